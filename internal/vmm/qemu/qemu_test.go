package qemu

import (
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"os/exec"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/vmm/vmmtest"
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

func TestConformance(t *testing.T) {
	d := newTestDriver(t)
	h := vmmtest.DefaultHarness(t)
	h.Fresh = func() (vmm.Driver, error) { return New(Config{Accel: "tcg"}) }
	vmmtest.Run(t, d, h)
}
