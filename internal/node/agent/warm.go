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
// sandbox's identity (hostname, env, clock, fresh entropy), exec. One goroutine (the
// manager's loop) fills and trims pools, one VM at a time so that refills never crowd out
// the starts they exist to speed up.

const (
	// claimWindow is how far back the autoscaler looks at claims.
	claimWindow = time.Minute
	// burstWindow: the pool aims to absorb the largest burst of claims seen in any
	// burstWindow within claimWindow.
	burstWindow = 10 * time.Second
	// fillRetry is how long a pool waits after a failed fill.
	fillRetry = 10 * time.Second
)

// warmManager owns this node's template snapshots, warm pools and restore slots.
type warmManager struct {
	warmDeps
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	wake   chan struct{}

	mu        sync.Mutex
	templates map[string]*template // by key hash
	pools     map[string]*pool     // by poolID
	slots     map[string]*slot     // by template key hash
	slotWants map[string]slotWant  // by template key hash
}

// needsImage says whether the node needs the image with digest: a pool is made from it,
// or a template of it is in use (a build or restore under way). With kept, templates merely
// kept for later count too, and so does a pool not resolved yet (it may be this image):
// what the node-wide image budget keeps. Without, a token's share may let the image go,
// and dropImage removes such templates with it (an unresolved pool pulls as the operator,
// whose images no share removes, and one that never resolves must not pin them all).
func (w *warmManager) needsImage(digest string, kept bool) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, t := range w.templates {
		if t.key.Digest == digest && (kept || t.busy()) {
			return true
		}
	}
	for _, p := range w.pools {
		if p.digest == digest || (kept && p.digest == "") {
			return true
		}
	}
	return false
}

// dropImage removes the templates of an image that was removed: they restore from its
// root disk, so they cannot be used again (VMs restored from them keep their mappings).
func (w *warmManager) dropImage(digest string) {
	w.mu.Lock()
	var dropped []string
	for hash, t := range w.templates {
		if t.key.Digest != digest || t.busy() {
			continue
		}
		delete(w.templates, hash)
		dropped = append(dropped, hash)
		w.log.Info("removing template snapshot", "why", "its image was removed", "image", t.image, "key", hash)
		if err := os.RemoveAll(t.dir); err != nil {
			w.log.Warn("remove template snapshot", "dir", t.dir, "err", err)
		}
	}
	w.mu.Unlock()
	for _, h := range dropped {
		w.dropSlots(h)
	}
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

// warmDeps is what the warm manager needs from the rest of the node, and its settings.
type warmDeps struct {
	dir    string // templates/
	budget int64  // bytes of template snapshots kept
	static []state.Pool
	// vms makes the VMs of templates, pools and slots.
	vms         *vms
	images      *image.Store
	pullTimeout time.Duration
	// shape fills in the node's default shape; sandboxUsage is what the sandboxes live
	// on the node reserve, of maxVCPUs and maxMemoryMiB (pools fill only what they leave).
	shape                  func(vcpus, memMiB int) (int, int)
	sandboxUsage           func() (vcpus, memMiB int)
	maxVCPUs, maxMemoryMiB int
	log                    *slog.Logger
}

func newWarmManager(d warmDeps) *warmManager {
	w := &warmManager{warmDeps: d, log: d.log.With("part", "warm"), wake: make(chan struct{}, 1),
		templates: map[string]*template{}, pools: map[string]*pool{}, slots: map[string]*slot{}, slotWants: map[string]slotWant{}}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	return w
}

// start loads the templates on disk and runs the pool loop until close.
func (w *warmManager) start() error {
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		return fmt.Errorf("create template directory: %w", err)
	}
	w.loadTemplates()
	w.collect()
	w.setPools(nil)
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		w.loop()
	}()
	return nil
}

// close stops the loop and builds, and ends every pool VM (they are cheap to make again;
// a restarted agent sweeps any it could not end).
func (w *warmManager) close() {
	// Cancelled under the lock: template() checks it and adds to wg under the lock, so no
	// build can start once Wait has begun.
	w.mu.Lock()
	w.cancel()
	w.mu.Unlock()
	w.wg.Wait()
	w.mu.Lock()
	var vms []*poolVM
	for _, p := range w.pools {
		vms = append(vms, p.ready...)
		p.ready = nil
	}
	w.mu.Unlock()
	for _, v := range vms {
		v.destroy()
	}
	w.dropSlots("")
}

