package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/assets"
)

// netnsEnv marks the copy of the test binary that runs inside its own network namespace.
const netnsEnv = "FIREWORKS_E2E_NETNS"

// inPrivateNetNS makes the whole e2e run (dev server, sandboxes' networks, NAT rules, the
// namespaces tests use as outside hosts) happen in a network namespace of its own, so no
// address or rule lands on the machine's own network. The first call, in the machine's
// namespace, fetches the guest kernel (that needs the machine's network), then re-runs
// the test binary under `unshare --net` and reports its exit code with again=true. In the
// re-run it brings lo up and returns again=false.
func inPrivateNetNS() (rc int, again bool) {
	if os.Getenv(netnsEnv) != "" {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: bring lo up in the private network namespace: %v %s\n", err, out)
			return 1, true
		}
		return 0, false
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: unshare not found (util-linux): the e2e tests run in a private network namespace")
		return 1, true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	if err := os.MkdirAll(assetCache(), 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1, true
	}
	if _, err := assets.EnsureKernel(ctx, assetCache()); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: fetch the guest kernel:", err)
		return 1, true
	}
	cmd := exec.Command("unshare", append([]string{"--net", "--", os.Args[0]}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), netnsEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), true
		}
		fmt.Fprintln(os.Stderr, "e2e: re-run in a private network namespace:", err)
		return 1, true
	}
	return 0, true
}
