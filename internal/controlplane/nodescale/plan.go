// Package nodescale is the node autoscaler: the leader asks it, every pass, whether the
// cluster needs more agent nodes (sandboxes wait for room) or can give one back (a node
// has been idle a while), and it asks a Provider (a Kubernetes node pool, a static fleet)
// for them. Nodes it gives back are drained first (live migration) and parked: they take
// no sandboxes until it takes them back.
package nodescale

import (
	"cmp"
	"slices"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Config is the autoscaler's policy.
type Config struct {
	// Min and Max bound the pool's nodes (parked ones count: they exist). Max 0: no bound.
	Min, Max int
	// ScaleUpAfter is how long a sandbox waits for room before it counts as demand: a
	// sandbox that one finishing soon makes room for is not worth a node.
	ScaleUpAfter time.Duration
	// IdleAfter is how long a node holds no sandbox before it is given back.
	IdleAfter time.Duration
	// ScaleDownDelay: no node is given back this soon after the last scale-up (the load
	// that asked for it tends to come back: giving back and asking again is the flapping
	// this rule prevents).
	ScaleDownDelay time.Duration
	// NodeShape is what one new node offers sandboxes, before overcommit. Zero: the
	// cluster's median node (by memory).
	NodeShape state.Resources
}

// Defaults for Config's zero fields.
const (
	DefaultScaleUpAfter   = 15 * time.Second
	DefaultIdleAfter      = 10 * time.Minute
	DefaultScaleDownDelay = 10 * time.Minute
)

func (c Config) withDefaults() Config {
	c.ScaleUpAfter = cmp.Or(c.ScaleUpAfter, DefaultScaleUpAfter)
	c.IdleAfter = cmp.Or(c.IdleAfter, DefaultIdleAfter)
	c.ScaleDownDelay = cmp.Or(c.ScaleDownDelay, DefaultScaleDownDelay)
	return c
}

// memory is what the autoscaler remembers between passes (leader-local: a new leader
// starts with none, which only delays a scale-down).
type memory struct {
	idleSince   map[string]time.Time
	lastScaleUp time.Time
}

// Plan is one pass's decision.
type Plan struct {
	// Want is how many new nodes to have on order (beyond every node registered).
	Want int
	// Unpark are parked nodes taken back (cheaper than new ones: they exist).
	Unpark []string
	// Drain is an idle node to start giving back ("" for none): parked and drained.
	Drain string
	// Release are parked nodes with nothing left on them: given back to the provider.
	Release []string
	// Keep are the nodes the cluster uses (every ready node not given back): the
	// platform's own scale-down must not remove them, as it sees only the agent's pod on
	// them, not the microVMs. Idle are those of them holding no sandbox.
	Keep, Idle []string
	// Waiting counts the sandboxes that have waited ScaleUpAfter for room; Unplaceable
	// those of them no node of the pool's shape could hold (more nodes will not help).
	Waiting, Unplaceable int
	// Capped is how many nodes more the waiting sandboxes need than Max allows.
	Capped int
}

// plan decides one pass. It reads nodes and sandboxes as the state has them and updates
// mem (idle times, the last scale-up).
func plan(now time.Time, cfg Config, sched scheduler.Config, nodes []state.Node, sbs []state.Sandbox, mem *memory) Plan {
	cfg = cfg.withDefaults()
	if r, err := sched.Resolved(); err == nil {
		sched = r
	} else {
		sched = scheduler.DefaultConfig()
	}
	var p Plan
	load := map[string]int{} // live sandboxes per node
	var waiting []state.Resources
	for _, sb := range sbs {
		if sb.Status.Terminal() {
			continue
		}
		if sb.Node != "" {
			load[sb.Node]++
			if sb.Migration != nil && sb.Migration.To != "" {
				load[sb.Migration.To]++
			}
			continue
		}
		if sb.Status != state.StatusPending || !sb.StopRequestedAt.IsZero() || sb.IsSidecar() {
			continue
		}
		// A sandbox that must go to one node (its snapshot's) or to nodes with given
		// labels waits for those: a new node of the pool is not known to be one.
		if sb.Spec.SnapshotNode != "" || len(sb.Spec.Constraints) > 0 {
			continue
		}
		if now.Sub(pendingSince(sb)) < cfg.ScaleUpAfter {
			continue
		}
		r := sb.Spec.Reserved()
		if sb.IsGroupMain() {
			g := state.GroupReserved(sb)
			r = state.Resources{VCPUs: r.VCPUs + g.VCPUs, MemoryMiB: r.MemoryMiB + g.MemoryMiB, DiskMiB: r.DiskMiB + g.DiskMiB}
		}
		waiting = append(waiting, r)
	}
	p.Waiting = len(waiting)

	shape := cfg.NodeShape
	var parked []string
	var sizes []state.Resources
	total := 0
	for _, n := range nodes {
		if n.Status != state.NodeReady {
			continue
		}
		total++
		sizes = append(sizes, n.Capacity)
		switch {
		case n.Parked && load[n.ID] > 0:
			// Being given back: its drain moves what is left.
			p.Keep = append(p.Keep, n.ID)
		case n.Parked:
			if n.Draining {
				p.Release = append(p.Release, n.ID)
			}
			parked = append(parked, n.ID)
		case load[n.ID] > 0:
			p.Keep = append(p.Keep, n.ID)
		default:
			p.Keep = append(p.Keep, n.ID)
			p.Idle = append(p.Idle, n.ID)
		}
		if n.Parked || load[n.ID] > 0 || n.Cordoned {
			delete(mem.idleSince, n.ID)
		} else if _, ok := mem.idleSince[n.ID]; !ok {
			mem.idleSince[n.ID] = now
		}
	}
	for id := range mem.idleSince {
		if !slices.ContainsFunc(nodes, func(n state.Node) bool { return n.ID == id && n.Status == state.NodeReady }) {
			delete(mem.idleSince, id)
		}
	}

	if shape == (state.Resources{}) && len(sizes) > 0 {
		// The median node (by memory): one node that declares an outsized capacity (a
		// node's agent says what it offers) does not make the pool look roomier.
		slices.SortFunc(sizes, func(a, b state.Resources) int { return cmp.Compare(a.MemoryMiB, b.MemoryMiB) })
		shape = sizes[len(sizes)/2]
	}

	// Scale up: the waiting sandboxes packed, largest first, onto nodes of the shape.
	if len(waiting) > 0 {
		capa := state.Resources{VCPUs: int(float64(shape.VCPUs) * sched.CPUOvercommit), MemoryMiB: int(float64(shape.MemoryMiB) * sched.MemoryOvercommit),
			DiskMiB: int(float64(shape.DiskMiB) * sched.DiskOvercommit)}
		need := 0
		if shape == (state.Resources{}) {
			need = 1 // no node to learn the shape from: one, then see
		} else {
			slices.SortFunc(waiting, func(a, b state.Resources) int { return cmp.Compare(b.MemoryMiB, a.MemoryMiB) })
			var bins []state.Resources // room left on each new node
			for _, r := range waiting {
				if !fits(r, capa) {
					p.Unplaceable++
					continue
				}
				i := slices.IndexFunc(bins, func(b state.Resources) bool { return fits(r, b) })
				if i < 0 {
					bins = append(bins, capa)
					i = len(bins) - 1
				}
				bins[i] = state.Resources{VCPUs: bins[i].VCPUs - r.VCPUs, MemoryMiB: bins[i].MemoryMiB - r.MemoryMiB, DiskMiB: bins[i].DiskMiB - r.DiskMiB}
			}
			need = len(bins)
		}
		slices.Sort(parked)
		for _, id := range parked {
			if need == 0 {
				break
			}
			p.Unpark = append(p.Unpark, id)
			p.Keep = append(p.Keep, id)
			p.Release = slices.DeleteFunc(p.Release, func(r string) bool { return r == id })
			need--
		}
		if cfg.Max > 0 {
			allowed := max(0, cfg.Max-total)
			p.Capped = max(0, need-allowed)
			need = min(need, allowed)
		}
		p.Want = need
		if p.Want > 0 || len(p.Unpark) > 0 {
			mem.lastScaleUp = now
		}
		return p // no scale-down while sandboxes wait
	}

	// Scale down: one node at a time, the longest idle, once idle long enough, not soon
	// after a scale-up, never below Min.
	active := total - len(parked)
	for _, n := range nodes {
		if n.Parked && n.Status == state.NodeReady && load[n.ID] > 0 {
			return p // one being given back already
		}
	}
	if now.Sub(mem.lastScaleUp) < cfg.ScaleDownDelay || active-1 < max(cfg.Min, 1) {
		return p
	}
	var best string
	for _, id := range p.Idle {
		since := mem.idleSince[id]
		if since.IsZero() || now.Sub(since) < cfg.IdleAfter {
			continue
		}
		if best == "" || since.Before(mem.idleSince[best]) || since.Equal(mem.idleSince[best]) && id < best {
			best = id
		}
	}
	p.Drain = best
	return p
}

// pendingSince is when sb last became pending (a sandbox whose node was lost waits again).
func pendingSince(sb state.Sandbox) time.Time {
	for i := len(sb.Events) - 1; i >= 0; i-- {
		if sb.Events[i].Status == state.StatusPending {
			return sb.Events[i].Time
		}
	}
	return sb.CreatedAt
}

func fits(r, room state.Resources) bool {
	return r.VCPUs <= room.VCPUs && r.MemoryMiB <= room.MemoryMiB && (room.DiskMiB == 0 || r.DiskMiB <= room.DiskMiB)
}