func (w *warmManager) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// setPools applies the configured pools: the API's (replicated state) over the node's own
// static ones for the same image and shape.
func (w *warmManager) setPools(api []state.Pool) {
	want := map[string]state.Pool{}
	local := map[string]bool{}
	for i, src := range [][]state.Pool{w.static, api} {
		for _, c := range src {
			v, m := w.shape(c.VCPUs, c.MemoryMiB)
			want[poolID(c.Image, v, m)] = c
			local[poolID(c.Image, v, m)] = i == 0
		}
	}
	var drop []*poolVM
	w.mu.Lock()
	for id, p := range w.pools {
		if _, ok := want[id]; !ok {
			drop = append(drop, p.ready...)
			delete(w.pools, id)
		}
	}
	for id, c := range want {
		if p := w.pools[id]; p != nil {
			p.cfg, p.local = c, local[id]
			continue
		}
		v, m := w.shape(c.VCPUs, c.MemoryMiB)
		w.pools[id] = &pool{cfg: c, local: local[id], vcpus: v, mem: m}
	}
	w.mu.Unlock()
	for _, v := range drop {
		v.destroy()
	}
	w.poke()
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

// loop keeps every pool at its target: resolve its image, fill one VM at a time, trim
// extras, drop VMs that died.
func (w *warmManager) loop() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		for w.ctx.Err() == nil && (w.step() || w.slotStep()) {
		}
		select {
		case <-w.ctx.Done():
			return
		case <-w.wake:
		case <-t.C:
		}
	}
}

