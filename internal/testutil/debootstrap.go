package testutil

import (
	"context"

	"github.com/fireworks-sandbox/fireworks/internal/release/rootfs"
)

// Debootstrap builds a Debian minbase root filesystem in dir (rootfs.Debootstrap).
func Debootstrap(ctx context.Context, dir string, include ...string) error {
	return rootfs.Debootstrap(ctx, dir, include...)
}
