package scheduler

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

func mustPlace(t *testing.T, snap *Snapshot, cfg Config, req Request) Placement {
	t.Helper()
	p, err := Place(snap, cfg, req)
	if err != nil {
		t.Fatalf("Place(%+v): %v", req, err)
	}
	return p
}

func cons(t *testing.T, ss ...string) []Constraint {
	t.Helper()
	var out []Constraint
	for _, s := range ss {
		c, err := ParseConstraint(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

func TestBinPackVersusSpread(t *testing.T) {
	snap := &Snapshot{
		Nodes: []Node{ready("a-empty", 8, 8192), ready("b-busy", 8, 8192)},
		Allocations: []Allocation{
			{SandboxID: "s1", NodeID: "b-busy", Resources: Resources{VCPUs: 4, MemoryMiB: 4096}},
		},
	}
	req := Request{SandboxID: "new", Resources: Resources{VCPUs: 1, MemoryMiB: 1024}}
	if p := mustPlace(t, snap, Config{}, req); p.NodeID != "b-busy" {
		t.Errorf("bin-pack chose %s, want the busier b-busy", p.NodeID)
	}
	req.Spread = true
	if p := mustPlace(t, snap, Config{}, req); p.NodeID != "a-empty" {
		t.Errorf("spread chose %s, want the emptier a-empty", p.NodeID)
	}
}

func TestImageLocality(t *testing.T) {
	const img = "sha256:aaa"
	n1, n2 := ready("n1", 4, 4096), ready("n2", 4, 4096)
	n2.Images = []string{"sha256:other", img}
	snap := &Snapshot{Nodes: []Node{n1, n2}}
	req := Request{SandboxID: "s", Resources: Resources{VCPUs: 1, MemoryMiB: 1024}, ImageDigest: img}

	// Equal nodes: without locality the lower ID wins; with it the image holder does.
	if p := mustPlace(t, snap, Config{ImageLocalityWeight: -1}, req); p.NodeID != "n1" {
		t.Errorf("without locality chose %s, want n1 (tie broken by ID)", p.NodeID)
	}
	p := mustPlace(t, snap, Config{}, req)
	if p.NodeID != "n2" {
		t.Errorf("with locality chose %s, want n2 (holds the image)", p.NodeID)
	}
	if p.Score < DefaultImageLocalityWeight {
		t.Errorf("score %v does not include the locality bonus", p.Score)
	}
	// A request without an image gets no bonus anywhere.
	if p := mustPlace(t, snap, Config{}, Request{Resources: req.Resources}); p.NodeID != "n1" {
		t.Errorf("no image chose %s, want n1", p.NodeID)
	}

	// Locality never overrides infeasibility: the holder is too full.
	snap.Allocations = []Allocation{{SandboxID: "x", NodeID: "n2", Resources: Resources{MemoryMiB: 4096}}}
	if p := mustPlace(t, snap, Config{}, req); p.NodeID != "n1" {
		t.Errorf("chose %s, want n1: n2 has no memory left", p.NodeID)
	}
	// ... nor a failed constraint.
	snap.Allocations = nil
	req.Constraints = cons(t, "!noimage")
	snap.Nodes[1].Labels = map[string]string{"noimage": "1"}
	if p := mustPlace(t, snap, Config{}, req); p.NodeID != "n1" {
		t.Errorf("chose %s, want n1: n2 fails the constraint", p.NodeID)
	}
}

func TestWarmLocalityHook(t *testing.T) {
	const img = "sha256:aaa"
	n1, n2, n3 := ready("n1", 4, 4096), ready("n2", 4, 4096), ready("n3", 4, 4096)
	n2.Images = []string{img}
	n3.Images, n3.Warm = []string{img}, []string{img}
	snap := &Snapshot{Nodes: []Node{n1, n2, n3}}
	req := Request{SandboxID: "s", Resources: Resources{VCPUs: 1, MemoryMiB: 1024}, ImageDigest: img}
	if p := mustPlace(t, snap, Config{}, req); p.NodeID != "n3" {
		t.Errorf("chose %s, want n3 (warm pool)", p.NodeID)
	}
	if p := mustPlace(t, snap, Config{WarmLocalityWeight: -1}, req); p.NodeID != "n2" {
		t.Errorf("warm disabled chose %s, want n2 (lowest ID holding the image)", p.NodeID)
	}
}

func TestOvercommit(t *testing.T) {
	snap := &Snapshot{
		Nodes:       []Node{ready("n1", 4, 8192)},
		Allocations: []Allocation{{SandboxID: "a", NodeID: "n1", Resources: Resources{VCPUs: 4, MemoryMiB: 4096}}},
	}
	req := Request{SandboxID: "s", Resources: Resources{VCPUs: 2, MemoryMiB: 1024}}
	if _, err := Place(snap, Config{}, req); err != nil {
		t.Errorf("default 4x cpu overcommit: %v", err)
	}
	var nf *NoFitError
	if _, err := Place(snap, Config{CPUOvercommit: 1}, req); !errors.As(err, &nf) {
		t.Errorf("no cpu overcommit: got %v, want NoFitError", err)
	}
	big := Request{SandboxID: "s", Resources: Resources{VCPUs: 1, MemoryMiB: 6144}}
	if _, err := Place(snap, Config{}, big); !errors.As(err, &nf) {
		t.Errorf("memory is not overcommitted by default: got %v", err)
	}
	if _, err := Place(snap, Config{MemoryOvercommit: 1.5}, big); err != nil {
		t.Errorf("memory overcommit 1.5: %v", err)
	}
	// A factor below 1 keeps headroom free.
	if _, err := Place(snap, Config{MemoryOvercommit: 0.5}, req); !errors.As(err, &nf) {
		t.Errorf("memory factor 0.5: got %v, want NoFitError", err)
	}
}

func TestConfigValidation(t *testing.T) {
	snap := &Snapshot{Nodes: []Node{ready("n1", 4, 4096)}}
	for _, cfg := range []Config{
		{CPUOvercommit: -1},
		{MemoryOvercommit: -0.5},
		{DiskOvercommit: nanf()},
		{ImageLocalityWeight: nanf()},
	} {
		if _, err := Place(snap, cfg, Request{}); err == nil || !strings.Contains(err.Error(), "scheduler config") {
			t.Errorf("Place with %+v: %v, want config error", cfg, err)
		}
	}
	got, err := Config{}.resolve()
	if err != nil || got != DefaultConfig() {
		t.Errorf("zero Config resolves to %+v, %v; want DefaultConfig", got, err)
	}
}

func nanf() float64 { z := 0.0; return z / z }

func TestIneligibleNodesExcluded(t *testing.T) {
	down, cordoned, draining := ready("a-down", 64, 65536), ready("b-cordoned", 64, 65536), ready("c-draining", 64, 65536)
	down.Status, cordoned.Cordoned, draining.Draining = NodeDown, true, true
	snap := &Snapshot{Nodes: []Node{down, cordoned, draining, ready("z-small", 2, 2048)}}
	req := Request{SandboxID: "s", Resources: Resources{VCPUs: 1, MemoryMiB: 1024}, Spread: true}
	p := mustPlace(t, snap, Config{}, req)
	if p.NodeID != "z-small" || p.Considered != 4 || p.Feasible != 1 {
		t.Errorf("got %+v, want z-small with 4 considered, 1 feasible", p)
	}
	snap.Nodes = snap.Nodes[:3]
	_, err := Place(snap, Config{}, req)
	want := "no node fits: 1 node draining, 1 node cordoned, 1 node down"
	if err == nil || err.Error() != want {
		t.Errorf("got %v, want %q", err, want)
	}
}

func TestConstraints(t *testing.T) {
	a, b, c := ready("a", 4, 4096), ready("b", 4, 4096), ready("c", 4, 4096)
	a.Labels = map[string]string{"zone": "a"}
	b.Labels = map[string]string{"zone": "b", "gpu": "true"}
	c.Labels = map[string]string{"zone": "b", "ssd": ""}
	snap := &Snapshot{Nodes: []Node{a, b, c}}
	for _, tc := range []struct {
		cs   []string
		want string
	}{
		{[]string{"zone==b"}, "b"},
		{[]string{"zone==b", "gpu!=true"}, "c"},
		{[]string{"ssd"}, "c"},
		{[]string{"!zone"}, ""},
		{[]string{"zone!=b"}, "a"},
	} {
		p, err := Place(snap, Config{}, Request{SandboxID: "s", Resources: Resources{VCPUs: 1}, Constraints: cons(t, tc.cs...)})
		if tc.want == "" {
			if err == nil {
				t.Errorf("%v placed on %s, want no fit", tc.cs, p.NodeID)
			}
			continue
		}
		if err != nil || p.NodeID != tc.want {
			t.Errorf("%v: got %q, %v; want %s", tc.cs, p.NodeID, err, tc.want)
		}
	}
}

func TestNoFitErrorText(t *testing.T) {
	mk := func(id string, vcpus, mem int, f func(*Node)) Node {
		n := ready(id, vcpus, mem)
		n.Labels = map[string]string{"zone": "b"}
		if f != nil {
			f(&n)
		}
		return n
	}
	zoneA := func(n *Node) { n.Labels["zone"] = "a" }
	for _, tc := range []struct {
		name   string
		nodes  []Node
		allocs []Allocation
		req    Request
		want   string
	}{
		{
			name: "empty cluster",
			want: "no node fits: the cluster has no nodes",
		},
		{
			name: "the issue's mix",
			nodes: []Node{
				mk("m1", 8, 1024, zoneA), mk("m2", 8, 512, zoneA), mk("m3", 8, 4096, zoneA),
				mk("c1", 8, 8192, func(n *Node) { zoneA(n); n.Cordoned = true }),
				mk("d1", 8, 8192, func(n *Node) { zoneA(n); n.Status = NodeDown }),
				mk("z1", 8, 8192, nil), mk("z2", 8, 8192, nil),
			},
			allocs: []Allocation{{SandboxID: "x", NodeID: "m3", Resources: Resources{MemoryMiB: 3584}}},
			req:    Request{Resources: Resources{VCPUs: 1, MemoryMiB: 2048}, Constraints: cons(t, "zone==a")},
			want:   "no node fits: 3 nodes lack memory (need 2048 MiB, most free 1024 MiB), 2 nodes fail constraint zone==a, 1 node cordoned, 1 node down",
		},
		{
			name:   "pinned to the node holding its saved state, which is full",
			nodes:  []Node{mk("n1", 2, 1024, nil), mk("n2", 8, 8192, nil), mk("n3", 8, 8192, nil)},
			allocs: []Allocation{{SandboxID: "x", NodeID: "n1", Resources: Resources{MemoryMiB: 1024}}},
			req:    Request{Resources: Resources{VCPUs: 1, MemoryMiB: 512}, Node: "n1"},
			want:   "no node fits: 1 node lacks memory (need 512 MiB, most free 0 MiB), 2 nodes are not node n1, which holds the files it starts from",
		},
		{
			name:   "a live migration's source is not a target, the others full",
			nodes:  []Node{mk("n1", 8, 8192, nil), mk("n2", 2, 1024, nil)},
			allocs: []Allocation{{SandboxID: "x", NodeID: "n2", Resources: Resources{MemoryMiB: 1024}}},
			req:    Request{Resources: Resources{VCPUs: 1, MemoryMiB: 512}, Avoid: "n1"},
			want:   "no node fits: 1 node lacks memory (need 512 MiB, most free 0 MiB), 1 node is node n1, where it runs now",
		},
		{
			name:   "pinned to the node asked for, which is full",
			nodes:  []Node{mk("n1", 2, 1024, nil), mk("n2", 8, 8192, nil)},
			allocs: []Allocation{{SandboxID: "x", NodeID: "n1", Resources: Resources{MemoryMiB: 1024}}},
			req:    Request{Resources: Resources{VCPUs: 1, MemoryMiB: 512}, Node: "n1", NodeWhy: "the node asked for"},
			want:   "no node fits: 1 node lacks memory (need 512 MiB, most free 0 MiB), 1 node is not node n1, the node asked for",
		},
		{
			name:  "several resources on one node, singular agreement",
			nodes: []Node{mk("n1", 1, 1024, func(n *Node) { n.Capacity.DiskMiB = 10 })},
			req:   Request{Resources: Resources{VCPUs: 8, MemoryMiB: 2048, DiskMiB: 20}},
			want:  "no node fits: 1 node lacks vCPUs (need 8, most free 4), 1 node lacks memory (need 2048 MiB, most free 1024 MiB), 1 node lacks disk (need 20 MiB, most free 10 MiB)",
		},
		{
			name: "constraints reported in request order, statuses by name",
			nodes: []Node{
				mk("a", 4, 4096, nil),
				mk("b", 4, 4096, func(n *Node) { n.Labels["gpu"] = "true" }),
				mk("c", 4, 4096, func(n *Node) { n.Labels["gpu"] = "true" }),
				mk("d", 4, 4096, func(n *Node) { n.Status = "initializing" }),
				mk("e", 4, 4096, func(n *Node) { n.Status = NodeDown }),
				mk("f", 4, 4096, func(n *Node) { n.Status = "" }),
				mk("g", 4, 4096, func(n *Node) { n.Draining = true }),
			},
			req:  Request{Resources: Resources{VCPUs: 1}, Constraints: cons(t, "gpu", "gpu!=true")},
			want: "no node fits: 1 node fails constraint gpu, 2 nodes fail constraint gpu!=true, 1 node draining, 1 node not ready (no status), 1 node down, 1 node not ready (initializing)",
		},
		{
			name:   "overcommitted node reports zero free",
			nodes:  []Node{mk("n1", 1, 1024, nil)},
			allocs: []Allocation{{SandboxID: "x", NodeID: "n1", Resources: Resources{MemoryMiB: 2048}}},
			req:    Request{Resources: Resources{MemoryMiB: 1}},
			want:   "no node fits: 1 node lacks memory (need 1 MiB, most free 0 MiB)",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.SandboxID = "new"
			_, err := Place(&Snapshot{Nodes: tc.nodes, Allocations: tc.allocs}, Config{}, tc.req)
			var nf *NoFitError
			if !errors.As(err, &nf) {
				t.Fatalf("got %v, want *NoFitError", err)
			}
			if err.Error() != tc.want {
				t.Errorf("got  %q\nwant %q", err.Error(), tc.want)
			}
			sum := 0
			for _, r := range nf.Reasons {
				sum += r.Nodes
			}
			if nf.SandboxID != "new" || nf.Considered != len(tc.nodes) || (len(nf.Reasons) > 0 && sum < len(tc.nodes)) {
				t.Errorf("error fields %+v inconsistent with %d nodes", nf, len(tc.nodes))
			}
		})
	}
}

func TestPlaceManyNeverOvercommits(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	snap := &Snapshot{}
	for i := range 20 {
		snap.Nodes = append(snap.Nodes, ready(fmt.Sprintf("n%02d", i), 2+r.IntN(8), 1024*(2+r.IntN(8))))
		snap.Allocations = append(snap.Allocations, Allocation{SandboxID: fmt.Sprint("old", i), NodeID: snap.Nodes[i].ID, Resources: Resources{VCPUs: 1, MemoryMiB: 512}})
	}
	var reqs []Request
	for i := range 300 {
		reqs = append(reqs, Request{SandboxID: fmt.Sprint("s", i), Resources: Resources{VCPUs: 1 + r.IntN(3), MemoryMiB: 256 << r.IntN(3), DiskMiB: 100}, Spread: i%3 == 0})
	}
	cfg := Config{CPUOvercommit: 2}
	res := PlaceMany(snap, cfg, reqs)
	if len(res) != len(reqs) {
		t.Fatalf("%d results for %d requests", len(res), len(reqs))
	}
	used := map[string]Resources{}
	for _, a := range snap.Allocations {
		used[a.NodeID] = used[a.NodeID].add(a.Resources)
	}
	placed, nofit := 0, 0
	after := *snap
	after.Allocations = append([]Allocation(nil), snap.Allocations...)
	for i, x := range res {
		if x.SandboxID != reqs[i].SandboxID {
			t.Fatalf("result %d is for %q, want %q", i, x.SandboxID, reqs[i].SandboxID)
		}
		var nf *NoFitError
		if errors.As(x.Err, &nf) {
			nofit++
			continue
		}
		if x.Err != nil {
			t.Fatalf("%s: %v", x.SandboxID, x.Err)
		}
		placed++
		used[x.Placement.NodeID] = used[x.Placement.NodeID].add(reqs[i].Resources)
		after.Allocations = append(after.Allocations, Allocation{SandboxID: x.SandboxID, NodeID: x.Placement.NodeID, Resources: reqs[i].Resources})
	}
	if placed == 0 || nofit == 0 {
		t.Fatalf("placed %d, no fit %d: the test should fill the cluster", placed, nofit)
	}
	for _, n := range snap.Nodes {
		u, c := used[n.ID], n.Capacity
		if u.VCPUs > 2*c.VCPUs || u.MemoryMiB > c.MemoryMiB || u.DiskMiB > c.DiskMiB {
			t.Errorf("node %s overcommitted: used %+v of %+v (cpu x2)", n.ID, u, c)
		}
	}
	// Every failed request really fits nowhere in the final state.
	for i, x := range res {
		if x.Err != nil {
			if p, err := Place(&after, cfg, reqs[i]); err == nil {
				t.Errorf("%s failed in the batch but fits on %s afterwards", x.SandboxID, p.NodeID)
			}
		}
	}
}

func TestPlaceManyDuplicateAndBadSnapshot(t *testing.T) {
	snap := &Snapshot{Nodes: []Node{ready("n1", 4, 4096)}}
	res := PlaceMany(snap, Config{}, []Request{{SandboxID: "a", Resources: Resources{VCPUs: 1}}, {SandboxID: "a", Resources: Resources{VCPUs: 1}}})
	if res[0].Err != nil || res[1].Err == nil || !strings.Contains(res[1].Err.Error(), "twice") {
		t.Errorf("duplicate sandbox in batch: %+v", res)
	}
	bad := &Snapshot{Nodes: []Node{ready("n1", 4, 4096), ready("n1", 4, 4096)}}
	res = PlaceMany(bad, Config{}, []Request{{SandboxID: "a"}, {SandboxID: "b"}})
	for _, r := range res {
		if r.Err == nil || !strings.Contains(r.Err.Error(), `node "n1" listed twice`) {
			t.Errorf("duplicate node: %+v", r)
		}
	}
}

func TestCheckRejectsStalePlan(t *testing.T) {
	snap := &Snapshot{
		Nodes:       []Node{ready("n1", 4, 4096), ready("n2", 4, 1024)},
		Allocations: []Allocation{{SandboxID: "old", NodeID: "n1", Resources: Resources{VCPUs: 1, MemoryMiB: 1024}}},
	}
	cfg := Config{CPUOvercommit: 1}
	r1 := Request{SandboxID: "s1", Resources: Resources{VCPUs: 2, MemoryMiB: 2048}}
	r2 := Request{SandboxID: "s2", Resources: Resources{VCPUs: 2, MemoryMiB: 2048}}
	// Two plans computed concurrently from the same snapshot pick the same node.
	p1, p2 := mustPlace(t, snap, cfg, r1), mustPlace(t, snap, cfg, r2)
	if p1.NodeID != "n1" || p2.NodeID != "n1" {
		t.Fatalf("plans on %s and %s, want both on n1", p1.NodeID, p2.NodeID)
	}
	if err := Check(snap, cfg, p1.NodeID, r1); err != nil {
		t.Fatalf("first plan against unchanged state: %v", err)
	}
	// The leader commits the first; the second is now stale.
	latest := &Snapshot{Nodes: snap.Nodes, Allocations: append(snap.Allocations, Allocation{SandboxID: "s1", NodeID: "n1", Resources: r1.Resources})}
	err := Check(latest, cfg, p2.NodeID, r2)
	want := `placement plan is stale: sandbox "s2" on node "n1": node lacks vCPUs (need 2, free 1) and memory (need 2048 MiB, free 1024 MiB)`
	if !errors.Is(err, ErrPlanStale) || err.Error() != want {
		t.Errorf("stale plan: got %v\nwant %s", err, want)
	}
	// The indexed Scheduler agrees with the one-off Check.
	s, err := New(latest, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Check(p2.NodeID, r2); !errors.Is(err, ErrPlanStale) {
		t.Errorf("Scheduler.Check: %v", err)
	}
	if err := s.Check("n2", Request{SandboxID: "s3", Resources: Resources{VCPUs: 1, MemoryMiB: 512}}); err != nil {
		t.Errorf("Scheduler.Check on a node with room: %v", err)
	}

	// Other ways a plan goes stale.
	gone := &Snapshot{Nodes: snap.Nodes[1:]}
	if err := Check(gone, cfg, "n1", r1); !errors.Is(err, ErrPlanStale) || !strings.Contains(err.Error(), `node "n1" no longer exists`) {
		t.Errorf("node removed: %v", err)
	}
	if err := s.Check("nope", r1); !errors.Is(err, ErrPlanStale) {
		t.Errorf("Scheduler.Check unknown node: %v", err)
	}
	cordoned := &Snapshot{Nodes: []Node{ready("n1", 4, 4096)}}
	cordoned.Nodes[0].Cordoned = true
	if err := Check(cordoned, cfg, "n1", r1); !errors.Is(err, ErrPlanStale) || !strings.Contains(err.Error(), "node is cordoned") {
		t.Errorf("cordoned since: %v", err)
	}
	down := &Snapshot{Nodes: []Node{ready("n1", 4, 4096)}}
	down.Nodes[0].Status = NodeDown
	if err := Check(down, cfg, "n1", r1); !errors.Is(err, ErrPlanStale) || !strings.Contains(err.Error(), "node is down") {
		t.Errorf("down since: %v", err)
	}
	relabelled := &Snapshot{Nodes: []Node{ready("n1", 4, 4096)}}
	withC := r1
	withC.Constraints = cons(t, "zone==a")
	if err := Check(relabelled, cfg, "n1", withC); !errors.Is(err, ErrPlanStale) || !strings.Contains(err.Error(), "fails constraint zone==a") {
		t.Errorf("constraint no longer met: %v", err)
	}
	// An invalid request is not "stale": re-planning would not help.
	if err := Check(snap, cfg, "n1", Request{Resources: Resources{VCPUs: -1}}); err == nil || errors.Is(err, ErrPlanStale) {
		t.Errorf("invalid request: %v", err)
	}
}

func TestDeterminism(t *testing.T) {
	base := SyntheticSnapshot(300, 10, 42)
	reqs := syntheticRequests(40, 3)
	want := PlaceMany(base, Config{}, reqs)
	r := rand.New(rand.NewPCG(1, 1))
	for round := range 5 {
		shuffled := &Snapshot{
			Nodes:       append([]Node(nil), base.Nodes...),
			Allocations: append([]Allocation(nil), base.Allocations...),
		}
		r.Shuffle(len(shuffled.Nodes), func(i, j int) { shuffled.Nodes[i], shuffled.Nodes[j] = shuffled.Nodes[j], shuffled.Nodes[i] })
		r.Shuffle(len(shuffled.Allocations), func(i, j int) {
			shuffled.Allocations[i], shuffled.Allocations[j] = shuffled.Allocations[j], shuffled.Allocations[i]
		})
		got := PlaceMany(shuffled, Config{}, reqs)
		for i := range want {
			if got[i].Placement != want[i].Placement || fmt.Sprint(got[i].Err) != fmt.Sprint(want[i].Err) {
				t.Fatalf("round %d request %d: got %+v, want %+v", round, i, got[i], want[i])
			}
		}
	}
	// Ties go to the lowest node ID whatever the input order.
	snap := &Snapshot{Nodes: []Node{ready("n3", 4, 4096), ready("n1", 4, 4096), ready("n2", 4, 4096)}}
	if p := mustPlace(t, snap, Config{}, Request{Resources: Resources{VCPUs: 1}}); p.NodeID != "n1" {
		t.Errorf("tie chose %s, want n1", p.NodeID)
	}
}

func TestSnapshotValidation(t *testing.T) {
	for _, tc := range []struct {
		snap Snapshot
		want string
	}{
		{Snapshot{Nodes: []Node{{Status: NodeReady}}}, "empty ID"},
		{Snapshot{Nodes: []Node{{ID: "n", Capacity: Resources{VCPUs: -1}}}}, "negative resources"},
		{Snapshot{Nodes: []Node{ready("n", 1, 1)}, Allocations: []Allocation{{NodeID: "n", Resources: Resources{MemoryMiB: -5}}}}, "negative resources"},
	} {
		if _, err := New(&tc.snap, Config{}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want error containing %q", tc.snap, err, tc.want)
		}
	}
	// Allocations on nodes no longer in the snapshot are ignored, not fatal.
	snap := &Snapshot{Nodes: []Node{ready("n1", 1, 1024)}, Allocations: []Allocation{{SandboxID: "x", NodeID: "gone", Resources: Resources{VCPUs: 100}}}}
	if p := mustPlace(t, snap, Config{}, Request{Resources: Resources{VCPUs: 1}}); p.NodeID != "n1" {
		t.Errorf("got %+v", p)
	}
	if _, err := Place(snap, Config{}, Request{SandboxID: "neg", Resources: Resources{DiskMiB: -1}}); err == nil || !strings.Contains(err.Error(), `sandbox "neg"`) {
		t.Errorf("negative request: %v", err)
	}
}

func TestSchedulerAssume(t *testing.T) {
	s, err := New(&Snapshot{Nodes: []Node{ready("n1", 2, 2048)}}, Config{CPUOvercommit: 1})
	if err != nil {
		t.Fatal(err)
	}
	req := Request{SandboxID: "s", Resources: Resources{VCPUs: 2, MemoryMiB: 1024}}
	if _, err := s.Place(req); err != nil {
		t.Fatal(err)
	}
	if err := s.Assume(Allocation{SandboxID: "x", NodeID: "n1", Resources: Resources{VCPUs: 1}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Place(req); err == nil {
		t.Error("Place ignored an assumed allocation")
	}
	if err := s.Assume(Allocation{SandboxID: "x", NodeID: "nope"}); err == nil {
		t.Error("Assume on an unknown node succeeded")
	}
}

func TestBenchPlacement(t *testing.T) {
	res, err := BenchPlacement(50, 20)
	if err != nil {
		t.Fatal(err)
	}
	if res.Nodes != 50 || res.Allocations != 500 || res.Iterations != 20 || len(res.Samples) != 20 || res.P50 > res.P99 {
		t.Errorf("unexpected result %+v", res)
	}
}

// A live migration's source (Request.Avoid) never takes the sandbox, even as the best fit.
func TestAvoidedNodeNotChosen(t *testing.T) {
	nodes := []Node{ready("n1", 8, 8192), ready("n2", 2, 1024)}
	for range 5 {
		p, err := Place(&Snapshot{Nodes: nodes}, Config{}, Request{SandboxID: "s", Resources: Resources{VCPUs: 1, MemoryMiB: 256}, Avoid: "n1"})
		if err != nil || p.NodeID != "n2" {
			t.Fatalf("placed on %q (%v), want n2: n1 is avoided", p.NodeID, err)
		}
	}
}
