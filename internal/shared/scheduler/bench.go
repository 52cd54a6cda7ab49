package scheduler

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"
)

// This file is for benchmarks only (the bench command and Go benchmarks); nothing on
// the placement path uses a clock or randomness.

// SyntheticSnapshot builds a realistic cluster deterministically from seed: nodes of
// 32 vCPUs / 128 GiB / 1 TiB across three zones, a few down or cordoned, each holding
// a few of 50 images' root disks and allocsPerNode sandboxes of mixed sizes.
func SyntheticSnapshot(nodes, allocsPerNode int, seed uint64) *Snapshot {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	sizes := []Resources{{1, 512, 1024}, {2, 2048, 2048}, {4, 4096, 4096}, {8, 16384, 10240}}
	snap := &Snapshot{Nodes: make([]Node, nodes), Allocations: make([]Allocation, 0, nodes*allocsPerNode)}
	for i := range snap.Nodes {
		n := Node{
			ID:       fmt.Sprintf("node-%05d", i),
			Labels:   map[string]string{"zone": string(rune('a' + i%3))},
			Capacity: Resources{VCPUs: 32, MemoryMiB: 128 << 10, DiskMiB: 1 << 20},
			Status:   NodeReady,
		}
		if i%2 == 0 {
			n.Labels["ssd"] = "true"
		}
		switch r.IntN(100) {
		case 0, 1:
			n.Status = NodeDown
		case 2:
			n.Cordoned = true
		}
		for range 3 {
			n.Images = append(n.Images, syntheticDigest(r.IntN(50)))
		}
		for k := range allocsPerNode {
			snap.Allocations = append(snap.Allocations, Allocation{
				SandboxID: fmt.Sprintf("sb-%05d-%02d", i, k),
				NodeID:    n.ID,
				Resources: sizes[r.IntN(len(sizes))],
			})
		}
		snap.Nodes[i] = n
	}
	return snap
}

func syntheticDigest(i int) string { return fmt.Sprintf("sha256:%064x", i) }

// syntheticRequests is a fixed mix: plain, constrained, spread, with and without image.
func syntheticRequests(n int, seed uint64) []Request {
	r := rand.New(rand.NewPCG(seed, seed+1))
	zone, _ := ParseConstraint("zone==b")
	ssd, _ := ParseConstraint("ssd")
	out := make([]Request, n)
	for i := range out {
		req := Request{
			SandboxID: fmt.Sprintf("new-%d", i),
			Resources: Resources{VCPUs: 1 + r.IntN(4), MemoryMiB: 512 << r.IntN(4), DiskMiB: 2048},
		}
		if r.IntN(2) == 0 {
			req.ImageDigest = syntheticDigest(r.IntN(50))
		}
		switch r.IntN(4) {
		case 0:
			req.Constraints = []Constraint{zone}
		case 1:
			req.Constraints = []Constraint{zone, ssd}
		}
		req.Spread = r.IntN(5) == 0
		out[i] = req
	}
	return out
}

// BenchResult is one placement-latency measurement.
type BenchResult struct {
	Nodes       int
	Allocations int
	Iterations  int
	// Index is the time to build the Scheduler (index) from the snapshot once.
	Index time.Duration
	// Samples are the latencies of individual Place calls on the built index.
	Samples  []time.Duration
	P50, P99 time.Duration
}

// BenchPlacement times Place on a synthetic cluster of the given size with 10
// allocations per node, iterations times (requests vary; nothing is committed, so
// every call sees the same state).
func BenchPlacement(nodes, iterations int) (BenchResult, error) {
	snap := SyntheticSnapshot(nodes, 10, 1)
	reqs := syntheticRequests(64, 2)
	start := time.Now()
	s, err := New(snap, Config{})
	idx := time.Since(start)
	if err != nil {
		return BenchResult{}, fmt.Errorf("bench placement at %d nodes: %w", nodes, err)
	}
	res := BenchResult{Nodes: nodes, Allocations: len(snap.Allocations), Iterations: iterations, Index: idx, Samples: make([]time.Duration, 0, iterations)}
	for i := range iterations {
		t := time.Now()
		_, err := s.Place(reqs[i%len(reqs)])
		res.Samples = append(res.Samples, time.Since(t))
		if _, nofit := err.(*NoFitError); err != nil && !nofit {
			return BenchResult{}, fmt.Errorf("bench placement at %d nodes: %w", nodes, err)
		}
	}
	sorted := slices.Clone(res.Samples)
	slices.Sort(sorted)
	res.P50, res.P99 = nearestRank(sorted, 0.50), nearestRank(sorted, 0.99)
	return res, nil
}

// nearestRank is the smallest sample with at least p of the samples at or below it.
func nearestRank(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}
