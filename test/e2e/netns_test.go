package e2e

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/assets"
	"github.com/fireworks-sandbox/fireworks/internal/network"
)

// inPrivateNetNS makes the whole e2e run (dev server, sandboxes' networks, NAT rules, the
// namespaces tests use as outside hosts) happen in a network namespace of its own, so no
// address or rule lands on the machine's own network (see network.InPrivateNetNS). The
// guest kernel is fetched first, in the machine's namespace.
func inPrivateNetNS() (rc int, again bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	rc, again, err := network.InPrivateNetNS(ctx, "FIREWORKS_E2E_NETNS", func(ctx context.Context) error {
		if err := os.MkdirAll(assetCache(), 0o755); err != nil {
			return err
		}
		_, err := assets.EnsureKernel(ctx, assetCache())
		return err
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
	}
	return rc, again
}
