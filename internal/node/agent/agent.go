// Package agent is the node side of Fireworks: it owns the VMM processes of the sandboxes
// placed on this node, their disks, sockets and output logs, and reports every lifecycle
// change to the replicated state store. In `fireworks dev` it runs in the server's process.
package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/sandboxlog"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/node/volume"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Config is the node's configuration.
type Config struct {
	DataDir string
	// TCGCacheMiB is each VM's translation cache under TCG (QEMU's tb-size); 0 is
	// DefaultTCGCacheMiB.
	TCGCacheMiB int
	// CgroupRoot is where the cgroup filesystem is mounted (default /sys/fs/cgroup), and
	// CgroupParent the directory the VMs' and volume servers' cgroups go in: "" under the
	// agent's own cgroup; an absolute path from the hierarchy's top (jail.Place). An agent
	// in a pod puts them outside its container's cgroup, so they outlive the container.
	CgroupRoot, CgroupParent string
	Node                     string
	InitBinary               string
	// VolumeServer is the static volume server binary (fireworks-volume-server); ""
	// looks for it in $FIREWORKS_VOLUME_SERVER, then beside this executable. Without one
	// the node runs no sandbox that mounts volumes (it says why).
	VolumeServer string
	// Accel forces "kvm" or "tcg"; empty means detect.
	Accel string
	// Limits on one sandbox; zero means derived from the host.
	MaxVCPUs     int
	MaxMemoryMiB int
	// Defaults when a request names none.
	DefaultVCPUs     int
	DefaultMemoryMiB int
	// ScratchMiB is the size of each sandbox's writable disk (sparse).
	ScratchMiB int
	// BootTimeout bounds the time from VMM start to the guest's handshake.
	BootTimeout time.Duration
	// PullTimeout bounds fetching an image (default 15m).
	PullTimeout time.Duration
	// MaxLogBytes caps each sandbox's stored output (default 256 MiB): a guest must not
	// be able to fill the host's disk. Output past it is discarded.
	MaxLogBytes int64
	// MaxLogBytesPerOwner caps the stored output of one token's sandboxes on this node
	// together (default 4 GiB; admins' too: it protects the node's disk).
	MaxLogBytesPerOwner int64
	// TemplateDiskMiB bounds the disk space of template snapshots (default 8192); the
	// least recently used go first.
	TemplateDiskMiB int
	// SavedDiskMiB bounds the disk space of paused sandboxes' saved states and of
	// snapshots on this node together (default 65536): a pause or snapshot that would
	// pass it is refused (nothing is removed to make room: each is a user's state).
	SavedDiskMiB int
	// ImageDiskMiB bounds the disk space of images (default 32768): past it, the least
	// recently used that no sandbox, template or pool needs are removed.
	ImageDiskMiB int
	// ImageMiBPerOwner bounds what the images one user token pulled or ran take on this
	// node (default 16384; admins' and pools' images do not count): past it, that
	// token's least recently used images that nothing runs from are let go of first.
	ImageMiBPerOwner int
	// Pools are warm pools this node keeps by its own configuration; pools set through
	// the API (SetPools) override them for the same image and shape.
	Pools []state.Pool
	// SandboxCIDR is where sandbox addresses come from (default DefaultSandboxCIDR); each
	// sandbox takes a /30 of it.
	SandboxCIDR string
	// Nameservers are the resolvers guests get (default: the node's own from
	// /etc/resolv.conf that a guest can reach; loopback ones cannot be).
	Nameservers []string
	// DenyCIDRs are ranges sandboxes may not reach unless an admin's policy allows them,
	// beyond the node's own (e.g. the cluster's management network).
	DenyCIDRs []string
	// RegistryAllow are ranges a user's image pull may reach besides public addresses
	// (e.g. an internal registry); an admin's pulls reach anything.
	RegistryAllow []string
	// MetricsListen, if set, serves Prometheus metrics (/metrics, plain HTTP) there.
	MetricsListen string
	Logger        *slog.Logger

	// Driver, if set, runs the VMs instead of the QEMU driver (which the accelerator
	// choice picks otherwise). Tests give a test double here (agenttest.Driver).
	Driver vmm.Driver
	// Assets, if set, provides the guest kernel and initramfs instead of fetching
	// Debian's kernel into dir and building the initramfs from InitBinary.
	Assets func(ctx context.Context, dir string) (*assets.Kernel, *assets.Initramfs, error)
	// Networks, if set, makes the sandbox networks instead of the host's network
	// namespaces, address translation and eBPF programs. Tests of the agent's logic give
	// a test double here (agenttest.Networks).
	Networks Networks
	// FetchSaved, if set, brings a paused sandbox's saved state from the node that holds
	// it, to resume it here (the cluster's agent gives one; dev, one node, does not).
	FetchSaved SavedFetcher
	// DialMigration, if set, reaches the agents of other nodes to migrate sandboxes to
	// them (the cluster's agent gives one; dev, one node, does not).
	DialMigration MigrationDialer
	// DialVolume, if set, reaches the volume servers of other nodes for the sandboxes
	// here that mount their volumes (the cluster's agent gives one; dev, one node, does
	// not).
	DialVolume VolumeDialer
	// FetchVolume, if set, fetches a volume moved here from the node that held it (the
	// cluster's agent gives one; dev, one node, does not).
	FetchVolume VolumeFetcher
}

// debianAssets is the default of Config.Assets: Debian's cloud kernel (apt-get download)
// and an initramfs built from initBinary, both cached in dir.
func debianAssets(initBinary string) func(ctx context.Context, dir string) (*assets.Kernel, *assets.Initramfs, error) {
	return func(ctx context.Context, dir string) (*assets.Kernel, *assets.Initramfs, error) {
		k, err := assets.EnsureKernel(ctx, dir)
		if err != nil {
			return nil, nil, fmt.Errorf("prepare guest kernel: %w", err)
		}
		ird, err := assets.BuildInitramfs(ctx, dir, k, initBinary)
		if err != nil {
			return nil, nil, fmt.Errorf("build initramfs from %s: %w", initBinary, err)
		}
		return k, ird, nil
	}
}

// Store is the part of the state store the agent writes to.
type Store interface {
	UpdateSandbox(ctx context.Context, id string, u state.Update) (state.Sandbox, error)
	GetSandbox(ctx context.Context, idOrName string) (state.Sandbox, error)
	ListSandboxes(ctx context.Context) ([]state.Sandbox, error)
}

