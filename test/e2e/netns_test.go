package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
)

// debianRootEnv names the Debian minbase tree the image tests import (made by the outer
// run with debootstrap, which needs the machine's network). Set it by hand to an existing
// tree to skip the debootstrap while iterating on one test.
const debianRootEnv = "FIREWORKS_TEST_DEBIAN_ROOT"

// debianPackages are added to minbase: ping (iputils-ping) carries a file capability
// (cap_net_raw, set by its postinst with setcap from libcap2-bin), the real-world case of
// security.capability xattrs in an image.
var debianPackages = []string{"libcap2-bin", "iputils-ping"}

// inPrivateNetNS makes the whole e2e run (dev server, sandboxes' networks, NAT rules, the
// namespaces tests use as outside hosts) happen in a network namespace of its own, so no
// address or rule lands on the machine's own network (see network.InPrivateNetNS). What
// needs the machine's network is done first, in the machine's namespace and at the same
// time: the guest kernel is fetched and a Debian root filesystem is bootstrapped.
func inPrivateNetNS() (rc int, again bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	var tmp string
	defer func() {
		if tmp != "" {
			_ = os.RemoveAll(tmp)
		}
	}()
	rc, again, err := network.InPrivateNetNS(ctx, "FIREWORKS_E2E_NETNS", func(ctx context.Context) error {
		if err := os.MkdirAll(assetCache(), 0o755); err != nil {
			return err
		}
		var wg sync.WaitGroup
		var kerr, derr error
		wg.Go(func() { _, kerr = assets.EnsureKernel(ctx, assetCache()) })
		if os.Getenv(debianRootEnv) == "" {
			var err error
			if tmp, err = os.MkdirTemp("", "fwe2e-debian"); err != nil {
				return err
			}
			root := filepath.Join(tmp, "root")
			start := time.Now()
			wg.Go(func() {
				if derr = testutil.Debootstrap(ctx, root, debianPackages...); derr == nil {
					fmt.Fprintf(os.Stderr, "e2e: Debian minbase root bootstrapped in %s\n", time.Since(start).Round(time.Second))
				}
			})
			os.Setenv(debianRootEnv, root)
		}
		// The Kubernetes tools build from the Go module proxy (cached between runs).
		var kuberr error
		if os.Getenv(kubeToolsEnv) == "" {
			wg.Go(func() {
				start := time.Now()
				dir, err := kubetest.ToolsDir(ctx, "../..")
				if err != nil {
					kuberr = err
					return
				}
				fmt.Fprintf(os.Stderr, "e2e: Kubernetes tools ready in %s (%s)\n", time.Since(start).Round(time.Second), dir)
				os.Setenv(kubeToolsEnv, dir)
			})
		}
		// The node image (make image's), for the chart on a real kubelet: its base root
		// comes from the Debian mirror (cached between runs) and its kernel seed from apt.
		if os.Getenv(nodeImageEnv) == "" {
			if tmp == "" {
				var err error
				if tmp, err = os.MkdirTemp("", "fwe2e-debian"); err != nil {
					return err
				}
			}
			dir := filepath.Join(tmp, "node-image")
			wg.Go(func() {
				start := time.Now()
				path, err := buildNodeImage(ctx, dir)
				if err != nil {
					os.Setenv(nodeImageErrEnv, err.Error())
					return
				}
				fmt.Fprintf(os.Stderr, "e2e: node image built in %s\n", time.Since(start).Round(time.Second))
				os.Setenv(nodeImageEnv, path)
			})
		}
		var serr error
		if os.Getenv(e2bSDKEnv) == "" {
			if _, err := exec.LookPath("npm"); err == nil {
				if tmp == "" {
					var err error
					if tmp, err = os.MkdirTemp("", "fwe2e-debian"); err != nil {
						return err
					}
				}
				dir := filepath.Join(tmp, "e2b-sdk")
				wg.Go(func() { serr = installE2BSDK(ctx, dir) })
				os.Setenv(e2bSDKEnv, dir)
			}
		}
		wg.Wait()
		if kerr != nil {
			return kerr
		}
		if serr != nil {
			return fmt.Errorf("install the e2b SDK (npm install e2b@%s): %w", e2bSDKVersion, serr)
		}
		if derr != nil {
			return fmt.Errorf("bootstrap the Debian image root: %w", derr)
		}
		if kuberr != nil {
			// Only the Kubernetes tests need them: they fail (or skip, outside CI) naming
			// this, and the rest run.
			os.Setenv(kubeToolsErrEnv, kuberr.Error())
		}
		return nil
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
	}
	return rc, again
}
