// Package scheduler decides which node a sandbox runs on.
//
// It is a pure function over a snapshot of cluster state: no I/O, no clocks, no
// randomness, so the same input always gives the same answer and every rule can be
// tested without a cluster. The integrator converts Raft state into a Snapshot.
//
// Placement follows Nomad's shape: a chain of small feasibility filters (node status,
// cordon/drain, label constraints, free resources) each of which can only reject a
// node, then rankers that score the survivors (bin-pack or spread, plus locality
// bonuses). The highest score wins; ties go to the lowest node ID. Every node is
// examined (no sampling): at 10,000 nodes a scan costs under a millisecond, and
// a full scan is what makes the "why nothing fits" explanation complete.
//
// The leader calls Place (or PlaceMany) on a snapshot, then Check against the latest
// state just before committing the plan, so two plans computed concurrently from the
// same snapshot can never overcommit a node.
package scheduler

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
)

// NodeStatus is whether the control plane hears from a node's agent. Only NodeReady
// nodes take sandboxes; any other value is reported by name in NoFitError.
type NodeStatus string

const (
	NodeReady NodeStatus = "ready"
	NodeDown  NodeStatus = "down"
)

// Resources is an amount of node capacity, or what a sandbox reserves.
type Resources struct {
	VCPUs     int
	MemoryMiB int
	DiskMiB   int
}

func (r Resources) add(o Resources) Resources {
	return Resources{r.VCPUs + o.VCPUs, r.MemoryMiB + o.MemoryMiB, r.DiskMiB + o.DiskMiB}
}

func (r Resources) validate() error {
	if r.VCPUs < 0 || r.MemoryMiB < 0 || r.DiskMiB < 0 {
		return fmt.Errorf("negative resources (vcpus %d, memory %d MiB, disk %d MiB)", r.VCPUs, r.MemoryMiB, r.DiskMiB)
	}
	return nil
}

// Node is one host as the scheduler sees it.
type Node struct {
	ID       string
	Labels   map[string]string
	Capacity Resources
	Status   NodeStatus
	// Cordoned nodes take no new sandboxes; Draining ones also have theirs moved off.
	Cordoned, Draining bool
	// Images are digests whose root disk is already built on the node.
	Images []string
	// Warm are digests the node has a template / warm pool for (ranking hook; filled
	// in by the warm-pool work).
	Warm []string
}

// Allocation is capacity already reserved on a node by a sandbox that is not terminal.
type Allocation struct {
	SandboxID string
	NodeID    string
	Resources
}

// Request is one sandbox to place.
type Request struct {
	SandboxID string
	Resources
	ImageDigest string // may be empty; used only for locality
	Constraints []Constraint
	// Spread asks for the least utilised node instead of bin-packing.
	Spread bool
	// Node, if set, is the only node that may take the sandbox: the one holding its
	// saved state (a paused sandbox resumes where its state is), or the one a caller
	// named; NodeWhy says which, for the reasons a placement fails ("which holds the
	// files it starts from" if empty).
	Node    string
	NodeWhy string
	// Prefer, if set, is the node that takes the sandbox if it can: the one holding the
	// files it starts from (a fork's source), which any other node would fetch first.
	Prefer string
	// Avoid, if set, is a node that must not take the sandbox: where it runs now (a live
	// migration's source).
	Avoid string
}

func (r *Request) validate() error {
	if err := r.Resources.validate(); err != nil {
		return fmt.Errorf("sandbox %q: %w", r.SandboxID, err)
	}
	for _, c := range r.Constraints {
		if err := c.Validate(); err != nil {
			return fmt.Errorf("sandbox %q: %w", r.SandboxID, err)
		}
	}
	return nil
}

// Snapshot is the state a placement decision is made from. The scheduler reads it and
// never modifies it; callers must not modify it while a Scheduler built from it is used.
type Snapshot struct {
	Nodes       []Node
	Allocations []Allocation
}

// Config tunes feasibility and ranking. The zero value means DefaultConfig: a zero
// field takes its default. A negative locality weight turns that bonus off.
type Config struct {
	// Overcommit factors multiply a node's capacity (1.0 = none).
	//
	// CPU defaults to 4.0: sandboxes are mostly idle or bursty and a vCPU is a host
	// thread the kernel time-slices, so oversubscribing costs latency, not correctness.
	// Memory defaults to 1.0: guest RAM is backed by host pages (no balloon yet), and
	// overcommitting it ends with the host OOM killer shooting a VMM. Disk defaults to
	// 1.0: root disks are sparse scratch files, but a full host filesystem corrupts
	// every guest on it at once.
	CPUOvercommit, MemoryOvercommit, DiskOvercommit float64
	// ImageLocalityWeight is added to the score of nodes that already hold the
	// request's root disk (default 0.3: such a node wins unless another would end up
	// more than 30 percentage points fuller; building a root disk costs a pull and
	// an erofs build, seconds at best).
	ImageLocalityWeight float64
	// WarmLocalityWeight is added for nodes with a warm pool of the image (default 0.5,
	// above image locality: a warm start skips the boot too).
	WarmLocalityWeight float64
}

