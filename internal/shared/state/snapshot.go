package state

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"
)

// Snapshot is a named snapshot of a sandbox's filesystem: its scratch disk (the writable
// layer over its image), copied while the guest's filesystem was frozen, kept on the node
// that took it. A sandbox started from it boots the same image with that disk.
type Snapshot struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Owner       string    `json:"owner,omitempty"` // as Sandbox.Owner
	Node        string    `json:"node"`            // where its files are
	Sandbox     string    `json:"sandbox"`         // the sandbox it was taken of
	Image       string    `json:"image"`           // the reference that sandbox ran
	ImageDigest string    `json:"image_digest"`
	Bytes       int64     `json:"bytes"`
	CreatedAt   time.Time `json:"created_at"`
	// Lost says why the snapshot can no longer be used (its node was removed).
	Lost string `json:"lost,omitempty"`
	// MemorySpec, for a snapshot with memory, is the spec of the sandbox it was taken of
	// as it ran: a start from it carries on that sandbox's processes, in a VM of its
	// shape. (Never changed once recorded: copies share it.)
	MemorySpec *SandboxSpec `json:"memory_spec,omitempty"`
	// Members, on a sandbox group's snapshot (taken of its main), are its sidecars'
	// snapshots, in the group's order: a start from it starts the whole group.
	Members []SnapshotMember `json:"members,omitempty"`
	// PartOf, on a sidecar's snapshot within a group's, is the group snapshot's ID: it
	// is used and removed with it, never alone. Its name is "<group's>/<sidecar's>".
	PartOf string `json:"part_of,omitempty"`
}

// SnapshotMember is one sidecar of a group's snapshot: its name in the group, its own
// snapshot, and what made it a sidecar (readiness check, restart policy).
type SnapshotMember struct {
	Name     string        `json:"name"`
	Snapshot string        `json:"snapshot"`
	Ready    string        `json:"ready,omitempty"`
	Restart  RestartPolicy `json:"restart,omitempty"`
	// Spec, for a snapshot without memory, is the sidecar's as it ran (its command,
	// environment, shape, policy, volumes): a start from the group's snapshot runs it
	// again so. (A snapshot with memory has its part's MemorySpec.)
	Spec *SandboxSpec `json:"spec,omitempty"`
}

// MaxSnapshotsPerOwner bounds a token's snapshots (each is a disk image on a node).
const MaxSnapshotsPerOwner = 100

type putSnapshotCmd struct {
	Snapshot Snapshot `json:"snapshot"`
	// Max bounds the owner's snapshots (0: no bound, an admin's).
	Max int `json:"max,omitempty"`
}

type deleteSnapshotCmd struct {
	ID string `json:"id"`
}

func (f *fsm) putSnapshot(c putSnapshotCmd) any {
	s := c.Snapshot
	if s.ID == "" || s.Name == "" || s.Node == "" || s.CreatedAt.IsZero() {
		return fmt.Errorf("%w: a snapshot needs an ID, a name, a node and a time", ErrInvalid)
	}
	if _, ok := f.snapshots[s.ID]; ok {
		return fmt.Errorf("snapshot ID %w", ErrExists)
	}
	if s.MemorySpec != nil {
		if err := s.MemorySpec.CheckSizes(); err != nil {
			return err
		}
	}
	if len(s.Members) > MaxSidecars {
		return fmt.Errorf("%w: a group snapshot of %d sidecars: at most %d", ErrInvalid, len(s.Members), MaxSidecars)
	}
	for _, m := range s.Members {
		// Its parts are recorded first, each of the same owner and node, and part of it.
		p, ok := f.snapshots[m.Snapshot]
		if !ok || p.PartOf != s.ID || p.Owner != s.Owner || p.Node != s.Node || ValidateSidecarName(m.Name) != nil {
			return fmt.Errorf("%w: group snapshot %s: sidecar %q's snapshot %s is not a part of it", ErrInvalid, s.Name, m.Name, m.Snapshot)
		}
		if _, err := ParseProbe(m.Ready); err != nil {
			return err
		}
		if _, err := ParseRestartPolicy(string(m.Restart)); err != nil {
			return err
		}
		if m.Spec != nil {
			if err := m.Spec.CheckSizes(); err != nil {
				return err
			}
		}
	}
	if s.PartOf != "" && len(s.Members) > 0 {
		return fmt.Errorf("%w: a part of a group snapshot has no parts", ErrInvalid)
	}
	n := 0
	for _, o := range f.snapshots {
		if o.Owner != s.Owner {
			continue
		}
		n++
		if o.Name == s.Name {
			return fmt.Errorf("snapshot name %q: %w", s.Name, ErrNameTaken)
		}
	}
	if c.Max > 0 && n >= c.Max {
		return fmt.Errorf("%w: the token holds %d snapshots, at most %d", ErrQuota, n, c.Max)
	}
	s.CreatedAt = utc(s.CreatedAt)
	f.snapshots[s.ID] = &s
	return s
}

