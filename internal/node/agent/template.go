package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
)

// A template snapshot is a VM of one image and shape saved right after fireworks-init came
// up and mounted the image's root filesystem, before any sandbox identity exists: guest
// RAM (mem), device state (state) and the scratch disk as the guest left it (scratch.img,
// whose mounted ext4 the saved kernel has in memory) in templates/<key>/. Every start of
// that image and shape on this node restores it instead of booting a kernel, with its own
// copy of the scratch disk, then gives the guest its identity. The key hashes everything that makes it valid, so a
// new kernel, init, image digest, shape, QEMU or accelerator simply makes a new one; old
// ones age out under the disk budget.

// templateKey is everything a saved VM depends on.
type templateKey struct {
	// Layout versions what a template holds and how its VM is made (3: root filesystem
	// mounted and the image's likely first binaries read before the save; 6: a NIC
	// configured by init; 7: the NIC without guest announcements; 8: no PIT or PIC).
	Layout int    `json:"layout"`
	Digest string `json:"digest"`
	// RootDisk identifies the root disk file (inode, size, mtime): the saved guest has its
	// filesystem's metadata cached, so a rebuilt disk (same image) needs a new template.
	RootDisk    string `json:"root_disk"`
	RootFS      string `json:"root_fs"`
	Kernel      string `json:"kernel"`       // release
	KernelHash  string `json:"kernel_hash"`  // of vmlinux: a rebuilt kernel of the same release
	InitVersion string `json:"init_version"` // hash of the initramfs (init binary + modules)
	Cmdline     string `json:"cmdline"`
	VCPUs       int    `json:"vcpus"`
	MemoryMiB   int    `json:"memory_mib"`
	ScratchMiB  int    `json:"scratch_mib"`
	Accel       string `json:"accel"`
	VMM         string `json:"vmm"` // driver and version: device state formats change between releases
	// Network is "nat" (a NIC, configured with the fixed guest address, and the node's
	// nameservers in resolv.conf) or "none" (no NIC: a different device set).
	Network     string   `json:"network"`
	Nameservers []string `json:"nameservers,omitempty"`
}

