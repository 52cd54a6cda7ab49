package qemu

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/vmmtest"
)

func newTestDriver(t *testing.T) *Driver {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testutil.Skipf(t, "qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
	}
	// Conformance runs under TCG everywhere: it is what works on every host, and a
	// KVM-capable CI host still proves the driver's behaviour.
	d, err := New(Config{Accel: "tcg"})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// The conformance suite runs against the driver as nodes run it: every VMM jailed.
func TestConformance(t *testing.T) {
	newTestDriver(t)
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "jailed VMMs need root")
	}
	cfg := Config{Accel: "tcg", Jail: DefaultJail()}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h := vmmtest.DefaultHarness(t)
	h.Fresh = func() (vmm.Driver, error) { return New(cfg) }
	vmmtest.Run(t, d, h)
}

// A jailed QEMU runs as a user of its own, in its cgroups, and its root holds its own
// files only: another sandbox's disk and the node's data are not there to read.
func TestJailedVMMSeesOnlyItsFiles(t *testing.T) {
	newTestDriver(t)
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "jailed VMMs need root")
	}
	h := vmmtest.DefaultHarness(t)
	d, err := New(Config{Accel: "tcg", Jail: DefaultJail()})
	if err != nil {
		t.Fatal(err)
	}
	data := t.TempDir() // plays the node's data directory
	mine, other := filepath.Join(data, "run", "a"), filepath.Join(data, "run", "b")
	for _, dir := range []string{mine, other} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	otherDisk, state := filepath.Join(other, "scratch.img"), filepath.Join(data, "state.db")
	for _, f := range []string{otherDisk, state, filepath.Join(mine, "scratch.img")} {
		if err := os.WriteFile(f, make([]byte, 4096), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("unix", filepath.Join(mine, "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vm, err := d.Create(ctx, vmm.Spec{ID: "jailed", Dir: mine, Kernel: h.Kernel, Initrd: h.Initrd, Cmdline: h.Cmdline,
		VCPUs: 1, MemoryMiB: 128, AgentSocket: filepath.Join(mine, "agent.sock"),
		Disks: []vmm.Disk{{Path: filepath.Join(mine, "scratch.img")}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = vm.Kill(); <-vm.Wait() }()
	pid := vm.Info().PID
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var uid string
	for _, l := range strings.Split(string(status), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "Uid:" {
			uid = f[1]
		}
	}
	if uid == "" || uid == "0" {
		t.Errorf("the VMM runs as uid %q", uid)
	}
	root := fmt.Sprintf("/proc/%d/root", pid)
	for _, p := range []string{otherDisk, state, "/etc/passwd", "/etc/shadow", "/root", "/var/lib", "/home"} {
		if _, err := os.Stat(root + p); err == nil {
			t.Errorf("%s is in the VMM's root", p)
		}
	}
	if _, err := os.Stat(root + filepath.Join(mine, "scratch.img")); err != nil {
		t.Errorf("the VMM's own disk is not in its root: %v", err)
	}
	if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)); !strings.Contains(string(cg), "/jailed") {
		t.Errorf("the VMM is not in its cgroup:\n%s", cg)
	}
	// Its own user cannot reach another sandbox's disk through the host's paths either.
	if fi, err := os.Stat(otherDisk); err == nil && fi.Mode().Perm()&0o007 != 0 {
		t.Errorf("another sandbox's disk is readable to everyone: %v", fi.Mode())
	}
}

// What runs in the cgroup of a VM the host did not take back is ended at its start, and
// the cgroup removed; a kept VM's cgroup stays.
func TestSweepCgroups(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "cgroups need root")
	}
	d, err := New(Config{Accel: "tcg", Jail: JailFor(t.TempDir())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, p := range d.cgroupParents() {
			_ = os.Remove(p)
		}
	})
	orphan, err := d.cgroupsFor("orphan", 1, 64)
	if err != nil || len(orphan) == 0 {
		t.Fatalf("cgroups: %v %v", orphan, err)
	}
	kept, err := d.cgroupsFor("kept", 1, 64)
	if err != nil {
		t.Fatal(err)
	}
	defer jail.RemoveCgroups(kept)
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	for _, cg := range orphan {
		if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(fmt.Sprint(sleeper.Process.Pid)), 0); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- sleeper.Wait() }()
	d.SweepCgroups(func(id string) bool { return id == "kept" })
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = sleeper.Process.Kill()
		t.Fatal("the process in an orphan VM's cgroup still runs after the sweep")
	}
	for _, cg := range orphan {
		if _, err := os.Stat(cg); err == nil {
			t.Errorf("orphan cgroup %s is still there", cg)
		}
	}
	for _, cg := range kept {
		if _, err := os.Stat(cg); err != nil {
			t.Errorf("a kept VM's cgroup is gone: %v", err)
		}
	}
}