// Default values of Config fields.
const (
	DefaultCPUOvercommit       = 4.0
	DefaultMemoryOvercommit    = 1.0
	DefaultDiskOvercommit      = 1.0
	DefaultImageLocalityWeight = 0.3
	DefaultWarmLocalityWeight  = 0.5
)

// DefaultConfig is the configuration the zero Config stands for.
func DefaultConfig() Config {
	return Config{
		CPUOvercommit:       DefaultCPUOvercommit,
		MemoryOvercommit:    DefaultMemoryOvercommit,
		DiskOvercommit:      DefaultDiskOvercommit,
		ImageLocalityWeight: DefaultImageLocalityWeight,
		WarmLocalityWeight:  DefaultWarmLocalityWeight,
	}
}

// Resolved is c with its defaults filled in, or an error for values that would make
// capacity meaningless.
func (c Config) Resolved() (Config, error) { return c.resolve() }

// resolve fills defaults and rejects values that would make capacity meaningless.
func (c Config) resolve() (Config, error) {
	def := DefaultConfig()
	for _, f := range []struct {
		name string
		v    *float64
		d    float64
		neg  bool // negative allowed (means "off")
	}{
		{"cpu overcommit", &c.CPUOvercommit, def.CPUOvercommit, false},
		{"memory overcommit", &c.MemoryOvercommit, def.MemoryOvercommit, false},
		{"disk overcommit", &c.DiskOvercommit, def.DiskOvercommit, false},
		{"image locality weight", &c.ImageLocalityWeight, def.ImageLocalityWeight, true},
		{"warm locality weight", &c.WarmLocalityWeight, def.WarmLocalityWeight, true},
	} {
		switch {
		case math.IsNaN(*f.v) || math.IsInf(*f.v, 0):
			return c, fmt.Errorf("scheduler config: %s is %v", f.name, *f.v)
		case *f.v == 0:
			*f.v = f.d
		case *f.v < 0 && !f.neg:
			return c, fmt.Errorf("scheduler config: %s %v is negative", f.name, *f.v)
		case *f.v < 0:
			*f.v = 0
		}
	}
	return c, nil
}

// Placement is where a request goes and how the decision was reached.
type Placement struct {
	NodeID     string
	Score      float64
	Considered int // nodes examined
	Feasible   int // nodes that passed every filter
}

// Result is one request's outcome in PlaceMany.
type Result struct {
	SandboxID string
	Placement Placement
	Err       error // *NoFitError when nothing fits
}

// ErrPlanStale wraps every Check failure caused by the state having moved on since the
// plan was made (node gone, no longer eligible, or now too full): re-plan and retry.
var ErrPlanStale = errors.New("placement plan is stale")

// entry is one node with what the filters and rankers need, precomputed.
type entry struct {
	node   *Node
	cap    Resources // capacity after overcommit
	used   Resources
	allocs int
}

// Scheduler holds a snapshot indexed once (effective capacity and usage per node,
// nodes ordered by ID, image holders per digest) so that many placements against it
// are cheap. Place and Check only read it and may run concurrently; Assume and
// PlaceMany modify it and must not run concurrently with anything else.
type Scheduler struct {
	cfg    Config
	nodes  []entry // sorted by node ID
	byID   map[string]int32
	images map[string]*[]int32 // digest -> indexes of nodes holding its root disk, ascending
	warm   map[string]*[]int32
}