func (k templateKey) hash() string {
	b, _ := json.Marshal(k)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// templateMeta is templates/<key>/meta.json.
type templateMeta struct {
	Key       templateKey `json:"key"`
	Image     string      `json:"image"`
	Created   time.Time   `json:"created"`
	BuildTime string      `json:"build_time"`
}

type template struct {
	key   templateKey
	hash  string
	ready chan struct{} // closed when the build ended (err says how)
	err   error

	// Set once ready without error.
	dir       string
	size      int64
	image     string
	buildTime time.Duration

	// Guarded by templates.mu.
	refs     map[string]bool // image references that resolved to it
	lastUsed time.Time
	users    int // restores in progress (their QEMU has not mapped the files yet)
	// gone: dropped while in use (its image was removed); its files go when the last
	// user releases it.
	gone bool
}

func (t *template) scratch() string { return filepath.Join(t.dir, "scratch.img") }

func (t *template) snapshot() *vmm.Snapshot {
	return &vmm.Snapshot{MemoryFile: filepath.Join(t.dir, "mem"), StateFile: filepath.Join(t.dir, "state")}
}

// templateKeyFor is the key of a VM of this node for an image root disk and shape.
func (m *vms) templateKeyFor(digest, rootDisk, rootFS string, vcpus, memMiB int, withNet bool) templateKey {
	id := "?"
	if fi, err := os.Stat(rootDisk); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			id = fmt.Sprintf("%d-%d-%d", st.Ino, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	k := templateKey{
		Layout: 8, Digest: digest, RootDisk: id, RootFS: rootFS, Kernel: m.kernel.Release, KernelHash: m.kernelHash,
		InitVersion: m.initrd.Version, Cmdline: m.cmdline(),
		VCPUs: vcpus, MemoryMiB: memMiB, ScratchMiB: m.scratchMiB,
		Accel: m.accel.Accel, VMM: m.driver.Name() + " " + m.vmmVersion, Network: "none",
	}
	if withNet {
		k.Network, k.Nameservers = "nat", m.nameservers
	}
	return k
}

func (k templateKey) withNet() bool { return k.Network == "nat" }

// busy says whether the template is being built or restored from; templates.mu held.
func (t *template) busy() bool { return t.users > 0 || !isClosed(t.ready) }

// sameNode reports whether a template key's node-wide inputs (everything but the image
// and the shape) are this node's.
func (m *vms) sameNode(k templateKey) bool {
	cur := m.templateKeyFor("", "", "", 0, 0, k.withNet())
	k.Digest, k.RootDisk, k.RootFS, k.VCPUs, k.MemoryMiB = "", cur.RootDisk, "", 0, 0
	return k.hash() == cur.hash()
}

// templates owns this node's template snapshots: their files under dir, their builds
// (one per key at a time, shared by the starts that wait for it) and their removal (a
// failed restore, an image removed, the disk budget). Restores hold a template until
// their VMM has mapped its files.
type templates struct {
	dir    string // templates/
	budget int64  // bytes of template snapshots kept
	vms    *vms   // makes the VM a template is saved from
	// pinned lists the templates the warm pools draw on (kept whatever the budget);
	// dropped hears of a template gone (its restore slot goes too). Neither is called
	// with mu held.
	pinned  func() map[string]bool
	dropped func(hash string)
	log     *slog.Logger

	ctx    context.Context // the builds'
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	byHash map[string]*template
}

func newTemplates(dir string, budget int64, m *vms, log *slog.Logger) *templates {
	ts := &templates{dir: dir, budget: budget, vms: m, log: log.With("part", "templates"), byHash: map[string]*template{},
		pinned: func() map[string]bool { return nil }, dropped: func(string) {}}
	ts.ctx, ts.cancel = context.WithCancel(context.Background())
	return ts
}

// open loads the templates a previous run left and applies the budget.
func (ts *templates) open() error {
	if err := os.MkdirAll(ts.dir, 0o700); err != nil {
		return fmt.Errorf("create template directory: %w", err)
	}
	ts.load()
	ts.collect()
	return nil
}

// close stops the builds and waits for them.
func (ts *templates) close() {
	// Cancelled under the lock: get checks it and adds to wg under the lock, so no build
	// can start once Wait has begun.
	ts.mu.Lock()
	ts.cancel()
	ts.mu.Unlock()
	ts.wg.Wait()
}

// load reads the templates a previous run left; half-built ones are removed.
func (ts *templates) load() {

	entries, _ := os.ReadDir(ts.dir)
	for _, e := range entries {
		p := filepath.Join(ts.dir, e.Name())
		if !e.IsDir() || strings.HasSuffix(e.Name(), ".tmp") {
			_ = os.RemoveAll(p)
			continue
		}
		b, err := os.ReadFile(filepath.Join(p, "meta.json"))
		var m templateMeta
		if err == nil {
			err = json.Unmarshal(b, &m)
		}
		if err != nil || m.Key.hash() != e.Name() {
			ts.log.Warn("removing an unreadable template snapshot", "dir", p, "err", err)
			_ = os.RemoveAll(p)
			continue
		}
		if !ts.vms.sameNode(m.Key) {
			// Made with another kernel, init, QEMU or accelerator: no start can use it.
			ts.log.Info("removing a template snapshot this node can no longer use", "image", m.Image, "key", e.Name())
			_ = os.RemoveAll(p)
			continue
		}
		fi, _ := os.Stat(filepath.Join(p, "meta.json"))
		t := &template{key: m.Key, hash: e.Name(), ready: make(chan struct{}), dir: p, size: dirSize(p), image: m.Image,
			refs: map[string]bool{m.Image: true}, lastUsed: fi.ModTime()}
		close(t.ready)
		ts.byHash[t.hash] = t
	}
}

// get returns the ready template for key, building it first if this node has none.
// Concurrent callers for one key share one build; a failed build is forgotten (a later
// start tries again) and a waiter whose shared build failed tries once itself. The
// template is held for the caller (not garbage collected) until it calls release.
func (ts *templates) get(ctx context.Context, key templateKey, ref, rootDisk string, prefetch []string) (t *template, built bool, err error) {
	h := key.hash()
	for attempt := 0; ; attempt++ {
		ts.mu.Lock()
		t, built = ts.byHash[h], false
		if t == nil {
			if ts.ctx.Err() != nil {
				ts.mu.Unlock()
				return nil, false, errors.New("the node agent is shutting down")
			}
			t = &template{key: key, hash: h, ready: make(chan struct{}), refs: map[string]bool{}, image: ref}
			ts.byHash[h] = t
			built = true
			ts.wg.Add(1)
			go func() {
				defer ts.wg.Done()
				ts.build(t, rootDisk, prefetch)
			}()
		}
		t.users++
		ts.mu.Unlock()
		select {
		case <-t.ready:
		case <-ctx.Done():
			ts.release(t)
			return nil, false, ctx.Err()
		}
		if t.err == nil {
			ts.mu.Lock()
			t.refs[ref] = true
			t.lastUsed = time.Now()
			ts.mu.Unlock()
			return t, built, nil
		}
		ts.release(t)
		ts.mu.Lock()
		if ts.byHash[h] == t {
			delete(ts.byHash, h)
		}
		ts.mu.Unlock()
		if built || attempt > 0 || ctx.Err() != nil {
			return nil, built, t.err
		}
	}
}

// prefetchFor lists the files a start of the image most likely reads first: the user
// and group databases, the usual PATH directories, the shell, the C library, and its
// entrypoint (or command), as paths in the image. Measured under TCG: reading these in
// the template took ~80 ms off a restored start.
func prefetchFor(cfg image.Config) []string {
	// What every exec reads (user and group lookup, PATH search), then the shell.
	out := []string{"/etc/passwd", "/etc/group", "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin", "/bin/sh",
		// The dynamic loader and C library of glibc and musl images.
		"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
		"/lib/ld-musl-x86_64.so.1"}
	argv := append(append([]string(nil), cfg.Entrypoint...), cfg.Cmd...)
	if len(argv) == 0 || argv[0] == "" {
		return out
	}
	if strings.HasPrefix(argv[0], "/") {
		return append(out, argv[0])
	}
	if strings.Contains(argv[0], "/") {
		return out
	}
	for _, dir := range []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		out = append(out, dir+"/"+argv[0])
	}
	return out
}

// invalidate drops a template that failed to restore: it is forgotten and its files
// removed (VMs restored from it earlier keep their mappings), so the next start of the
// image builds it again.
func (ts *templates) invalidate(t *template, why error) {
	ts.mu.Lock()
	if ts.byHash[t.hash] != t {
		ts.mu.Unlock()
		return // dropped already (and maybe rebuilt: the files are not t's any more)
	}
	delete(ts.byHash, t.hash)
	ts.log.Warn("dropping a template snapshot that does not restore", "image", t.image, "key", t.hash, "err", why)
	if err := os.RemoveAll(t.dir); err != nil {
		ts.log.Warn("remove template snapshot", "dir", t.dir, "err", err)
	}
	ts.mu.Unlock()
	ts.dropped(t.hash)
}

func (ts *templates) release(t *template) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	t.users--
	if t.gone && t.users == 0 {
		// Under the lock, as every removal: a template built again under the same key
		// is installed under it too.
		ts.removeFiles(t)
	}
}

