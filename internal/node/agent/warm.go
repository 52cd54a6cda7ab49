package agent

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Warm pools: per image and shape, the node keeps VMs restored from the template snapshot,
// root filesystem already mounted, paused. A start claims one: resume, give it the
// sandbox's identity (hostname, env, clock, fresh entropy), exec. One goroutine (the fill
// loop) fills and trims pools and launches restore slots, one VM at a time so that refills
// never crowd out the starts they exist to speed up.

const (
	// claimWindow is how far back the autoscaler looks at claims.
	claimWindow = time.Minute
	// burstWindow: the pool aims to absorb the largest burst of claims seen in any
	// burstWindow within claimWindow.
	burstWindow = 10 * time.Second
	// fillRetry is how long a pool waits after a failed fill.
	fillRetry = 10 * time.Second
)

// warmPools owns the node's warm pools: their configuration (the cluster's, over the
// node's own --warm-pool ones), their ready VMs, the autoscaler's record of claims, and
// the capacity their VMs take (only what placed sandboxes leave free).
type warmPools struct {
	static []state.Pool // the node's own (--warm-pool)
	// pullOptions and userRootDisk are the agent's for users' images: managed pools'
	// images are pulled and built as theirs, charged to PoolOwner(manager).
	pullOptions  func(insecure []string, private bool, owner string) image.PullOptions
	userRootDisk func(ctx context.Context, owner string, img *image.Image) (string, string, error)
	templates    *templates // a pool's VMs restore from its image's template
	vms          *vms
	images       *image.Store
	pullTimeout  time.Duration
	// shape fills in the node's default shape; sandboxUsage is what the sandboxes live
	// on the node reserve, of maxVCPUs and maxMemoryMiB (pools fill only what they leave).
	shape                  func(vcpus, memMiB int) (int, int)
	sandboxUsage           func() (vcpus, memMiB int)
	maxVCPUs, maxMemoryMiB int
	wake                   func() // asks the fill loop for a step
	log                    *slog.Logger

	mu    sync.Mutex
	pools map[string]*pool // by poolID
}

// pool is the node's side of one configured warm pool.
type pool struct {
	cfg   state.Pool
	local bool // configured by this node (--warm-pool), not by the cluster
	vcpus int
	mem   int
	// Resolved from cfg.Image by the loop.
	digest, rootDisk, rootFS string
	prefetch                 []string
	key                      string // template key hash
	ready                    []*poolVM
	filling                  int
	claims                   []time.Time
	lastErr                  string
	limited                  string // why the pool is below target for want of capacity
	retryAt                  time.Time
}

// spareVM is a VM the node made ahead of a start, in a run directory of its own, that a
// start may take over (run/<id> then links to dir).
type spareVM struct {
	dir string
	h   *vmHandle
}

// claim makes it the sandbox's whose run directory is runDir (a link to v.dir, so
// adoption, inspect and removal find it by the sandbox's ID). On error it is destroyed.
func (v *spareVM) claim(runDir string) error {
	if err := os.Symlink(filepath.Base(v.dir), runDir); err != nil {
		v.destroy()
		return fmt.Errorf("take over VM in %s: %w", v.dir, err)
	}
	return nil
}

// destroy ends the VM and removes its run directory.
func (v *spareVM) destroy() {
	v.h.undo()
	_ = os.RemoveAll(v.dir)
}

// poolVM is a restored, set-up, paused VM waiting for a claim.
type poolVM struct {
	spareVM
	key string // template key hash
}

func poolID(image string, vcpus, mem int) string {
	return image + "|" + strconv.Itoa(vcpus) + "|" + strconv.Itoa(mem)
}

// setPools applies the configured pools: the API's (replicated state) over the node's own
// static ones for the same image and shape.
func (wp *warmPools) setPools(api []state.Pool) {
	want := map[string]state.Pool{}
	local := map[string]bool{}
	for i, src := range [][]state.Pool{wp.static, api} {
		for _, c := range src {
			v, m := wp.shape(c.VCPUs, c.MemoryMiB)
			want[poolID(c.Image, v, m)] = c
			local[poolID(c.Image, v, m)] = i == 0
		}
	}
	var drop []*poolVM
	wp.mu.Lock()
	for id, p := range wp.pools {
		if _, ok := want[id]; !ok {
			drop = append(drop, p.ready...)
			delete(wp.pools, id)
		}
	}
	for id, c := range want {
		if p := wp.pools[id]; p != nil {
			p.cfg, p.local = c, local[id]
			continue
		}
		v, m := wp.shape(c.VCPUs, c.MemoryMiB)
		wp.pools[id] = &pool{cfg: c, local: local[id], vcpus: v, mem: m}
	}
	wp.mu.Unlock()
	for _, v := range drop {
		v.destroy()
	}
	wp.wake()
}