// New indexes a snapshot. Allocations on nodes not in the snapshot are ignored (the
// node was removed; its capacity is gone with it).
func New(snap *Snapshot, cfg Config) (*Scheduler, error) {
	cfg, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	s := &Scheduler{
		cfg:    cfg,
		nodes:  make([]entry, len(snap.Nodes)),
		byID:   make(map[string]int32, len(snap.Nodes)),
		images: map[string]*[]int32{},
		warm:   map[string]*[]int32{},
	}
	for i := range snap.Nodes {
		n := &snap.Nodes[i]
		if n.ID == "" {
			return nil, fmt.Errorf("scheduler snapshot: node %d has an empty ID", i)
		}
		if err := n.Capacity.validate(); err != nil {
			return nil, fmt.Errorf("scheduler snapshot: node %q: %w", n.ID, err)
		}
		s.nodes[i] = entry{node: n, cap: effective(n.Capacity, cfg)}
	}
	slices.SortFunc(s.nodes, func(a, b entry) int { return strings.Compare(a.node.ID, b.node.ID) })
	for i := range s.nodes {
		id := s.nodes[i].node.ID
		if i > 0 && s.nodes[i-1].node.ID == id {
			return nil, fmt.Errorf("scheduler snapshot: node %q listed twice", id)
		}
		s.byID[id] = int32(i)
		// Appending in index order keeps each holder list ascending, which lets the
		// ranking scan merge-join it with the node list instead of hashing per node.
		for _, d := range s.nodes[i].node.Images {
			addHolder(s.images, d, int32(i))
		}
		for _, d := range s.nodes[i].node.Warm {
			addHolder(s.warm, d, int32(i))
		}
	}
	// Allocations usually arrive grouped by node; remembering the last node skips
	// most of the map lookups that dominate building the index.
	last, lastIdx := "", int32(-1)
	for k := range snap.Allocations {
		a := &snap.Allocations[k]
		if err := a.Resources.validate(); err != nil {
			return nil, fmt.Errorf("scheduler snapshot: allocation of sandbox %q: %w", a.SandboxID, err)
		}
		if lastIdx < 0 || a.NodeID != last {
			i, ok := s.byID[a.NodeID]
			if !ok {
				continue // the node is gone, and its capacity with it
			}
			last, lastIdx = a.NodeID, i
		}
		e := &s.nodes[lastIdx]
		e.used = e.used.add(a.Resources)
		e.allocs++
	}
	return s, nil
}

// addHolder appends node index i to digest d's holder list once, hashing d once.
func addHolder(m map[string]*[]int32, d string, i int32) {
	xs := m[d]
	if xs == nil {
		m[d] = &[]int32{i}
		return
	}
	if (*xs)[len(*xs)-1] != i {
		*xs = append(*xs, i)
	}
}

// holders is the ascending list of nodes holding digest d.
func holders(m map[string]*[]int32, d string) []int32 {
	if d == "" {
		return nil
	}
	if xs := m[d]; xs != nil {
		return *xs
	}
	return nil
}

// Schedulable is what the scheduler may place on a node of capacity c under this
// configuration: c after the overcommit factors (c itself for a configuration New would
// refuse).
func (cfg Config) Schedulable(c Resources) Resources {
	r, err := cfg.resolve()
	if err != nil {
		return c
	}
	return effective(c, r)
}

// effective is capacity after overcommit, rounded down so a factor never invents a
// partial vCPU or MiB.
func effective(c Resources, cfg Config) Resources {
	f := func(v int, k float64) int { return int(math.Floor(float64(v) * k)) }
	return Resources{f(c.VCPUs, cfg.CPUOvercommit), f(c.MemoryMiB, cfg.MemoryOvercommit), f(c.DiskMiB, cfg.DiskOvercommit)}
}

var errUnknownNode = errors.New("unknown node")

// Assume records an allocation as if committed, so later placements against this
// Scheduler account for it.
func (s *Scheduler) Assume(a Allocation) error {
	if err := a.Resources.validate(); err != nil {
		return fmt.Errorf("allocation of sandbox %q: %w", a.SandboxID, err)
	}
	i, ok := s.byID[a.NodeID]
	if !ok {
		return fmt.Errorf("allocation of sandbox %q on node %q: %w", a.SandboxID, a.NodeID, errUnknownNode)
	}
	e := &s.nodes[i]
	e.used = e.used.add(a.Resources)
	e.allocs++
	return nil
}

// Place picks the best node for req, or returns a *NoFitError explaining why none fits.
func (s *Scheduler) Place(req Request) (Placement, error) {
	if err := req.validate(); err != nil {
		return Placement{}, err
	}
	if i, ok := s.byID[req.Prefer]; ok && req.Prefer != "" && newChain(&req).reject(&s.nodes[i]).kind == accepted {
		return Placement{NodeID: req.Prefer, Considered: 1, Feasible: 1}, nil
	}
	chain := newChain(&req)
	rank := newRanker(&req, s.cfg)
	imgs, warm := holders(s.images, req.ImageDigest), holders(s.warm, req.ImageDigest)
	best := Placement{Considered: len(s.nodes)}
	bestIdx := -1
	for i := range s.nodes {
		e := &s.nodes[i]
		if !chain.feasible(e) {
			continue
		}
		best.Feasible++
		// Holder lists are ascending and i only grows: advance past smaller indexes.
		for len(imgs) > 0 && int(imgs[0]) < i {
			imgs = imgs[1:]
		}
		for len(warm) > 0 && int(warm[0]) < i {
			warm = warm[1:]
		}
		sc := rank.score(e, len(imgs) > 0 && int(imgs[0]) == i, len(warm) > 0 && int(warm[0]) == i)
		// Strictly greater: on equal scores the earlier (lower) node ID stays.
		if bestIdx < 0 || sc > best.Score {
			bestIdx, best.Score = i, sc
		}
	}
	if bestIdx < 0 {
		return Placement{}, s.explain(&req, chain)
	}
	best.NodeID = s.nodes[bestIdx].node.ID
	return best, nil
}

