package scheduler

import (
	"fmt"
	"testing"
)

// go test -run '^$' -bench . ./internal/shared/scheduler/
func BenchmarkPlace(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		snap := SyntheticSnapshot(n, 10, 1)
		reqs := syntheticRequests(64, 2)
		s, err := New(snap, Config{})
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.Place(reqs[i%len(reqs)])
				i++
			}
		})
	}
}

// BenchmarkIndex is the one-off cost of New (what the top-level Place pays per call).
func BenchmarkIndex(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		snap := SyntheticSnapshot(n, 10, 1)
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := New(snap, Config{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCheck is the leader's one-off re-check against a fresh snapshot.
func BenchmarkCheck(b *testing.B) {
	snap := SyntheticSnapshot(10000, 10, 1)
	req := Request{SandboxID: "x", Resources: Resources{VCPUs: 1, MemoryMiB: 512}}
	b.ReportAllocs()
	for b.Loop() {
		Check(snap, Config{}, "node-05000", req)
	}
}