// target is the autoscaler: the largest burst of claims in any burstWindow of the last
// claimWindow, at least Size and at most Max.
func (p *pool) target(now time.Time) int {
	p.claims = slices.DeleteFunc(p.claims, func(t time.Time) bool { return now.Sub(t) > claimWindow })
	burst := 0
	for i, t := range p.claims {
		n := 0
		for _, u := range p.claims[i:] {
			if u.Sub(t) < burstWindow {
				n++
			}
		}
		burst = max(burst, n)
	}
	lo, hi := p.cfg.Size, p.cfg.Max
	if hi < lo {
		hi = lo
	}
	return min(max(burst, lo), hi, state.MaxPoolSize)
}

// step does one unit of pool work and reports whether there may be more.
func (wp *warmPools) step(ctx context.Context) bool {
	now := time.Now()
	var (
		dead, extra []*poolVM
		fill        *pool
		resolve     *pool
	)
	wp.mu.Lock()
	ids := slices.Sorted(maps.Keys(wp.pools))
	for _, id := range ids {
		p := wp.pools[id]
		p.ready = slices.DeleteFunc(p.ready, func(v *poolVM) bool {
			if isClosed(v.h.vm.Wait()) {
				dead = append(dead, v)
				return true
			}
			return false
		})
		tgt := p.target(now)
		for len(p.ready) > tgt {
			extra = append(extra, p.ready[0])
			p.ready = p.ready[1:]
		}
		if now.Before(p.retryAt) {
			continue
		}
		if p.key == "" {
			if resolve == nil && tgt > 0 {
				resolve = p
			}
			continue
		}
		if len(p.ready)+p.filling >= tgt {
			p.limited = ""
			continue
		}
		if !wp.fitsLocked(p.vcpus, p.mem) {
			p.limited = fmt.Sprintf("node memory: %d of %d wanted (pool VMs only use memory that sandboxes leave free)", len(p.ready)+p.filling, tgt)
			continue
		}
		p.limited = ""
		if fill == nil {
			fill = p
		}
	}
	if resolve != nil {
		fill = nil // one unit of work per step: resolving first
	}
	if fill != nil {
		fill.filling++
	}
	wp.mu.Unlock()
	for _, v := range append(dead, extra...) {
		v.destroy()
	}
	switch {
	case resolve != nil:
		wp.resolve(ctx, resolve)
		return true
	case fill != nil:
		v, err := wp.fill(ctx, fill)
		wp.mu.Lock()
		fill.filling--
		stale := false
		if err != nil {
			fill.lastErr = err.Error()
			fill.retryAt = time.Now().Add(fillRetry)
		} else {
			fill.lastErr = ""
			switch {
			case wp.pools[poolID(fill.cfg.Image, fill.vcpus, fill.mem)] != fill:
				// The pool went away while it was filled.
			case v.key != fill.key:
				// The image's root disk was rebuilt (or the tag moved) since the pool
				// was resolved: resolve it again; VMs of the old key go.
				stale = true
				fill.key = ""
				extra = append(extra[:0], fill.ready...)
				fill.ready = nil
			default:
				fill.ready = append(fill.ready, v)
				v = nil
			}
		}
		wp.mu.Unlock()
		if err != nil {
			wp.log.Warn("warm pool fill failed", "image", fill.cfg.Image, "err", err)
		}
		if stale {
			wp.log.Info("warm pool's image changed under it; resolving it again", "image", fill.cfg.Image)
			for _, old := range extra {
				old.destroy()
			}
		}
		if v != nil {
			v.destroy()
		}
		return err == nil
	}
	return false
}

// PoolOwner is whom a managed pool's images are charged to on a node: a share of the
// image disk of its own, as a token's (--image-mib-per-token), which no token's ID is.
func PoolOwner(manager string) string { return "pools:" + manager }

