package nodescale

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

var t0 = time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)

// A node of 2 vCPUs (8 schedulable with the default 4x) and 2 GiB.
func node(id string) state.Node {
	return state.Node{ID: id, Status: state.NodeReady, Capacity: state.Resources{VCPUs: 2, MemoryMiB: 2048, DiskMiB: 10000}}
}

func waitingSince(id string, mem int, since time.Time) state.Sandbox {
	return state.Sandbox{ID: id, Status: state.StatusPending, Spec: state.SandboxSpec{Image: "i", MemoryMiB: mem, VCPUs: 1},
		CreatedAt: since, Events: []state.Event{{Time: since, Status: state.StatusPending}}}
}

func running(id, on string) state.Sandbox {
	return state.Sandbox{ID: id, Status: state.StatusRunning, Node: on, Spec: state.SandboxSpec{Image: "i", MemoryMiB: 512, VCPUs: 1}, CreatedAt: t0}
}

func newMem() *memory { return &memory{idleSince: map[string]time.Time{}} }

func TestScaleUpForWaitingSandboxes(t *testing.T) {
	cfg := Config{Max: 10}
	nodes := []state.Node{node("a")}
	sbs := []state.Sandbox{running("r", "a"), waitingSince("w1", 1024, t0), waitingSince("w2", 1024, t0), waitingSince("w3", 1024, t0)}
	// Not yet: they may be placed in a moment.
	if p := plan(t0.Add(5*time.Second), cfg, scheduler.Config{}, nodes, sbs, newMem()); p.Want != 0 || p.Waiting != 0 {
		t.Fatalf("before ScaleUpAfter: %+v", p)
	}
	// Three of 1 GiB on nodes of 2 GiB: two nodes.
	p := plan(t0.Add(DefaultScaleUpAfter), cfg, scheduler.Config{}, nodes, sbs, newMem())
	if p.Want != 2 || p.Waiting != 3 || p.Drain != "" {
		t.Fatalf("want 2 nodes for 3 GiB of waiting sandboxes: %+v", p)
	}
	// Max bounds the pool: one node exists, so one more.
	cfg.Max = 2
	if p := plan(t0.Add(time.Minute), cfg, scheduler.Config{}, nodes, sbs, newMem()); p.Want != 1 || p.Capped != 1 {
		t.Fatalf("Max 2: %+v", p)
	}
	// A sandbox no node of the shape can hold asks for none.
	big := []state.Sandbox{waitingSince("huge", 4096, t0)}
	if p := plan(t0.Add(time.Minute), Config{}, scheduler.Config{}, nodes, big, newMem()); p.Want != 0 || p.Unplaceable != 1 {
		t.Fatalf("a sandbox larger than a node: %+v", p)
	}
	// Sandboxes bound to a node or to labels wait for those, not for new nodes.
	pinned := waitingSince("pinned", 512, t0)
	pinned.Spec.Constraints = []string{"zone=b"}
	if p := plan(t0.Add(time.Minute), Config{}, scheduler.Config{}, nodes, []state.Sandbox{pinned}, newMem()); p.Want != 0 {
		t.Fatalf("a constrained sandbox: %+v", p)
	}
	// One node declaring an outsized capacity does not shrink the order: the shape is the
	// median node's.
	huge := node("huge")
	huge.Capacity.MemoryMiB = 1 << 20
	if p := plan(t0.Add(time.Minute), Config{}, scheduler.Config{}, []state.Node{node("a"), node("b"), huge}, sbs, newMem()); p.Want != 2 {
		t.Fatalf("with an outsized node: %+v", p)
	}
	// No node yet to learn the shape from: one.
	if p := plan(t0.Add(time.Minute), Config{}, scheduler.Config{}, nil, sbs[1:], newMem()); p.Want != 1 {
		t.Fatalf("no nodes: %+v", p)
	}
}