// Agent runs sandboxes on this node.
type Agent struct {
	// groupMu serializes the wiring of sandbox groups' networks (refreshGroup).
	groupMu sync.Mutex
	cfg     Config
	log     *slog.Logger
	store   Store
	images  *image.Store
	// vms makes every VM of this node (sandboxes', templates', warm pools', slots').
	vms *vms

	ctx    context.Context // lifetime of all sandbox goroutines: a VM's life never hangs off a request
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// relays are the volume servers this node runs for sandboxes on other nodes, by
	// sandbox (see volumerelay.go).
	relayMu sync.Mutex
	relays  map[string]*relayedServer

	mu   sync.Mutex
	live map[string]*sandbox
	// incomingRuns are runs of sandboxes live here that a migration within this node
	// is moving into a fresh VM (see takeOverStep).
	incomingRuns map[string]*sandbox
	began        time.Time                // when this process started (a migration older than it was another's)
	started      map[string]bool          // incarnations ("id/restarts") started by Reconcile
	stopsSent    map[string]bool          // sandboxes Reconcile has begun stopping
	leaving      map[string]chan struct{} // sandboxes no longer assigned here, being stopped and removed
	// diskHashes caches rootDiskHash by the disk file's identity.
	diskHashes map[string]string
	// savedHeld is what saves under way may add to the node's saved states (savedRoom).
	savedMu   sync.Mutex
	savedHeld int64
	// flatSem lets one save be flattened at a time (see flatten.go).
	flatSem chan struct{}
	// migrationWaits counts, per peer node, the migration calls waiting for the state
	// to show their migration (see migrationFor). Guarded by mu.
	migrationWaits map[string]int
	// snaps keeps named snapshots' files (see SnapshotStore).
	snaps SnapshotStore

	// What the node keeps ahead of starts, each owning its state: template snapshots,
	// warm pools of VMs restored from them, and VMMs launched ahead of restores (slots).
	// One fill loop does the pools' and the slots' work, one VM at a time.
	templates *templates
	pools     *warmPools
	slots     *restoreSlots
	fillWake  chan struct{}
	net       Networks
	// userPulls carries the registry traffic of pulls users asked for (see
	// image.GuardedTransport).
	userPulls http.RoundTripper
	pruneWake chan struct{}            // a pull happened: see pruneImages
	buildsMu  sync.Mutex               // guards builds
	builds    map[string]chan struct{} // one users' root disk build per token at a time
	pullMu    sync.Mutex               // guards pulling
	pulling   map[string]int64         // bytes of users' downloads under way, by token

	logMu      sync.Mutex
	logBudgets map[string]*sandboxlog.Budget // by owner, made on first use
	logOwners  map[string]string             // sandbox ID -> owner, for logs charged to a budget
}

// ErrNotRunning means the sandbox has no live VM on this node.
var ErrNotRunning = errors.New("sandbox is not running")

// ErrMovedAway means a live migration moved the sandbox off this node before the call
// did anything here (an exec that waited for the migration to settle): the caller may
// make it again where the sandbox runs now.
var ErrMovedAway = errors.New("a live migration moved the sandbox to another node")

// New prepares the node: guest kernel and initramfs, accelerator choice, image store, and a
// sweep of what an earlier run left behind.
func New(ctx context.Context, cfg Config, store Store) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Node == "" {
		cfg.Node, _ = os.Hostname()
	}
	// Everything the VMMs are given (and recovery matches them by) is under DataDir:
	// it must be absolute to identify this node's processes exactly.
	abs, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("data dir %s: %w", cfg.DataDir, err)
	}
	cfg.DataDir = abs
	if cfg.MaxVCPUs == 0 {
		cfg.MaxVCPUs = runtime.NumCPU()
	}
	if cfg.MaxMemoryMiB == 0 {
		cfg.MaxMemoryMiB = int(hostMemoryMiB() * 3 / 4)
	}
	if cfg.DefaultVCPUs == 0 {
		cfg.DefaultVCPUs = 1
	}
	if cfg.DefaultMemoryMiB == 0 {
		cfg.DefaultMemoryMiB = 256
	}
	if cfg.ScratchMiB == 0 {
		cfg.ScratchMiB = 2048
	}
	if cfg.MaxLogBytesPerOwner == 0 {
		cfg.MaxLogBytesPerOwner = 4 << 30
	}
	if cfg.MaxLogBytes == 0 {
		cfg.MaxLogBytes = 256 << 20
	}
	if cfg.PullTimeout == 0 {
		cfg.PullTimeout = 15 * time.Minute
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 90 * time.Second
	}
	if cfg.ImageDiskMiB == 0 {
		cfg.ImageDiskMiB = 32768
	}
	if cfg.SavedDiskMiB == 0 {
		cfg.SavedDiskMiB = 65536
	}
	if cfg.TemplateDiskMiB == 0 {
		cfg.TemplateDiskMiB = 8192
	}
	if cfg.ImageMiBPerOwner == 0 {
		cfg.ImageMiBPerOwner = 16384
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, store: store, live: map[string]*sandbox{}, incomingRuns: map[string]*sandbox{}, flatSem: make(chan struct{}, 1), migrationWaits: map[string]int{},
		snaps: localSnapshots{root: filepath.Join(cfg.DataDir, "snapshots")}, started: map[string]bool{}, stopsSent: map[string]bool{}, leaving: map[string]chan struct{}{},
		pruneWake: make(chan struct{}, 1), began: time.Now()}
	for _, d := range []string{a.runRoot(), a.sandboxRoot(), a.assetDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create agent directory %s: %w", d, err)
		}
	}
	if cfg.Assets == nil {
		cfg.Assets = debianAssets(cfg.InitBinary)
	}
	m := &vms{runRoot: a.runRoot(), scratchMiB: cfg.ScratchMiB, bootTimeout: cfg.BootTimeout, node: cfg.Node, dialVolume: cfg.DialVolume, log: a.log}
	a.vms = m
	if m.volumes, err = volume.NewStore(filepath.Join(cfg.DataDir, "volumes"), volumeServerUID, volumeServerUID); err != nil {
		return nil, err
	}
	m.volumeCgroup = jail.Place{Root: cfg.CgroupRoot, Parent: path.Join(cfg.CgroupParent, volumeCgroupFor(cfg.DataDir))}
	if src := findVolumeServer(cfg.VolumeServer); src == "" {
		m.volumeServerErr = errors.New("this node has no volume server binary (fireworks-volume-server: `make build` puts it beside fireworks; or set FIREWORKS_VOLUME_SERVER)")
		a.log.Warn("no volume server binary: sandboxes that mount volumes cannot start here", "looked_for", "fireworks-volume-server beside "+os.Args[0])
	} else if m.volumeServerBin, err = volume.InstallServer(src, filepath.Join(cfg.DataDir, "volume-server")); err != nil {
		m.volumeServerErr = err
		a.log.Warn("volume server binary unusable: sandboxes that mount volumes cannot start here", "err", err)
	}
	if m.kernel, m.initrd, err = cfg.Assets(ctx, a.assetDir()); err != nil {
		return nil, err
	}
	if a.images, err = image.Open(filepath.Join(cfg.DataDir, "images")); err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	if cfg.Driver != nil {
		m.driver = cfg.Driver
		m.accel = vmm.AccelChoice{Accel: cfg.Driver.Accel(), Reason: "the configured " + cfg.Driver.Name() + " driver's"}
	} else {
		m.accel = vmm.DetectAccel(ctx, a.assetDir(), cfg.Accel, m.kernel.Vmlinux)
		limits := vmm.Limits{MaxVCPUs: cfg.MaxVCPUs, MinMemoryMiB: minMemoryMiB, MaxMemoryMiB: cfg.MaxMemoryMiB}
		if m.driver, err = newDriver(m.accel, limits, cfg); err != nil {
			return nil, err
		}
	}
	a.log.Info("accelerator chosen", "accel", m.accel.Accel, "reason", m.accel.Reason)
	if m.scratch, err = a.scratchTemplate(ctx); err != nil {
		return nil, err
	}
	if m.kernelHash, err = fileHash(m.kernel.Vmlinux); err != nil {
		return nil, fmt.Errorf("hash guest kernel: %w", err)
	}
	m.vmmVersion = "unknown"
	if v, ok := m.driver.(interface{ Version() string }); ok {
		m.vmmVersion = v.Version()
	}
	if cfg.SandboxCIDR == "" {
		cfg.SandboxCIDR = DefaultSandboxCIDR
	}
	rng, err := netip.ParsePrefix(cfg.SandboxCIDR)
	if err != nil || !rng.Addr().Is4() || rng.Bits() > 29 {
		return nil, fmt.Errorf("sandbox CIDR %q: want an IPv4 prefix of /29 or wider", cfg.SandboxCIDR)
	}
	if cfg.Nameservers == nil {
		cfg.Nameservers = network.NodeNameservers()
		if len(cfg.Nameservers) == 0 {
			a.log.Warn("no nameserver in /etc/resolv.conf that guests can reach; guests get no DNS (set the agent's nameservers)")
		}
	}
	if err := proto.ValidateNameservers(cfg.Nameservers); err != nil {
		return nil, fmt.Errorf("nameservers for guests: %w", err)
	}
	var extra []netip.Prefix
	for _, c := range cfg.DenyCIDRs {
		p, err := netip.ParsePrefix(c)
		if err != nil || !p.Addr().Is4() {
			return nil, fmt.Errorf("deny CIDR %q: want an IPv4 prefix", c)
		}
		extra = append(extra, p.Masked())
	}
	var allow []netip.Prefix
	for _, c := range cfg.RegistryAllow {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return nil, fmt.Errorf("registry allow CIDR %q: want a prefix", c)
		}
		allow = append(allow, p.Masked())
	}
	a.userPulls = image.GuardedTransport(allow, func() []netip.Prefix {
		return a.net.Protected() // the node's own addresses, metadata, the sandbox range, --deny-cidr
	})
	a.cfg = cfg
	m.nameservers = cfg.Nameservers
	a.net = cfg.Networks
	if a.net == nil {
		if a.net, err = newNetManager(ctx, a.log, cfg.DataDir, rng, cfg.Nameservers, extra); err != nil {
			return nil, err
		}
	}
	m.net = a.net
	a.ctx, a.cancel = context.WithCancel(context.Background())
	a.fillWake = make(chan struct{}, 1)
	a.templates = newTemplates(filepath.Join(cfg.DataDir, "templates"), int64(cfg.TemplateDiskMiB)<<20, m, a.log)
	a.pools = &warmPools{static: cfg.Pools, pullOptions: a.PullOptions, userRootDisk: a.userRootDisk, templates: a.templates, vms: m, images: a.images, pullTimeout: cfg.PullTimeout,
		shape: a.shape, sandboxUsage: a.sandboxUsage, maxVCPUs: cfg.MaxVCPUs, maxMemoryMiB: cfg.MaxMemoryMiB,
		wake: a.wakeFill, log: a.log.With("part", "pools"), pools: map[string]*pool{}}
	a.slots = newRestoreSlots(a.templates, m, a.wakeFill, a.log)
	a.templates.pinned = a.pools.templateKeys
	a.templates.dropped = func(hash string) {
		a.slots.drop(hash)
		a.pools.templateGone(hash)
	}
	if err := a.recover(ctx); err != nil {
		a.Close() // the sandboxes adopted so far are left running for the next agent
		return nil, err
	}
	a.adoptRelays(ctx)
	if err := a.templates.open(); err != nil {
		return nil, err
	}
	a.pools.setPools(nil)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.fillLoop(a.ctx)
	}()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.net.Run(a.ctx)
	}()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.pruneImages(a.ctx)
	}()
	if cfg.MetricsListen != "" {
		if err := a.serveMetrics(cfg.MetricsListen); err != nil {
			a.Close()
			return nil, err
		}
	}
	return a, nil
}

