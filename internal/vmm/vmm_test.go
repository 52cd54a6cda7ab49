package vmm

import (
	"context"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/assets"
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

// The probe itself: on a PVM host a standard kernel prints nothing under -accel kvm.
func TestProbeKVM(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testutil.Skipf(t, "qemu-system-x86_64 not found")
	}
	if err := kvmUsable(); err != nil {
		testutil.Skipf(t, "%v", err)
	}
	// Same cache as vmmtest.CacheDir (importing vmmtest here would be a cycle).
	cache := os.Getenv("FIREWORKS_TEST_CACHE")
	if cache == "" {
		cache = filepath.Join(os.TempDir(), "fireworks-test-cache")
	}
	k, err := assets.EnsureKernel(context.Background(), cache)
	if err != nil {
		testutil.Skipf(t, "guest kernel unavailable: %v", err)
	}
	kernel := k.Vmlinux
	old := ProbeTimeout
	ProbeTimeout = 4 * time.Second
	defer func() { ProbeTimeout = old }()
	c := probeKVM(context.Background(), kernel)
	t.Logf("probe: %+v", c)
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil && c.Accel != "tcg" {
		t.Errorf("probe on a PVM host judged %q", c.Accel)
	}
}