// Parked nodes come back before new ones are ordered.
func TestParkedNodesFirst(t *testing.T) {
	a, b := node("a"), node("b")
	b.Parked, b.Cordoned = true, true
	sbs := []state.Sandbox{running("r", "a"), waitingSince("w1", 2048, t0), waitingSince("w2", 2048, t0)}
	p := plan(t0.Add(time.Minute), Config{}, scheduler.Config{}, []state.Node{a, b}, sbs, newMem())
	if !slices.Equal(p.Unpark, []string{"b"}) || p.Want != 1 || !slices.Contains(p.Keep, "b") {
		t.Fatalf("one parked node taken back, one new: %+v", p)
	}
}

// The no-flapping rules: a node is given back only after IdleAfter of holding nothing,
// never within ScaleDownDelay of a scale-up, never below Min, one at a time, and never
// while sandboxes wait.
func TestScaleDownRules(t *testing.T) {
	cfg := Config{Min: 1}
	nodes := []state.Node{node("a"), node("b"), node("c")}
	mem := newMem()
	busy := []state.Sandbox{running("r", "a")}
	// A scale-up at t0 (a sandbox had waited).
	if p := plan(t0, cfg, scheduler.Config{}, nodes, append(busy, waitingSince("w", 512, t0.Add(-time.Minute))), mem); p.Want != 1 {
		t.Fatalf("scale-up: %+v", p)
	}
	// b and c idle from t0; IdleAfter passes at t0+10m, but so does ScaleDownDelay only then.
	if p := plan(t0.Add(9*time.Minute), cfg, scheduler.Config{}, nodes, busy, mem); p.Drain != "" {
		t.Fatalf("drained within ScaleDownDelay / IdleAfter: %+v", p)
	}
	p := plan(t0.Add(10*time.Minute), cfg, scheduler.Config{}, nodes, busy, mem)
	if p.Drain != "b" {
		t.Fatalf("the longest idle (ties by name) given back after 10 minutes: %+v", p)
	}
	if !slices.Equal(p.Keep, []string{"a", "b", "c"}) || !slices.Equal(p.Idle, []string{"b", "c"}) {
		t.Fatalf("keep/idle: %+v", p)
	}
	// b is being given back (parked, draining, a sandbox still on it): no second drain.
	nodes[1].Parked, nodes[1].Draining, nodes[1].Cordoned = true, true, true
	moving := append(slices.Clone(busy), running("m", "b"))
	if p := plan(t0.Add(11*time.Minute), cfg, scheduler.Config{}, nodes, moving, mem); p.Drain != "" || len(p.Release) != 0 {
		t.Fatalf("one node at a time: %+v", p)
	}
	// Drained: released; c would be next but a sandbox waits, so nothing goes.
	p = plan(t0.Add(12*time.Minute), cfg, scheduler.Config{}, nodes, busy, mem)
	if !slices.Equal(p.Release, []string{"b"}) || p.Drain != "c" {
		t.Fatalf("release b, drain c next: %+v", p)
	}
	nodes[1].Draining = false // released
	if p := plan(t0.Add(13*time.Minute), cfg, scheduler.Config{}, nodes, append(busy, waitingSince("w2", 4096, t0)), mem); p.Drain != "" {
		t.Fatalf("drained while a sandbox waits: %+v", p)
	}
	// Min: with b parked and c given back too, a is the last and stays.
	nodes[2].Parked, nodes[2].Cordoned = true, true
	if p := plan(t0.Add(time.Hour), cfg, scheduler.Config{}, nodes, nil, mem); p.Drain != "" {
		t.Fatalf("below Min: %+v", p)
	}
}