func (a *Agent) runRoot() string     { return filepath.Join(a.cfg.DataDir, "run") }
func (a *Agent) sandboxRoot() string { return filepath.Join(a.cfg.DataDir, "sandboxes") }
func (a *Agent) assetDir() string    { return filepath.Join(a.cfg.DataDir, "assets") }

// LogPath is where a sandbox's output is kept (it outlives the VM).
func (a *Agent) LogPath(id string) string {
	return filepath.Join(a.sandboxRoot(), id, "output.log")
}

// Images is the node's image store.
func (a *Agent) Images() *image.Store { return a.images }

// RemovedImage says what an image's removal took with it and what it left running.
type RemovedImage struct {
	TemplatesDropped int // template snapshots of it (they restore from its root disk)
	SandboxesUsing   int // sandboxes still running from it (their open root disk stays)
}

// RemoveImage removes an image (see image.Store.Remove) and, once no name is left for it,
// the templates kept of it: they restore from its root disk.
func (a *Agent) RemoveImage(ctx context.Context, ref string) (RemovedImage, error) {
	img, err := a.images.Get(ctx, ref)
	if err != nil {
		return RemovedImage{}, err
	}
	if ids := a.pausedOn(img.Digest); len(ids) > 0 {
		// Its root disk is what they resume on (a running sandbox keeps its open file;
		// a paused one has none open). As Docker keeps an image a stopped container uses.
		return RemovedImage{}, fmt.Errorf("%w: image %s is used by paused sandbox(es) or snapshots with memory: %s: resume or remove them first", ErrImageInUse, ref, strings.Join(ids, ", "))
	}
	if err := a.images.Remove(ctx, ref); err != nil {
		return RemovedImage{}, err
	}
	var out RemovedImage
	if _, err := a.images.Get(ctx, img.Digest); errors.Is(err, image.ErrNotFound) {
		out.TemplatesDropped = a.templates.dropImage(img.Digest)
		out.SandboxesUsing = a.imageUsers(img.Digest)
	}
	return out, nil
}

// Info describes the node.
type Info struct {
	Node          string
	Accel         string
	AccelReason   string
	KernelRelease string
	InitVersion   string
	QEMUVersion   string
	NodeVCPUs     int
	NodeMemoryMiB int64
	MaxVCPUs      int
	MaxMemoryMiB  int
	Running       int
	DataDir       string
}

// Info reports what this node runs sandboxes with.
func (a *Agent) Info() Info {
	a.mu.Lock()
	n := len(a.live)
	a.mu.Unlock()
	return Info{
		Node: a.cfg.Node, Accel: a.vms.accel.Accel, AccelReason: a.vms.accel.Reason,
		KernelRelease: a.vms.kernel.Release, InitVersion: a.vms.initrd.Version, QEMUVersion: a.vms.vmmVersion,
		NodeVCPUs: runtime.NumCPU(), NodeMemoryMiB: hostMemoryMiB(),
		MaxVCPUs: a.cfg.MaxVCPUs, MaxMemoryMiB: a.cfg.MaxMemoryMiB, Running: n, DataDir: a.cfg.DataDir,
	}
}

// pruneImages keeps the image store within its disk budget until ctx ends: after pulls,
// and every 30 seconds, the least recently used images nothing needs (and no start used
// in the last 10 seconds) are removed.
func (a *Agent) pruneImages(ctx context.Context) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.pruneWake:
		case <-t.C:
		}
		// Each token's share first (a root disk built since its start counts now), then
		// the node's budget.
		if owners, err := a.images.Owners(); err == nil {
			for _, o := range owners {
				if err := a.FitImages(ctx, o, ""); err != nil && !errors.Is(err, image.ErrOwnerBudget) && ctx.Err() == nil {
					a.log.Warn("keep a token's images within its share", "owner", o, "err", err)
				}
			}
		}
		budget := int64(a.cfg.ImageDiskMiB) << 20
		if _, err := a.images.Prune(ctx, budget, 10*time.Second, a.imageInUse); err != nil && ctx.Err() == nil {
			a.log.Warn("keep images within their disk budget", "err", err)
		}
		if used := a.images.Usage(); used > budget {
			a.log.Debug("images take more than their disk budget, all in use or just used", "used_mib", used>>20, "budget_mib", budget>>20)
		}
	}
}

// imageInUse says whether a sandbox on this node runs from the image with digest, or a
// template or warm pool of the node needs it.
func (a *Agent) imageInUse(digest string) bool {
	return a.imageRunning(digest) || a.templates.needsImage(digest, true) || a.pools.needsImage(digest, true)
}

