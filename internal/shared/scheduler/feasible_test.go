package scheduler

import "testing"

// ready is a schedulable node with no disk limit worth mentioning.
func ready(id string, vcpus, memMiB int) Node {
	return Node{ID: id, Capacity: Resources{VCPUs: vcpus, MemoryMiB: memMiB, DiskMiB: 100 << 10}, Status: NodeReady}
}

func entryOf(n Node, used Resources, cfg Config) *entry {
	cfg, err := cfg.resolve()
	if err != nil {
		panic(err)
	}
	return &entry{node: &n, cap: effective(n.Capacity, cfg), used: used}
}

func TestStatusFilter(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Node)
		want rejectKind
	}{
		{"ready", func(*Node) {}, accepted},
		{"down", func(n *Node) { n.Status = NodeDown }, rejectStatus},
		{"unknown status", func(n *Node) { n.Status = "initializing" }, rejectStatus},
		{"empty status", func(n *Node) { n.Status = "" }, rejectStatus},
		{"cordoned", func(n *Node) { n.Cordoned = true }, rejectCordoned},
		{"draining", func(n *Node) { n.Draining = true }, rejectDraining},
		{"draining and cordoned", func(n *Node) { n.Draining, n.Cordoned = true, true }, rejectDraining},
		{"down and cordoned", func(n *Node) { n.Status, n.Cordoned = NodeDown, true }, rejectStatus},
	} {
		n := ready("n1", 4, 4096)
		tc.mod(&n)
		if got := (statusFilter{}).reject(entryOf(n, Resources{}, Config{})).kind; got != tc.want {
			t.Errorf("%s: kind %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestConstraintFilter(t *testing.T) {
	n := ready("n1", 4, 4096)
	n.Labels = map[string]string{"zone": "a", "ssd": "true"}
	e := entryOf(n, Resources{}, Config{})
	mk := func(ss ...string) constraintFilter {
		var f constraintFilter
		for _, s := range ss {
			c, err := ParseConstraint(s)
			if err != nil {
				t.Fatal(err)
			}
			f.cs = append(f.cs, c)
		}
		return f
	}
	if r := mk().reject(e); r.kind != accepted {
		t.Errorf("no constraints rejected: %+v", r)
	}
	if r := mk("zone==a", "ssd", "!gpu").reject(e); r.kind != accepted {
		t.Errorf("matching constraints rejected: %+v", r)
	}
	// The first failing constraint is the one reported.
	if r := mk("zone==a", "gpu", "zone==b").reject(e); r.kind != rejectConstraint || r.constraint != 1 {
		t.Errorf("got %+v, want constraint index 1", r)
	}
}

func TestResourceFilter(t *testing.T) {
	n := ready("n1", 4, 4096)
	n.Capacity.DiskMiB = 1000
	used := Resources{VCPUs: 4, MemoryMiB: 3072, DiskMiB: 500}
	none := Config{CPUOvercommit: 1, MemoryOvercommit: 1, DiskOvercommit: 1}
	for _, tc := range []struct {
		name string
		cfg  Config
		need Resources
		want resMask
	}{
		{"fits exactly", none, Resources{0, 1024, 500}, 0},
		{"cpu full without overcommit", none, Resources{1, 0, 0}, lackCPU},
		{"cpu fits with default 4x overcommit", Config{}, Resources{12, 1024, 0}, 0},
		{"cpu beyond 4x", Config{}, Resources{13, 0, 0}, lackCPU},
		{"memory", none, Resources{0, 1025, 0}, lackMemory},
		{"memory overcommit 2x", Config{MemoryOvercommit: 2}, Resources{0, 5120, 0}, 0},
		{"disk", none, Resources{0, 0, 501}, lackDisk},
		{"all three", none, Resources{1, 2048, 600}, lackCPU | lackMemory | lackDisk},
	} {
		r := resourceFilter{tc.need}.reject(entryOf(n, used, tc.cfg))
		if r.lacking != tc.want || (tc.want == 0) != (r.kind == accepted) {
			t.Errorf("%s: got %+v, want lacking %b", tc.name, r, tc.want)
		}
	}
	// A dimension the request does not use never rejects, even on an over-full node.
	over := entryOf(n, Resources{VCPUs: 8}, none)
	if r := (resourceFilter{Resources{0, 1024, 0}}).reject(over); r.kind != accepted {
		t.Errorf("zero-cpu request rejected on over-full cpu: %+v", r)
	}
}

func TestChainOrder(t *testing.T) {
	// A down node that also lacks memory and fails a constraint is reported as down.
	n := ready("n1", 1, 512)
	n.Status = NodeDown
	c, _ := ParseConstraint("zone==a")
	req := Request{Resources: Resources{MemoryMiB: 4096}, Constraints: []Constraint{c}}
	if r := newChain(&req).reject(entryOf(n, Resources{}, Config{})); r.kind != rejectStatus {
		t.Errorf("got %+v, want status rejection first", r)
	}
	n.Status = NodeReady
	if r := newChain(&req).reject(entryOf(n, Resources{}, Config{})); r.kind != rejectConstraint {
		t.Errorf("got %+v, want constraint rejection before resources", r)
	}
}
