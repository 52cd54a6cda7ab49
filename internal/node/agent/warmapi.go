package agent

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// TemplateInfo describes a template snapshot on this node.
type TemplateInfo struct {
	Key       string // hash of everything that makes the snapshot valid
	Image     string // the reference it was built for
	Digest    string // image digest
	VCPUs     int
	MemoryMiB int
	Dir       string
	SizeBytes int64         // disk space it takes (allocated blocks)
	Built     bool          // this call built it (false: it existed)
	BuildTime time.Duration // time to boot and save it, when Built
	LastUsed  time.Time
}

// PoolStatus describes one warm pool on this node.
type PoolStatus struct {
	Image     string
	Digest    string // "" until the image is pulled
	VCPUs     int
	MemoryMiB int
	Size, Max int    // configured
	Target    int    // what the autoscaler currently aims for (Size <= Target <= Max)
	Ready     int    // paused VMs waiting for a claim
	Filling   int    // VMs being restored
	Claims    int    // claims in the last minute
	Error     string // the last fill error, if the pool cannot be filled
	Local     bool   // configured by this node (--warm-pool), not by the cluster
}

// SetPools replaces the cluster's warm-pool configuration on this node (it comes with the
// assignments). Pools no longer listed are drained.
func (a *Agent) SetPools(pools []state.Pool) { a.pools.setPools(pools) }

// Pools reports this node's warm pools.
func (a *Agent) Pools() []PoolStatus { return a.pools.status() }

// Templates lists this node's template snapshots.
func (a *Agent) Templates() []TemplateInfo { return a.templates.list() }

// Warm lists image digests and references this node holds a template snapshot or a warm
// pool for, for the scheduler's locality ranking.
func (a *Agent) Warm() []string {
	set := append(a.templates.imageRefs(), a.pools.imageRefs()...)
	slices.Sort(set)
	set = slices.Compact(set)
	return slices.DeleteFunc(set, func(s string) bool { return s == "" })
}

// WarmImage pulls ref and builds its template snapshot for the default VM shape, if there
// is none yet (`fireworks image warm`).
func (a *Agent) WarmImage(ctx context.Context, ref string, opts image.PullOptions) (TemplateInfo, error) {
	img, err := a.images.Ensure(ctx, ref, opts)
	if err != nil {
		return TemplateInfo{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	disk, fs, err := a.images.RootDisk(ctx, img)
	if err != nil {
		return TemplateInfo{}, fmt.Errorf("build root disk for %s: %w", ref, err)
	}
	v, m := a.shape(0, 0)
	t, built, err := a.templates.get(ctx, a.vms.templateKeyFor(img.Digest, disk, fs, v, m, true), ref, disk, prefetchFor(img.Config))
	if err != nil {
		return TemplateInfo{}, err
	}
	defer a.templates.release(t)
	info := t.info()
	info.Built = built
	return info, nil
}

// wakeFill asks the fill loop for a step (a claim to refill, a slot wanted, new pools).
func (a *Agent) wakeFill() {
	select {
	case a.fillWake <- struct{}{}:
	default:
	}
}

// fillLoop keeps every pool at its target and every wanted restore slot launched, one VM
// at a time (pools first), until ctx ends.
func (a *Agent) fillLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		for ctx.Err() == nil && (a.pools.step(ctx) || a.slots.step(ctx)) {
		}
		select {
		case <-ctx.Done():
			return
		case <-a.fillWake:
		case <-t.C:
		}
	}
}
