// Package vmmtest is the conformance suite every vmm driver runs (the containerd
// snapshots/testsuite pattern): Run boots real guests through the driver and checks the
// behaviour the rest of Fireworks relies on, from the outside.
//
// The guest is a busybox initramfs (see InitScript) speaking a line protocol on the agent
// port, so the suite does not depend on fireworks-init.
package vmmtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
)

// Harness is what the suite needs to boot the test guest with a driver.
type Harness struct {
	Kernel  string
	Initrd  string // built by BuildGuest
	Cmdline string
	// Fresh returns a new driver instance for the adoption test (a restarted host
	// process); nil reuses the driver under test.
	Fresh func() (vmm.Driver, error)
	// BootTimeout bounds the time from Start to the ready marker; default 90 s (TCG on a
	// loaded 2-core machine).
	BootTimeout time.Duration
}

// BootModules are the modules the test guest loads.
var BootModules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk", "virtio_rng",
	"failover", "net_failover", "virtio_net"}

// CacheDir is where test runs keep the downloaded kernel and built initramfs: the one
// cache every test package shares (testutil.AssetCache). A run on a fresh machine fills
// it; nothing requires an earlier run to have done so.
func CacheDir() string { return testutil.AssetCache() }

// DefaultHarness fetches the Debian guest kernel and builds the busybox test guest,
// skipping the test (with the reason) if either is impossible here.
func DefaultHarness(t testing.TB) Harness {
	t.Helper()
	for _, tool := range []string{"apt-get", "apt-cache", "dpkg-deb", "lz4"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found: cannot fetch the Debian guest kernel", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	k, err := assets.EnsureKernel(ctx, CacheDir())
	if err != nil {
		testutil.Skipf(t, "guest kernel unavailable: %v", err)
	}
	ir, err := BuildGuest(ctx, CacheDir(), k)
	if err != nil {
		testutil.Skipf(t, "test guest initramfs: %v", err)
	}
	return Harness{Kernel: k.Vmlinux, Initrd: ir.Path, Cmdline: assets.KernelCmdline(BootModules)}
}

// Run runs the conformance suite against d.
func Run(t *testing.T, d vmm.Driver, h Harness) {
	if h.BootTimeout == 0 {
		h.BootTimeout = 90 * time.Second
	}
	s := &suite{d: d, h: h}
	t.Cleanup(func() { s.reportBoots(t) })

	t.Run("RejectsAbsurdResources", s.testRejects)
	t.Run("RunningGuest", s.testRunningGuest)
	t.Run("GracefulStop", s.testGracefulStop)
	t.Run("GuestPoweroffIsClean", s.testPoweroff)
	t.Run("GuestPanicIsReported", s.testPanic)
	t.Run("KilledVMMIsDetected", s.testKill9)
	t.Run("StopEscalatesOnStuckVMM", s.testStuckStop)
	t.Run("SnapshotRestore", s.testSnapshot)
	t.Run("SaveRestoreWhole", s.testSave)
	t.Run("LiveMigration", s.testMigrate)
	t.Run("LiveMigrationMirrorsDisks", s.testMigrateMirror)
	t.Run("Network", s.testNetwork)
}

type suite struct {
	d vmm.Driver
	h Harness

	mu    sync.Mutex
	boots []time.Duration
}

func (s *suite) reportBoots(t *testing.T) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.boots) == 0 {
		return
	}
	b := append([]time.Duration(nil), s.boots...)
	sort.Slice(b, func(i, j int) bool { return b[i] < b[j] })
	t.Logf("%s/%s boot to ready marker: n=%d min=%s median=%s max=%s", s.d.Name(), s.d.Accel(),
		len(b), b[0].Round(time.Millisecond), b[len(b)/2].Round(time.Millisecond), b[len(b)-1].Round(time.Millisecond))
}

type bootOpts struct {
	vcpus, mem int
	disks      []vmm.Disk
	noWait     bool // return once started, without waiting for the guest
	memFile    string
	restore    *vmm.Snapshot
	prestart   bool // launch the VMM with Prestart before Start
	nics       []vmm.NIC
}

// guest is a booted test VM and the host end of its agent channel.
type guest struct {
	t    *testing.T
	vm   vmm.VM
	spec vmm.Spec
	ln   net.Listener
	conn net.Conn
	r    *bufio.Reader
}

// shortDir makes a run directory with a short path: unix socket paths are limited to 107
// bytes and t.TempDir embeds the (long) test name.
func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "fwvm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (s *suite) spec(t *testing.T, o bootOpts) vmm.Spec {
	dir := shortDir(t)
	if o.vcpus == 0 {
		o.vcpus = 1
	}
	if o.mem == 0 {
		o.mem = 128
	}
	return vmm.Spec{
		ID: "vmmtest-" + filepath.Base(dir), Dir: filepath.Join(dir, "run"),
		Kernel: s.h.Kernel, Initrd: s.h.Initrd, Cmdline: s.h.Cmdline,
		VCPUs: o.vcpus, MemoryMiB: o.mem, Disks: o.disks,
		AgentSocket: filepath.Join(dir, "agent.sock"),
		MemoryFile:  o.memFile, Restore: o.restore, NICs: o.nics,
	}
}

