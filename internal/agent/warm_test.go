package agent

import (
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/state"
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
