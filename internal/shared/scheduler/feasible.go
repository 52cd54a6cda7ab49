package scheduler

// Feasibility: small filters that can only reject a node, each with one concern, run
// in a fixed order. The order matters for explanations only: a node is reported under
// the first filter that rejects it (a down node is "down", not also "lacks memory").

type rejectKind uint8

const (
	accepted rejectKind = iota
	rejectStatus
	rejectPinned
	rejectAvoided
	rejectDraining
	rejectCordoned
	rejectConstraint
	rejectResources
)

// resMask says which resources a node lacks.
type resMask uint8

const (
	lackCPU resMask = 1 << iota
	lackMemory
	lackDisk
)

// rejection is why a filter refused a node; the zero value accepts it.
type rejection struct {
	kind       rejectKind
	constraint int     // index into Request.Constraints, for rejectConstraint
	lacking    resMask // for rejectResources
}

// filter is one feasibility rule, bound to a request when built.
type filter interface {
	reject(e *entry) rejection
}

// statusFilter accepts only ready nodes that are neither draining nor cordoned.
type statusFilter struct{}

func (statusFilter) reject(e *entry) rejection {
	switch {
	case e.node.Status != NodeReady:
		return rejection{kind: rejectStatus}
	case e.node.Draining: // reported before cordon: draining is the stronger state
		return rejection{kind: rejectDraining}
	case e.node.Cordoned:
		return rejection{kind: rejectCordoned}
	}
	return rejection{}
}

// pinFilter rejects every node but the one the request is pinned to (Request.Node).
type pinFilter struct{ node string }

func (f pinFilter) reject(e *entry) rejection {
	if e.node.ID != f.node {
		return rejection{kind: rejectPinned}
	}
	return rejection{}
}

// avoidFilter rejects the node a sandbox is moving away from.
type avoidFilter struct{ node string }

func (f avoidFilter) reject(e *entry) rejection {
	if e.node.ID == f.node {
		return rejection{kind: rejectAvoided}
	}
	return rejection{}
}

// constraintFilter rejects nodes whose labels fail any constraint (reporting the first).
type constraintFilter struct{ cs []Constraint }

func (f constraintFilter) reject(e *entry) rejection {
	for i := range f.cs {
		if !f.cs[i].Matches(e.node.Labels) {
			return rejection{kind: rejectConstraint, constraint: i}
		}
	}
	return rejection{}
}

// resourceFilter rejects nodes without room for the request after overcommit.
type resourceFilter struct{ need Resources }

func (f resourceFilter) reject(e *entry) rejection {
	if m := lacking(e, f.need); m != 0 {
		return rejection{kind: rejectResources, lacking: m}
	}
	return rejection{}
}

// lacking compares need with what is free. A dimension the request does not use never
// rejects, even on a node already over its (possibly lowered) effective capacity.
func lacking(e *entry, need Resources) resMask {
	free := free(e)
	var m resMask
	if need.VCPUs > 0 && need.VCPUs > free.VCPUs {
		m |= lackCPU
	}
	if need.MemoryMiB > 0 && need.MemoryMiB > free.MemoryMiB {
		m |= lackMemory
	}
	if need.DiskMiB > 0 && need.DiskMiB > free.DiskMiB {
		m |= lackDisk
	}
	return m
}

// free is effective capacity minus usage; negative when a lowered overcommit factor
// leaves a node holding more than it may now.
func free(e *entry) Resources {
	return Resources{e.cap.VCPUs - e.used.VCPUs, e.cap.MemoryMiB - e.used.MemoryMiB, e.cap.DiskMiB - e.used.DiskMiB}
}

// chain runs filters in order; the first rejection wins.
type chain struct{ filters []filter }

func newChain(req *Request) chain {
	var fs []filter
	if req.Node != "" {
		// First: the other nodes are "not where its state is", not also down or full.
		fs = append(fs, pinFilter{req.Node})
	}
	if req.Avoid != "" {
		fs = append(fs, avoidFilter{req.Avoid})
	}
	fs = append(fs, statusFilter{})
	if len(req.Constraints) > 0 {
		fs = append(fs, constraintFilter{req.Constraints})
	}
	return chain{append(fs, resourceFilter{req.Resources})}
}

func (c chain) reject(e *entry) rejection {
	for _, f := range c.filters {
		if r := f.reject(e); r.kind != accepted {
			return r
		}
	}
	return rejection{}
}

func (c chain) feasible(e *entry) bool { return c.reject(e).kind == accepted }
