package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

func testSpec(t *testing.T) vmm.Spec {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	disk := filepath.Join(dir, "a,b.img") // a comma must be escaped for QEMU's option parser
	for _, f := range []string{kernel, disk} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return vmm.Spec{ID: "t1", Dir: filepath.Join(dir, "run"), Kernel: kernel, Cmdline: "console=ttyS0",
		VCPUs: 1, MemoryMiB: 128, Disks: []vmm.Disk{{Path: disk, ReadOnly: true}, {Path: kernel}}, AgentSocket: filepath.Join(dir, "agent.sock")}
}

func TestCommandLine(t *testing.T) {
	d := &Driver{cfg: Config{Binary: "qemu-system-x86_64", Accel: "tcg", CPU: "qemu64"}}
	s := testSpec(t)
	args := d.args(s)
	joined := strings.Join(args, "\n")
	for _, want := range []string{"microvm,acpi=on,pit=off,pic=off", "-no-reboot", "-S", "-sandbox", "virtio-mmio.force-legacy=false",
		"file=" + strings.ReplaceAll(s.Disks[0].Path, ",", ",,") + ",if=none,id=disk0,node-name=fw-disk0,format=raw,readonly=on",
		"path=" + s.AgentSocket + ",reconnect=1", "name=fireworks.0", "128M"} {
		if !strings.Contains(joined, want) {
			t.Errorf("command line lacks %q:\n%s", want, joined)
		}
	}
	// vda must be the first disk: its device comes before the second disk's.
	i0 := slices.Index(args, "virtio-blk-device,drive=disk0")
	i1 := slices.Index(args, "virtio-blk-device,drive=disk1")
	if i0 < 0 || i1 < 0 || i0 > i1 {
		t.Errorf("disk devices out of order: %d, %d", i0, i1)
	}
}

func TestCreateValidates(t *testing.T) {
	d := &Driver{log: discardLogger(), cfg: Config{Binary: "qemu-system-x86_64", Accel: "tcg", CPU: "qemu64",
		Limits: vmm.Limits{MaxVCPUs: 2, MinMemoryMiB: 64, MaxMemoryMiB: 1024}}}
	s := testSpec(t)
	vm, err := d.Create(context.Background(), s)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if b, err := os.ReadFile(vm.Info().CmdlineFile); err != nil || !strings.HasPrefix(string(b), "qemu-system-x86_64\n") {
		t.Errorf("qemu.cmdline = %q, %v", b, err)
	}
	long := s
	long.AgentSocket = "/tmp/" + strings.Repeat("x", 120)
	if _, err := d.Create(context.Background(), long); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("overlong socket path: %v", err)
	}
	if err := vm.Stop(context.Background(), 0); err != nil {
		t.Errorf("Stop of a never-started VM: %v", err)
	}
	if !isDone(vm.Wait()) {
		t.Error("Wait of a stopped never-started VM is open")
	}
}