func (ts *templates) removeFiles(t *template) {
	if err := os.RemoveAll(t.dir); err != nil {
		ts.log.Warn("remove template snapshot", "dir", t.dir, "err", err)
	}
}

// build boots a VM for the template, waits for fireworks-init to answer and saves it.
func (ts *templates) build(t *template, rootDisk string, prefetch []string) {
	start := time.Now()
	err := ts.buildFiles(ts.ctx, t, rootDisk, prefetch)
	if err != nil {
		t.err = fmt.Errorf("build template snapshot for %s: %w", t.image, err)
		ts.log.Warn("template snapshot failed", "image", t.image, "key", t.hash, "err", err)
	} else {
		t.buildTime = time.Since(start)
		ts.log.Info("template snapshot built", "image", t.image, "key", t.hash, "vcpus", t.key.VCPUs, "memory_mib", t.key.MemoryMiB,
			"size_mib", t.size>>20, "took", t.buildTime.Round(time.Millisecond))
	}
	ts.mu.Lock()
	t.lastUsed = time.Now()
	ts.mu.Unlock()
	close(t.ready)
	if err == nil {
		ts.collect()
	}
}

func (ts *templates) buildFiles(ctx context.Context, t *template, rootDisk string, prefetch []string) error {
	final := filepath.Join(ts.dir, t.hash)
	tmp := final + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // nothing is left after the rename
	// The VM the template is taken from: a run directory of its own (short: socket paths)
	// and a throwaway scratch disk (the guest never mounts it before the save, but its
	// device must exist so that restored VMs have the same devices).
	runDir := filepath.Join(ts.vms.runRoot, "t-"+t.hash[:12])
	_ = os.RemoveAll(runDir)
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(runDir)
	scratch := filepath.Join(runDir, "scratch.img")
	if err := copySparse(ts.vms.scratch, scratch); err != nil {
		return err
	}
	sock := filepath.Join(runDir, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on guest channel: %w", err)
	}
	if err := vmm.ShareSocket(ts.vms.driver, sock); err != nil {
		return fmt.Errorf("listen on guest channel: %w", err)
	}
	defer ln.Close()
	// The template's guest configures its NIC (every guest has the same address; see
	// network.GuestAddr) behind a network that lets nothing through: no image code runs,
	// and nothing should reach it.
	var nics []vmm.NIC
	if t.key.withNet() {
		n, err := ts.vms.net.Acquire(ctx, runDir, NetPolicy{}, true)
		if err != nil {
			return fmt.Errorf("template network: %w", err)
		}
		defer n.Remove()
		tap, err := n.Tap()
		if err != nil {
			return err
		}
		defer tap.Close()
		nics = []vmm.NIC{{Tap: tap, MAC: network.GuestMAC}}
	}
	vm, err := ts.vms.driver.Create(ctx, vmm.Spec{
		ID: "template-" + t.hash[:12], Dir: runDir, Kernel: ts.vms.kernel.Vmlinux, Initrd: ts.vms.initrd.Path,
		Cmdline: t.key.Cmdline, VCPUs: t.key.VCPUs, MemoryMiB: t.key.MemoryMiB,
		Disks:       []vmm.Disk{{Path: rootDisk, ReadOnly: true}, {Path: scratch}},
		AgentSocket: sock, MemoryFile: filepath.Join(tmp, "mem"), NICs: nics,
	})
	if err != nil {
		return err
	}
	snap, ok := vm.(vmm.Snapshotter)
	if !ok {
		return fmt.Errorf("the %s driver cannot snapshot VMs: %w", ts.vms.driver.Name(), vmm.ErrNotSupported)
	}
	if err := vm.Start(ctx); err != nil {
		return err
	}
	defer func() {
		_ = vm.Kill()
		<-vm.Wait()
	}()
	guest, err := ts.vms.connectGuest(ctx, ln, vm)
	if err != nil {
		return err
	}
	defer guest.Close()
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := guest.Ping(pctx); err != nil {
		return fmt.Errorf("guest did not answer a ping: %w", err)
	}
	// Mount the root now, so no start pays for it, and read the image's likely first
	// binaries into the page cache (reading runs no image code); the guest syncs the scratch disk
	// before answering, and the copy of that disk each restore gets matches what the saved
	// kernel believes is on it.
	setup := proto.Setup{Hostname: "template", RootDevice: "/dev/vda", RootFSType: t.key.RootFS,
		ScratchDevice: "/dev/vdb", TimeUnixNano: time.Now().UnixNano(), Entropy: entropy(), Prefetch: prefetch}
	if t.key.withNet() {
		setup.Net, setup.Nameservers = guestNet(), t.key.Nameservers
	}
	if err := guest.Setup(pctx, setup); err != nil {
		return fmt.Errorf("set up the template guest: %w", err)
	}
	// No image code runs before the save: a template is shared by every sandbox of the
	// image, and nothing a process could leave behind may be shared with them.
	if err := snap.Snapshot(pctx, filepath.Join(tmp, "state")); err != nil {
		return err
	}
	// The VMM must be gone before the memory file is final: it maps it shared.
	_ = vm.Kill()
	<-vm.Wait()
	if err := moveFile(scratch, filepath.Join(tmp, "scratch.img")); err != nil {
		return fmt.Errorf("keep the template's scratch disk: %w", err)
	}
	for _, f := range []string{"mem", "state", "scratch.img"} {
		if err := syncReadOnly(filepath.Join(tmp, f)); err != nil {
			return err
		}
	}
	meta, _ := json.MarshalIndent(templateMeta{Key: t.key, Image: t.image, Created: time.Now().UTC()}, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "meta.json"), meta, 0o400); err != nil {
		return err
	}
	// Installing and removing template directories happen under the lock, so a late
	// removal of a dropped template can never hit a new one built under the same key.
	ts.mu.Lock()
	_ = os.RemoveAll(final)
	err = os.Rename(tmp, final)
	ts.mu.Unlock()
	if err != nil {
		return err
	}
	t.dir = final
	t.size = dirSize(final)
	return nil
}

