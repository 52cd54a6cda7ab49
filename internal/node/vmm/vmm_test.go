package vmm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

func TestLimitsValidate(t *testing.T) {
	l := Limits{MaxVCPUs: 4, MinMemoryMiB: 64, MaxMemoryMiB: 4096}
	ok := Spec{ID: "a", Dir: "/tmp/a", Kernel: "/k", VCPUs: 2, MemoryMiB: 256}
	if err := l.Validate(ok); err != nil {
		t.Fatalf("valid spec rejected: %v", err)
	}
	bad := ok
	bad.VCPUs, bad.MemoryMiB = 5, 8192
	err := l.Validate(bad)
	if err == nil || !strings.Contains(err.Error(), "vcpus 5 is outside 1..4") || !strings.Contains(err.Error(), "memory 8192 MiB is outside 64..4096") {
		t.Fatalf("error %v does not name both limits", err)
	}
}

func TestExitErrorIncludesConsoleTail(t *testing.T) {
	e := &ExitError{Reason: "VMM killed by signal SIGKILL", Code: -1, Signal: syscall.SIGKILL, ConsoleTail: "last words\n"}
	if got := e.Error(); !strings.Contains(got, "SIGKILL") || !strings.Contains(got, "last words") {
		t.Errorf("Error() = %q", got)
	}
}

func TestDetectAccelForced(t *testing.T) {
	if c := DetectAccel(context.Background(), t.TempDir(), "tcg", ""); c.Accel != "tcg" || c.Reason == "" {
		t.Errorf("forced tcg = %+v", c)
	}
	if c := DetectAccel(context.Background(), t.TempDir(), "kvm", ""); c.Accel != "kvm" {
		t.Errorf("forced kvm = %+v", c)
	}
}

// On hosts whose KVM is the nested PVM hypervisor, a standard kernel must never be judged
// KVM-capable (it would hang every boot).
func TestDetectAccelOnThisHost(t *testing.T) {
	c := DetectAccel(context.Background(), t.TempDir(), "", "")
	t.Logf("this host: %+v", c)
	if c.Reason == "" || (c.Accel != "kvm" && c.Accel != "tcg") {
		t.Fatalf("DetectAccel = %+v", c)
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil && c.Accel != "tcg" {
		t.Errorf("PVM host judged %q", c.Accel)
	}
	if _, err := os.Stat("/dev/kvm"); err != nil && c.Accel != "tcg" {
		t.Errorf("host without /dev/kvm judged %q", c.Accel)
	}
}

// A host without a usable KVM device (a normal, supported case: TCG) is judged TCG with a
// reason that names the device, on every machine, without booting anything.
func TestDetectAccelWithoutKVM(t *testing.T) {
	old := kvmDevice
	kvmDevice = filepath.Join(t.TempDir(), "kvm")
	defer func() { kvmDevice = old }()
	c := DetectAccel(context.Background(), t.TempDir(), "", "/nonexistent-kernel")
	if c.Accel != "tcg" || !strings.Contains(c.Reason, kvmDevice) || !strings.Contains(c.Reason, "not usable") {
		t.Errorf("without KVM: %+v, want tcg with a reason naming %s", c, kvmDevice)
	}
	// Forcing KVM there is honoured, and the reason says it is not usable.
	if c := DetectAccel(context.Background(), t.TempDir(), "kvm", ""); c.Accel != "kvm" || !strings.Contains(c.Reason, "not usable") {
		t.Errorf("forced kvm without KVM: %+v", c)
	}
}

// The probe itself, on whatever this host has: without /dev/kvm it must say "not usable"
// with the reason (the supported TCG case); where a KVM device exists, a real probe boot
// decides, and on a PVM host a standard kernel prints nothing under -accel kvm.
func TestProbeKVM(t *testing.T) {
	if err := kvmUsable(); err != nil {
		c := DetectAccel(context.Background(), t.TempDir(), "", "")
		t.Logf("no usable KVM here: %+v", c)
		if c.Accel != "tcg" || !strings.Contains(c.Reason, "/dev/kvm is not usable") {
			t.Errorf("host without a usable /dev/kvm judged %+v", c)
		}
		return
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testutil.Skipf(t, "qemu-system-x86_64 not found (scripts/install-deps.sh installs qemu-system-x86)")
	}
	k, err := assets.EnsureKernel(context.Background(), testutil.AssetCache())
	if err != nil {
		testutil.Skipf(t, "guest kernel unavailable: %v", err)
	}
	old := ProbeTimeout
	ProbeTimeout = 4 * time.Second
	defer func() { ProbeTimeout = old }()
	c := probeKVM(context.Background(), k.Vmlinux)
	t.Logf("probe: %+v", c)
	if c.Reason == "" || (c.Accel != "kvm" && c.Accel != "tcg") {
		t.Errorf("probe = %+v", c)
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil && c.Accel != "tcg" {
		t.Errorf("probe on a PVM host judged %q", c.Accel)
	}
}
