package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
)

// InPrivateNetNS makes the whole bench (its dev server, the sandboxes' networks and NAT
// rules, the host ends the network series talk to) run in a network namespace of its
// own (see network.InPrivateNetNS), after fetching the guest kernel into dataDir, where
// `fireworks dev --data-dir` looks for it, and installing the e2b SDK (both need the
// machine's network).
func InPrivateNetNS(ctx context.Context, dataDir string) (code int, again bool, err error) {
	return network.InPrivateNetNS(ctx, "FIREWORKS_BENCH_NETNS", func(ctx context.Context) error {
		dir := filepath.Join(dataDir, "assets")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("bench asset dir %s: %w", dir, err)
		}
		if _, err := assets.EnsureKernel(ctx, dir); err != nil {
			return fmt.Errorf("fetch the guest kernel into %s: %w", dir, err)
		}
		// The E2B rows' SDK comes from the npm registry, outside the namespace.
		if os.Getenv(e2bSDKEnv) == "" {
			sdk := filepath.Join(dataDir, "e2b-sdk")
			if err := installE2BSDK(ctx, sdk); err != nil {
				// The rows fail with this reason; the rest of the bench runs.
				os.Setenv(e2bSDKErrEnv, err.Error())
			} else {
				os.Setenv(e2bSDKEnv, sdk)
			}
		}
		return nil
	})
}
