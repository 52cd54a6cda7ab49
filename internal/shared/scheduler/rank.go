package scheduler

// Ranking: feasible nodes get a base score in [0, 1] from bin-pack or spread, plus
// locality bonuses. Each part is a small function testable alone.

// utilisation is how full the node would be with the request placed: the mean of
// vCPU and memory fractions of effective capacity, each clamped to [0, 1]. Disk is
// left out on purpose: root disks are shared per image and scratch disks are sparse,
// so disk fullness says little about how busy a node is.
func utilisation(e *entry, need Resources) float64 {
	frac := func(used, capacity int) float64 {
		if capacity <= 0 {
			return 1
		}
		return min(1, max(0, float64(used)/float64(capacity)))
	}
	return (frac(e.used.VCPUs+need.VCPUs, e.cap.VCPUs) + frac(e.used.MemoryMiB+need.MemoryMiB, e.cap.MemoryMiB)) / 2
}

// binPackScore prefers the node that would be fullest (best fit), keeping whole
// nodes free for large sandboxes and letting idle nodes be scaled away.
func binPackScore(e *entry, need Resources) float64 { return utilisation(e, need) }

// spreadScore prefers the least utilised node, limiting the blast radius of one host.
func spreadScore(e *entry, need Resources) float64 { return 1 - utilisation(e, need) }

// localityScore is the bonus for a node that already has what the request needs.
func localityScore(has bool, weight float64) float64 {
	if has {
		return weight
	}
	return 0
}

// ranker combines the parts for one request.
type ranker struct {
	need          Resources
	spread        bool
	imageW, warmW float64
}

func newRanker(req *Request, cfg Config) ranker {
	return ranker{need: req.Resources, spread: req.Spread, imageW: cfg.ImageLocalityWeight, warmW: cfg.WarmLocalityWeight}
}

// score is the node's total: base plus image locality plus the warm-pool hook.
func (r ranker) score(e *entry, hasImage, hasWarm bool) float64 {
	var s float64
	if r.spread {
		s = spreadScore(e, r.need)
	} else {
		s = binPackScore(e, r.need)
	}
	return s + localityScore(hasImage, r.imageW) + localityScore(hasWarm, r.warmW)
}
