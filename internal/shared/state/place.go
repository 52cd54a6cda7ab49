package state

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// Plan places one pending sandbox on a node.
type Plan struct {
	SandboxID string `json:"sandbox_id"`
	NodeID    string `json:"node_id"`
}

// PlanResult is the FSM's verdict on one plan: Err is empty when it was applied.
type PlanResult struct {
	SandboxID string `json:"sandbox_id"`
	NodeID    string `json:"node_id"`
	Err       string `json:"err,omitempty"`
}

type placeSandboxesCmd struct {
	Plans  []Plan           `json:"plans"`
	Config scheduler.Config `json:"config"`
	Time   time.Time        `json:"time"`
}

// DefaultVCPUs and DefaultMemoryMiB are what a sandbox reserves when its request names
// no amount; the node applies the same defaults when it boots the VM.
const (
	DefaultVCPUs     = 1
	DefaultMemoryMiB = 256
)

// Reserved is what sb reserves on its node.
func (spec SandboxSpec) Reserved() Resources {
	r := Resources{VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB, DiskMiB: spec.DiskMiB}
	if r.VCPUs <= 0 {
		r.VCPUs = DefaultVCPUs
	}
	if r.MemoryMiB <= 0 {
		r.MemoryMiB = DefaultMemoryMiB
	}
	return r
}

// SchedulerSnapshot is the scheduler's view of a state: nodes, and what every live
// sandbox already reserves on its node.
func SchedulerSnapshot(nodes []*Node, sbs []*Sandbox) *scheduler.Snapshot {
	snap := &scheduler.Snapshot{Nodes: schedulerNodes(nodes)}
	for _, sb := range sbs {
		snap.Allocations = append(snap.Allocations, allocationsOf(sb)...)
	}
	return snap
}

func schedulerNodes(nodes []*Node) []scheduler.Node {
	out := make([]scheduler.Node, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, scheduler.Node{
			ID: n.ID, Labels: n.Labels, Status: scheduler.NodeStatus(n.Status), Cordoned: n.Cordoned, Draining: n.Draining,
			Capacity: scheduler.Resources{VCPUs: n.Capacity.VCPUs, MemoryMiB: n.Capacity.MemoryMiB, DiskMiB: n.Capacity.DiskMiB},
			Images:   n.Images, Warm: n.Warm,
		})
	}
	return out
}

// allocationsOf is what sb holds on nodes: nothing unless placed and not ended.
func allocationsOf(sb *Sandbox) []scheduler.Allocation {
	if sb.Node == "" || sb.Status.Terminal() {
		return nil
	}
	r := sb.Spec.Reserved()
	if sb.Status == StatusPaused {
		// A paused sandbox holds no CPU or RAM on its node, only the disk its saved
		// state takes (at most its RAM beside its scratch disk).
		r = Resources{DiskMiB: r.DiskMiB + r.MemoryMiB}
	}
	res := scheduler.Resources{VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB, DiskMiB: r.DiskMiB}
	out := []scheduler.Allocation{{SandboxID: sb.ID, NodeID: sb.Node, Resources: res}}
	if m := sb.Migration; m != nil && m.To != sb.Node {
		// The target of a live migration holds a VM for it until it ends.
		out = append(out, scheduler.Allocation{SandboxID: sb.ID + "~migration", NodeID: m.To, Resources: res})
	}
	return out
}

// SchedulerSnapshotOf is SchedulerSnapshot of copies (as Store.LocalNodes and
// LocalSandboxes return them).
func SchedulerSnapshotOf(nodes []Node, sbs []Sandbox) *scheduler.Snapshot {
	np := make([]*Node, len(nodes))
	for i := range nodes {
		np[i] = &nodes[i]
	}
	sp := make([]*Sandbox, len(sbs))
	for i := range sbs {
		sp[i] = &sbs[i]
	}
	return SchedulerSnapshot(np, sp)
}

// schedulerSnapshot is the scheduler's view of the state: the nodes, and what each holds
// as one allocation per node (kept as sandboxes change: see assign.go), so that a
// placement costs the nodes, not every sandbox.
func (f *fsm) schedulerSnapshot() *scheduler.Snapshot {
	snap := &scheduler.Snapshot{Nodes: schedulerNodes(slices.Collect(maps.Values(f.nodes)))}
	for n, r := range f.nodeUse {
		snap.Allocations = append(snap.Allocations, scheduler.Allocation{SandboxID: "sandboxes on " + n, NodeID: n, Resources: r})
	}
	return snap
}

