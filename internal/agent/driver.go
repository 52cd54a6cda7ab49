package agent

import (
	"fmt"
	"log/slog"

	"github.com/fireworks-sandbox/fireworks/internal/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/vmm/qemu"
)

// newDriver picks the VMM driver. QEMU is the only one that runs on every host; the
// accelerator was decided by vmm.DetectAccel.
func newDriver(c vmm.AccelChoice, limits vmm.Limits, log *slog.Logger) (vmm.Driver, error) {
	d, err := qemu.New(qemu.Config{Accel: c.Accel, Limits: limits, Logger: log})
	if err != nil {
		return nil, fmt.Errorf("start VMM driver: %w", err)
	}
	return d, nil
}
