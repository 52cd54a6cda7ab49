package network

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// InPrivateNetNS runs the calling program in a network namespace of its own, so nothing
// it makes (sandbox networks, NAT rules, test "hosts") lands on the machine's network. In
// the machine's namespace it calls prepare (for what needs the machine's network, such as
// fetching the guest kernel), runs this program again with the same arguments under
// `unshare --net` with env var marker set, and returns that run's exit code with
// again=true. In the re-run it brings lo up and returns again=false: the caller goes on.
func InPrivateNetNS(ctx context.Context, marker string, prepare func(context.Context) error) (code int, again bool, err error) {
	if os.Getenv(marker) != "" {
		if out, err := exec.CommandContext(ctx, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return 1, true, fmt.Errorf("bring lo up in the private network namespace: %w: %s", err, out)
		}
		return 0, false, nil
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return 1, true, fmt.Errorf("unshare not found (util-linux): %w", err)
	}
	if err := prepare(ctx); err != nil {
		return 1, true, err
	}
	self, err := os.Executable()
	if err != nil {
		return 1, true, fmt.Errorf("find this executable: %w", err)
	}
	cmd := exec.CommandContext(ctx, "unshare", append([]string{"--net", "--", self}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), marker+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// On cancellation the inner run gets SIGTERM, so it can stop what it started (a dev
	// server removes its VMs and their networks) before it exits.
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
		return 1, true, fmt.Errorf("run in a private network namespace: %w", err)
	}
}
