package agent

import (
	"cmp"
	"fmt"
	"path"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/qemu"
)

// newDriver picks the VMM driver. QEMU is the only one that runs on every host; the
// accelerator was decided by vmm.DetectAccel.
func newDriver(c vmm.AccelChoice, limits vmm.Limits, cfg Config) (vmm.Driver, error) {
	// Every VMM jailed (its own user, namespaces, root and cgroups): QEMU parses what the
	// guest sends, so it is treated as the guest's. Each agent on a host (its data
	// directory) has a user range and a cgroup of its own.
	j := qemu.JailFor(cfg.DataDir)
	j.CgroupRoot, j.CgroupName = cfg.CgroupRoot, path.Join(cfg.CgroupParent, j.CgroupName)
	d, err := qemu.New(qemu.Config{Accel: c.Accel, Limits: limits, Logger: cfg.Logger, Jail: j, TCGCacheMiB: cmp.Or(cfg.TCGCacheMiB, DefaultTCGCacheMiB)})
	if err != nil {
		return nil, fmt.Errorf("start VMM driver: %w", err)
	}
	return d, nil
}

// DefaultTCGCacheMiB is each VM's TCG translation cache unless told otherwise. QEMU's
// default (1 GiB) lets an idle VM keep tens of MiB of translations it will not run
// again; see the density rows of make bench for what each size costs and saves.
const DefaultTCGCacheMiB = 1024