// Load that comes and goes (a sandbox every other minute) on a node that can hold it
// orders nothing and gives back only the node that stays idle, once, over an hour.
func TestNoFlappingUnderOscillatingLoad(t *testing.T) {
	cfg := Config{Min: 1}
	nodes := []state.Node{node("a"), node("b")}
	mem := newMem()
	ups, drains := 0, map[string]int{}
	for m := 0; m < 60; m++ {
		now := t0.Add(time.Duration(m) * time.Minute)
		var sbs []state.Sandbox
		if m%2 == 0 {
			sbs = append(sbs, running(fmt.Sprint("s", m), "a"))
		}
		if m%6 == 0 { // a short wait, placed within the pass: not demand
			sbs = append(sbs, waitingSince(fmt.Sprint("w", m), 512, now.Add(-5*time.Second)))
		}
		p := plan(now, cfg, scheduler.Config{}, nodes, sbs, mem)
		if p.Want > 0 {
			ups++
		}
		if p.Drain != "" {
			drains[p.Drain]++
			for i := range nodes {
				if nodes[i].ID == p.Drain {
					nodes[i].Parked, nodes[i].Cordoned = true, true
				}
			}
		}
	}
	if ups != 0 || len(drains) != 1 || drains["b"] != 1 {
		t.Fatalf("oscillating load: %d scale-ups, drains %v (want none, and b once)", ups, drains)
	}
}

// storeDouble and providerDouble are test doubles above the autoscaler's seams (the
// replicated state, the platform); the real ones run in TestNodeAutoscalerOnKubernetes.
type storeDouble struct {
	nodes []state.Node
	sbs   []state.Sandbox
}

func (s *storeDouble) LocalNodes() []state.Node        { return s.nodes }
func (s *storeDouble) LocalSandboxes() []state.Sandbox { return s.sbs }
func (s *storeDouble) UpdateNode(_ context.Context, id string, _ state.NodeUpdate) (state.Node, error) {
	return state.Node{ID: id}, nil
}

type providerDouble struct{ requests []int }

func (p *providerDouble) Name() string { return "double" }
func (p *providerDouble) Request(_ context.Context, n int, _ []string) error {
	p.requests = append(p.requests, n)
	return nil
}
func (p *providerDouble) Keep(context.Context, []string) error  { return nil }
func (p *providerDouble) Release(context.Context, string) error { return nil }

// Passes act at most once per Interval (each costs the platform's API calls), except
// one that finds more waiting than the last one ordered for: it acts at once.
func TestPassActsAtOnceOnNewNeed(t *testing.T) {
	st := &storeDouble{nodes: []state.Node{node("a")}, sbs: []state.Sandbox{running("r", "a")}}
	pr := &providerDouble{}
	a, err := New(Config{Max: 10, ScaleUpAfter: time.Second}, scheduler.Config{}, pr, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	pass := func(at time.Duration) {
		t.Helper()
		if err := a.Pass(ctx, t0.Add(at)); err != nil {
			t.Fatal(err)
		}
	}
	pass(0)
	pass(time.Second) // nothing new: not acted on
	if !slices.Equal(pr.requests, []int{0}) {
		t.Fatalf("requests after two quiet passes a second apart: %v", pr.requests)
	}
	st.sbs = append(st.sbs, waitingSince("w1", 1536, t0.Add(time.Second)))
	pass(2 * time.Second) // waiting its ScaleUpAfter: one node, at once
	if !slices.Equal(pr.requests, []int{0, 1}) {
		t.Fatalf("requests after a sandbox waited: %v", pr.requests)
	}
	pass(3 * time.Second) // the same need: not again until Interval
	st.sbs = append(st.sbs, waitingSince("w2", 1536, t0.Add(2*time.Second)))
	pass(3*time.Second + 500*time.Millisecond) // more: at once
	if !slices.Equal(pr.requests, []int{0, 1, 2}) {
		t.Fatalf("requests after a second sandbox waited: %v", pr.requests)
	}
	st.sbs = st.sbs[:1] // both gone: less is needed, which waits for Interval
	pass(4 * time.Second)
	if len(pr.requests) != 3 {
		t.Fatalf("a smaller need acted on within Interval: %v", pr.requests)
	}
	pass(3*time.Second + 500*time.Millisecond + Interval)
	if !slices.Equal(pr.requests, []int{0, 1, 2, 0}) {
		t.Fatalf("requests once Interval passed: %v", pr.requests)
	}
}