// syncReadOnly flushes a snapshot file to disk and makes it read-only: snapshot files are
// never written again (restored VMs map them privately).
func syncReadOnly(path string) error {
	if err := syncFile(path); err != nil {
		return err
	}
	return os.Chmod(path, 0o400)
}

// collect removes least recently used templates until the rest fit the disk budget. A
// template in use (a restore in progress, or the newest) stays; VMs already restored
// from a removed one keep running (their mapping holds the file).
func (ts *templates) collect() {
	pinned := ts.pinned()
	ts.mu.Lock()
	defer ts.mu.Unlock()
	var total int64
	var list []*template
	for _, t := range ts.byHash {
		if !isClosed(t.ready) || t.err != nil {
			continue
		}
		total += t.size
		list = append(list, t)
	}
	slices.SortFunc(list, func(x, y *template) int { return x.lastUsed.Compare(y.lastUsed) })
	imageShape := func(t *template) string {
		return t.key.Digest + "|" + strconv.Itoa(t.key.VCPUs) + "|" + strconv.Itoa(t.key.MemoryMiB) + "|" + t.key.Network
	}
	newest := map[string]*template{}
	for _, t := range list {
		newest[imageShape(t)] = t // list is oldest first
	}
	for i, t := range list {
		if t.users > 0 || pinned[t.hash] {
			continue
		}
		why := ""
		switch {
		case newest[imageShape(t)] != t:
			// A newer template of the same image and shape exists (its root disk was
			// rebuilt): this one will not be used again.
			why = "superseded"
		case total > ts.budget && i < len(list)-1:
			why = "over the disk budget"
		default:
			continue
		}
		delete(ts.byHash, t.hash)
		total -= t.size
		ts.log.Info("removing template snapshot", "why", why, "image", t.image, "key", t.hash, "size_mib", t.size>>20, "budget_mib", ts.budget>>20)
		if err := os.RemoveAll(t.dir); err != nil {
			ts.log.Warn("remove template snapshot", "dir", t.dir, "err", err)
		}
	}
}