// Check re-validates a plan (req on nodeID) against this state: the node must still
// exist, be eligible, satisfy the constraints and have room. Failures wrap ErrPlanStale.
func (s *Scheduler) Check(nodeID string, req Request) error {
	if err := req.validate(); err != nil {
		return err
	}
	i, ok := s.byID[nodeID]
	if !ok {
		return fmt.Errorf("%w: sandbox %q: node %q no longer exists", ErrPlanStale, req.SandboxID, nodeID)
	}
	return checkEntry(&s.nodes[i], &req)
}

func checkEntry(e *entry, req *Request) error {
	chain := newChain(req)
	if r := chain.reject(e); r.kind != accepted {
		return fmt.Errorf("%w: sandbox %q on node %q: %s", ErrPlanStale, req.SandboxID, e.node.ID, describeOne(e, req, r))
	}
	return nil
}

// PlaceMany places requests in order, each one seeing the capacity taken by those
// before it. A request that fits nowhere gets a *NoFitError and takes nothing. The
// order is the caller's priority (e.g. oldest pending first).
func (s *Scheduler) PlaceMany(reqs []Request) []Result {
	out := make([]Result, len(reqs))
	seen := make(map[string]bool, len(reqs))
	for k, req := range reqs {
		out[k].SandboxID = req.SandboxID
		if req.SandboxID != "" && seen[req.SandboxID] {
			out[k].Err = fmt.Errorf("sandbox %q appears twice in one placement batch", req.SandboxID)
			continue
		}
		seen[req.SandboxID] = true
		p, err := s.Place(req)
		if err != nil {
			out[k].Err = err
			continue
		}
		out[k].Placement = p
		if err := s.Assume(Allocation{SandboxID: req.SandboxID, NodeID: p.NodeID, Resources: req.Resources}); err != nil {
			out[k].Err = err // unreachable: Place returned a node of this Scheduler
		}
	}
	return out
}

// Place indexes snap and places one request. Use New when placing several against
// the same snapshot.
func Place(snap *Snapshot, cfg Config, req Request) (Placement, error) {
	s, err := New(snap, cfg)
	if err != nil {
		return Placement{}, err
	}
	return s.Place(req)
}

// PlaceMany places a batch against snap, accounting for earlier placements in the
// batch. An invalid snapshot or config fails every request with the same error.
func PlaceMany(snap *Snapshot, cfg Config, reqs []Request) []Result {
	s, err := New(snap, cfg)
	if err != nil {
		out := make([]Result, len(reqs))
		for k := range reqs {
			out[k] = Result{SandboxID: reqs[k].SandboxID, Err: err}
		}
		return out
	}
	return s.PlaceMany(reqs)
}

// Check re-validates one plan against the latest snapshot without indexing all of it:
// cost is one pass over nodes and allocations. Failures caused by the state moving on
// wrap ErrPlanStale. Whether the sandbox should be placed at all (still pending, not
// already allocated) is the caller's state-machine question, not the scheduler's.
func Check(snap *Snapshot, cfg Config, nodeID string, req Request) error {
	cfg, err := cfg.resolve()
	if err != nil {
		return err
	}
	if err := req.validate(); err != nil {
		return err
	}
	var e *entry
	for i := range snap.Nodes {
		if n := &snap.Nodes[i]; n.ID == nodeID {
			if err := n.Capacity.validate(); err != nil {
				return fmt.Errorf("scheduler snapshot: node %q: %w", n.ID, err)
			}
			e = &entry{node: n, cap: effective(n.Capacity, cfg)}
			break
		}
	}
	if e == nil {
		return fmt.Errorf("%w: sandbox %q: node %q no longer exists", ErrPlanStale, req.SandboxID, nodeID)
	}
	for _, a := range snap.Allocations {
		if a.NodeID == nodeID {
			if err := a.Resources.validate(); err != nil {
				return fmt.Errorf("scheduler snapshot: allocation of sandbox %q: %w", a.SandboxID, err)
			}
			e.used = e.used.add(a.Resources)
			e.allocs++
		}
	}
	return checkEntry(e, &req)
}
