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
// `fireworks dev --data-dir` looks for it (that needs the machine's network).
func InPrivateNetNS(ctx context.Context, dataDir string) (code int, again bool, err error) {
	return network.InPrivateNetNS(ctx, "FIREWORKS_BENCH_NETNS", func(ctx context.Context) error {
		dir := filepath.Join(dataDir, "assets")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("bench asset dir %s: %w", dir, err)
		}
		if _, err := assets.EnsureKernel(ctx, dir); err != nil {
			return fmt.Errorf("fetch the guest kernel into %s: %w", dir, err)
		}
		return nil
	})
}