func (s *suite) boot(t *testing.T, o bootOpts) *guest {
	t.Helper()
	spec := s.spec(t, o)
	ln, err := net.Listen("unix", spec.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	vm, err := s.d.Create(ctx, spec)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if o.prestart {
		ps, ok := vm.(vmm.Prestarter)
		if !ok {
			testutil.Skipf(t, "the %s driver does not implement vmm.Prestarter (launching a VMM ahead of a restore)", s.d.Name())
		}
		if err := ps.Prestart(ctx); err != nil {
			t.Fatalf("Prestart: %v", err)
		}
		if info := vm.Info(); info.PID <= 0 {
			t.Errorf("Info().PID = %d after Prestart", info.PID)
		}
	}
	t0 := time.Now()
	if err := vm.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		_ = vm.Kill()
		select {
		case <-vm.Wait():
		case <-time.After(30 * time.Second):
			t.Errorf("VM %s did not end within 30s of Kill", spec.ID)
		}
	})
	g := &guest{t: t, vm: vm, spec: spec, ln: ln}
	if info := vm.Info(); info.PID <= 0 {
		t.Errorf("Info().PID = %d after Start", info.PID)
	}
	if o.noWait {
		return g
	}
	if o.restore != nil {
		// A restored guest printed its marker before the save; it answers on the channel.
		// Its port may see the host side reconnect (and reopen, dropping what was sent
		// meanwhile), so ping until it answers, as fireworks's hello does.
		g.accept(30 * time.Second)
		g.waitAnswer(30 * time.Second)
		return g
	}
	g.waitMarker(s.h.BootTimeout)
	s.mu.Lock()
	s.boots = append(s.boots, time.Since(t0))
	s.mu.Unlock()
	g.accept(30 * time.Second)
	return g
}

// waitMarker polls the console log for the ready marker, failing early if the VM dies.
func (g *guest) waitMarker(timeout time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	log := g.vm.Info().ConsoleLog
	for {
		b, _ := os.ReadFile(log)
		if bytes.Contains(b, []byte(ReadyMarker)) {
			return
		}
		select {
		case <-g.vm.Wait():
			b, _ := os.ReadFile(log)
			g.t.Fatalf("VM ended before the ready marker: %v; console:\n%s", g.vm.ExitError(), b)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("no %q on the console within %s; console:\n%s", ReadyMarker, timeout, b)
		}
	}
}

// accept waits for the VMM's connection to the agent socket.
func (g *guest) accept(timeout time.Duration) {
	g.t.Helper()
	if ul, ok := g.ln.(*net.UnixListener); ok {
		_ = ul.SetDeadline(time.Now().Add(timeout))
	}
	conn, err := g.ln.Accept()
	if err != nil {
		g.t.Fatalf("no connection from the VM on the agent socket: %v", err)
	}
	g.t.Cleanup(func() { conn.Close() })
	g.conn, g.r = conn, bufio.NewReader(conn)
}

// waitAnswer sends pings until the guest answers one.
func (g *guest) waitAnswer(timeout time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	for i := 0; time.Now().Before(deadline); i++ {
		want := "ping-" + strconv.Itoa(i)
		_ = g.conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
		if _, err := fmt.Fprintf(g.conn, "echo %s\n", want); err != nil {
			g.t.Fatalf("write to restored guest: %v", err)
		}
		for {
			line, err := g.r.ReadString('\n')
			if err != nil {
				break
			}
			if strings.TrimSpace(line) == want {
				_ = g.conn.SetDeadline(time.Time{})
				return
			}
		}
		if isClosed(g.vm.Wait()) {
			g.t.Fatalf("restored VM ended: %v", g.vm.ExitError())
		}
	}
	b, _ := os.ReadFile(g.vm.Info().ConsoleLog)
	g.t.Fatalf("restored guest did not answer within %s; console:\n%s", timeout, b)
}

// call sends one protocol line and reads one line back.
func (g *guest) call(cmd string, timeout time.Duration) (string, error) {
	_ = g.conn.SetDeadline(time.Now().Add(timeout))
	defer g.conn.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(g.conn, "%s\n", cmd); err != nil {
		return "", err
	}
	line, err := g.r.ReadString('\n')
	return strings.TrimRight(line, "\n"), err
}

func (g *guest) mustCall(cmd string) string {
	g.t.Helper()
	out, err := g.call(cmd, 30*time.Second)
	if err != nil {
		g.t.Fatalf("guest command %q: %v", cmd, err)
	}
	return out
}

func waitEnd(t *testing.T, vm vmm.VM, timeout time.Duration) {
	t.Helper()
	select {
	case <-vm.Wait():
	case <-time.After(timeout):
		t.Fatalf("VM did not end within %s", timeout)
	}
}