// SchedulerRequest is the scheduler's view of placing sb. Before its first pull a
// sandbox has no digest; its image reference stands in, which nodes list in Warm.
func SchedulerRequest(sb Sandbox) (scheduler.Request, error) {
	r := sb.Spec.Reserved()
	img := sb.ImageDigest
	if img == "" {
		img = sb.Spec.Image
	}
	req := scheduler.Request{SandboxID: sb.ID, ImageDigest: img, Spread: sb.Spec.Spread,
		Resources: scheduler.Resources{VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB, DiskMiB: r.DiskMiB},
		// The files a start from a snapshot reads are on its node; a fork's source's
		// saved state is fetched by another node if the holder has no room, and a
		// sandbox's volumes are relayed to another node if theirs has none.
		Node: sb.Spec.SnapshotNode, Prefer: cmp.Or(sb.Spec.VolumeNode, sb.Spec.ForkNode)}
	if sb.IsGroupMain() && sb.Status == StatusPending && sb.Node == "" {
		// The main's first placement is the group's: room for every member on one node
		// (its sidecars go with it). Later (a resume, a migration) each member counts
		// for itself.
		ReserveMore(&req, GroupReserved(sb))
	}
	for _, c := range sb.Spec.Constraints {
		pc, err := scheduler.ParseConstraint(c)
		if err != nil {
			return req, err
		}
		req.Constraints = append(req.Constraints, pc)
	}
	return req, nil
}

// resumeSandbox makes a paused sandbox pending again on its node (which holds its saved
// state), if the node has room for it beside what is there now; the node then resumes it.
func (f *fsm) resumeSandbox(c resumeSandboxCmd) any {
	if c.Time.IsZero() {
		return fmt.Errorf("%w: resume without time", ErrInvalid)
	}
	cur, ok := f.sandboxes[c.ID]
	switch {
	case !ok:
		return ErrNotFound
	case cur.Status != StatusPaused:
		return fmt.Errorf("%w: sandbox is %s, not paused", ErrInvalidTransition, cur.Status)
	case !cur.StopRequestedAt.IsZero():
		return fmt.Errorf("%w: sandbox was stopped", ErrInvalidTransition)
	case cur.Saved == nil || cur.Saved.Node != cur.Node:
		return fmt.Errorf("%w: sandbox has no saved state on its node", ErrInvalid)
	}
	snap := f.schedulerSnapshot()
	// Without its own share: paused, it counts only its saved state's disk, which the
	// resume keeps using. (The snapshot holds one sum per node: take its part out.)
	for _, own := range allocationsOf(cur) {
		for i := range snap.Allocations {
			if a := &snap.Allocations[i]; a.NodeID == own.NodeID {
				a.Resources = scheduler.Resources{VCPUs: a.Resources.VCPUs - own.Resources.VCPUs,
					MemoryMiB: a.Resources.MemoryMiB - own.Resources.MemoryMiB, DiskMiB: a.Resources.DiskMiB - own.Resources.DiskMiB}
			}
		}
	}
	req, err := SchedulerRequest(*cur)
	if err != nil {
		return err
	}
	target := cmp.Or(c.Node, cur.Node)
	req.Node = target
	err = scheduler.Check(snap, c.Scheduler, target, req)
	next := cur.clone()
	t := utc(c.Time)
	switch {
	case err == nil:
		next.Node = target
		next.Reason = "resuming on node " + target
		if target != cur.Node {
			next.Reason += " (its saved state is fetched from node " + cur.Node + ")"
		}
	case c.Node != "":
		return fmt.Errorf("%w: resume on node %s: %v", ErrNoRoom, target, err)
	default:
		// The holder has no room (full, cordoned, draining, down): any node that has
		// fetches the saved state; the next placement pass picks it.
		next.Node = ""
		next.Reason = "resuming: node " + cur.Node + ", which holds its saved state, cannot take it now (" + err.Error() + ")"
	}
	next.Status = StatusPending
	next.addEvent(Event{Time: t, Status: StatusPending, Reason: next.Reason})
	next.PauseRequestedAt, next.PausedFor = time.Time{}, ""
	next.Resumes++
	// A lifetime counts from each resume (E2B's connect), unless the call sets its own;
	// a pause for a call's save (a fork, a snapshot) leaves it as it was.
	switch {
	case !c.EndAt.IsZero():
		next.EndAt = utc(c.EndAt)
	case next.Spec.Lifetime > 0 && cur.PausedFor == "":
		next.EndAt = t.Add(next.Spec.Lifetime)
	}
	f.putSandbox(next)
	return *next.clone()
}

