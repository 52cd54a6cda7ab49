package image

import (
	"context"
	"os"
	"slices"
	"syscall"
	"time"
)

// Usage is the disk the store takes: blobs, root disks and what is being unpacked.
func (s *Store) Usage() int64 {
	var n int64
	for _, d := range []string{s.blobDir(), s.diskDir(), s.tmpDir()} {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			if fi, err := e.Info(); err == nil {
				n += diskBytes(fi)
			}
		}
	}
	return n
}

// touch records that the image with digest was used now (in memory: recency is a
// heuristic, and writing the index on every start would cost every start a write).
func (s *Store) touch(digest string) {
	s.mu.Lock()
	if s.used == nil {
		s.used = map[string]time.Time{}
	}
	s.used[digest] = time.Now()
	s.mu.Unlock()
}

// Prune removes least recently used images that inUse does not claim until the store
// takes at most budget bytes, and returns the digests it removed. Images in use (a
// sandbox runs from it, a template or pool needs it) are never removed, so the store may
// stay over budget; the caller reports that.
//
// Images used within keepRecent stay too: a start may be between getting its image and
// telling inUse about it.
func (s *Store) Prune(ctx context.Context, budget int64, keepRecent time.Duration, inUse func(digest string) bool) ([]string, error) {
	if budget <= 0 || s.Usage() <= budget {
		return nil, nil
	}
	s.mu.Lock()
	idx, err := s.loadIndex()
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	type cand struct {
		digest string
		last   time.Time
	}
	var cands []cand
	for d, r := range idx.Images {
		last := r.Pulled
		if t, ok := s.used[d]; ok && t.After(last) {
			last = t
		}
		cands = append(cands, cand{d, last})
	}
	s.mu.Unlock()
	slices.SortFunc(cands, func(a, b cand) int { return a.last.Compare(b.last) })
	var removed []string
	for _, c := range cands {
		if s.Usage() <= budget {
			break
		}
		if inUse(c.digest) || time.Since(c.last) < keepRecent {
			continue
		}
		if err := s.Remove(ctx, c.digest); err != nil {
			return removed, err
		}
		s.log.Info("removed an unused image over the disk budget", "digest", c.digest, "unused_since", c.last, "budget_mib", budget>>20)
		removed = append(removed, c.digest)
	}
	return removed, nil
}

// diskBytes is what a file takes on disk (sparse root disks take less than their size).
func diskBytes(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
