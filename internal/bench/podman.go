package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// KeyPodman is `podman run --rm` of the same image and command: the start a container
// user knows (a fresh container with its own network, namespaces and cgroup each time).
const KeyPodman = "podman"

// podmanStore runs podman with a private store under root, so the bench neither needs nor
// touches the machine's container storage. runc, not podman's default crun: crun refuses
// this machine's cgroup v1/v2 hybrid (see hybridCgroups). The network is podman's
// default for root (a bridge through CNI), as `podman run` gives it.
type podmanStore struct{ root string }

func (p podmanStore) cmd(ctx context.Context, args ...string) *exec.Cmd {
	base := []string{"--root", filepath.Join(p.root, "root"), "--runroot", filepath.Join(p.root, "run"),
		"--tmpdir", filepath.Join(p.root, "tmp"), "--volumepath", filepath.Join(p.root, "vol"),
		"--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"}
	return exec.CommandContext(ctx, "podman", append(base, args...)...)
}

// measurePodman measures `podman run --rm IMAGE COMMAND` on the bench image (from its
// OCI layout ociDir), after one unmeasured run.
func measurePodman(ctx context.Context, cfg Config, ociDir string, rep *Report) error {
	if _, err := exec.LookPath("podman"); err != nil {
		return fmt.Errorf("podman not found (scripts/install-deps.sh installs it; or pass -skip-crun): %w", err)
	}
	// Podman refuses a run root path longer than 50 characters: a short temp dir.
	root, err := os.MkdirTemp("", "fwbp")
	if err != nil {
		return err
	}
	p := podmanStore{root: root}
	defer func() {
		_ = p.cmd(context.WithoutCancel(ctx), "rm", "-af", "-t0").Run()
		_ = p.cmd(context.WithoutCancel(ctx), "rmi", "-af").Run()
		_ = exec.Command("umount", "-R", filepath.Join(root, "root", "overlay")).Run()
		_ = os.RemoveAll(root)
	}()
	// Podman names the image after the layout's path, which must be lowercase.
	link := filepath.Join(root, "img")
	if err := os.Symlink(ociDir, link); err != nil {
		return err
	}
	out, err := p.cmd(ctx, "pull", "-q", "oci:"+link).CombinedOutput()
	if err != nil {
		return fmt.Errorf("podman pull oci:%s: %w: %s", ociDir, err, out)
	}
	f := strings.Fields(string(out))
	if len(f) == 0 {
		return fmt.Errorf("podman pull oci:%s printed no image ID", ociDir)
	}
	imageID := f[len(f)-1]
	// The row names the runtime and network it ran with: checked, not assumed.
	info, err := p.cmd(ctx, "info", "--format", "{{.Host.OCIRuntime.Name}} {{.Host.NetworkBackend}} {{.Store.GraphDriverName}}").Output()
	if err != nil {
		return fmt.Errorf("podman info: %w", err)
	}
	parts := strings.Fields(string(info))
	if len(parts) != 3 || parts[0] != "runc" {
		return fmt.Errorf("podman runs with %q, want runc", strings.TrimSpace(string(info)))
	}
	// The limits are the ones a shell here has: podman's defaults are above the hard
	// limits a Go parent leaves (runc then fails setting them).
	run := func() *exec.Cmd {
		return p.cmd(ctx, append([]string{"run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", imageID}, cfg.Command...)...)
	}
	if _, _, err := timeCommand(ctx, run()); err != nil {
		return fmt.Errorf("warm-up podman run: %w", err)
	}
	name := fmt.Sprintf("podman run --rm (%s, %s net, %s)", parts[0], parts[1], parts[2])
	s, err := measure(ctx, cfg, KeyPodman, name, func() (sample, error) {
		first, exit, err := timeCommand(ctx, run())
		return sample{first: first, exit: exit}, err
	})
	if err != nil {
		return err
	}
	rep.Series = append(rep.Series, s)
	return nil
}
