package agent

import (
	"fmt"
	"log/slog"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/qemu"
)

// newDriver picks the VMM driver. QEMU is the only one that runs on every host; the
// accelerator was decided by vmm.DetectAccel.
func newDriver(c vmm.AccelChoice, limits vmm.Limits, dataDir string, log *slog.Logger) (vmm.Driver, error) {
	// Every VMM jailed (its own user, namespaces, root and cgroups): QEMU parses what the
	// guest sends, so it is treated as the guest's. Each agent on a host (its data
	// directory) has a user range and a cgroup of its own.
	d, err := qemu.New(qemu.Config{Accel: c.Accel, Limits: limits, Logger: log, Jail: qemu.JailFor(dataDir)})
	if err != nil {
		return nil, fmt.Errorf("start VMM driver: %w", err)
	}
	return d, nil
}