// resolve pulls a pool's image and builds its root disk, which name the template its VMs
// come from.
func (wp *warmPools) resolve(ctx context.Context, p *pool) {
	ctx, cancel := context.WithTimeout(ctx, wp.pullTimeout)
	defer cancel()
	opts := image.PullOptions{InsecureRegistries: p.cfg.InsecureRegistries}
	rootDisk := func(ctx context.Context, img *image.Image) (string, string, error) {
		return wp.images.RootDisk(ctx, img)
	}
	if m := p.cfg.ManagedBy; m != "" {
		// Kept for others (a Kubernetes namespace's SandboxWarmPool): its image is
		// pulled as theirs would be, through the registry guard, and what the images of
		// one manager's pools take on the node is bounded as one token's are.
		owner := PoolOwner(m)
		opts = wp.pullOptions(p.cfg.InsecureRegistries, false, owner)
		rootDisk = func(ctx context.Context, img *image.Image) (string, string, error) {
			return wp.userRootDisk(ctx, owner, img)
		}
	}
	img, err := wp.images.Ensure(ctx, p.cfg.Image, opts)
	var disk, fs string
	if err == nil {
		disk, fs, err = rootDisk(ctx, img)
	}
	wp.mu.Lock()
	defer wp.mu.Unlock()
	if err != nil {
		p.lastErr = err.Error() // it names the image
		p.retryAt = time.Now().Add(fillRetry)
		wp.log.Warn("warm pool image", "image", p.cfg.Image, "err", err)
		return
	}
	p.digest, p.rootDisk, p.rootFS, p.prefetch = img.Digest, disk, fs, prefetchFor(img.Config)
	p.key = wp.vms.templateKeyFor(img.Digest, disk, fs, p.vcpus, p.mem, true).hash()
}

// fill restores one VM from the pool's template, sets up its root filesystem and pauses it.
func (wp *warmPools) fill(ctx context.Context, p *pool) (*poolVM, error) {
	wp.mu.Lock()
	digest, disk, fs, vcpus, mem, ref, pre := p.digest, p.rootDisk, p.rootFS, p.vcpus, p.mem, p.cfg.Image, p.prefetch
	wp.mu.Unlock()
	key := wp.vms.templateKeyFor(digest, disk, fs, vcpus, mem, true)
	t, _, err := wp.templates.get(ctx, key, ref, disk, pre)
	if err != nil {
		return nil, err
	}
	defer wp.templates.release(t)
	dir := filepath.Join(wp.vms.runRoot, "w-"+randHex(6))
	r, err := wp.vms.startVM(ctx, vmInput{id: filepath.Base(dir), dir: dir, rootDisk: disk, vcpus: vcpus, mem: mem, tmpl: t, net: true, closedNet: true})
	if err != nil {
		_ = os.RemoveAll(dir)
		if ctx.Err() == nil {
			wp.templates.invalidate(t, err)
		}
		return nil, err
	}
	v := &poolVM{spareVM: spareVM{dir: dir, h: r}, key: key.hash()}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// Run two short commands so that the paths every start takes (exec, process exit,
	// output) are translated before a claim: under TCG the first run of guest code is
	// slow. They run with an identity and entropy of this VM's own (never the template's
	// shared random state), and nothing they leave behind survives: every process but
	// init is killed before the pause. The claim reseeds again.
	err = r.guest.Identity(ctx, proto.Identity{Hostname: "warm", TimeUnixNano: time.Now().UnixNano(), Entropy: entropy()})
	if err == nil {
		err = warmUp(ctx, r.guest)
	}
	if err == nil {
		err = r.guest.KillAll(ctx)
	}
	if err == nil {
		if pz, ok := r.vm.(vmm.Pauser); ok {
			err = pz.Pause(ctx)
		}
	}
	if err != nil {
		v.destroy()
		return nil, fmt.Errorf("prepare warm VM: %w", err)
	}
	return v, nil
}

// claim takes a ready pool VM for a template key, if there is one. The caller owns it.
// The claim counts for the autoscaler of the pool it came from (or, when no pool had a
// VM, of the first pool for the key).
func (wp *warmPools) claim(key string) *poolVM {
	wp.mu.Lock()
	defer wp.mu.Unlock()
	var first *pool
	for _, id := range slices.Sorted(maps.Keys(wp.pools)) {
		p := wp.pools[id]
		if p.key != key {
			continue
		}
		if first == nil {
			first = p
		}
		for len(p.ready) > 0 {
			v := p.ready[0]
			p.ready = p.ready[1:]
			if isClosed(v.h.vm.Wait()) {
				go v.destroy()
				continue
			}
			p.claims = append(p.claims, time.Now())
			wp.wake() // refill
			return v
		}
	}
	if first != nil {
		first.claims = append(first.claims, time.Now())
		wp.wake()
	}
	return nil
}

// templateGone ends the ready VMs restored from a template that was dropped (its image
// was removed, or it does not restore) and has their pools resolve their image again.
func (wp *warmPools) templateGone(hash string) {
	var drop []*poolVM
	wp.mu.Lock()
	for _, p := range wp.pools {
		if p.key != hash {
			continue
		}
		drop = append(drop, p.ready...)
		p.ready, p.key = nil, ""
	}
	wp.mu.Unlock()
	for _, v := range drop {
		v.destroy()
	}
	if len(drop) > 0 {
		wp.log.Info("ended warm VMs of a template that went", "key", hash, "vms", len(drop))
	}
	wp.wake()
}

