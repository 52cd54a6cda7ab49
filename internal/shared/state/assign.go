package state

import (
	"cmp"
	"slices"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// Likewise per owner, what its sandboxes count against its quota (ownerUse): a create
// checked its owner's quota by a pass over every sandbox.
//
// The FSM also keeps, per node, the sum of what its sandboxes hold (nodeUse): the
// placement a create commits re-checks against it, which cost a pass over every
// sandbox per create before.
//
// The FSM indexes, per node, the sandboxes the node has a part in (Sandbox.Involves):
// what its assignments stream sends. Without it, every committed change made every
// node's stream copy and sort every sandbox to find its own: with 100 nodes and a few
// thousand sandboxes that was most of the leader's CPU, and capped creates through the
// API at a few dozen a second (found by the API throughput bench).
//
// Each node's set has a version, changed whenever the set or one of its sandboxes
// changes, so a stream woken by an unrelated change sees at once that it has nothing new.

// Per the whole state, how many sandboxes wait in the leader's queue (queued): a create
// asked it by a pass over every sandbox.

// Queued reports whether sb waits for the leader's pass to place it, in order: pending,
// on no node, no stop asked, not a sidecar (those go beside their main), and not known to
// fit nowhere (a reason with scheduler.NoFitText: those wait for the cluster to change,
// and a create that fits goes ahead of them).
func (sb *Sandbox) Queued() bool {
	sidecar := sb.Spec.Group != nil && sb.Spec.Group.Main != sb.ID // IsSidecar copies the record
	return sb.Status == StatusPending && sb.Node == "" && sb.StopRequestedAt.IsZero() && !sidecar &&
		!strings.Contains(sb.Reason, scheduler.NoFitText)
}

// involvedNodes lists the nodes sb involves, without repeats.
func involvedNodes(sb *Sandbox) []string {
	var out []string
	for _, n := range []string{sb.Node, sb.FilesOn(), sb.MigratingTo(), sb.VolumesOn()} {
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// putSandbox stores next (replacing the record of its ID) and keeps the index.
func (f *fsm) putSandbox(next *Sandbox) {
	if prev := f.sandboxes[next.ID]; prev != nil {
		f.unindexSandbox(prev)
	}
	f.sandboxes[next.ID] = next
	f.indexSandbox(next)
}

// dropSandbox forgets the record of id and keeps the index.
func (f *fsm) dropSandbox(id string) {
	if prev := f.sandboxes[id]; prev != nil {
		f.unindexSandbox(prev)
	}
	delete(f.sandboxes, id)
}

func (f *fsm) indexSandbox(sb *Sandbox) {
	if sb.Queued() {
		f.queued++
	}
	f.ownerUse[sb.Owner] = f.ownerUse[sb.Owner].plus(quotaUse(sb), 1)
	for _, a := range allocationsOf(sb) {
		u := f.nodeUse[a.NodeID]
		f.nodeUse[a.NodeID] = scheduler.Resources{VCPUs: u.VCPUs + a.Resources.VCPUs, MemoryMiB: u.MemoryMiB + a.Resources.MemoryMiB, DiskMiB: u.DiskMiB + a.Resources.DiskMiB}
	}
	for _, n := range involvedNodes(sb) {
		set := f.involved[n]
		if set == nil {
			set = map[string]bool{}
			f.involved[n] = set
		}
		set[sb.ID] = true
		f.bumpAssigned(n)
	}
}

func (f *fsm) unindexSandbox(sb *Sandbox) {
	if sb.Queued() {
		f.queued--
	}
	if u := f.ownerUse[sb.Owner].plus(quotaUse(sb), -1); u == (Quota{}) {
		delete(f.ownerUse, sb.Owner)
	} else {
		f.ownerUse[sb.Owner] = u
	}
	for _, a := range allocationsOf(sb) {
		u := f.nodeUse[a.NodeID]
		u = scheduler.Resources{VCPUs: u.VCPUs - a.Resources.VCPUs, MemoryMiB: u.MemoryMiB - a.Resources.MemoryMiB, DiskMiB: u.DiskMiB - a.Resources.DiskMiB}
		if u == (scheduler.Resources{}) {
			delete(f.nodeUse, a.NodeID)
		} else {
			f.nodeUse[a.NodeID] = u
		}
	}
	for _, n := range involvedNodes(sb) {
		if set := f.involved[n]; set != nil {
			delete(set, sb.ID)
			if len(set) == 0 {
				delete(f.involved, n)
			}
		}
		f.bumpAssigned(n)
	}
}

// bumpAssigned gives node's assignments a new version. Versions only grow (across
// restores too), so a stream never mistakes a new set for the one it sent.
func (f *fsm) bumpAssigned(node string) {
	f.assignSeq++
	f.assignVer[node] = f.assignSeq
}

// reindex rebuilds the index from the sandboxes (after a restore).
func (f *fsm) reindex() {
	for n := range f.assignVer {
		f.bumpAssigned(n)
	}
	f.involved = map[string]map[string]bool{}
	f.nodeUse = map[string]scheduler.Resources{}
	f.ownerUse = map[string]Quota{}
	f.queued = 0
	for _, sb := range f.sandboxes {
		f.indexSandbox(sb)
	}
}

// AssignedVersion is the version of node's assignments in this server's copy of the
// state: it changes whenever Assigned(node) would answer differently.
func (s *Store) AssignedVersion(node string) uint64 {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	return s.fsm.assignVer[node]
}

// Assigned returns copies of the sandboxes node has a part in (Sandbox.Involves), by ID,
// from this server's copy of the state, with their version (see AssignedVersion).
func (s *Store) Assigned(node string) ([]Sandbox, uint64) {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	set := s.fsm.involved[node]
	out := make([]Sandbox, 0, len(set))
	for id := range set {
		out = append(out, *s.fsm.sandboxes[id].clone())
	}
	slices.SortFunc(out, func(a, b Sandbox) int { return cmp.Compare(a.ID, b.ID) })
	return out, s.fsm.assignVer[node]
}

// quotaUse is what sb counts against its owner's quota: every sandbox its spec's bytes;
// one not over yet its vCPUs, memory and disk too.
func quotaUse(sb *Sandbox) Quota {
	q := Quota{Sandboxes: 1, SpecBytes: sb.Spec.Bytes()}
	if !sb.Status.Terminal() {
		q.VCPUs, q.MemoryMiB, q.DiskMiB = sb.Spec.VCPUs, sb.Spec.MemoryMiB, sb.Spec.DiskMiB
	}
	return q
}

// plus is q with u added sign times.
func (q Quota) plus(u Quota, sign int) Quota {
	return Quota{Sandboxes: q.Sandboxes + sign*u.Sandboxes, VCPUs: q.VCPUs + sign*u.VCPUs, MemoryMiB: q.MemoryMiB + sign*u.MemoryMiB,
		DiskMiB: q.DiskMiB + sign*u.DiskMiB, SpecBytes: q.SpecBytes + sign*u.SpecBytes}
}