func (f *fsm) deleteSnapshot(id string) any {
	if _, ok := f.snapshots[id]; !ok {
		return ErrNotFound
	}
	delete(f.snapshots, id)
	return nil
}

// getSnapshot finds owner's snapshot (any, for "") by ID, name or unique ID prefix.
func (f *fsm) getSnapshot(ref, owner string, any bool) (Snapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return findByRef("snapshot", f.snapshots, ref, owner, any, func(s *Snapshot) (string, string, string) { return s.ID, s.Name, s.Owner })
}

func (f *fsm) listSnapshots() []Snapshot {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Snapshot, 0, len(f.snapshots))
	for _, id := range slices.Sorted(maps.Keys(f.snapshots)) {
		out = append(out, *f.snapshots[id])
	}
	return out
}

// PutSnapshot records a snapshot a node has taken; max bounds the owner's (0: none).
func (s *Store) PutSnapshot(ctx context.Context, snap Snapshot, max int) (Snapshot, error) {
	resp, err := s.apply(ctx, cmdPutSnapshot, putSnapshotCmd{Snapshot: snap, Max: max})
	if err != nil {
		return Snapshot{}, fmt.Errorf("record snapshot %s: %w", snap.Name, err)
	}
	out, ok := resp.(Snapshot)
	if !ok {
		return Snapshot{}, fmt.Errorf("record snapshot %s: state machine answered %T", snap.Name, resp)
	}
	return out, nil
}

// DeleteSnapshot forgets a snapshot (its node removes its files).
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	if _, err := s.apply(ctx, cmdDeleteSnapshot, deleteSnapshotCmd{ID: id}); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", id, err)
	}
	return nil
}

// GetSnapshot finds a snapshot of owner (of anyone's with all) by ID, name or prefix.
func (s *Store) GetSnapshot(ctx context.Context, ref, owner string, all bool) (Snapshot, error) {
	if err := s.read(ctx); err != nil {
		return Snapshot{}, err
	}
	return s.fsm.getSnapshot(ref, owner, all)
}

// ListSnapshots lists every snapshot.
func (s *Store) ListSnapshots(ctx context.Context) ([]Snapshot, error) {
	if err := s.read(ctx); err != nil {
		return nil, err
	}
	return s.fsm.listSnapshots(), nil
}

// LocalSnapshotsOn lists the IDs of the snapshots recorded on node, sorted, from this
// server's copy of the state (the leader's assignments streams read it).
func (s *Store) LocalSnapshotsOn(node string) []string {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	var out []string
	for id, sn := range s.fsm.snapshots {
		if sn.Node == node {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Parts is the snapshots of s's sidecars (s a group's snapshot), as recorded.
func (s Snapshot) Parts() []string {
	out := make([]string, 0, len(s.Members))
	for _, m := range s.Members {
		out = append(out, m.Snapshot)
	}
	return out
}
