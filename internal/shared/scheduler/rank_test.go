package scheduler

import (
	"math"
	"testing"
)

func TestRankers(t *testing.T) {
	cfg := Config{CPUOvercommit: 1}
	half := entryOf(ready("half", 4, 4096), Resources{VCPUs: 2, MemoryMiB: 2048}, cfg)
	empty := entryOf(ready("empty", 4, 4096), Resources{}, cfg)
	need := Resources{VCPUs: 1, MemoryMiB: 1024}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

	if got := binPackScore(half, need); !near(got, 0.75) {
		t.Errorf("bin-pack on half-full node = %v, want 0.75", got)
	}
	if got := binPackScore(empty, need); !near(got, 0.25) {
		t.Errorf("bin-pack on empty node = %v, want 0.25", got)
	}
	if binPackScore(half, need) <= binPackScore(empty, need) {
		t.Error("bin-pack does not prefer the fuller node")
	}
	if spreadScore(half, need) >= spreadScore(empty, need) {
		t.Error("spread does not prefer the emptier node")
	}
	if got := localityScore(true, 0.3) + localityScore(false, 0.5); !near(got, 0.3) {
		t.Errorf("locality = %v, want 0.3", got)
	}
	// Zero capacity counts as full rather than dividing by zero.
	zero := entryOf(Node{ID: "z", Status: NodeReady}, Resources{}, cfg)
	if got := utilisation(zero, Resources{}); got != 1 {
		t.Errorf("utilisation of a zero-capacity node = %v, want 1", got)
	}
	r := ranker{need: need, imageW: 0.3, warmW: 0.5}
	if got := r.score(empty, true, true); !near(got, 0.25+0.3+0.5) {
		t.Errorf("combined score = %v", got)
	}
}
