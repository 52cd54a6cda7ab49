package image

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"time"
)

// ErrOwnerBudget is returned (wrapped) by FitOwner when an owner's images cannot be
// brought within its share of the store: what is left is in use.
var ErrOwnerBudget = errors.New("over this token's share of the node's image disk")

// ownerImage keys the in-memory last use of an image by one owner.
type ownerImage struct{ owner, digest string }

// charge records that opts.Owner uses the image with digest (a cache hit), writing
// the index only the first time an owner uses it, so a start costs no write.
func (s *Store) charge(digest string, opts PullOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return err
	}
	r, ok := idx.Images[digest]
	if !ok {
		return nil // removed since the lookup; the caller's start fails on its own
	}
	_, had := r.Owners[opts.Owner]
	wasOperator := r.Operator
	s.chargeLocked(r, opts)
	if (opts.Owner != "" && had) || (opts.Owner == "" && wasOperator) {
		return nil
	}
	return s.saveIndex(idx)
}

// chargeLocked records the pull or use opts describe on r (not saved); s.mu must be held.
func (s *Store) chargeLocked(r *record, opts PullOptions) {
	if opts.Owner == "" {
		r.Operator = true
		return
	}
	if r.Owners == nil {
		r.Owners = map[string]time.Time{}
	}
	now := time.Now().UTC()
	if _, ok := r.Owners[opts.Owner]; !ok {
		r.Owners[opts.Owner] = now
	}
	if s.ownerUsed == nil {
		s.ownerUsed = map[ownerImage]time.Time{}
	}
	s.ownerUsed[ownerImage{opts.Owner, r.Digest}] = now
}

// imageBytes is what one image counts for against an owner: its compressed layers
// and its root disk once built. Layers another image shares count for both: an
// owner's share is what its images would take alone.
func (s *Store) imageBytes(r *record) int64 {
	n := r.Size
	if fi, err := os.Stat(s.diskPath(r.Digest, s.fsType)); err == nil {
		n += diskBytes(fi)
	}
	return n
}

// OwnerImages is what each image owner holds counts for, by digest.
func (s *Store) OwnerImages(owner string) (map[string]int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for d, r := range idx.Images {
		if _, ok := r.Owners[owner]; ok {
			out[d] = s.imageBytes(r)
		}
	}
	return out, nil
}

// Owners lists the owners holding at least one image.
func (s *Store) Owners() ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for _, r := range idx.Images {
		for o := range r.Owners {
			set[o] = true
		}
	}
	return slices.Sorted(maps.Keys(set)), nil
}

// FitOwner brings owner's images within budget bytes: it lets go of the owner's least
// recently used images, other than keep, that inUse does not claim and the owner did
// not use within keepRecent; an image no owner holds any more and the operator never
// asked for is removed from the node, and removed(digest) is called for it (the caller
// drops what it built from it). If that is not enough and keep is not in use either, the
// owner lets go of keep too. It returns an error wrapping ErrOwnerBudget, naming the
// figures, when the owner stays over budget or had to let go of keep.
//
// One owner can so never fill the node's image disk and push every other tenant's
// images out of the store's node-wide LRU (Prune): its own images go first.
func (s *Store) FitOwner(ctx context.Context, owner string, budget int64, keep string, keepRecent time.Duration, inUse func(digest string) bool, removed func(digest string)) error {
	if owner == "" || budget <= 0 {
		return nil
	}
	type cand struct {
		digest string
		last   time.Time
		bytes  int64
	}
	s.mu.Lock()
	idx, err := s.loadIndex()
	if err != nil {
		s.mu.Unlock()
		return err
	}
	var (
		cands []cand
		used  int64
	)
	for d, r := range idx.Images {
		first, ok := r.Owners[owner]
		if !ok {
			continue
		}
		c := cand{d, first, s.imageBytes(r)}
		if t, ok := s.ownerUsed[ownerImage{owner, d}]; ok && t.After(c.last) {
			c.last = t
		}
		used += c.bytes
		if d != keep {
			cands = append(cands, c)
		}
	}
	s.mu.Unlock()
	if used <= budget {
		return nil
	}
	slices.SortFunc(cands, func(a, b cand) int { return a.last.Compare(b.last) })
	if keep != "" {
		cands = append(cands, cand{digest: keep}) // last resort, whatever its age
	}
	for _, c := range cands {
		if used <= budget {
			break
		}
		if inUse(c.digest) || (c.digest != keep && (time.Since(c.last) < keepRecent || s.usedWithin(c.digest, keepRecent))) {
			continue
		}
		freed, gone, err := s.disown(ctx, owner, c.digest, inUse)
		if err != nil {
			return err
		}
		if gone && removed != nil {
			removed(c.digest)
		}
		if c.digest == keep {
			break // over budget with it: refused, and let go of (used still counts it)
		}
		used -= freed
	}
	if used > budget {
		return fmt.Errorf("%w: this token's images take %d MiB here, %d MiB allowed; the rest runs or was used in the last %s",
			ErrOwnerBudget, used>>20, budget>>20, keepRecent)
	}
	return nil
}

// usedWithin says whether anyone's start used the image with digest within d: another
// token's start between its lookup and its charge must not lose the image.
func (s *Store) usedWithin(digest string, d time.Duration) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.used[digest]
	return ok && time.Since(t) < d
}

// disown drops owner from the image with digest, and removes the image when no owner
// holds it and the operator never asked for it. An image inUse claims (asked again: the
// wait for a root disk build of it may have let a start begin) is left as it is. It
// returns the bytes the image counted for against owner, and whether it removed it.
func (s *Store) disown(ctx context.Context, owner, digest string, inUse func(string) bool) (int64, bool, error) {
	unlock, err := s.lockDigest(ctx, digest) // no root disk build of it under way
	if err != nil {
		return 0, false, err
	}
	defer unlock()
	if inUse(digest) { // asked before taking s.mu: inUse takes its caller's locks
		return 0, false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return 0, false, err
	}
	r, ok := idx.Images[digest]
	if !ok {
		return 0, false, nil
	}
	if _, ok := r.Owners[owner]; !ok {
		return 0, false, nil
	}
	n := s.imageBytes(r)
	delete(r.Owners, owner)
	delete(s.ownerUsed, ownerImage{owner, digest})
	orphan := len(r.Owners) == 0 && !r.Operator
	if orphan {
		delete(idx.Images, digest)
	}
	if err := s.saveIndex(idx); err != nil {
		return 0, false, err
	}
	if orphan {
		s.gcLocked(idx)
		s.log.Info("removed an image its last token let go of over its share", "digest", digest, "owner", owner)
	}
	return n, orphan, nil
}