func (s *suite) testRejects(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name  string
		edit  func(*vmm.Spec)
		words []string
	}{
		{"zero vcpus", func(s *vmm.Spec) { s.VCPUs = 0 }, []string{"vcpus", "0"}},
		{"huge vcpus", func(s *vmm.Spec) { s.VCPUs = 100000 }, []string{"vcpus", "100000"}},
		{"tiny memory", func(s *vmm.Spec) { s.MemoryMiB = 1 }, []string{"memory", "1 MiB"}},
		{"huge memory", func(s *vmm.Spec) { s.MemoryMiB = 1 << 30 }, []string{"memory"}},
		{"missing kernel", func(s *vmm.Spec) { s.Kernel = "/nonexistent/vmlinux" }, []string{"/nonexistent/vmlinux"}},
		{"missing disk", func(s *vmm.Spec) { s.Disks = []vmm.Disk{{Path: "/nonexistent/disk.img"}} }, []string{"/nonexistent/disk.img"}},
	} {
		spec := s.spec(t, bootOpts{})
		c.edit(&spec)
		vm, err := s.d.Create(ctx, spec)
		if err == nil {
			_ = vm.Kill()
			t.Errorf("%s: Create accepted %+v", c.name, spec)
			continue
		}
		for _, w := range c.words {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", c.name, err, w)
			}
		}
	}
}