// dirSize is the disk space the files of dir take (allocated blocks: memory files are sparse).
func dirSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return nil
		}
		fi, err := e.Info()
		if err != nil {
			return nil
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			n += st.Blocks * 512
		} else {
			n += fi.Size()
		}
		return nil
	})
	return n
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// needsImage says whether a template of the image with digest is in use (a build or a
// restore under way) or, with kept, merely kept for later.
func (ts *templates) needsImage(digest string, kept bool) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for _, t := range ts.byHash {
		if t.key.Digest == digest && (kept || t.busy()) {
			return true
		}
	}
	return false
}

// dropImage removes the templates of an image that was removed: they restore from its
// root disk, so they cannot be used again (VMs restored from them keep their mappings).
// One in use (a restore whose VMM has not mapped its files yet) is forgotten now and its
// files go when it is released; one still being built is left to the disk budget. It
// reports how many it dropped.
func (ts *templates) dropImage(digest string) int {
	ts.mu.Lock()
	var dropped []string
	for hash, t := range ts.byHash {
		if t.key.Digest != digest || !isClosed(t.ready) {
			continue
		}
		delete(ts.byHash, hash)
		dropped = append(dropped, hash)
		ts.log.Info("removing template snapshot", "why", "its image was removed", "image", t.image, "key", hash, "in_use", t.users)
		if t.users > 0 {
			t.gone = true
		} else {
			ts.removeFiles(t)
		}
	}
	ts.mu.Unlock()
	for _, h := range dropped {
		ts.dropped(h)
	}
	return len(dropped)
}

// current returns the template under hash, built and usable, or nil.
func (ts *templates) current(hash string) *template {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if t := ts.byHash[hash]; t != nil && isClosed(t.ready) && t.err == nil {
		return t
	}
	return nil
}

// hold keeps t from being removed until release, if it is still the current template
// for its key.
func (ts *templates) hold(t *template) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.byHash[t.hash] != t {
		return false
	}
	t.users++
	return true
}

func (ts *templates) list() []TemplateInfo {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	var out []TemplateInfo
	for _, h := range slices.Sorted(maps.Keys(ts.byHash)) {
		t := ts.byHash[h]
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

// imageRefs lists the digests and references of images with a template here.
func (ts *templates) imageRefs() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	var out []string
	for _, t := range ts.byHash {
		if !isClosed(t.ready) || t.err != nil {
			continue
		}
		out = append(out, t.key.Digest)
		for r := range t.refs {
			out = append(out, r)
		}
	}
	return out
}