// step does one unit of pool work and reports whether there may be more.
func (w *warmManager) step() bool {
	now := time.Now()
	var (
		dead, extra []*poolVM
		fill        *pool
		resolve     *pool
	)
	w.mu.Lock()
	ids := slices.Sorted(maps.Keys(w.pools))
	for _, id := range ids {
		p := w.pools[id]
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
		if !w.fitsLocked(p.vcpus, p.mem) {
			p.limited = fmt.Sprintf("node capacity: %d of %d wanted (pool VMs only use vCPUs and memory that sandboxes leave free)", len(p.ready)+p.filling, tgt)
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
	w.mu.Unlock()
	for _, v := range append(dead, extra...) {
		v.destroy()
	}
	switch {
	case resolve != nil:
		w.resolve(resolve)
		return true
	case fill != nil:
		v, err := w.fill(fill)
		w.mu.Lock()
		fill.filling--
		stale := false
		if err != nil {
			fill.lastErr = err.Error()
			fill.retryAt = time.Now().Add(fillRetry)
		} else {
			fill.lastErr = ""
			switch {
			case w.pools[poolID(fill.cfg.Image, fill.vcpus, fill.mem)] != fill:
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
		w.mu.Unlock()
		if err != nil {
			w.log.Warn("warm pool fill failed", "image", fill.cfg.Image, "err", err)
		}
		if stale {
			w.log.Info("warm pool's image changed under it; resolving it again", "image", fill.cfg.Image)
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

// resolve pulls a pool's image and builds its root disk, which name the template its VMs
// come from.
func (w *warmManager) resolve(p *pool) {
	ctx, cancel := context.WithTimeout(w.ctx, w.pullTimeout)
	defer cancel()
	img, err := w.images.Ensure(ctx, p.cfg.Image, image.PullOptions{InsecureRegistries: p.cfg.InsecureRegistries})
	var disk, fs string
	if err == nil {
		disk, fs, err = w.images.RootDisk(ctx, img)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		p.lastErr = err.Error() // it names the image
		p.retryAt = time.Now().Add(fillRetry)
		w.log.Warn("warm pool image", "image", p.cfg.Image, "err", err)
		return
	}
	p.digest, p.rootDisk, p.rootFS, p.prefetch = img.Digest, disk, fs, prefetchFor(img.Config)
	p.key = w.vms.templateKeyFor(img.Digest, disk, fs, p.vcpus, p.mem, true).hash()
}

// fill restores one VM from the pool's template, sets up its root filesystem and pauses it.
func (w *warmManager) fill(p *pool) (*poolVM, error) {
	w.mu.Lock()
	digest, disk, fs, vcpus, mem, ref, pre := p.digest, p.rootDisk, p.rootFS, p.vcpus, p.mem, p.cfg.Image, p.prefetch
	w.mu.Unlock()
	key := w.vms.templateKeyFor(digest, disk, fs, vcpus, mem, true)
	t, _, err := w.template(w.ctx, key, ref, disk, pre)
	if err != nil {
		return nil, err
	}
	defer w.release(t)
	dir := filepath.Join(w.vms.runRoot, "w-"+randHex(6))
	r, err := w.vms.startVM(w.ctx, vmInput{id: filepath.Base(dir), dir: dir, rootDisk: disk, vcpus: vcpus, mem: mem, tmpl: t, net: true, closedNet: true})
	if err != nil {
		_ = os.RemoveAll(dir)
		if w.ctx.Err() == nil {
			w.invalidate(t, err)
		}
		return nil, err
	}
	v := &poolVM{spareVM: spareVM{dir: dir, h: r}, key: key.hash()}
	ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
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
func (w *warmManager) claim(key string) *poolVM {
	w.mu.Lock()
	defer w.mu.Unlock()
	var first *pool
	for _, id := range slices.Sorted(maps.Keys(w.pools)) {
		p := w.pools[id]
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
			w.poke() // refill
			return v
		}
	}
	if first != nil {
		first.claims = append(first.claims, time.Now())
		w.poke()
	}
	return nil
}

// poolUsesLocked reports whether a configured pool draws on the template.
func (w *warmManager) poolUsesLocked(hash string) bool {
	for _, p := range w.pools {
		if p.key == hash {
			return true
		}
	}
	return false
}

// fitsLocked reports whether one more pool VM of this shape fits the node's capacity
// beside the sandboxes and the pool VMs already there: pools only use capacity that
// placed sandboxes leave free.
func (w *warmManager) fitsLocked(vcpus, mem int) bool {
	usedC, usedM := w.sandboxUsage()
	for _, p := range w.pools {
		n := len(p.ready) + p.filling
		usedC += n * p.vcpus
		usedM += n * p.mem
	}
	return usedC+vcpus <= w.maxVCPUs && usedM+mem <= w.maxMemoryMiB
}

// makeRoom ends ready pool VMs until a sandbox of this shape fits beside the others: a
// placed sandbox always wins over a warm VM.
func (w *warmManager) makeRoom() {
	var drop []*poolVM
	w.mu.Lock()
	usedC, usedM := w.sandboxUsage()
	poolC, poolM := 0, 0
	for _, p := range w.pools {
		n := len(p.ready) + p.filling
		poolC += n * p.vcpus
		poolM += n * p.mem
	}
	for _, id := range slices.Sorted(maps.Keys(w.pools)) {
		p := w.pools[id]
		for len(p.ready) > 0 && (usedC+poolC > w.maxVCPUs || usedM+poolM > w.maxMemoryMiB) {
			drop = append(drop, p.ready[0])
			p.ready = p.ready[1:]
			poolC -= p.vcpus
			poolM -= p.mem
		}
	}
	w.mu.Unlock()
	for _, v := range drop {
		w.log.Info("ending a warm VM to make room for a sandbox", "dir", v.dir)
		v.destroy()
	}
}

func (w *warmManager) status() []PoolStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	var out []PoolStatus
	for _, id := range slices.Sorted(maps.Keys(w.pools)) {
		p := w.pools[id]
		out = append(out, PoolStatus{Image: p.cfg.Image, Digest: p.digest, VCPUs: p.vcpus, MemoryMiB: p.mem,
			Size: p.cfg.Size, Max: max(p.cfg.Max, p.cfg.Size), Target: p.target(now), Ready: len(p.ready), Filling: p.filling,
			Claims: len(p.claims), Error: cmp.Or(p.lastErr, p.limited), Local: p.local})
	}
	return out
}

func (w *warmManager) templateList() []TemplateInfo {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []TemplateInfo
	for _, h := range slices.Sorted(maps.Keys(w.templates)) {
		t := w.templates[h]
		if !isClosed(t.ready) || t.err != nil {
			continue
		}
		out = append(out, t.info())
	}
	return out
}

func (t *template) info() TemplateInfo {
	return TemplateInfo{Key: t.hash, Image: t.image, Digest: t.key.Digest, VCPUs: t.key.VCPUs, MemoryMiB: t.key.MemoryMiB,
		Dir: t.dir, SizeBytes: t.size, BuildTime: t.buildTime, LastUsed: t.lastUsed}
}

// warmKeys lists the digests and references of images with a template or a pool here.
func (w *warmManager) warmKeys() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	set := map[string]bool{}
	for _, t := range w.templates {
		if !isClosed(t.ready) || t.err != nil {
			continue
		}
		set[t.key.Digest] = true
		for r := range t.refs {
			set[r] = true
		}
	}
	for _, p := range w.pools {
		if len(p.ready) > 0 {
			set[p.cfg.Image] = true
			set[p.digest] = true
		}
	}
	delete(set, "")
	return slices.Sorted(maps.Keys(set))
}

func (w *warmManager) warmImage(ctx context.Context, ref string, opts image.PullOptions) (TemplateInfo, error) {
	img, err := w.images.Ensure(ctx, ref, opts)
	if err != nil {
		return TemplateInfo{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	disk, fs, err := w.images.RootDisk(ctx, img)
	if err != nil {
		return TemplateInfo{}, fmt.Errorf("build root disk for %s: %w", ref, err)
	}
	v, m := w.shape(0, 0)
	t, built, err := w.template(ctx, w.vms.templateKeyFor(img.Digest, disk, fs, v, m, true), ref, disk, prefetchFor(img.Config))
	if err != nil {
		return TemplateInfo{}, err
	}
	defer w.release(t)
	info := t.info()
	info.Built = built
	return info, nil
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

// Restore slots: for each template recently restored from, the node keeps one VMM
// launched ahead (vmm.Prestarter) with its scratch disk and guest channel ready. A restore
// start takes it and only loads the device state, saving the VMM's own start-up (~40 ms of
// QEMU initialisation); the slot is refilled in the background. A slot runs no guest code
// and has touched no guest memory, so it holds no sandbox capacity.
const (
	// slotIdle: a template not restored from for this long keeps no slot.
	slotIdle = 10 * time.Minute
	// maxSlots bounds the slots of a node.
	maxSlots = 4
)

type slot struct {
	spareVM
	t *template // the template it restores: only a start from this very template takes it
}

// slotWant records a template's recent use, for keeping a slot for it.
type slotWant struct {
	rootDisk   string
	vcpus, mem int
	last       time.Time
	retryAt    time.Time // after a failed launch
}

// wantSlot notes that a start restored from t (so its next start should find a slot).
func (w *warmManager) wantSlot(t *template, rootDisk string, vcpus, mem int) {
	w.mu.Lock()
	sw := w.slotWants[t.hash]
	sw.rootDisk, sw.vcpus, sw.mem, sw.last = rootDisk, vcpus, mem, time.Now()
	w.slotWants[t.hash] = sw
	w.mu.Unlock()
	w.poke()
}

// takeSlot hands over the slot for template t, if there is a live one launched for t
// itself (not for an earlier template under the same key, which was dropped).
func (w *warmManager) takeSlot(t *template) *slot {
	if t == nil {
		return nil
	}
	w.mu.Lock()
	sl := w.slots[t.hash]
	delete(w.slots, t.hash)
	w.mu.Unlock()
	if sl != nil && (sl.t != t || isClosed(sl.h.vm.Wait())) {
		sl.destroy()
		return nil
	}
	return sl
}

// slotStep keeps the slots: drops idle or dead ones and launches one missing slot. It
// reports whether it did any launching.
func (w *warmManager) slotStep() bool {
	now := time.Now()
	var drop []*slot
	var (
		t    *template
		want slotWant
	)
	w.mu.Lock()
	for hash, sw := range w.slotWants {
		sl := w.slots[hash]
		tm := w.templates[hash]
		if sl != nil && sl.t != tm {
			// Its template was dropped (and maybe rebuilt under the same key).
			drop = append(drop, sl)
			delete(w.slots, hash)
			sl = nil
		}
		if now.Sub(sw.last) > slotIdle || tm == nil {
			delete(w.slotWants, hash)
			if sl != nil {
				drop = append(drop, sl)
				delete(w.slots, hash)
			}
			continue
		}
		if sl != nil && isClosed(sl.h.vm.Wait()) {
			drop = append(drop, sl)
			delete(w.slots, hash)
			sl = nil
		}
		if sl == nil && t == nil && len(w.slots) < maxSlots && isClosed(tm.ready) && tm.err == nil && !now.Before(sw.retryAt) {
			t, want = tm, sw
			t.users++ // held until its files are open in the new VMM
		}
	}
	w.mu.Unlock()
	for _, sl := range drop {
		sl.destroy()
	}
	if t == nil {
		return false
	}
	defer w.release(t)
	dir := filepath.Join(w.vms.runRoot, "s-"+randHex(6))
	h, err := w.vms.prepareVM(w.ctx, vmInput{id: filepath.Base(dir), dir: dir, rootDisk: want.rootDisk, vcpus: want.vcpus, mem: want.mem, tmpl: t,
		net: t.key.withNet(), closedNet: true}, true)
	if err != nil {
		_ = os.RemoveAll(dir)
		w.log.Warn("launch a VMM ahead of restores", "key", t.hash, "err", err)
		w.mu.Lock()
		if sw, ok := w.slotWants[t.hash]; ok {
			sw.retryAt = time.Now().Add(fillRetry)
			w.slotWants[t.hash] = sw
		}
		w.mu.Unlock()
		return false
	}
	sl := &slot{spareVM: spareVM{dir: dir, h: h}, t: t}
	w.mu.Lock()
	// Only for the template as it stands: one dropped meanwhile gets no slot.
	if w.slots[t.hash] == nil && w.templates[t.hash] == t && w.ctx.Err() == nil {
		w.slots[t.hash] = sl
		sl = nil
	}
	w.mu.Unlock()
	if sl != nil {
		sl.destroy()
	}
	return true
}

// dropSlots ends the slot of a template (it was dropped) or, for "", every slot.
func (w *warmManager) dropSlots(hash string) {
	w.mu.Lock()
	var drop []*slot
	for h, sl := range w.slots {
		if hash == "" || h == hash {
			drop = append(drop, sl)
			delete(w.slots, h)
		}
	}
	w.mu.Unlock()
	for _, sl := range drop {
		sl.destroy()
	}
}