func diskImage(t *testing.T, content string) string {
	p := filepath.Join(shortDir(t), "disk.img")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

func (s *suite) testRunningGuest(t *testing.T) {
	vcpus := 2
	if n, _ := strconv.Atoi(os.Getenv("FIREWORKS_TEST_VCPUS")); n > 0 {
		vcpus = n
	}
	const mem = 192
	roDisk, rwDisk := diskImage(t, "read-only-disk-0"), diskImage(t, "writable-disk-01")
	g := s.boot(t, bootOpts{vcpus: vcpus, mem: mem, disks: []vmm.Disk{{Path: roDisk, ReadOnly: true}, {Path: rwDisk}}})

	t.Run("ConsoleAndInfo", func(t *testing.T) {
		info := g.vm.Info()
		for _, f := range []string{info.ConsoleLog, info.CmdlineFile} {
			if _, err := os.Stat(f); err != nil {
				t.Errorf("Info names %s: %v", f, err)
			}
		}
		if info.Accel != s.d.Accel() {
			t.Errorf("Info().Accel = %q, driver says %q", info.Accel, s.d.Accel())
		}
	})
	t.Run("AgentRoundTrip", func(t *testing.T) {
		for _, msg := range []string{"hello fireworks", "second line"} {
			if got := g.mustCall("echo " + msg); got != msg {
				t.Errorf("echo %q came back as %q", msg, got)
			}
		}
	})
	t.Run("Resources", func(t *testing.T) {
		if got := g.mustCall("cpus"); got != strconv.Itoa(vcpus) {
			t.Errorf("guest sees %s CPUs, want %d", got, vcpus)
		}
		kb, err := strconv.Atoi(g.mustCall("mem"))
		// MemTotal excludes what the kernel reserves for itself: expect most of it.
		if err != nil || kb > mem*1024 || kb < mem*1024*6/10 {
			t.Errorf("guest MemTotal %d kB (%v), want a little under %d kB", kb, err, mem*1024)
		}
	})
	t.Run("Disks", func(t *testing.T) {
		for i, want := range []string{"ro=1 bytes=" + hex.EncodeToString([]byte("read-only-disk-0")), "ro=0 bytes=" + hex.EncodeToString([]byte("writable-disk-01"))} {
			if got := g.mustCall("disk " + strconv.Itoa(i)); got != want {
				t.Errorf("disk %d: guest reports %q, want %q", i, got, want)
			}
		}
	})
	t.Run("NoNetworkWithoutNIC", func(t *testing.T) {
		if got := g.mustCall("ifaces"); got != "" {
			t.Errorf("a VM without NICs has network interfaces %q", got)
		}
	})
	t.Run("PauseResume", func(t *testing.T) {
		p, ok := g.vm.(vmm.Pauser)
		if !ok {
			testutil.Skipf(t, "%s does not implement vmm.Pauser", s.d.Name())
		}
		ctx := context.Background()
		if err := p.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		// A paused guest cannot answer; the reply must arrive only after Resume.
		if _, err := fmt.Fprintf(g.conn, "echo after-pause\n"); err != nil {
			t.Fatal(err)
		}
		_ = g.conn.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
		if line, err := g.r.ReadString('\n'); err == nil {
			t.Fatalf("paused guest answered %q", line)
		}
		_ = g.conn.SetReadDeadline(time.Time{})
		if err := p.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		_ = g.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		line, err := g.r.ReadString('\n')
		_ = g.conn.SetReadDeadline(time.Time{})
		if err != nil || strings.TrimSpace(line) != "after-pause" {
			t.Fatalf("after Resume: %q, %v", line, err)
		}
	})
	t.Run("AdoptFromFreshDriver", func(t *testing.T) {
		if _, ok := g.vm.(vmm.Detacher); !ok {
			testutil.Skipf(t, "%s does not implement vmm.Detacher", s.d.Name())
		}
		vm, d2 := s.adoptFresh(t, g)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if vm.Info().PID != g.vm.Info().PID {
			t.Errorf("adopted PID %d, started PID %d", vm.Info().PID, g.vm.Info().PID)
		}
		if got := g.mustCall("echo still here"); got != "still here" {
			t.Errorf("guest after adoption answered %q", got)
		}
		if p, ok := vm.(vmm.Pauser); ok {
			if err := p.Pause(ctx); err != nil {
				t.Errorf("Pause of adopted VM: %v", err)
			} else if err := p.Resume(ctx); err != nil {
				t.Errorf("Resume of adopted VM: %v", err)
			}
		}
		if err := vm.Stop(ctx, 10*time.Second); err != nil {
			t.Fatalf("Stop of adopted VM: %v", err)
		}
		waitEnd(t, vm, 10*time.Second)
		if err := vm.ExitError(); err != nil {
			t.Errorf("adopted VM stopped by request reports %v", err)
		}
		waitEnd(t, g.vm, 10*time.Second) // the original handle sees the process end too
		if _, err := d2.Adopt(ctx, g.spec.Dir); err == nil {
			t.Error("Adopt of an ended VM succeeded")
		}
	})
}

func (s *suite) testGracefulStop(t *testing.T) {
	g := s.boot(t, bootOpts{})
	if got := g.mustCall("echo up"); got != "up" {
		t.Fatalf("guest answered %q", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := g.vm.Stop(ctx, 10*time.Second); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if !isClosed(g.vm.Wait()) {
		t.Fatal("Stop returned before Wait closed")
	}
	if err := g.vm.ExitError(); err != nil {
		t.Errorf("requested stop reports %v", err)
	}
	if err := g.vm.Stop(ctx, time.Second); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func (s *suite) testPoweroff(t *testing.T) {
	g := s.boot(t, bootOpts{})
	if got := g.mustCall("poweroff"); got != "bye" {
		t.Fatalf("guest answered %q", got)
	}
	waitEnd(t, g.vm, 60*time.Second)
	if err := g.vm.ExitError(); err != nil {
		t.Errorf("guest poweroff reports %v", err)
	}
}

func (s *suite) testPanic(t *testing.T) {
	g := s.boot(t, bootOpts{})
	_, _ = fmt.Fprintf(g.conn, "panic\n")
	waitEnd(t, g.vm, 60*time.Second)
	err := g.vm.ExitError()
	var ee *vmm.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("guest panic reports %v, want a *vmm.ExitError", err)
	}
	if !strings.Contains(err.Error(), "Kernel panic") && !strings.Contains(err.Error(), "sysrq") {
		t.Errorf("exit error does not say the guest kernel panicked: %v", err)
	}
	if ee.ConsoleTail == "" {
		t.Error("exit error has no console tail")
	}
	t.Logf("reported: %s", ee.Reason)
}

func (s *suite) testKill9(t *testing.T) {
	g := s.boot(t, bootOpts{noWait: true})
	if err := syscall.Kill(g.vm.Info().PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitEnd(t, g.vm, 30*time.Second)
	err := g.vm.ExitError()
	var ee *vmm.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("kill -9 reports %v, want a *vmm.ExitError", err)
	}
	if ee.Signal != syscall.SIGKILL || !strings.Contains(err.Error(), "SIGKILL") {
		t.Errorf("kill -9 reported as %v (signal %v)", err, ee.Signal)
	}
}

func (s *suite) testStuckStop(t *testing.T) {
	g := s.boot(t, bootOpts{noWait: true})
	pid := g.vm.Info().PID
	// A stopped process answers neither QMP nor SIGTERM: only SIGKILL ends it.
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	const grace = 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), grace+30*time.Second)
	defer cancel()
	if err := g.vm.Stop(ctx, grace); err != nil {
		t.Fatalf("Stop of a stuck VMM: %v", err)
	}
	if !isClosed(g.vm.Wait()) {
		t.Fatal("Stop returned before Wait closed")
	}
	if err := g.vm.ExitError(); err == nil || !strings.Contains(err.Error(), "SIGKILL") {
		t.Errorf("escalated stop reports %v, want a mention of SIGKILL", err)
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// testSnapshot saves a running guest and restores it several times from the one memory
// file: every restore continues from the saved state, restores do not see each other's
// changes, killing them leaves the snapshot intact, and the original cannot be resumed.
func (s *suite) testSnapshot(t *testing.T) {
	dir := shortDir(t)
	mem := filepath.Join(dir, "mem")
	disk := diskImage(t, "snapshot-disk-01")
	g := s.boot(t, bootOpts{memFile: mem, disks: []vmm.Disk{{Path: disk}}})
	snap, ok := g.vm.(vmm.Snapshotter)
	if !ok {
		testutil.Skipf(t, "the %s driver does not implement vmm.Snapshotter (template snapshots)", s.d.Name())
	}
	if got := g.mustCall("put saved-state"); got != "ok" {
		t.Fatalf("put: %q", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := snap.Snapshot(ctx, filepath.Join(dir, "state")); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if p, ok := g.vm.(vmm.Pauser); ok {
		if err := p.Resume(ctx); err == nil {
			t.Error("a snapshotted VM could be resumed (it would change the snapshot's memory)")
		}
	}
	if err := g.vm.Stop(ctx, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	sum := func() string {
		out, err := exec.Command("sha256sum", mem).Output()
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	before := sum()
	sn := &vmm.Snapshot{MemoryFile: mem, StateFile: filepath.Join(dir, "state")}
	restore := func() *guest {
		// Each restore gets its own copy of the disk, as each sandbox gets its own scratch.
		d := diskImage(t, "snapshot-disk-01")
		return s.boot(t, bootOpts{restore: sn, disks: []vmm.Disk{{Path: d}}})
	}
	a, b := restore(), restore()
	for _, r := range []*guest{a, b} {
		if got := r.mustCall("get"); got != "saved-state" {
			t.Errorf("restored guest remembers %q, want saved-state", got)
		}
	}
	for _, r := range []*guest{a, b} {
		checkTemplateReadOnly(t, r.vm.Info().PID, mem)
	}
	if got := a.mustCall("put changed-in-a"); got != "ok" {
		t.Fatal(got)
	}
	if got := b.mustCall("get"); got != "saved-state" {
		t.Errorf("restore b sees %q after restore a changed its memory", got)
	}
	a.vm.Kill()
	waitEnd(t, a.vm, 30*time.Second)
	b.vm.Kill()
	waitEnd(t, b.vm, 30*time.Second)
	if after := sum(); after != before {
		t.Errorf("the snapshot's memory file changed: %s -> %s", before, after)
	}
	c := restore()
	if got := c.mustCall("get"); got != "saved-state" {
		t.Errorf("restore after killed restores remembers %q", got)
	}
	// A VM restored from a template saves whole (its private copy of the template's
	// memory goes in the stream) and comes back with what it changed; the template's
	// memory stays as it was.
	if sv, ok := c.vm.(vmm.Saver); ok {
		if got := c.mustCall("put changed-after-restore"); got != "ok" {
			t.Fatal(got)
		}
		whole := filepath.Join(dir, "whole")
		if err := sv.Save(ctx, whole); err != nil {
			t.Fatalf("Save of a restored VM: %v", err)
		}
		c.vm.Kill()
		waitEnd(t, c.vm, 30*time.Second)
		back := s.boot(t, bootOpts{restore: &vmm.Snapshot{StateFile: whole}, disks: c.spec.Disks})
		if got := back.mustCall("get"); got != "changed-after-restore" {
			t.Errorf("a restored VM saved whole remembers %q, want changed-after-restore", got)
		}
		back.vm.Kill()
		waitEnd(t, back.vm, 30*time.Second)
		if after := sum(); after != before {
			t.Errorf("the template's memory file changed through a whole save: %s -> %s", before, after)
		}
	}
	// A VMM launched ahead (Prestart) restores on Start like any other.
	pd := diskImage(t, "snapshot-disk-01")
	pre := s.boot(t, bootOpts{restore: sn, disks: []vmm.Disk{{Path: pd}}, prestart: true})
	if got := pre.mustCall("get"); got != "saved-state" {
		t.Errorf("prestarted restore remembers %q", got)
	}
	// A restore whose state file vanished between Create and Start fails cleanly: the VM
	// ends, and Kill and Wait work on it.
	gone := filepath.Join(dir, "state-gone")
	if data, err := os.ReadFile(filepath.Join(dir, "state")); err != nil || os.WriteFile(gone, data, 0o600) != nil {
		t.Fatal("copy state")
	}
	gspec := s.spec(t, bootOpts{restore: &vmm.Snapshot{MemoryFile: mem, StateFile: gone}, disks: []vmm.Disk{{Path: diskImage(t, "x")}}})
	gvm, err := s.d.Create(ctx, gspec)
	if err != nil {
		t.Fatal(err)
	}
	_ = os.Remove(gone)
	if err := gvm.Start(ctx); err == nil {
		t.Error("Start restored from a state file that is gone")
	}
	if err := gvm.Kill(); err != nil {
		t.Errorf("Kill after a failed start: %v", err)
	}
	select {
	case <-gvm.Wait():
	case <-time.After(5 * time.Second):
		t.Error("Wait did not end after a start that failed before QEMU ran")
	}
	// A snapshot for another shape is refused with a clear error, not a confused guest.
	spec := s.spec(t, bootOpts{restore: sn, mem: 256})
	if vm, err := s.d.Create(ctx, spec); err == nil {
		_ = vm.Kill()
		t.Error("Create accepted a restore into a VM with a different memory size")
	} else if !strings.Contains(err.Error(), "MiB") {
		t.Errorf("shape mismatch error %q does not say why", err)
	}
}

// testSave: a booted VM saved whole (vmm.Saver: RAM and devices in one file) restores
// with its memory as it was, again and again (each cycle saves the VM the last one
// restored); the VM saved cannot run again; a damaged save is refused.
func (s *suite) testSave(t *testing.T) {
	disk := diskImage(t, "save-disk-01")
	g := s.boot(t, bootOpts{disks: []vmm.Disk{{Path: disk}}})
	if _, ok := g.vm.(vmm.Saver); !ok {
		testutil.Skipf(t, "the %s driver does not implement vmm.Saver (pause and resume)", s.d.Name())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	dir := shortDir(t)
	for cycle := range 3 {
		want := fmt.Sprintf("cycle-%d", cycle)
		if got := g.mustCall("put " + want); got != "ok" {
			t.Fatalf("put: %q", got)
		}
		state := filepath.Join(dir, fmt.Sprintf("state-%d", cycle))
		if err := g.vm.(vmm.Saver).Save(ctx, state); err != nil {
			t.Fatalf("Save (cycle %d): %v", cycle, err)
		}
		if p, ok := g.vm.(vmm.Pauser); ok {
			if err := p.Resume(ctx); err == nil {
				t.Error("a saved VM could be resumed (its disk belongs to the save now)")
			}
		}
		g.vm.Kill()
		waitEnd(t, g.vm, 30*time.Second)
		// The save holds the RAM: it is not a device state of some KB.
		if fi, err := os.Stat(state); err != nil || fi.Size() < 1<<20 {
			t.Fatalf("saved state: %v, %d bytes", err, fi.Size())
		}
		g = s.boot(t, bootOpts{restore: &vmm.Snapshot{StateFile: state}, disks: []vmm.Disk{{Path: disk}}})
		if got := g.mustCall("get"); got != want {
			t.Fatalf("restored (cycle %d) remembers %q, want %q", cycle, got, want)
		}
	}
	g.vm.Kill()
	waitEnd(t, g.vm, 30*time.Second)
	s.testFlatten(ctx, t, filepath.Join(dir, "state-2"), "cycle-2")
	// A truncated save is refused with an error and leaves no VM running.
	state := filepath.Join(dir, "state-0")
	data, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "truncated")
	if err := os.WriteFile(bad, data[:len(data)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	spec := s.spec(t, bootOpts{restore: &vmm.Snapshot{StateFile: bad}, disks: []vmm.Disk{{Path: diskImage(t, "x")}}})
	vm, err := s.d.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err == nil {
		t.Error("Start restored from a truncated save")
	}
	_ = vm.Kill()
	waitEnd(t, vm, 30*time.Second)
}

// testMigrate: a running VM migrated live (vmm.Migrator) into a VM restoring its
// stream, on the same disk (one node: shared storage). A target that may not run (its
// switch-over refused) ends, and the source runs on; one that may takes over with the
// guest's memory as it was.
func (s *suite) testMigrate(t *testing.T) {
	disk := diskImage(t, "migrate-disk-01")
	src := s.boot(t, bootOpts{disks: []vmm.Disk{{Path: disk}}})
	m, ok := src.vm.(vmm.Migrator)
	if !ok {
		testutil.Skipf(t, "the %s driver does not implement vmm.Migrator (live migration)", s.d.Name())
	}
	if got := src.mustCall("put before-migration"); got != "ok" {
		t.Fatalf("put: %q", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	migrate := func() (*io.PipeReader, chan migration) { return migrateOut(ctx, m, vmm.MigrateOptions{}) }

	// The switch-over refused: the target ends without running; the source resumes.
	pr, done := migrate()
	refused := errors.New("no switch-over")
	spec := s.spec(t, bootOpts{disks: []vmm.Disk{{Path: disk}}, restore: &vmm.Snapshot{Stream: pr, BeforeResume: func(context.Context) error { return refused }}})
	ln, err := net.Listen("unix", spec.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	vm, err := s.d.Create(ctx, spec)
	if err != nil {
		t.Fatalf("Create the migration's target: %v", err)
	}
	if err := vm.Start(ctx); err == nil || !errors.Is(err, refused) {
		t.Errorf("a target whose switch-over was refused started: %v", err)
	}
	waitEnd(t, vm, 30*time.Second)
	pr.Close()
	if r := <-done; r.err != nil {
		t.Fatalf("MigrateOut (target refused at the switch-over): %v", r.err)
	}
	if err := src.vm.(vmm.Pauser).Resume(ctx); err != nil {
		t.Fatalf("resume the source after a refused switch-over: %v", err)
	}
	noACL := func(when string) {
		t.Helper()
		if _, err := unix.Getxattr(disk, "system.posix_acl_access", nil); !errors.Is(err, unix.ENODATA) {
			t.Errorf("%s: the disk still carries an ACL (%v): a VMM that did not take it over keeps access", when, err)
		}
	}
	noACL("after a refused switch-over")
	if got := src.mustCall("get"); got != "before-migration" {
		t.Fatalf("the source after a refused switch-over remembers %q", got)
	}

	// The switch-over done: the target runs on, the guest's memory as it was.
	pr, done = migrate()
	dst := s.boot(t, bootOpts{disks: []vmm.Disk{{Path: disk}}, restore: &vmm.Snapshot{Stream: pr}})
	r := <-done
	if r.err != nil {
		t.Fatalf("MigrateOut: %v", r.err)
	}
	src.vm.Kill()
	waitEnd(t, src.vm, 30*time.Second)
	if got := dst.mustCall("get"); got != "before-migration" {
		t.Fatalf("the migrated VM remembers %q", got)
	}
	noACL("after the switch-over")
	// The disk moved with it: what the guest writes now lands where it did.
	if got := dst.mustCall("put after-migration"); got != "ok" {
		t.Fatalf("put on the migrated VM: %q", got)
	}
	t.Logf("live migration: %d bytes, downtime %s, total %s", r.st.Bytes, r.st.Downtime, r.st.Total)
	if r.st.Bytes <= 0 || r.st.Total <= 0 {
		t.Errorf("migration stats %+v", r.st)
	}
}

// testMigrateMirror: a guest migrated onto disks of its own (another node's) finds on
// them what it wrote before and during the migration; a mirror refused by the target
// leaves the source running.
func (s *suite) testMigrateMirror(t *testing.T) {
	const diskSize = 64 << 20 // sparse: what the guest never wrote must not travel or fill the target
	srcDisk := diskImage(t, "mirror-source")
	if err := os.Truncate(srcDisk, diskSize); err != nil {
		t.Fatal(err)
	}
	src := s.boot(t, bootOpts{disks: []vmm.Disk{{Path: srcDisk}}})
	if _, ok := src.vm.(vmm.Migrator); !ok {
		testutil.Skipf(t, "the %s driver does not implement vmm.Migrator (live migration)", s.d.Name())
	}
	// Migrated as a restarted host process would: adopted by a driver that knows the
	// VM only from what it left in its directory.
	var srcVM vmm.VM = src.vm
	if _, ok := src.vm.(vmm.Detacher); ok {
		srcVM, _ = s.adoptFresh(t, src)
		t.Cleanup(func() { _ = srcVM.Kill() })
	}
	m := srcVM.(vmm.Migrator)
	if got := src.mustCall("wdisk 0 written-before"); got != "ok" {
		t.Fatalf("wdisk: %q", got)
	}
	if got := src.mustCall("put in-memory"); got != "ok" {
		t.Fatalf("put: %q", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The target's disk service cannot be reached: the migration fails, the source runs.
	pr, done := migrateOut(ctx, m, vmm.MigrateOptions{DialDisks: func(context.Context) (net.Conn, error) {
		return nil, errors.New("no route to the target")
	}})
	r := <-done
	pr.Close()
	if r.err == nil {
		t.Fatal("a migration whose disks could not be mirrored succeeded")
	}
	if got := src.mustCall("get"); got != "in-memory" {
		t.Fatalf("the source after a failed mirror answers %q", got)
	}

	// The target has an empty disk of the same size; the source mirrors into it.
	dstDisk := filepath.Join(shortDir(t), "disk.img")
	if err := os.WriteFile(dstDisk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(dstDisk, diskSize); err != nil {
		t.Fatal(err)
	}
	dials := make(chan vmm.DialFunc, 1)
	ropts := &vmm.Snapshot{ReceiveDisks: func(d vmm.DialFunc) { dials <- d }}
	pr, pw := io.Pipe()
	ropts.Stream = pr
	type started struct {
		g *guest
	}
	dstc := make(chan started, 1)
	go func() {
		var g *guest
		defer func() { dstc <- started{g} }() // nil: boot failed the test
		g = s.boot(t, bootOpts{disks: []vmm.Disk{{Path: dstDisk}}, restore: ropts})
	}()
	var dial vmm.DialFunc
	select {
	case dial = <-dials:
	case st := <-dstc:
		t.Fatalf("the target ended (%v) before it offered its disks", st.g)
	case <-ctx.Done():
		t.Fatal("the target never offered its disks")
	}
	done = make(chan migration, 1)
	go func() {
		st, err := m.MigrateOut(ctx, pw, vmm.MigrateOptions{DialDisks: dial})
		pw.CloseWithError(err)
		done <- migration{st, err}
	}()
	// The guest writes its disk while it is being mirrored.
	if got := src.mustCall("wdisk 0 written-during"); got != "ok" {
		t.Fatalf("wdisk during the migration: %q", got)
	}
	r = <-done
	if r.err != nil {
		t.Fatalf("MigrateOut with a disk mirror: %v", r.err)
	}
	dst := (<-dstc).g
	if dst == nil {
		t.Fatal("the target did not start")
	}
	srcVM.Kill()
	waitEnd(t, srcVM, 30*time.Second)
	var st unix.Stat_t
	if err := unix.Stat(dstDisk, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 8<<20 {
		t.Errorf("the target's %d MiB disk takes %d KiB: the mirror filled what the source never wrote", diskSize>>20, used>>10)
	}
	if got := dst.mustCall("get"); got != "in-memory" {
		t.Fatalf("the migrated VM remembers %q", got)
	}
	head := make([]byte, 16)
	f, err := os.Open(dstDisk)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadFull(f, head)
	f.Close()
	if err != nil || strings.TrimSpace(string(head)) != "written-during" {
		t.Fatalf("the target's disk starts with %q (%v), want what the guest wrote during the migration", head, err)
	}
	if got := dst.mustCall("wdisk 0 written-after"); got != "ok" {
		t.Fatalf("wdisk on the migrated VM: %q", got)
	}
	t.Logf("live migration with a disk mirror: %d bytes of RAM and state, %d of disk, downtime %s, total %s", r.st.Bytes, r.st.DiskBytes, r.st.Downtime, r.st.Total)
	if r.st.DiskBytes <= 0 {
		t.Errorf("the mirror says it sent %d bytes", r.st.DiskBytes)
	}
}

// adoptFresh detaches g's VM (a vmm.Detacher) and adopts it with a fresh driver (or the
// suite's), as a restarted host process would; it returns the VM and that driver.
func (s *suite) adoptFresh(t *testing.T, g *guest) (vmm.VM, vmm.Driver) {
	t.Helper()
	if err := g.vm.(vmm.Detacher).Detach(); err != nil {
		t.Fatal(err)
	}
	d2 := s.d
	if s.h.Fresh != nil {
		var err error
		if d2, err = s.h.Fresh(); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	vm, err := d2.Adopt(ctx, g.spec.Dir)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	return vm, d2
}

// migration is how a MigrateOut ended.
type migration struct {
	st  vmm.MigrationStats
	err error
}

// migrateOut starts migrating m into a pipe: the target reads its end, done says how the
// source's side ended (the pipe is closed with it).
func migrateOut(ctx context.Context, m vmm.Migrator, opts vmm.MigrateOptions) (*io.PipeReader, chan migration) {
	pr, pw := io.Pipe()
	done := make(chan migration, 1)
	go func() {
		st, err := m.MigrateOut(ctx, pw, opts)
		pw.CloseWithError(err)
		done <- migration{st, err}
	}()
	return pr, done
}

// testFlatten: a whole save flattened (vmm.Flattener) into a memory file restores as
// many VMs as wanted, each carrying on from the save with a memory of its own, all
// sharing the file's pages copy-on-write and holding it read-only.
func (s *suite) testFlatten(ctx context.Context, t *testing.T, save, want string) {
	dir := shortDir(t)
	mem, state := filepath.Join(dir, "mem"), filepath.Join(dir, "state")
	spec := s.spec(t, bootOpts{restore: &vmm.Snapshot{StateFile: save}, memFile: mem, disks: []vmm.Disk{{Path: diskImage(t, "flatten")}}})
	// The VMM connects to the agent channel as any VM's does (the guest never answers).
	ln, err := net.Listen("unix", spec.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	vm, err := s.d.Create(ctx, spec)
	if err != nil {
		t.Fatalf("Create a VM to flatten a save: %v", err)
	}
	fl, ok := vm.(vmm.Flattener)
	if !ok {
		_ = vm.Kill()
		testutil.Skipf(t, "the %s driver does not implement vmm.Flattener (forks sharing memory)", s.d.Name())
	}
	if err := vm.Start(ctx); err == nil {
		t.Error("a VM made to flatten a save could be started")
	}
	if err := fl.Flatten(ctx, state); err != nil {
		t.Fatalf("Flatten: %v", err)
	}
	waitEnd(t, vm, 30*time.Second)
	if fi, err := os.Stat(state); err != nil || fi.Size() > 16<<20 {
		t.Fatalf("flattened device state: %v (%d bytes: RAM is in it?)", err, fi.Size())
	}
	var forks []*guest
	for i := range 2 {
		f := s.boot(t, bootOpts{restore: &vmm.Snapshot{MemoryFile: mem, StateFile: state}, disks: []vmm.Disk{{Path: diskImage(t, "fork")}}})
		if got := f.mustCall("get"); got != want {
			t.Fatalf("VM %d restored from the flattened save remembers %q, want %q", i, got, want)
		}
		if got := f.mustCall(fmt.Sprintf("put fork-%d", i)); got != "ok" {
			t.Fatalf("put: %q", got)
		}
		checkTemplateReadOnly(t, f.vm.Info().PID, mem)
		forks = append(forks, f)
	}
	for i, f := range forks {
		if got := f.mustCall("get"); got != fmt.Sprintf("fork-%d", i) {
			t.Errorf("VM %d remembers %q after both wrote: their memories are not their own", i, got)
		}
	}
	// Pages of the file that both guests read are in memory once, mapped by both.
	kib := testutil.SharedKiB(t, forks[1].vm.Info().PID, func(p string) bool { return p == mem })
	t.Logf("two VMs restored from one flattened save share %d KiB of its memory file", kib)
	if kib < 1024 {
		t.Errorf("the second restored VM shares %d KiB of the memory file with the first; want its pages shared", kib)
	}
}

// checkTemplateReadOnly fails t unless the VMM process pid holds the template memory file
// mem only read-only: every descriptor of it opened O_RDONLY, every mapping of it private.
// Every VM restored from a template shares the file: a VMM taken over by its guest must
// not be able to write what the others read.
func checkTemplateReadOnly(t *testing.T, pid int, mem string) {
	t.Helper()
	var want unix.Stat_t
	if err := unix.Stat(mem, &want); err != nil {
		t.Fatal(err)
	}
	found := false
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("VMM %d: %v", pid, err)
	}
	for _, fd := range fds {
		var st unix.Stat_t
		if unix.Stat(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()), &st) != nil || st.Dev != want.Dev || st.Ino != want.Ino {
			continue
		}
		found = true
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
				if err != nil || flags&unix.O_ACCMODE != unix.O_RDONLY {
					t.Errorf("VMM %d holds the template memory open with flags %s: not read-only", pid, strings.TrimSpace(v))
				}
			}
		}
	}
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(maps), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[4] != strconv.FormatUint(want.Ino, 10) {
			continue
		}
		found = true
		if f[1][3] != 'p' {
			t.Errorf("VMM %d maps the template memory shared (%s): its writes would reach the file", pid, line)
		}
	}
	if !found {
		t.Errorf("VMM %d neither holds nor maps the template memory %s: the check proves nothing", pid, mem)
	}
}
