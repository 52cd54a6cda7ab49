package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/assets"
)

// netnsEnv marks the copy of the bench that runs inside its own network namespace.
const netnsEnv = "FIREWORKS_BENCH_NETNS"

// InPrivateNetNS makes the whole bench (its dev server, the sandboxes' networks and NAT
// rules, the host ends the network series talk to) run in a network namespace of its
// own, so no address or rule lands on the machine's network and nothing is left there
// when it ends. Called in the machine's namespace, it fetches the guest kernel into
// dataDir (that needs the machine's network), runs this program again with the same
// arguments under `unshare --net`, and returns that run's exit code with again=true. In
// the re-run it brings lo up and returns again=false: the caller goes on measuring.
func InPrivateNetNS(ctx context.Context, dataDir string) (code int, again bool, err error) {
	if os.Getenv(netnsEnv) != "" {
		if out, err := exec.CommandContext(ctx, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return 1, true, fmt.Errorf("bring lo up in the bench's network namespace: %w: %s", err, out)
		}
		return 0, false, nil
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return 1, true, fmt.Errorf("unshare not found (util-linux; or pass -host-network): %w", err)
	}
	dir := filepath.Join(dataDir, "assets") // where `fireworks dev --data-dir` looks for it
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 1, true, fmt.Errorf("bench asset dir %s: %w", dir, err)
	}
	if _, err := assets.EnsureKernel(ctx, dir); err != nil {
		return 1, true, fmt.Errorf("fetch the guest kernel into %s: %w", dir, err)
	}
	self, err := os.Executable()
	if err != nil {
		return 1, true, fmt.Errorf("find the bench executable: %w", err)
	}
	cmd := exec.CommandContext(ctx, "unshare", append([]string{"--net", "--", self}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), netnsEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// On a signal the inner bench gets SIGTERM and stops its dev server (which removes its
	// VMs and their networks) before it exits.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = time.Minute
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, true, nil
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		return ee.ExitCode(), true, nil
	default:
		return 1, true, fmt.Errorf("run the bench in a private network namespace: %w", err)
	}
}