// imageBusy is imageInUse without the templates merely kept for later: what keeps a
// token's share from letting an image go (its templates go with it, see FitImages).
func (a *Agent) imageBusy(digest string) bool {
	return a.imageRunning(digest) || a.templates.needsImage(digest, false) || a.pools.needsImage(digest, false)
}

// imageRunning says whether a sandbox on this node runs (or starts) from the image.
func (a *Agent) imageRunning(digest string) bool {
	return a.imageUsers(digest) > 0 || len(a.pausedOn(digest)) > 0
}

// ErrImageInUse refuses to remove an image a paused sandbox needs.
var ErrImageInUse = errors.New("image in use")

// pausedOn lists the sandboxes paused on this node whose saved state runs on the image
// with digest, and the snapshots with memory of it.
func (a *Agent) pausedOn(digest string) []string {
	entries, _ := os.ReadDir(a.sandboxRoot())
	var out []string
	for _, e := range entries {
		rec, err := readSavedRecord(a.savedDir(e.Name()))
		if err == nil && rec.ImageDigest == digest {
			out = append(out, e.Name())
		}
	}
	// Snapshots with memory need the very root disk too.
	stored, _ := a.snaps.List()
	for _, sn := range stored {
		rec, err := readSavedRecord(a.snapshotDir(sn.ID))
		if err == nil && rec.ImageDigest == digest {
			out = append(out, "snapshot "+sn.ID)
		}
	}
	return out
}

// dropTemplates removes the templates of an image the store let go.
func (a *Agent) dropTemplates(digest string) { a.templates.dropImage(digest) }

// imageUsers counts the sandboxes on this node that run from the image with digest.
func (a *Agent) imageUsers(digest string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, s := range a.live {
		s.mu.Lock()
		d := s.started.ImageDigest
		s.mu.Unlock()
		// nil: still pulling. What it pulls is kept by the store itself (used within the
		// last minutes), so one slow pull does not keep every other image.
		if d != nil && *d == digest {
			n++
		}
	}
	return n
}

// PullOptions are the options of a pull on behalf of a sandbox or a caller: an admin's
// (private) reaches any registry address, anyone else's only public ones and the
// operator's --registry-allow ranges, and counts against its owner's share of the
// node's image disk (see FitImages).
func (a *Agent) PullOptions(insecure []string, private bool, owner string) image.PullOptions {
	o := image.PullOptions{InsecureRegistries: insecure}
	if !private {
		o.Transport, o.User, o.Owner = a.userPulls, true, owner
		o.Reserve = func(ctx context.Context, n int64) (func(), error) { return a.reservePull(ctx, owner, n) }
	}
	return o
}

// userRootDisk builds (or finds) the root disk of a user token's image within the room
// left in the token's share, one build of the token's at a time: so what a token's builds
// write, staging trees included, stays near its share however many it starts at once.
func (a *Agent) userRootDisk(ctx context.Context, owner string, img *image.Image) (string, string, error) {
	if img.RootDisk != "" {
		return a.images.RootDisk(ctx, img)
	}
	a.buildsMu.Lock()
	if a.builds == nil {
		a.builds = map[string]chan struct{}{}
	}
	slot := a.builds[owner]
	if slot == nil {
		slot = make(chan struct{}, 1)
		a.builds[owner] = slot
	}
	a.buildsMu.Unlock()
	select {
	case slot <- struct{}{}:
		defer func() { <-slot }()
	case <-ctx.Done():
		return "", "", ctx.Err()
	}
	// The room is what the token's images that cannot go (they run, or are this one)
	// leave: the others go after the build if the new disk needs their space (FitImages).
	held, err := a.images.OwnerImages(owner)
	if err != nil {
		return "", "", err
	}
	var pinned int64
	for d, n := range held {
		if d == img.Digest || a.imageBusy(d) {
			pinned += n
		}
	}
	room := int64(a.cfg.ImageMiBPerOwner)<<20 - pinned
	if room <= 0 {
		return "", "", fmt.Errorf("on node %s (--image-mib-per-token): %w: no room left for a root disk", a.cfg.Node, image.ErrOwnerBudget)
	}
	p, fs, err := a.images.RootDiskWithin(ctx, img, room)
	if errors.Is(err, image.ErrTooLarge) {
		err = fmt.Errorf("%w (on node %s the files may take at most the %d MiB left in this token's share, --image-mib-per-token)", err, a.cfg.Node, room>>20)
	}
	return p, fs, err
}

// reservePull makes room in owner's share for a download of n bytes before it starts:
// what the owner's pulls in flight take counts, and its least recently used images go
// first. Without it, pulls of huge images would fill the disk (and push other tokens'
// images out under the node's budget) before FitImages ever ran.
func (a *Agent) reservePull(ctx context.Context, owner string, n int64) (func(), error) {
	share := int64(a.cfg.ImageMiBPerOwner) << 20
	a.pullMu.Lock() // one reservation at a time: the check and the count go together
	defer a.pullMu.Unlock()
	if a.pulling == nil {
		a.pulling = map[string]int64{}
	}
	room := share - n - a.pulling[owner]
	if room < 0 {
		return nil, fmt.Errorf("on node %s (--image-mib-per-token): %w: the image's layers take %d MiB and this token's pulls under way %d MiB more, %d MiB allowed",
			a.cfg.Node, image.ErrOwnerBudget, n>>20, a.pulling[owner]>>20, share>>20)
	}
	if err := a.images.FitOwner(ctx, owner, max(room, 1), "", ownerGrace, a.imageBusy, a.dropTemplates); err != nil {
		return nil, fmt.Errorf("on node %s (--image-mib-per-token), making room for %d MiB of layers: %w", a.cfg.Node, n>>20, err)
	}
	a.pulling[owner] += n
	return func() {
		a.pullMu.Lock()
		defer a.pullMu.Unlock()
		if a.pulling[owner] -= n; a.pulling[owner] <= 0 {
			delete(a.pulling, owner)
		}
	}, nil
}

// ownerGrace keeps an image a start used this recently from its token's share: the start
// may be between its pull and telling imageBusy about it.
const ownerGrace = 2 * time.Second

// FitImages keeps what owner's images take on this node within ImageMiBPerOwner: its own
// least recently used images that nothing runs from go first (with the templates kept
// of them, when no other token holds the image), then (if still over) keep, the image it
// just pulled, and the pull fails naming the figures.
func (a *Agent) FitImages(ctx context.Context, owner, keep string) error {
	err := a.images.FitOwner(ctx, owner, int64(a.cfg.ImageMiBPerOwner)<<20, keep, ownerGrace, a.imageBusy, a.dropTemplates)
	if err != nil {
		return fmt.Errorf("on node %s (--image-mib-per-token): %w", a.cfg.Node, err)
	}
	return nil
}

// Close stops every sandbox goroutine's VM and waits for them. Sandboxes that were running
// are left to the next start's recovery (marked lost), because state cannot be written after
// the store closes.
func (a *Agent) Close() error {
	a.cancel()
	a.wg.Wait()
	// The fill loop ended with a.wg; templates being built stop, and the VMs kept ahead
	// end (they are cheap to make again; a restarted agent sweeps any it could not end).
	a.templates.close()
	a.pools.close()
	a.slots.drop("")
	a.net.Close()
	a.releaseRelays()
	a.unmountVolumes()
	if a.vms.volumeServerBin != "" {
		// Running servers keep their copy (their jails' binds hold it).
		_ = unix.Unmount(filepath.Dir(a.vms.volumeServerBin), unix.MNT_DETACH)
	}
	return nil
}