// placeSandboxes applies plans that still fit the current state, in order (each counts
// the ones before it): the leader planned on a snapshot, and this re-check at commit time
// is what keeps two plans from overcommitting a node.
func (f *fsm) placeSandboxes(c placeSandboxesCmd) any {
	if c.Time.IsZero() {
		return fmt.Errorf("%w: placement without time", ErrInvalid)
	}
	snap := f.schedulerSnapshot()
	out := make([]PlanResult, 0, len(c.Plans))
	for _, p := range c.Plans {
		res := PlanResult{SandboxID: p.SandboxID, NodeID: p.NodeID}
		sb, ok := f.sandboxes[p.SandboxID]
		switch {
		case !ok:
			res.Err = "sandbox not found"
		case sb.Status != StatusPending || sb.Node != "":
			res.Err = fmt.Sprintf("sandbox is %s on %q, not waiting for a node", sb.Status, sb.Node)
		case !sb.StopRequestedAt.IsZero():
			res.Err = "sandbox was stopped"
		case sb.IsSidecar():
			// A sidecar runs beside its main, on its node, or not at all.
			if main, ok := f.sandboxes[sb.Spec.Group.Main]; !ok || main.Status.Terminal() || main.Node != p.NodeID {
				res.Err = "a sidecar goes on its group's main's node"
			}
		}
		if res.Err == "" {
			req, err := SchedulerRequest(*sb)
			if err == nil {
				err = scheduler.Check(snap, c.Config, p.NodeID, req)
			}
			if err != nil {
				res.Err = err.Error()
			} else {
				next := sb.clone()
				next.Node = p.NodeID
				next.Reason = "placed on node " + p.NodeID
				next.addEvent(Event{Time: utc(c.Time), Status: StatusPending, Reason: next.Reason})
				f.putSandbox(next)
				snap.Allocations = append(snap.Allocations, scheduler.Allocation{SandboxID: sb.ID, NodeID: p.NodeID, Resources: req.Resources})
				if next.IsGroupMain() {
					// Its sidecars go with it (the main's request reserved their room).
					f.placeSidecars(next, c.Time)
				}
			}
		}
		out = append(out, res)
	}
	return out
}

// placeSidecars puts main's sidecars that wait for a node on main's node.
func (f *fsm) placeSidecars(main *Sandbox, t time.Time) {
	for _, gm := range main.Spec.Group.Members[1:] {
		sc, ok := f.sandboxes[gm.ID]
		if !ok || sc.Status != StatusPending || sc.Node != "" || !sc.StopRequestedAt.IsZero() {
			continue
		}
		next := sc.clone()
		next.Node = main.Node
		next.Reason = "placed on node " + main.Node + " with its group"
		next.addEvent(Event{Time: utc(t), Status: StatusPending, Reason: next.Reason})
		f.putSandbox(next)
	}
}

// GroupReserved is what the sidecars of main's group reserve together.
func GroupReserved(main Sandbox) Resources {
	var r Resources
	if !main.IsGroupMain() {
		return r
	}
	for _, m := range main.Spec.Group.Members[1:] {
		r.VCPUs += m.Reserved.VCPUs
		r.MemoryMiB += m.Reserved.MemoryMiB
		r.DiskMiB += m.Reserved.DiskMiB
	}
	return r
}

// ReserveMore adds r to what req asks a node for (a group's other members' room).
func ReserveMore(req *scheduler.Request, r Resources) {
	req.Resources.VCPUs += r.VCPUs
	req.Resources.MemoryMiB += r.MemoryMiB
	req.Resources.DiskMiB += r.DiskMiB
}