func TestAdoptRefusesForeignProcess(t *testing.T) {
	d := &Driver{cfg: Config{Accel: "tcg"}, log: discardLogger()}
	dir := t.TempDir()
	// Our own pid, but with a start time that does not match: a recycled pid.
	st := persisted{ID: "x", PID: os.Getpid(), StartTime: 1, QMP: filepath.Join(dir, qmpSocket), Accel: "tcg"}
	b, _ := json.Marshal(st)
	if err := os.WriteFile(filepath.Join(dir, stateFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Adopt(context.Background(), dir); err == nil || !strings.Contains(err.Error(), "pid reused") {
		t.Errorf("Adopt of a recycled pid: %v", err)
	}
	// Right start time, but the process is not a QEMU of this directory.
	st.StartTime = procStartTime(os.Getpid())
	b, _ = json.Marshal(st)
	_ = os.WriteFile(filepath.Join(dir, stateFile), b, 0o600)
	if _, err := d.Adopt(context.Background(), dir); err == nil || !strings.Contains(err.Error(), "not the QEMU") {
		t.Errorf("Adopt of a foreign process: %v", err)
	}
	if _, err := d.Adopt(context.Background(), t.TempDir()); err == nil {
		t.Error("Adopt of an empty directory succeeded")
	}
}

func TestTrimLog(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	data := strings.Repeat("a", 900) + strings.Repeat("z", 300)
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := trimLog(p, 1000); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if len(b) > 400 || !strings.HasSuffix(string(b), strings.Repeat("z", 250)) || !strings.Contains(string(b), "cut") {
		t.Errorf("trimmed log (%d bytes) = %q", len(b), b)
	}
	if err := trimLog(p, 1000); err != nil {
		t.Fatal(err)
	}
	if b2, _ := os.ReadFile(p); string(b2) != string(b) {
		t.Error("a log under the limit was changed")
	}
}

func TestPanicMessage(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	log := "[ 1.0] sysrq: Trigger a crash\n[ 1.1] Kernel panic - not syncing: sysrq triggered crash\n[ 1.2] CPU: 0 PID: 1\n" + strings.Repeat("[ 1.3] trace\n", 400)
	_ = os.WriteFile(p, []byte(log), 0o600)
	if got := panicMessage(p); got != "sysrq triggered crash" {
		t.Errorf("panicMessage = %q", got)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func TestCommandLineNICs(t *testing.T) {
	d := &Driver{cfg: Config{Binary: "qemu-system-x86_64", Accel: "tcg", CPU: "qemu64"}}
	s := testSpec(t)
	if joined := strings.Join(d.args(s), "\n"); strings.Contains(joined, "netdev") {
		t.Errorf("a spec without NICs has a network device:\n%s", joined)
	}
	tap, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	mac := net.HardwareAddr{0x02, 0xfc, 0, 0, 0, 0x21}
	s.NICs = []vmm.NIC{{Tap: tap, MAC: mac}, {Tap: tap}}
	args := d.args(s)
	for _, want := range []string{"tap,id=net0,fd=3,vhost=off", "virtio-net-device,netdev=net0,guest_announce=off,mac=02:fc:00:00:00:21",
		"tap,id=net1,fd=4,vhost=off", "virtio-net-device,netdev=net1,guest_announce=off"} {
		if !slices.Contains(args, want) {
			t.Errorf("command line lacks %q:\n%s", want, strings.Join(args, "\n"))
		}
	}
	// A restore's state file is fd 3: the taps follow it.
	s.Restore = &vmm.Snapshot{MemoryFile: "/m", StateFile: "/s"}
	args = d.args(s)
	if !slices.Contains(args, "tap,id=net0,fd=4,vhost=off") || !slices.Contains(args, "tap,id=net1,fd=5,vhost=off") {
		t.Errorf("restore command line numbers the taps wrongly:\n%s", strings.Join(args, "\n"))
	}
}

func TestCreateValidatesNICs(t *testing.T) {
	d := &Driver{log: discardLogger(), cfg: Config{Binary: "qemu-system-x86_64", Accel: "tcg", CPU: "qemu64",
		Limits: vmm.Limits{MaxVCPUs: 2, MinMemoryMiB: 64, MaxMemoryMiB: 1024}}}
	dev, err := os.Open("/dev/null") // stands in for a tap: a character device
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	regular, err := os.Open(testSpec(t).Kernel)
	if err != nil {
		t.Fatal(err)
	}
	defer regular.Close()
	closed, _ := os.Open("/dev/null")
	closed.Close()
	for _, c := range []struct {
		nic  vmm.NIC
		want string
	}{
		{vmm.NIC{}, "no tap"},
		{vmm.NIC{Tap: regular}, "not a tun/tap"},
		{vmm.NIC{Tap: closed}, "nic 0"},
		{vmm.NIC{Tap: dev, MAC: net.HardwareAddr{1, 0, 0x5e, 0, 0, 1}}, "multicast"},
		{vmm.NIC{Tap: dev, MAC: net.HardwareAddr{0, 0, 0, 0, 0, 0}}, "all zeros"},
		{vmm.NIC{Tap: dev, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0, 0, 1}}, "6-byte"},
	} {
		s := testSpec(t)
		s.NICs = []vmm.NIC{c.nic}
		vm, err := d.Create(context.Background(), s)
		if err == nil {
			_ = vm.Kill()
			t.Errorf("Create accepted NIC %+v", c.nic)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("NIC %+v: error %q does not mention %q", c.nic, err, c.want)
		}
	}
}

// A template whose memory was written after it was saved (what a compromised restored
// VMM, which must open it read-write, could do) is not restored from.
func TestTamperedTemplateRefused(t *testing.T) {
	dir := t.TempDir()
	mem, state := filepath.Join(dir, "mem"), filepath.Join(dir, "state")
	for _, f := range []string{mem, state} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	snap := vmm.Snapshot{MemoryFile: mem, StateFile: state}
	now := time.Now()
	if err := os.Chtimes(state, now, now); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(mem, now.Add(-time.Minute), now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := sealed(snap); err != nil {
		t.Fatalf("a sealed template: %v", err)
	}
	if err := os.Chtimes(mem, now.Add(time.Second), now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := sealed(snap); !errors.Is(err, ErrTemplateTampered) {
		t.Fatalf("a template written after its save: %v", err)
	}
}

// The host changes owners and modes of a VMM's files without following a symlink the VMM
// may have put in their place (its run directory is its own).
func TestSetOwnerRefusesSymlinks(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "chown needs root")
	}
	dir := t.TempDir()
	victim, link := filepath.Join(dir, "victim"), filepath.Join(dir, "console.log")
	if err := os.WriteFile(victim, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	if err := setOwner(link, syscall.S_IFREG, 4000123, 4000123, 0o666); err == nil {
		t.Error("setOwner followed a symlink")
	}
	fi, _ := os.Stat(victim)
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("the link's target changed: uid %d mode %v", st.Uid, fi.Mode())
	}
	if err := setOwner(victim, syscall.S_IFREG, 4000123, 4000123, 0o640); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(victim); fi.Sys().(*syscall.Stat_t).Uid != 4000123 || fi.Mode().Perm() != 0o640 {
		t.Errorf("a plain file: uid %d mode %v", fi.Sys().(*syscall.Stat_t).Uid, fi.Mode())
	}
}

// The host reads and cuts a VMM's console log without following a link the VMM put in
// its place: a host file is neither shown to the user nor truncated.
func TestConsoleLogLinkNotFollowed(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "host-secret")
	if err := os.WriteFile(secret, append([]byte("root:hash:"), make([]byte, 2<<20)...), 0o600); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, "console.log")
	if err := os.Symlink(secret, log); err != nil {
		t.Fatal(err)
	}
	if tail := consoleTail(log); tail != "" {
		t.Errorf("the console tail read through a link: %q", tail[:min(len(tail), 40)])
	}
	if err := trimLog(log, 1<<20); err == nil {
		t.Error("trimLog went through a link")
	}
	if fi, _ := os.Stat(secret); fi.Size() <= 2<<20 {
		t.Errorf("the link's target was cut to %d bytes", fi.Size())
	}
}

// vm.json naming a QMP socket outside the VM's directory (another VM's) is refused.
func TestAdoptRefusesForeignQMP(t *testing.T) {
	d := &Driver{cfg: Config{Accel: "tcg"}, log: discardLogger()}
	dir := t.TempDir()
	st := persisted{ID: "x", PID: os.Getpid(), StartTime: procStartTime(os.Getpid()), QMP: "/tmp/other-vm/vmm/qmp.sock", Accel: "tcg"}
	b, _ := json.Marshal(st)
	if err := os.WriteFile(filepath.Join(dir, stateFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Adopt(context.Background(), dir); err == nil || !strings.Contains(err.Error(), "outside it") {
		t.Errorf("adopting with a foreign QMP socket: %v", err)
	}
}

// A QEMU older than 8.2 (Debian 12's own 7.2) would have to open template memory
// read-write: the driver refuses it at New, saying where a newer one comes from. (The
// "QEMU" here is a script printing a version line: a stand-in below the driver's seam.)
func TestRefusesQEMUBefore82(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		line string
		ok   bool
	}{
		{"QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", false},
		{"QEMU emulator version 8.1.5", false},
		{"QEMU emulator version 8.2.0", true},
		{"QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", true},
		{"something else", false},
	} {
		bin := filepath.Join(dir, "qemu")
		if err := os.WriteFile(bin, []byte("#!/bin/sh\necho '"+c.line+"'\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		d, err := New(Config{Accel: "tcg", Binary: bin, Logger: discardLogger()})
		if c.ok != (err == nil) {
			t.Errorf("%q: New error %v, want ok=%v", c.line, err, c.ok)
			continue
		}
		if err != nil && c.line != "something else" && !strings.Contains(err.Error(), "bookworm-backports") {
			t.Errorf("%q: the error does not say where a newer QEMU comes from: %v", c.line, err)
		}
		if err == nil && d.Version() != c.line {
			t.Errorf("Version() = %q, want %q", d.Version(), c.line)
		}
	}
}