// findVolumeServer is the volume server binary: given, $FIREWORKS_VOLUME_SERVER, or beside
// this executable ("" if none).
func findVolumeServer(given string) string {
	for _, p := range []string{given, os.Getenv("FIREWORKS_VOLUME_SERVER")} {
		if p != "" {
			return p
		}
	}
	if exe, err := os.Executable(); err == nil {
		if exe, err = filepath.EvalSymlinks(exe); err == nil {
			p := filepath.Join(filepath.Dir(exe), volume.ServerName)
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	return ""
}

// sandbox is the live, in-memory side of a sandbox on this node.
type sandbox struct {
	// ctx is the sandbox's own life: cancelled by a stop that arrives while it is still
	// starting (pull, boot), and by the agent shutting down.
	ctx    context.Context
	cancel context.CancelFunc
	id     string
	dir    string // run dir: sockets, scratch disk, console log, qemu cmdline
	log    *sandboxlog.Writer
	ready  chan struct{} // closed once main is set (or the start failed)

	mu       sync.Mutex
	vm       vmm.VM
	net      SandboxNet // nil without a network
	guest    *client.Client
	main     *client.Session
	proc     process // the main process as resolved; exec inherits from it
	spec     state.SandboxSpec
	restarts int  // the run (restart count) this node executes
	resumes  int  // and its resume count
	pausing  bool // a pause is saving it: its end is reported by Pause, not supervise
	// migrating, while this node migrates it away, delivers how that ended (see
	// migrateOut); supervise waits for it when the main process is lost meanwhile.
	migrating chan migrationOutcome
	// incoming, on a migration's target, is that migration until its switch-over;
	// incomingMid its ID, kept (see Reconcile).
	incoming    *incoming
	incomingMid string
	guestLn     net.Listener // the guest channel's listener (a failed migration reconnects)
	// guestGate, while a migration away is under way, closes once it is settled (the
	// guest taken back, or moved away: movedAway); execs wait for it.
	guestGate chan struct{}
	movedAway bool
	// groupReady, for a sidecar, closes once its readiness check passed (see
	// probeSidecar).
	groupReady chan struct{}
	// stopMigration, while a migration away is under way, ends it here (a stop wins
	// over it: the state has ended it already).
	stopMigration context.CancelFunc
	// execStarts counts the execs starting in the guest (past the gate, not yet in
	// execs): a migration waits for them before it ends the sessions under way, so
	// none starts unseen as the guest lets go of its sessions.
	execStarts int
	netBase    NetStats              // network counters carried over a pause
	conns      map[*runConn]struct{} // connections into the guest (see DialSandbox)
	// execs are the exec sessions under way, each with why the node ended it ("" while
	// it has not: see Pause).
	execs map[*client.Session]string
	// snapshotting: a filesystem snapshot of it is being taken (one at a time).
	snapshotting bool
	// ranBefore is how long earlier runs ran before pauses, runSince when this one's
	// supervision began: --timeout counts running time across pauses.
	ranBefore time.Duration
	runSince  time.Time
	node      string // the node the control plane placed it on ("" in dev before the first report)
	stopping  string // why a stop was requested; "" if none
	keep      bool   // the VM was detached for the next agent to adopt: cleanups leave it
	stopCode  int
	done      chan struct{}
	// started holds what the start learned (image digest, runtime details); it is
	// written with the running (or failed) status, one state write instead of several
	// on the start's critical path.
	started state.Update
}

// Start launches a created sandbox. It returns at once; progress is written to the store.
func (a *Agent) Start(sb state.Sandbox) error {
	a.mu.Lock()
	if _, ok := a.live[sb.ID]; ok {
		a.mu.Unlock()
		return fmt.Errorf("sandbox %s is already started", sb.ID)
	}
	if err := os.MkdirAll(filepath.Join(a.sandboxRoot(), sb.ID), 0o700); err != nil {
		a.mu.Unlock()
		return fmt.Errorf("create sandbox directory: %w", err)
	}
	w, err := a.openLog(sb)
	if err != nil {
		a.mu.Unlock()
		return err
	}
	s := &sandbox{id: sb.ID, dir: filepath.Join(a.runRoot(), sb.ID), log: w, ready: make(chan struct{}), done: make(chan struct{}), spec: sb.Spec, restarts: sb.Restarts, resumes: sb.Resumes, node: sb.Node,
		groupReady: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(a.ctx)
	a.live[sb.ID] = s
	a.mu.Unlock()

	a.goSandbox(s, func() { a.run(s, sb) })
	return nil
}

// goSandbox runs a live sandbox's goroutine, owned by the agent: when fn returns, the
// sandbox stops being live here and its waiters are released.
func (a *Agent) goSandbox(s *sandbox, fn func()) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer func() {
			a.mu.Lock()
			if a.live[s.id] == s {
				delete(a.live, s.id)
			}
			if a.incomingRuns[s.id] == s {
				delete(a.incomingRuns, s.id)
			}
			a.mu.Unlock()
			// Its group's other members lose it as a peer (its address may go to
			// another sandbox).
			a.refreshGroup(s.spec.Group)
			s.cancel()
			s.closeConns()
			close(s.done)
		}()
		fn()
	}()
}

// update writes a lifecycle change; failures are logged because the sandbox goroutine has
// nobody to return them to.
func (a *Agent) update(id string, u state.Update) {
	if u.Time.IsZero() {
		u.Time = time.Now()
	}
	// Pin the report to the run this node is executing, so it cannot land on a later
	// run of the same sandbox (restarted, possibly on this node again).
	a.mu.Lock()
	if s := a.live[id]; s != nil {
		r, res := s.restarts, s.resumes
		u.IfRestarts, u.IfResumes = &r, &res
		if s.node != "" {
			n := s.node
			u.IfNode = &n
		}
	}
	a.mu.Unlock()
	a.report(id, u)
}

func status(s state.Status) *state.Status { return &s }

// fail records a start that did not get as far as running the command. A start aborted
// by a user's stop is recorded as stopped, not as a failure.
func (a *Agent) fail(s *sandbox, reason string) {
	if a.ctx.Err() != nil {
		// The agent is shutting down, which is why the start broke off: record nothing;
		// the next start's recovery accounts for the sandbox.
		return
	}
	s.mu.Lock()
	stopping, code, u, in := s.stopping, s.stopCode, s.started, s.incoming
	s.mu.Unlock()
	if in != nil && !a.committed(in) {
		// A migration's target that failed before the switch-over: the sandbox runs on
		// at its source, which settles the migration; nothing here is news of it.
		a.log.Warn("receiving a migrating sandbox failed", "sandbox", s.id, "migration", in.mid, "reason", reason)
		return
	}
	if stopping != "" {
		sig := 0
		u.Status, u.Reason, u.ExitCode, u.Signal = status(state.StatusExited), stopping+" while starting", &code, &sig
		a.updateRun(s, u)
		return
	}
	a.log.Warn("sandbox failed", "sandbox", s.id, "reason", reason)
	u.Status, u.Reason = status(state.StatusFailed), reason
	a.updateRun(s, u)
}

// updateRun writes a lifecycle change of run s, pinned to it (whether or not it is the
// sandbox's live run here: a migration's target is not until it takes over).
func (a *Agent) updateRun(s *sandbox, u state.Update) {
	if u.Time.IsZero() {
		u.Time = time.Now()
	}
	r, res, n := s.restarts, s.resumes, s.node
	u.IfRestarts, u.IfResumes = &r, &res
	if n != "" {
		u.IfNode = &n
	}
	a.report(s.id, u)
}

// supervise pumps the main process's output to the log and records how it ended.
//
// reported is closed once the sandbox's "running" is reported: its end is reported after.
func (a *Agent) supervise(ctx context.Context, s *sandbox, sb state.Sandbox, vm vmm.VM, main *client.Session, reported <-chan struct{}) {
	defer func() { <-reported }()
	var pumps sync.WaitGroup
	pump := func(r io.Reader, stream int) {
		defer pumps.Done()
		if r == nil {
			return
		}
		_, _ = io.Copy(s.log.StreamWriter(stream), r)
	}
	pumps.Add(2)
	go pump(main.Stdout(), sandboxlog.Stdout)
	go pump(main.Stderr(), sandboxlog.Stderr)
	if !sb.Spec.Stdin {
		_ = main.Stdin().Close()
	}

	var timeout <-chan time.Time
	s.mu.Lock()
	s.runSince = time.Now()
	left := sb.Spec.Timeout - s.ranBefore
	s.mu.Unlock()
	if sb.Spec.Timeout > 0 {
		t := time.NewTimer(max(left, time.Millisecond))
		defer t.Stop()
		timeout = t.C
	}
	type exit struct {
		st  proto.ExitStatus
		err error
	}
	exited := make(chan exit, 1)
	wait := func(main *client.Session) {
		go func() {
			st, err := main.Wait(context.Background())
			exited <- exit{st, err}
		}()
	}
	wait(main)

	var (
		st     proto.ExitStatus
		reason string
		failed bool
	)
watch:
	select {
	case e := <-exited:
		st = e.st
		if e.err != nil {
			failed, reason = true, fmt.Sprintf("lost the main process: %v", e.err)
			// The guest channel breaking is most often the VMM dying; give the driver a
			// moment to reap it so the reason names the real cause.
			select {
			case <-vm.Wait():
			case <-time.After(2 * time.Second):
			}
			if vm.ExitError() != nil {
				reason = fmt.Sprintf("VMM died: %v", vm.ExitError())
			}
		}
	case <-vm.Wait():
		failed, reason = true, fmt.Sprintf("VMM died: %v", vm.ExitError())
	case <-timeout:
		_ = vm.Kill()
		failed, reason = true, fmt.Sprintf("timed out after %s", sb.Spec.Timeout)
		st = proto.ExitStatus{Code: 124}
	case <-ctx.Done():
		if a.ctx.Err() != nil {
			// The node agent is shutting down: leave the VM running for the next agent
			// to adopt (the record stays running); without a way to detach, stop it and
			// let the next start's recovery mark it lost.
			if !a.detachForAdoption(s, vm) {
				_ = vm.Kill()
			}
			pumps.Wait()
			return
		}
		// A stop cancelled the sandbox just as it started running.
		failed, reason = true, "stopped"
	}
	s.mu.Lock()
	migration := s.migrating
	s.mu.Unlock()
	if failed && migration != nil && reason != fmt.Sprintf("timed out after %s", sb.Spec.Timeout) {
		// Lost to a live migration of it (see migrateOut): it moved away, or the
		// migration failed and the main process was taken back on a new connection.
		o := <-migration
		s.mu.Lock()
		s.migrating = nil
		s.mu.Unlock()
		if o.moved {
			pumps.Wait()
			return
		}
		if o.main != nil {
			pumps.Wait() // the old connection's streams ended with it
			main, failed, reason, st = o.main, false, "", proto.ExitStatus{}
			pumps.Add(2)
			go pump(main.Stdout(), sandboxlog.Stdout)
			go pump(main.Stderr(), sandboxlog.Stderr)
			if !sb.Spec.Stdin {
				_ = main.Stdin().Close()
			}
			wait(main)
			goto watch
		}
		// Neither moved nor taken back: lost here (or stopped, if a stop caused it).
		reason = o.lost
	}
	if !failed {
		// The guest closes the output streams before it reports the exit; wait for the
		// pumps so the log is complete before the status says the sandbox finished.
		pumps.Wait()
	} else {
		_ = vm.Kill()
		pumps.Wait()
	}
	<-reported
	s.mu.Lock()
	stopping, stopCode, pausing := s.stopping, s.stopCode, s.pausing
	s.mu.Unlock()
	if pausing {
		// Saved and ended by Pause, which reports it paused (or failed).
		return
	}
	// The guest is untrusted: keep what it reports in the ranges a process can have.
	code, sig := st.Code, st.Signal
	if code < -1 || code > 255 {
		code = -1
	}
	if sig < 0 || sig > 64 {
		sig = 0
	}
	if !failed && st.ErrKind == proto.ErrKindSetup {
		// The command never started (unknown user, unusable working directory, an
		// environment too large for exec): that is a failure to run, not an exit code.
		failed, reason = true, "cannot start the command: "+st.Err
		code = 125
	}
	switch {
	case stopping != "":
		// A command that exits by itself after SIGTERM keeps its own code; one the stop
		// had to kill gets 128+signal.
		if failed {
			code, sig = stopCode, 0
		}
		a.update(sb.ID, state.Update{Status: status(state.StatusExited), Reason: stopping, ExitCode: &code, Signal: &sig})
	case failed:
		a.update(sb.ID, state.Update{Status: status(state.StatusFailed), Reason: reason, ExitCode: &code, Signal: &sig})
	default:
		reason := exitReason(st)
		a.update(sb.ID, state.Update{Status: status(state.StatusExited), Reason: reason, ExitCode: &code, Signal: &sig})
	}
	// Ask the guest to power off cleanly; the cleanup stack escalates if it does not.
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	s.mu.Lock()
	g := s.guest
	s.mu.Unlock()
	_ = g.Shutdown(sctx)
	cancel()
}

func exitReason(st proto.ExitStatus) string {
	switch {
	case st.ErrKind == proto.ErrKindNotFound:
		return "command not found: " + st.Err
	case st.ErrKind == proto.ErrKindNotExecutable:
		return "command not executable: " + st.Err
	case st.Err != "":
		return st.Err
	case st.Signal != 0:
		return fmt.Sprintf("killed by signal %d", st.Signal)
	default:
		return fmt.Sprintf("exit code %d", st.Code)
	}
}

func (a *Agent) lookup(id string) (*sandbox, error) {
	a.mu.Lock()
	s := a.live[id]
	a.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("sandbox %s: %w", id, ErrNotRunning)
	}
	return s, nil
}

