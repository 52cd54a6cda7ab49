package scheduler

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// NoFitError says why no node can take a request, aggregated over all nodes. Its text
// is what users see as a pending sandbox's reason, so it is deterministic: groups come
// in a fixed order (vCPUs, memory, disk, constraints in request order, draining,
// cordoned, then other statuses by name), never in map or node order.
type NoFitError struct {
	SandboxID  string
	Considered int // nodes examined
	Reasons    []NoFitReason
}

// NoFitReason is one group of nodes rejected for the same reason.
type NoFitReason struct {
	// Kind is "vcpus", "memory", "disk", "constraint", "draining", "cordoned" or
	// "status".
	Kind  string
	Nodes int
	// Text is the rendered group, e.g. "3 nodes lack memory (need 2048 MiB, most free 1024 MiB)".
	Text string
}

// NoFitText begins every NoFitError's text: a pending sandbox's reason that contains it
// fits on no node as the cluster stands.
const NoFitText = "no node fits:"

func (e *NoFitError) Error() string {
	if e.Considered == 0 {
		return NoFitText + " the cluster has no nodes"
	}
	parts := make([]string, len(e.Reasons))
	for i, r := range e.Reasons {
		parts[i] = r.Text
	}
	return NoFitText + " " + strings.Join(parts, ", ")
}

// nodes renders a count with agreement: "1 node lacks" / "3 nodes lack".
func nodes(n int, singular, plural string) string {
	if n == 1 {
		return "1 node " + singular
	}
	return fmt.Sprintf("%d nodes %s", n, plural)
}

// dims describes the resources in a fixed order, for both the aggregate and the
// single-node (Check) messages.
var dims = [...]struct {
	mask       resMask
	kind, name string
	get        func(Resources) int
	unit       string
}{
	{lackCPU, "vcpus", "vCPUs", func(r Resources) int { return r.VCPUs }, ""},
	{lackMemory, "memory", "memory", func(r Resources) int { return r.MemoryMiB }, " MiB"},
	{lackDisk, "disk", "disk", func(r Resources) int { return r.DiskMiB }, " MiB"},
}

// explain re-runs the filters over every node, tallying first rejections. It runs
// only when nothing fits, so the hot path pays nothing for it.
func (s *Scheduler) explain(req *Request, c chain) *NoFitError {
	var (
		lack      [len(dims)]int
		mostFree  [len(dims)]int
		cons      = make([]int, len(req.Constraints))
		drain, co int
		pinned    int
		avoided   int
		statuses  map[NodeStatus]int
	)
	for i := range s.nodes {
		e := &s.nodes[i]
		r := c.reject(e)
		switch r.kind {
		case rejectStatus:
			if statuses == nil {
				statuses = map[NodeStatus]int{}
			}
			statuses[e.node.Status]++
		case rejectPinned:
			pinned++
		case rejectAvoided:
			avoided++
		case rejectDraining:
			drain++
		case rejectCordoned:
			co++
		case rejectConstraint:
			cons[r.constraint]++
		case rejectResources:
			f := free(e)
			for d, dim := range dims {
				if r.lacking&dim.mask != 0 {
					lack[d]++
					mostFree[d] = max(mostFree[d], dim.get(f))
				}
			}
		}
	}
	out := &NoFitError{SandboxID: req.SandboxID, Considered: len(s.nodes)}
	add := func(kind string, n int, text string) {
		out.Reasons = append(out.Reasons, NoFitReason{Kind: kind, Nodes: n, Text: text})
	}
	for d, dim := range dims {
		if lack[d] > 0 {
			what := fmt.Sprintf("%s (need %d%s, most free %d%s)", dim.name, dim.get(req.Resources), dim.unit, mostFree[d], dim.unit)
			add(dim.kind, lack[d], nodes(lack[d], "lacks "+what, "lack "+what))
		}
	}
	for i, n := range cons {
		if n > 0 {
			c := req.Constraints[i].String()
			add("constraint", n, nodes(n, "fails constraint "+c, "fail constraint "+c))
		}
	}
	if pinned > 0 {
		what := "not node " + req.Node + ", " + req.pinWhy()
		add("pinned", pinned, nodes(pinned, "is "+what, "are "+what))
	}
	if avoided > 0 {
		add("source", avoided, nodes(avoided, "is node "+req.Avoid+", where it runs now", "are node "+req.Avoid+", where it runs now"))
	}
	if drain > 0 {
		add("draining", drain, nodes(drain, "draining", "draining"))
	}
	if co > 0 {
		add("cordoned", co, nodes(co, "cordoned", "cordoned"))
	}
	for _, st := range slices.Sorted(maps.Keys(statuses)) {
		add("status", statuses[st], nodes(statuses[st], statusText(st), statusText(st)))
	}
	return out
}

func statusText(st NodeStatus) string {
	if st == "" {
		return "not ready (no status)"
	}
	if st == NodeDown {
		return "down"
	}
	return fmt.Sprintf("not ready (%s)", string(st))
}

// describeOne says why a single node rejects a request, for Check errors.
func describeOne(e *entry, req *Request, r rejection) string {
	switch r.kind {
	case rejectStatus:
		return "node is " + statusText(e.node.Status)
	case rejectPinned:
		return "node is not " + req.Node + ", " + req.pinWhy()
	case rejectAvoided:
		return "the sandbox runs on this node now"
	case rejectDraining:
		return "node is draining"
	case rejectCordoned:
		return "node is cordoned"
	case rejectConstraint:
		return "node fails constraint " + req.Constraints[r.constraint].String()
	case rejectResources:
		f := free(e)
		var parts []string
		for _, dim := range dims {
			if r.lacking&dim.mask != 0 {
				parts = append(parts, fmt.Sprintf("%s (need %d%s, free %d%s)", dim.name, dim.get(req.Resources), dim.unit, max(0, dim.get(f)), dim.unit))
			}
		}
		return "node lacks " + strings.Join(parts, " and ")
	}
	return "node accepted"
}

// pinWhy says why only req.Node may take the sandbox.
func (r *Request) pinWhy() string {
	if r.NodeWhy != "" {
		return r.NodeWhy
	}
	return "which holds the files it starts from"
}
