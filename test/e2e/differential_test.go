package e2e

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// Docker semantics, checked against a real container runtime: the same cases run through
// Podman (with runc, as root) and through Fireworks, and their output and exit code must
// match. Where Fireworks differs on purpose, the case says what each gives, so the table
// in the README ("Differences from Docker") stays true.

// podman runs a podman command with a private store, so it neither needs nor touches the
// machine's container storage. crun (Podman's default here) refuses this machine's cgroup
// layout; runc does not.
type podman struct{ root string }

func (p podman) cmd(ctx context.Context, args ...string) *exec.Cmd {
	// Everything podman keeps goes under p.root: its store, run state, engine temp dir
	// (the default is the host-wide /run/libpod), networks and volumes.
	base := []string{"--root", filepath.Join(p.root, "root"), "--runroot", filepath.Join(p.root, "run"),
		"--tmpdir", filepath.Join(p.root, "tmp"), "--network-config-dir", filepath.Join(p.root, "net"),
		"--volumepath", filepath.Join(p.root, "vol"),
		"--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"}
	return exec.CommandContext(ctx, "podman", append(base, args...)...)
}

type outcome struct {
	stdout string
	code   int
}

func (p podman) run(t *testing.T, env []string, args ...string) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	full := append([]string{"run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}, args...)
	cmd := p.cmd(ctx, full...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return outcome{out.String(), 0}
	case errors.As(err, &ee):
		return outcome{out.String(), ee.ExitCode()}
	}
	t.Fatalf("podman %v: %v: %s", full, err, errb.String())
	return outcome{}
}

func TestDifferentialAgainstPodman(t *testing.T) {
	need(t)
	for _, tool := range []string{"podman", "runc"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found (scripts/install-deps.sh installs podman and runc)", tool)
		}
	}
	// Podman refuses a run root path longer than 50 characters: no t.TempDir() here.
	root, err := os.MkdirTemp("", "fwpm")
	if err != nil {
		t.Fatal(err)
	}
	p := podman{root: root}
	defer os.RemoveAll(root)
	defer func() {
		// Not `podman system reset`: it also clears host-wide state outside --root. vfs
		// layers are plain directories, so removing the images and the root is enough.
		_ = p.cmd(context.Background(), "rm", "-af", "-t0").Run()
		_ = p.cmd(context.Background(), "rmi", "-af").Run()
	}()

	// plain: busybox whose WorkingDir is /root (0700); ep: with an Entrypoint and Cmd.
	images := map[string]struct {
		opts []testimage.Option
		pm   string // podman's image ID
	}{
		"plain": {opts: []testimage.Option{testimage.Workdir("/root")}},
		"ep":    {opts: []testimage.Option{testimage.Entrypoint("/bin/echo", "ep"), testimage.Cmd("default")}},
	}
	for name, im := range images {
		img := testimage.Busybox(t, im.opts...)
		// Podman names a layout's image after its path, which must be lowercase.
		dir := filepath.Join(root, "img-"+name)
		testimage.WriteOCILayout(t, dir, img, "")
		out, err := p.cmd(context.Background(), "pull", "-q", "oci:"+dir).CombinedOutput()
		if err != nil {
			t.Fatalf("podman pull oci:%s: %v: %s", dir, err, out)
		}
		lines := strings.Fields(string(out))
		im.pm = lines[len(lines)-1]
		images[name] = im
		testimage.Push(t, world.registry, "diff-"+name+":latest", img)
	}

	sh := func(script string) []string { return []string{"sh", "-c", script} }
	ids := `id -u; id -g; id -G; pwd`
	cases := []struct {
		name  string
		flags []string
		image string
		cmd   []string
		// Set for a deliberate difference: what each gives (the README lists them).
		podman, fireworks *outcome
	}{
		{name: "default user and workdir", image: "plain", cmd: sh(ids + `; echo $HOME`)},
		{name: "-u name", flags: []string{"-u", "app"}, image: "plain", cmd: sh(ids + `; echo $HOME`)},
		{name: "-u name without home", flags: []string{"-u", "nobody"}, image: "plain", cmd: sh(ids + `; echo $HOME`)},
		{name: "-u uid with passwd entry", flags: []string{"-u", "1000"}, image: "plain", cmd: sh(ids + `; echo $HOME`)},
		{name: "-u uid without passwd entry", flags: []string{"-u", "1234"}, image: "plain", cmd: sh(ids)},
		{name: "-u uid:gid", flags: []string{"-u", "1000:1000"}, image: "plain", cmd: sh(ids)},
		{name: "-u uid:gid -w /root (0700)", flags: []string{"-u", "1234:5678", "-w", "/root"}, image: "plain", cmd: []string{"/bin/sh", "-c", ids}},
		{name: "-u name -w unreadable", flags: []string{"-u", "nobody", "-w", "/root"}, image: "plain",
			cmd: sh(`pwd; ls . >/dev/null 2>&1 || echo cannot-list`)},
		{name: "-w existing", flags: []string{"-w", "/tmp"}, image: "plain", cmd: []string{"pwd"}},
		{name: "-e override", flags: []string{"-e", "FOO=override"}, image: "plain", cmd: sh(`echo $FOO`)},
		{name: "-e pass-through", flags: []string{"-e", "FW_PASSED", "-e", "NEW=1"}, image: "plain", cmd: sh(`echo $FW_PASSED $NEW $FOO`)},
		{name: "PATH", image: "plain", cmd: sh(`echo $PATH`)},
		{name: "umask", image: "plain", cmd: sh(`umask`)},
		{name: "ulimit nofile (soft)", image: "plain", cmd: sh(`ulimit -n`)},
		{name: "image entrypoint and cmd", image: "ep"},
		{name: "image entrypoint, args replace cmd", image: "ep", cmd: []string{"x", "y"}},
		{name: "--entrypoint without args drops cmd", flags: []string{"--entrypoint", "/bin/pwd"}, image: "ep"},
		{name: "--entrypoint with args", flags: []string{"--entrypoint", "/bin/echo"}, image: "ep", cmd: []string{"a", "b"}},
		{name: "exit code", image: "plain", cmd: sh(`exit 3`)},
		{name: "false", image: "plain", cmd: []string{"false"}},
		{name: "command not found", image: "plain", cmd: []string{"no-such-command"}},
		{name: "command not executable", image: "plain", cmd: []string{"/bin/notexec"}},
		{name: "child killed by a signal", image: "plain", cmd: sh(`sh -c 'kill -TERM $$'; echo $?; sh -c 'kill -KILL $$'; echo $?`)},
		{name: "stdin closed without -i", image: "plain", cmd: sh(`read x; echo read:$?; cat; echo cat:$?`)},

		// Deliberate differences.
		{name: "the command is not PID 1", image: "plain", cmd: sh(`kill -TERM $$`),
			podman: &outcome{"", 0}, fireworks: &outcome{"", 143}},
		{name: "-w missing is created", flags: []string{"-w", "/missing/dir"}, image: "plain", cmd: []string{"pwd"},
			podman: &outcome{"", 126}, fireworks: &outcome{"/missing/dir\n", 0}},
		{name: "HOME of a uid without passwd entry", flags: []string{"-u", "1234"}, image: "plain", cmd: sh(`echo $HOME`),
			podman: &outcome{"/root\n", 0}, fireworks: &outcome{"/\n", 0}},
		{name: "unknown user", flags: []string{"-u", "nosuchuser"}, image: "plain", cmd: []string{"true"},
			podman: &outcome{"", 126}, fireworks: &outcome{"", 125}},
	}
	env := []string{"FW_PASSED=passed"}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			im := images[c.image]
			pargs := append(append(append([]string{}, c.flags...), im.pm), c.cmd...)
			got := p.run(t, env, pargs...)
			fargs := append(append([]string{"run"}, c.flags...), image("diff-"+c.image+":latest"))
			if len(c.cmd) > 0 {
				fargs = append(append(fargs, "--"), c.cmd...)
			}
			r := world.cliEnv(context.Background(), env, nil, fargs...)
			fw := outcome{r.stdout, r.code}
			switch {
			case c.podman == nil && got.stdout == "" && got.code == 0:
				t.Errorf("podman %v printed nothing: the case compares nothing", pargs)
			case c.podman == nil && fw != got:
				t.Errorf("fireworks %v: %q exit %d (stderr %q)\npodman  %v: %q exit %d", fargs, fw.stdout, fw.code, r.stderr, pargs, got.stdout, got.code)
			case c.podman != nil && (got != *c.podman || fw != *c.fireworks):
				t.Errorf("deliberate difference changed:\nfireworks %v: %q exit %d (want %q exit %d; stderr %q)\npodman  %v: %q exit %d (want %q exit %d)",
					fargs, fw.stdout, fw.code, c.fireworks.stdout, c.fireworks.code, r.stderr, pargs, got.stdout, got.code, c.podman.stdout, c.podman.code)
			}
		})
	}
}