// NodeName is the name this node goes by in the cluster.
func (a *Agent) NodeName() string { return a.cfg.Node }

// Spec returns the spec of a sandbox live on this node.
func (a *Agent) Spec(id string) (state.SandboxSpec, bool) {
	s, err := a.lookup(id)
	if err != nil {
		return state.SandboxSpec{}, false
	}
	return s.spec, true
}

// Live returns the writer of a sandbox's log while it runs on this node (nil otherwise), so
// readers can follow it.
func (a *Agent) Live(id string) *sandboxlog.Writer {
	s, err := a.lookup(id)
	if err != nil {
		return nil
	}
	return s.log
}

// Done returns a channel closed when the sandbox's goroutine on this node has finished
// (closed already if it is not live here).
func (a *Agent) Done(id string) <-chan struct{} {
	s, err := a.lookup(id)
	if err != nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return s.done
}

// MainSession waits until the main process started and returns it.
func (a *Agent) MainSession(ctx context.Context, id string) (*client.Session, error) {
	s, err := a.lookup(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-s.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.main == nil {
		return nil, fmt.Errorf("sandbox %s: %w", id, ErrNotRunning)
	}
	return s.main, nil
}

// Exec starts another process in a running sandbox.
func (a *Agent) Exec(ctx context.Context, id string, req proto.ExecRequest) (*client.Session, error) {
	s, err := a.lookup(id)
	if err != nil {
		return nil, err
	}
	for {
		s.mu.Lock()
		gate, moved := s.guestGate, s.movedAway
		if gate == nil && !moved {
			s.execStarts++
		}
		s.mu.Unlock()
		if moved {
			// Within this node the run it moved to is here (taking over, or taken over):
			// the exec runs there. Across nodes the caller makes the call again there.
			a.mu.Lock()
			next := a.incomingRuns[id]
			if next == nil {
				next = a.live[id]
			}
			a.mu.Unlock()
			if next == nil || next == s {
				return nil, fmt.Errorf("sandbox %s: %w", id, ErrMovedAway)
			}
			s = next
			continue
		}
		if gate == nil {
			break
		}
		// Migrating: the exec runs wherever the sandbox runs once that is settled.
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		next, err := a.lookup(id)
		if err != nil {
			return nil, fmt.Errorf("sandbox %s: %w", id, ErrMovedAway)
		}
		s = next
	}
	defer func() {
		s.mu.Lock()
		s.execStarts--
		s.mu.Unlock()
	}()
	// A run still starting (a migration's target taking the guest over) is waited for.
	select {
	case <-s.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	g, main := s.guest, s.proc
	s.mu.Unlock()
	if g == nil {
		return nil, fmt.Errorf("sandbox %s: %w", id, ErrNotRunning)
	}
	sess, err := g.Exec(ctx, execDefaults(main, req))
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.execs == nil {
		s.execs = map[*client.Session]string{}
	}
	s.execs[sess] = ""
	s.mu.Unlock()
	return sess, nil
}

// ExecDone forgets exec session sess of sandbox id (its caller is done with it) and
// says why the node ended it, if it did.
func (a *Agent) ExecDone(id string, sess *client.Session) string {
	// The session is the live run's, or, within a migration on this node, the incoming
	// run's that an exec waiting for the migration went to (see Exec).
	a.mu.Lock()
	runs := []*sandbox{a.live[id], a.incomingRuns[id]}
	a.mu.Unlock()
	for _, s := range runs {
		if s == nil {
			continue
		}
		s.mu.Lock()
		why, ok := s.execs[sess]
		delete(s.execs, sess)
		s.mu.Unlock()
		if ok {
			return why
		}
	}
	return ""
}

// endExecs ends the sandbox's exec sessions under way (SIGKILL), saying why, and waits a
// little for the guest to report their ends (their callers pass it on).
func (a *Agent) endExecs(ctx context.Context, s *sandbox, why string) {
	s.mu.Lock()
	var sessions []*client.Session
	for sess := range s.execs {
		s.execs[sess] = why
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for _, sess := range sessions {
		_ = sess.Signal(ctx, int(syscall.SIGKILL))
	}
	for _, sess := range sessions {
		_, _ = sess.Wait(ctx)
	}
}

// Stop ends a running sandbox: SIGTERM to its main process, then after grace the VM is
// killed. It returns once the sandbox's VM is gone.
func (a *Agent) Stop(ctx context.Context, id string, grace time.Duration) error {
	s, err := a.lookup(id)
	if err != nil {
		return err
	}
	return a.stopRun(ctx, s, grace)
}

// stopRun is Stop of run s of a sandbox.
func (a *Agent) stopRun(ctx context.Context, s *sandbox, grace time.Duration) error {
	s.mu.Lock()
	if s.stopping == "" {
		s.stopping, s.stopCode = "stopped by request", 128+int(syscall.SIGTERM)
	}
	gate, stopMigration := s.guestGate, s.stopMigration
	s.mu.Unlock()
	if gate != nil {
		// Migrating away: the guest holds the main process meanwhile, so no signal
		// would reach it. The migration stops here and the guest is taken back; then
		// the main process is signalled as in any stop.
		if stopMigration != nil {
			stopMigration()
		}
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.mu.Lock()
	main, moved := s.main, s.movedAway
	s.mu.Unlock()
	if moved {
		// The switch-over was committed before the stop: this run ends by itself, and
		// the sandbox runs where it moved. On another node the stop goes there; on this
		// one (a migration in place) it is the run that took over that stops.
		select {
		case <-s.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		a.mu.Lock()
		next := a.incomingRuns[s.id]
		if next == nil {
			next = a.live[s.id]
		}
		a.mu.Unlock()
		if next == nil || next == s {
			return nil
		}
		return a.stopRun(ctx, next, grace)
	}
	if main == nil {
		// Still pulling or booting: there is no process to signal, so abort the start.
		s.cancel()
	} else {
		_ = main.Signal(ctx, int(syscall.SIGTERM))
	}
	select {
	case <-s.done:
		return nil
	case <-time.After(grace):
	case <-ctx.Done():
		return ctx.Err()
	}
	s.mu.Lock()
	s.stopCode = 128 + int(syscall.SIGKILL)
	vm := s.vm // read again: the VM may have been created during the grace period
	s.mu.Unlock()
	s.cancel()
	if vm != nil {
		_ = vm.Kill()
	}
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// openLog opens sb's output log, capped on its own (MaxLogBytes) and with its owner's
// other logs on this node (MaxLogBytesPerOwner).
func (a *Agent) openLog(sb state.Sandbox) (*sandboxlog.Writer, error) {
	w, err := sandboxlog.CreateLimited(a.LogPath(sb.ID), a.cfg.MaxLogBytes)
	if err != nil {
		return nil, err
	}
	a.logMu.Lock()
	defer a.logMu.Unlock()
	if a.logBudgets == nil {
		a.logBudgets, a.logOwners = map[string]*sandboxlog.Budget{}, map[string]string{}
	}
	b := a.logBudgets[sb.Owner]
	if b == nil {
		// What the owner's earlier logs on this node take (an agent restart, exited
		// sandboxes not removed yet) counts from the start.
		var used int64
		if all, err := a.store.ListSandboxes(a.ctx); err == nil {
			for _, o := range all {
				if o.Owner == sb.Owner && o.ID != sb.ID {
					if fi, err := os.Stat(a.LogPath(o.ID)); err == nil {
						used += fi.Size()
						a.logOwners[o.ID] = sb.Owner
					}
				}
			}
		}
		b = sandboxlog.NewBudget(a.cfg.MaxLogBytesPerOwner, used)
		a.logBudgets[sb.Owner] = b
	}
	if _, charged := a.logOwners[sb.ID]; !charged {
		if fi, err := os.Stat(a.LogPath(sb.ID)); err == nil && fi.Size() > 0 {
			b.Charge(fi.Size()) // an adopted sandbox's log so far
		}
	}
	a.logOwners[sb.ID] = sb.Owner
	w.SetBudget(b)
	return w, nil
}

// releaseLog credits a removed sandbox's log back to its owner's budget.
func (a *Agent) releaseLog(id string) {
	fi, err := os.Stat(a.LogPath(id))
	a.logMu.Lock()
	defer a.logMu.Unlock()
	owner, ok := a.logOwners[id]
	if !ok {
		return
	}
	delete(a.logOwners, id)
	if b := a.logBudgets[owner]; b != nil && err == nil {
		b.Give(fi.Size())
	}
}

// Remove deletes what the node keeps for a finished sandbox.
func (a *Agent) Remove(id string) error {
	if _, err := a.lookup(id); err == nil {
		return fmt.Errorf("sandbox %s is still running on this node", id)
	}
	a.releaseLog(id)
	if err := os.RemoveAll(filepath.Join(a.sandboxRoot(), id)); err != nil {
		return fmt.Errorf("remove sandbox files of %s: %w", id, err)
	}
	if err := a.removeRunDir(id); err != nil {
		return fmt.Errorf("remove run directory of %s: %w", id, err)
	}
	return nil
}

// removeRunDir removes run/<name>, and the warm VM directory it links to if it is a link.
func (a *Agent) removeRunDir(name string) error {
	p := filepath.Join(a.runRoot(), name)
	if target, err := os.Readlink(p); err == nil && filepath.Base(target) == target && target != "" {
		if err := os.RemoveAll(filepath.Join(a.runRoot(), target)); err != nil {
			return err
		}
	}
	return os.RemoveAll(p)
}

// recover runs at start: sandboxes the store believes are live on this node have lost their
// supervisor (this process restarted). Their VMMs are killed and they are marked lost;
// leftover run directories are swept.
func (a *Agent) recover(ctx context.Context) error {
	all, err := a.store.ListSandboxes(ctx)
	if err != nil {
		return fmt.Errorf("list sandboxes for recovery: %w", err)
	}
	var mine []state.Sandbox
	for _, sb := range all {
		if sb.Status.Terminal() || sb.Node != a.cfg.Node {
			continue // over, or another node's (whose files or volumes are here)
		}
		if sb.Status == state.StatusPaused || (sb.Status == state.StatusPending && sb.Saved != nil) {
			// No VM: its saved state waits on disk for a resume (Reconcile starts one).
			continue
		}
		mine = append(mine, sb)
	}
	// Running sandboxes whose VM the previous agent left behind are taken back; the rest
	// (still starting, or not adoptable) lose their VM and are marked lost.
	var running []state.Sandbox
	for _, sb := range mine {
		if sb.Status == state.StatusRunning {
			running = append(running, sb)
		}
	}
	failed := a.adoptAll(ctx, running)
	if ctx.Err() != nil {
		// Stopped while taking its sandboxes back: the VMs not adopted yet were left
		// running, and nothing is marked lost or swept; the next agent takes them all.
		return fmt.Errorf("stopped while taking back this node's sandboxes: %w", ctx.Err())
	}
	for _, sb := range mine {
		if a.isLive(sb.ID) {
			continue
		}
		reason := "the node agent restarted while the sandbox was " + string(sb.Status) + "; its VM was stopped"
		if err := failed[sb.ID]; err != nil {
			a.log.Warn("could not re-adopt a running sandbox; ending it", "sandbox", sb.ID, "err", err)
			reason = "the node agent restarted and could not re-adopt the sandbox's VM (" + err.Error() + ")"
		}
		if pid, err := strconv.Atoi(sb.Runtime["pid"]); err == nil && pid > 0 {
			killStaleVMM(pid, filepath.Join(a.runRoot(), sb.ID))
		}
		a.update(sb.ID, state.Update{Status: status(state.StatusLost), Reason: reason})
	}
	// A VMM started just before the crash may not have had its pid recorded: find every
	// process still running from a run directory of this node that is not adopted, and
	// end it.
	for _, pid := range vmmsUnder(a.runRoot()) {
		if a.adoptedPID(pid) {
			continue
		}
		a.log.Warn("killing leftover VMM from before the restart", "pid", pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	entries, _ := os.ReadDir(a.runRoot())
	keep := map[string]bool{}
	for _, e := range entries {
		if a.isLive(e.Name()) {
			keep[e.Name()] = true
			if target, err := os.Readlink(filepath.Join(a.runRoot(), e.Name())); err == nil {
				keep[filepath.Base(target)] = true // the warm VM directory a sandbox claimed
			}
		}
	}
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(a.runRoot(), e.Name())); err != nil {
			a.log.Warn("sweep leftover run directory", "dir", e.Name(), "err", err)
		}
	}
	// VMs are named by their run directories: the cgroups of those not kept go too, with
	// whatever still runs in them.
	if s, ok := a.vms.driver.(vmm.CgroupSweeper); ok {
		s.SweepCgroups(func(id string) bool { return keep[id] })
	}
	// Networks belong to VMs (their run directories name them): those of VMs that are
	// gone go too.
	var keepDirs []string
	for name := range keep {
		if real, err := filepath.EvalSymlinks(filepath.Join(a.runRoot(), name)); err == nil {
			keepDirs = append(keepDirs, real)
		}
	}
	a.net.Sweep(ctx, keepDirs)
	return nil
}

// adoptedPID reports whether pid is the VMM of a sandbox this agent adopted.
func (a *Agent) adoptedPID(pid int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, s := range a.live {
		if s.vm != nil && s.vm.Info().PID == pid {
			return true
		}
	}
	return false
}

// killStaleVMM kills pid only if it is a VMM that was started for runDir, so a recycled pid
// never takes down an unrelated process.
// vmmsUnder returns the pids of QEMU processes whose command line names a path under dir
// (every VMM this node starts is given its run directory's sockets and disks).
func vmmsUnder(dir string) []int {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil {
			continue
		}
		argv0, _, _ := strings.Cut(string(cmdline), "\x00")
		if !strings.Contains(filepath.Base(argv0), "qemu") {
			continue
		}
		// Whole arguments (or their "path=" values) under dir: a substring match would
		// also catch another instance whose data dir merely contains ours.
		for _, arg := range strings.Split(string(cmdline), "\x00") {
			if strings.HasPrefix(arg, dir+"/") || strings.Contains(arg, "="+dir+"/") {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

func killStaleVMM(pid int, runDir string) {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), runDir) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// scratchTemplate formats one empty ext4 image that every sandbox's scratch disk is a sparse
// copy of, so a start does not pay for mkfs.
func (a *Agent) scratchTemplate(ctx context.Context) (string, error) {
	path := filepath.Join(a.assetDir(), fmt.Sprintf("scratch-%dM.ext4", a.cfg.ScratchMiB))
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	if err := os.WriteFile(tmp, nil, 0o600); err != nil {
		return "", fmt.Errorf("create scratch template: %w", err)
	}
	if err := os.Truncate(tmp, int64(a.cfg.ScratchMiB)<<20); err != nil {
		return "", fmt.Errorf("size scratch template: %w", err)
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-L", "scratch", tmp).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("mkfs.ext4 scratch template: %v: %s", err, out)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("install scratch template: %w", err)
	}
	return path, nil
}

// fileHash is the hex sha256 of a file's content.
func fileHash(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// copySparse copies src to dst keeping holes (cp knows SEEK_HOLE).
func copySparse(src, dst string) error { return copySparseCtx(context.Background(), src, dst) }

// moveFile renames src to dst, or copies it (sparse) and removes src when they are on
// different filesystems: an operator may mount the data directory's run/ apart (a
// tmpfs, a faster disk).
func moveFile(src, dst string) error {
	err := os.Rename(src, dst)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if err := copySparse(src, dst); err != nil {
		return err
	}
	return os.Remove(src)
}

// linkOrCopy hard-links src at dst, or copies it (sparse) across filesystems.
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	return copySparse(src, dst)
}

// copySparseCtx is copySparse that ends with ctx.
func copySparseCtx(ctx context.Context, src, dst string) error {
	out, err := exec.CommandContext(ctx, "cp", "--sparse=always", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp %s %s: %v: %s", src, dst, err, out)
	}
	return nil
}

// minMemoryMiB is the smallest guest that boots reliably: the Debian cloud kernel plus
// the initramfs deadlock on memory at 64 MiB and fail intermittently below ~96 MiB.
const minMemoryMiB = 128

func hostMemoryMiB() int64 {
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		return 1024
	}
	return int64(si.Totalram) * int64(si.Unit) >> 20
}

// cleanupStack undoes a partial start in reverse order (the E2B pattern).
type cleanupStack struct {
	fns []struct {
		what string
		fn   func() error
	}
}

func (c *cleanupStack) push(what string, fn func() error) {
	c.fns = append(c.fns, struct {
		what string
		fn   func() error
	}{what, fn})
}

func (c *cleanupStack) run(log *slog.Logger) {
	for i := len(c.fns) - 1; i >= 0; i-- {
		if err := c.fns[i].fn(); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, net.ErrClosed) {
			log.Debug("cleanup", "step", c.fns[i].what, "err", err)
		}
	}
}
