package agent

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// The autoscaler aims for the largest burst of claims in any 10 s of the last minute,
// never below the configured size nor above the max.
func TestPoolTarget(t *testing.T) {
	now := time.Unix(1000, 0)
	at := func(secsAgo ...float64) []time.Time {
		var out []time.Time
		for _, s := range secsAgo {
			out = append(out, now.Add(-time.Duration(s*float64(time.Second))))
		}
		return out
	}
	for _, c := range []struct {
		name      string
		size, max int
		claims    []time.Time
		want      int
	}{
		{"idle stays at size", 1, 4, nil, 1},
		{"burst of three", 1, 4, at(5, 4, 3), 3},
		{"spread out claims are one at a time", 0, 4, at(50, 35, 20, 5), 1},
		{"burst capped at max", 1, 2, at(3, 2, 1, 0.5), 2},
		{"max below size means size", 3, 1, at(1), 3},
		{"claims older than a minute are forgotten", 1, 4, at(70, 69, 68), 1},
		{"never above the hard limit", 1, 1000, nil, 1},
	} {
		p := &pool{cfg: state.Pool{Size: c.size, Max: c.max}, claims: c.claims}
		if got := p.target(now); got != c.want {
			t.Errorf("%s: target %d, want %d", c.name, got, c.want)
		}
	}
	p := &pool{cfg: state.Pool{Size: 1000, Max: 1000}}
	if got := p.target(now); got != state.MaxPoolSize {
		t.Errorf("size 1000: target %d, want the limit %d", got, state.MaxPoolSize)
	}
}

// A template key changes with everything a saved VM depends on.
func TestTemplateKeyCoversItsInputs(t *testing.T) {
	base := templateKey{Layout: 2, Digest: "sha256:a", RootDisk: "1-2-3", RootFS: "erofs", Kernel: "6.1", KernelHash: "k",
		InitVersion: "i", Cmdline: "c", VCPUs: 1, MemoryMiB: 256, ScratchMiB: 2048, Accel: "tcg", VMM: "qemu 7.2"}
	for name, edit := range map[string]func(*templateKey){
		"image": func(k *templateKey) { k.Digest = "sha256:b" }, "root disk": func(k *templateKey) { k.RootDisk = "9-2-3" },
		"kernel": func(k *templateKey) { k.KernelHash = "k2" }, "init": func(k *templateKey) { k.InitVersion = "i2" },
		"vcpus": func(k *templateKey) { k.VCPUs = 2 }, "memory": func(k *templateKey) { k.MemoryMiB = 512 },
		"scratch": func(k *templateKey) { k.ScratchMiB = 1024 }, "accel": func(k *templateKey) { k.Accel = "kvm" },
		"vmm": func(k *templateKey) { k.VMM = "qemu 8.2" }, "cmdline": func(k *templateKey) { k.Cmdline = "c2" },
	} {
		k := base
		edit(&k)
		if k.hash() == base.hash() {
			t.Errorf("changing the %s keeps the template key", name)
		}
	}
}

// stubVM stands in for a VM in the capacity accounting test, which needs VM handles to
// end but no guest (the real driver is exercised by the e2e tests).
type stubVM struct {
	done   chan struct{}
	killed bool
}

func newStubVM() *stubVM                                    { return &stubVM{done: make(chan struct{})} }
func (v *stubVM) ID() string                                { return "stub" }
func (v *stubVM) Start(context.Context) error               { return nil }
func (v *stubVM) Stop(context.Context, time.Duration) error { return v.Kill() }
func (v *stubVM) Wait() <-chan struct{}                     { return v.done }
func (v *stubVM) ExitError() error                          { return nil }
func (v *stubVM) Info() vmm.Info                            { return vmm.Info{} }
func (v *stubVM) Kill() error {
	if !v.killed {
		v.killed = true
		close(v.done)
	}
	return nil
}

// Pool VMs only use capacity that sandboxes leave free: a full node fills no more, and a
// sandbox that needs room ends ready pool VMs first.
func TestPoolCapacityGuard(t *testing.T) {
	a := &Agent{cfg: Config{MaxVCPUs: 3, MaxMemoryMiB: 1024, DefaultVCPUs: 1, DefaultMemoryMiB: 256},
		live: map[string]*sandbox{}, log: slog.New(slog.DiscardHandler)}
	w := &warmPools{shape: a.shape, sandboxUsage: a.sandboxUsage, maxVCPUs: a.cfg.MaxVCPUs, maxMemoryMiB: a.cfg.MaxMemoryMiB,
		log: a.log, pools: map[string]*pool{}}
	var vms []*stubVM
	ready := func() []*poolVM {
		var out []*poolVM
		for range 2 {
			v := newStubVM()
			vms = append(vms, v)
			ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, &poolVM{spareVM: spareVM{dir: t.TempDir(), h: &vmHandle{vm: v, ln: ln}}})
		}
		return out
	}
	p := &pool{cfg: state.Pool{Image: "img", Size: 2}, vcpus: 1, mem: 256, key: "k", ready: ready()}
	w.pools["img"] = p

	w.mu.Lock()
	if !w.fitsLocked(1, 256) {
		t.Error("a third 256 MiB VM should fit 1024 MiB with 2 pool VMs")
	}
	if !w.fitsLocked(8, 256) {
		t.Error("vCPUs kept a paused pool VM out (they take no CPU time)")
	}
	if w.fitsLocked(1, 600) {
		t.Error("600 MiB fits beside 512 MiB of pool VMs in 1024 MiB")
	}
	w.mu.Unlock()

	// A sandbox of 768 MiB arrives: 768 + 512 of pool VMs > 1024, so one pool VM goes.
	a.live["sb1"] = &sandbox{spec: state.SandboxSpec{VCPUs: 2, MemoryMiB: 768}}
	w.makeRoom()
	if len(p.ready) != 1 || !vms[0].killed || vms[1].killed {
		t.Fatalf("after a 768 MiB sandbox: %d ready, killed %v %v; want the first pool VM ended", len(p.ready), vms[0].killed, vms[1].killed)
	}
	w.mu.Lock()
	if w.fitsLocked(1, 256) {
		t.Error("a refill fits while the node's memory is full")
	}
	w.mu.Unlock()
	// Another sandbox: the last pool VM goes too.
	a.live["sb2"] = &sandbox{spec: state.SandboxSpec{VCPUs: 1, MemoryMiB: 256}}
	w.makeRoom()
	if len(p.ready) != 0 || !vms[1].killed {
		t.Fatalf("after the node filled with sandboxes: %d pool VMs ready", len(p.ready))
	}
}