// templateKeys lists the templates the pools draw on.
func (wp *warmPools) templateKeys() map[string]bool {
	wp.mu.Lock()
	defer wp.mu.Unlock()
	out := map[string]bool{}
	for _, p := range wp.pools {
		if p.key != "" {
			out[p.key] = true
		}
	}
	return out
}

// needsImage says whether a pool is made from the image with digest or, with kept, is
// not resolved yet (it may be this image). See Agent.imageNeeded.
func (wp *warmPools) needsImage(digest string, kept bool) bool {
	wp.mu.Lock()
	defer wp.mu.Unlock()
	for _, p := range wp.pools {
		if p.digest == digest || (kept && p.digest == "") {
			return true
		}
	}
	return false
}

// fitsLocked reports whether one more pool VM of this shape fits the node's memory beside
// the sandboxes and the pool VMs already there: pools only use memory that placed
// sandboxes leave free. A ready pool VM is paused: it holds memory but takes no CPU time,
// so vCPUs are not counted (the scheduler overcommits them anyway).
func (wp *warmPools) fitsLocked(_, mem int) bool {
	_, usedM := wp.sandboxUsage()
	for _, p := range wp.pools {
		usedM += (len(p.ready) + p.filling) * p.mem
	}
	return usedM+mem <= wp.maxMemoryMiB
}

// makeRoom ends ready pool VMs until a sandbox of this shape fits beside the others: a
// placed sandbox always wins over a warm VM.
func (wp *warmPools) makeRoom() {
	var drop []*poolVM
	wp.mu.Lock()
	_, usedM := wp.sandboxUsage()
	poolM := 0
	for _, p := range wp.pools {
		poolM += (len(p.ready) + p.filling) * p.mem
	}
	for _, id := range slices.Sorted(maps.Keys(wp.pools)) {
		p := wp.pools[id]
		for len(p.ready) > 0 && usedM+poolM > wp.maxMemoryMiB {
			drop = append(drop, p.ready[0])
			p.ready = p.ready[1:]
			poolM -= p.mem
		}
	}
	wp.mu.Unlock()
	for _, v := range drop {
		wp.log.Info("ending a warm VM to make room for a sandbox", "dir", v.dir)
		v.destroy()
	}
}

func (wp *warmPools) status() []PoolStatus {
	wp.mu.Lock()
	defer wp.mu.Unlock()
	now := time.Now()
	var out []PoolStatus
	for _, id := range slices.Sorted(maps.Keys(wp.pools)) {
		p := wp.pools[id]
		out = append(out, PoolStatus{Image: p.cfg.Image, Digest: p.digest, VCPUs: p.vcpus, MemoryMiB: p.mem,
			Size: p.cfg.Size, Max: max(p.cfg.Max, p.cfg.Size), Target: p.target(now), Ready: len(p.ready), Filling: p.filling,
			Claims: len(p.claims), Error: cmp.Or(p.lastErr, p.limited), Local: p.local})
	}
	return out
}

// imageRefs lists the references and digests of images with a ready pool VM.
func (wp *warmPools) imageRefs() []string {
	wp.mu.Lock()
	defer wp.mu.Unlock()
	var out []string
	for _, p := range wp.pools {
		if len(p.ready) > 0 {
			out = append(out, p.cfg.Image, p.digest)
		}
	}
	return out
}

// close ends every pool VM (they are cheap to make again; a restarted agent sweeps any it
// could not end).
func (wp *warmPools) close() {
	wp.mu.Lock()
	var vms []*poolVM
	for _, p := range wp.pools {
		vms = append(vms, p.ready...)
		p.ready = nil
	}
	wp.mu.Unlock()
	for _, v := range vms {
		v.destroy()
	}
}

// warmUp runs two short commands in the guest and drains them, so that exec, process exit
// and the output path (pipe, frames, virtio-serial) have all run once in this QEMU process.
func warmUp(ctx context.Context, g *client.Client) error {
	for _, argv := range [][]string{{"true"}, {"echo", "fireworks-warm-up"}} {
		s, err := g.Exec(ctx, proto.ExecRequest{Argv: argv})
		if err != nil {
			return fmt.Errorf("warm-up exec: %w", err)
		}
		go func() { _, _ = io.Copy(io.Discard, s.Stderr()) }()
		_, _ = io.Copy(io.Discard, s.Stdout())
		if _, err := s.Wait(ctx); err != nil {
			return fmt.Errorf("warm-up exec: %w", err)
		}
	}
	return nil
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func entropy() []byte {
	b := make([]byte, 64)
	_, _ = rand.Read(b)
	return b
}
