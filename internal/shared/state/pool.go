package state

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

// setPoolCmd sets the warm pool of Pool.Image, or deletes it when Size and Max are both 0.
type setPoolCmd struct {
	Pool Pool `json:"pool"`
}

// deletes reports whether p, as a command, removes its image's pool.
func (p Pool) deletes() bool { return p.Size == 0 && p.Max == 0 }

// normalize fills what a pool implies (Max 0 = Size), puts the time in UTC and copies
// the slices, so the stored value aliases nothing of the caller's.
func (p Pool) normalize() Pool {
	if p.Max == 0 {
		p.Max = p.Size
	}
	p.InsecureRegistries = slices.Clone(p.InsecureRegistries)
	p.UpdatedAt = utc(p.UpdatedAt)
	return p
}

// validate checks a normalized pool that is to be stored.
func (p Pool) validate() error {
	switch {
	case p.Image == "":
		return fmt.Errorf("%w: pool without image", ErrInvalid)
	case p.Size < 0 || p.Size > MaxPoolSize:
		return fmt.Errorf("%w: pool %s: size %d is outside 0..%d", ErrInvalid, p.Image, p.Size, MaxPoolSize)
	case p.Max < p.Size || p.Max > MaxPoolSize:
		return fmt.Errorf("%w: pool %s: max %d must be between the size (%d) and %d", ErrInvalid, p.Image, p.Max, p.Size, MaxPoolSize)
	case p.VCPUs < 0 || p.MemoryMiB < 0:
		return fmt.Errorf("%w: pool %s: negative vCPUs (%d) or memory (%d MiB)", ErrInvalid, p.Image, p.VCPUs, p.MemoryMiB)
	case len(p.ManagedBy) > MaxPoolManager:
		return fmt.Errorf("%w: pool %s: managed_by longer than %d bytes", ErrInvalid, p.Image, MaxPoolManager)
	case p.UpdatedAt.IsZero():
		return fmt.Errorf("%w: pool %s without time", ErrInvalid, p.Image)
	}
	return nil
}

func (f *fsm) setPool(p Pool) any {
	if p.Image == "" {
		return fmt.Errorf("%w: pool without image", ErrInvalid)
	}
	if p.deletes() {
		if _, ok := f.pools[p.Image]; !ok {
			return fmt.Errorf("pool %q: %w", p.Image, ErrNotFound)
		}
		delete(f.pools, p.Image)
		return nil
	}
	p = p.normalize()
	if err := p.validate(); err != nil {
		return err
	}
	f.pools[p.Image] = &p
	return p.normalize() // a copy: the stored value is never handed out
}

func (f *fsm) listPools() []Pool {
	f.mu.RLock()
	out := make([]Pool, 0, len(f.pools))
	for _, p := range f.pools {
		out = append(out, p.normalize())
	}
	f.mu.RUnlock()
	slices.SortFunc(out, func(a, b Pool) int { return cmp.Compare(a.Image, b.Image) })
	return out
}

// SetPool creates or replaces the warm pool of p.Image and returns it as stored (Max 0
// becomes Size). Size and Max both 0 remove the pool (none is not an error then).
// p.UpdatedAt defaults to now. Errors: ErrInvalid.
func (s *Store) SetPool(ctx context.Context, p Pool) (Pool, error) {
	if p.UpdatedAt.IsZero() {
		p.UpdatedAt = time.Now()
	}
	if p.Image == "" {
		return Pool{}, fmt.Errorf("set pool: %w: no image", ErrInvalid)
	}
	if p.deletes() {
		if err := s.DeletePool(ctx, p.Image); err != nil && !errors.Is(err, ErrNotFound) {
			return Pool{}, err
		}
		return p.normalize(), nil
	}
	// Checked here too so that a bad request never reaches the log.
	if err := p.normalize().validate(); err != nil {
		return Pool{}, fmt.Errorf("set pool %s: %w", p.Image, err)
	}
	resp, err := s.apply(ctx, cmdSetPool, setPoolCmd{Pool: p})
	if err != nil {
		return Pool{}, fmt.Errorf("set pool %s: %w", p.Image, err)
	}
	out, ok := resp.(Pool)
	if !ok {
		return Pool{}, fmt.Errorf("set pool %s: state machine answered %T", p.Image, resp)
	}
	return out, nil
}

// DeletePool removes the warm pool of image. Errors: ErrNotFound.
func (s *Store) DeletePool(ctx context.Context, image string) error {
	if image == "" {
		return fmt.Errorf("delete pool: %w: no image", ErrInvalid)
	}
	if _, err := s.apply(ctx, cmdSetPool, setPoolCmd{Pool: Pool{Image: image}}); err != nil {
		return fmt.Errorf("delete pool %s: %w", image, err)
	}
	return nil
}

// ListPools returns every warm pool sorted by image.
func (s *Store) ListPools(ctx context.Context) ([]Pool, error) {
	if err := s.read(ctx); err != nil {
		return nil, fmt.Errorf("list pools: %w", err)
	}
	return s.fsm.listPools(), nil
}

// LocalPools is LocalSandboxes for warm pools: this server's copy, for watchers that
// follow Changed (the dev server handing pools to its agent, heartbeat replies).
func (s *Store) LocalPools() []Pool { return s.fsm.listPools() }
