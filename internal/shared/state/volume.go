package state

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// Volume is a user's persistent filesystem: it outlives every sandbox that mounts it.
// Its data is on Node (an ext4 image of SizeMiB there); sandboxes that mount it run there.
type Volume struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Owner     string    `json:"owner,omitempty"` // as Sandbox.Owner
	Node      string    `json:"node"`
	SizeMiB   int       `json:"size_mib"`
	CreatedAt time.Time `json:"created_at"`
	// Lost says why the volume can no longer be used (its node was removed).
	Lost string `json:"lost,omitempty"`
	// Shares are the other tokens an admin let mount it.
	Shares []VolumeShare `json:"shares,omitempty"`
	// Move, while set, is a move of its data to another node: no sandbox may mount it
	// meanwhile.
	Move *VolumeMove `json:"move,omitempty"`
	// MoveNote says what became of the last move (why it failed), or why a drain of its
	// node leaves it there; MoveNoteAt when.
	MoveNote   string    `json:"move_note,omitempty"`
	MoveNoteAt time.Time `json:"move_note_at,omitzero"`
}

// VolumeMove is a volume's data being moved to node To (why: Why).
type VolumeMove struct {
	To    string    `json:"to"`
	Why   string    `json:"why"`
	Since time.Time `json:"since"`
}

// VolumeShare lets a token other than the owner mount a volume (only read-only, if so).
type VolumeShare struct {
	Token    string `json:"token"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// MaxVolumeShares bounds one volume's shares.
const MaxVolumeShares = 100

// ShareOf is token's share of v, if v is shared with it.
func (v Volume) ShareOf(token string) (VolumeShare, bool) {
	for _, s := range v.Shares {
		if s.Token == token {
			return s, true
		}
	}
	return VolumeShare{}, false
}

// VolumeMount is a volume mounted in a sandbox's guest at Path.
type VolumeMount struct {
	Volume   string `json:"volume"` // the volume's ID
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// MaxVolumesPerOwner bounds a token's volumes.
const MaxVolumesPerOwner = 100

// ParseVolumeMount reads NAME:/path[:ro|rw] (the volume's name or ID, as run -v takes it).
func ParseVolumeMount(s string) (ref string, m VolumeMount, err error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" {
		return "", m, fmt.Errorf("%w: volume %q: want NAME:/path or NAME:/path:ro", ErrInvalid, s)
	}
	m.Path = parts[1]
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
			m.ReadOnly = true
		case "rw":
		default:
			return "", m, fmt.Errorf("%w: volume %q: mode %q, want ro or rw", ErrInvalid, s, parts[2])
		}
	}
	if err := proto.ValidateVolumePath(m.Path); err != nil {
		return "", m, fmt.Errorf("%w: volume %q: %v", ErrInvalid, s, err)
	}
	return parts[0], m, nil
}

// checkVolumes checks a new sandbox's mounts against the volumes there are: each exists,
// is not lost, is on the sandbox's volume node, and no path repeats.
func (f *fsm) checkVolumes(spec SandboxSpec) error {
	if len(spec.Volumes) > proto.MaxVolumeMounts {
		return fmt.Errorf("%w: %d volume mounts, at most %d", ErrInvalid, len(spec.Volumes), proto.MaxVolumeMounts)
	}
	paths, vols := map[string]bool{}, map[string]bool{}
	for _, m := range spec.Volumes {
		if vols[m.Volume] {
			return fmt.Errorf("%w: volume %s mounted twice", ErrInvalid, m.Volume)
		}
		vols[m.Volume] = true
		v, ok := f.volumes[m.Volume]
		switch {
		case !ok:
			return fmt.Errorf("volume %s: %w", m.Volume, ErrNotFound)
		case v.Lost != "":
			return fmt.Errorf("%w: volume %s is lost: %s", ErrInvalid, v.Name, v.Lost)
		case v.Move != nil:
			return fmt.Errorf("%w: volume %s is being moved to another node; mount it once it has moved (volume inspect)", ErrInUse, v.Name)
		case v.Node != spec.VolumeNode:
			return fmt.Errorf("%w: volume %s is on another node than the sandbox's other volumes", ErrInvalid, v.Name)
		case paths[m.Path]:
			return fmt.Errorf("%w: two volumes mounted at %s", ErrInvalid, m.Path)
		}
		if err := proto.ValidateVolumePath(m.Path); err != nil {
			return fmt.Errorf("%w: volume %s: %v", ErrInvalid, v.Name, err)
		}
		paths[m.Path] = true
	}
	return nil
}

// refreshVolumeNode points a sandbox that runs again (a restart) at where its volumes
// are now: a volume may have moved while it was over. One that is moving holds the
// restart back (the leader tries again); one that is gone is left to fail the start.
func (f *fsm) refreshVolumeNode(spec *SandboxSpec) error {
	v, ok := f.volumes[spec.Volumes[0].Volume]
	switch {
	case !ok:
		return nil
	case v.Move != nil:
		return fmt.Errorf("%w: volume %s is being moved to another node; the sandbox runs again once it has moved", ErrInUse, v.Name)
	}
	spec.VolumeNode = v.Node
	if n, ok := f.nodes[v.Node]; ok {
		spec.VolumeAddress = n.Address
	}
	return nil
}

type putVolumeCmd struct {
	Volume Volume `json:"volume"`
	// Max bounds the owner's volumes (0: no bound, an admin's).
	Max int `json:"max,omitempty"`
}

type moveVolumeCmd struct {
	ID   string    `json:"id"`
	To   string    `json:"to"`
	Why  string    `json:"why"`
	Time time.Time `json:"time"`
}

type volumeMovedCmd struct {
	ID string `json:"id"`
	To string `json:"to"`
	// Err, if set, says why the move failed: the volume stays where it was.
	Err  string    `json:"err,omitempty"`
	Time time.Time `json:"time"`
	// Note only records why a drain leaves the volume (no move was under way).
	Note bool `json:"note,omitempty"`
}

// moveVolume starts a move of volume c.ID to node c.To: refused while a sandbox that
// is not over mounts it (checked here, so that no start slips in), or a move is under
// way, or the node cannot take it.
func (f *fsm) moveVolume(c moveVolumeCmd) any {
	v, ok := f.volumes[c.ID]
	if !ok {
		return ErrNotFound
	}
	n, ok := f.nodes[c.To]
	switch {
	case c.Time.IsZero() || c.Why == "":
		return fmt.Errorf("%w: a volume move needs a reason and a time", ErrInvalid)
	case v.Lost != "":
		return fmt.Errorf("%w: volume %s is lost: %s", ErrInvalid, v.Name, v.Lost)
	case v.Move != nil:
		return fmt.Errorf("%w: volume %s is being moved to node %s already", ErrInUse, v.Name, v.Move.To)
	case !ok:
		return fmt.Errorf("node %s: %w", c.To, ErrNotFound)
	case c.To == v.Node:
		return fmt.Errorf("%w: volume %s is on node %s already", ErrInvalid, v.Name, c.To)
	case n.Status != NodeReady || n.Draining || n.Cordoned:
		return fmt.Errorf("%w: node %s is not ready to take volumes (%s)", ErrNoRoom, c.To, n.Status)
	}
	if users := f.volumeUsers(c.ID); len(users) > 0 {
		return fmt.Errorf("%w: volume %s is mounted by sandbox %s (running, or to run again under its restart policy): a volume moves only while no sandbox mounts it", ErrInUse, v.Name, strings.Join(users, ", "))
	}
	nv := *v
	nv.Move = &VolumeMove{To: c.To, Why: c.Why, Since: utc(c.Time)}
	f.volumes[c.ID] = &nv
	return nv
}

// volumeMoved ends volume c.ID's move to c.To: its data is there now, or, with c.Err,
// the move failed and the volume stays where it was. With c.Note it only records why a
// drain leaves the volume.
func (f *fsm) volumeMoved(c volumeMovedCmd) any {
	v, ok := f.volumes[c.ID]
	if !ok {
		return ErrNotFound
	}
	nv := *v
	switch {
	case c.Note:
		if v.Move != nil {
			return fmt.Errorf("%w: volume %s is being moved", ErrInUse, v.Name)
		}
	case v.Move == nil || v.Move.To != c.To:
		return fmt.Errorf("%w: volume %s is not being moved to node %s", ErrStaleReport, v.Name, c.To)
	case c.Err == "":
		nv.Node = c.To
		nv.Move = nil
	default:
		nv.Move = nil
	}
	nv.MoveNote, nv.MoveNoteAt = c.Err, utc(c.Time)
	f.volumes[c.ID] = &nv
	return nv
}

// VolumeTarget is the node a volume moving off node but goes to: the ready, uncordoned,
// undrained node other than but holding the fewest volumes ("" if none).
func VolumeTarget(nodes []Node, vols []Volume, but string) string {
	count := map[string]int{}
	for _, v := range vols {
		count[v.Node]++
		if v.Move != nil {
			count[v.Move.To]++
		}
	}
	best := ""
	for _, n := range nodes {
		if n.ID == but || n.Status != NodeReady || n.Cordoned || n.Draining {
			continue
		}
		if best == "" || count[n.ID] < count[best] || count[n.ID] == count[best] && n.ID < best {
			best = n.ID
		}
	}
	return best
}

// MoveVolume starts moving volume id's data to node to (see moveVolume).
func (s *Store) MoveVolume(ctx context.Context, id, to, why string, now time.Time) (Volume, error) {
	return s.applyVolume(ctx, "move volume "+id, cmdMoveVolume, moveVolumeCmd{ID: id, To: to, Why: why, Time: now})
}

// VolumeMoved ends volume id's move to node to: done, or failed with why (see
// volumeMoved).
func (s *Store) VolumeMoved(ctx context.Context, id, to, why string, now time.Time) (Volume, error) {
	return s.applyVolume(ctx, "end the move of volume "+id, cmdVolumeMoved, volumeMovedCmd{ID: id, To: to, Err: why, Time: now})
}

// NoteVolume records why volume id stays where it is (a drain of its node leaves it).
func (s *Store) NoteVolume(ctx context.Context, id, note string, now time.Time) (Volume, error) {
	return s.applyVolume(ctx, "note on volume "+id, cmdVolumeMoved, volumeMovedCmd{ID: id, Err: note, Note: true, Time: now})
}

func (s *Store) applyVolume(ctx context.Context, what string, t cmdType, c any) (Volume, error) {
	resp, err := s.apply(ctx, t, c)
	if err != nil {
		return Volume{}, fmt.Errorf("%s: %w", what, err)
	}
	out, ok := resp.(Volume)
	if !ok {
		return Volume{}, fmt.Errorf("%s: state machine answered %T", what, resp)
	}
	return out, nil
}

type deleteVolumeCmd struct {
	ID string `json:"id"`
}

type shareVolumeCmd struct {
	ID     string      `json:"id"`
	Share  VolumeShare `json:"share"`
	Remove bool        `json:"remove,omitempty"`
}

func (f *fsm) shareVolume(c shareVolumeCmd) any {
	v, ok := f.volumes[c.ID]
	if !ok {
		return ErrNotFound
	}
	if c.Share.Token == "" || c.Share.Token == v.Owner {
		return fmt.Errorf("%w: a volume is shared with a token other than its owner", ErrInvalid)
	}
	nv := *v
	nv.Shares = slices.DeleteFunc(slices.Clone(v.Shares), func(s VolumeShare) bool { return s.Token == c.Share.Token })
	if !c.Remove {
		if len(nv.Shares) >= MaxVolumeShares {
			return fmt.Errorf("%w: volume %s is shared with %d tokens, at most %d", ErrQuota, v.Name, len(nv.Shares), MaxVolumeShares)
		}
		nv.Shares = append(nv.Shares, c.Share)
	}
	f.volumes[c.ID] = &nv
	return nv
}

func (f *fsm) putVolume(c putVolumeCmd) any {
	v := c.Volume
	if v.ID == "" || v.Name == "" || v.Node == "" || v.SizeMiB <= 0 || v.CreatedAt.IsZero() {
		return fmt.Errorf("%w: a volume needs an ID, a name, a node, a size and a time", ErrInvalid)
	}
	if _, ok := f.volumes[v.ID]; ok {
		return fmt.Errorf("volume ID %w", ErrExists)
	}
	n := 0
	for _, o := range f.volumes {
		if o.Owner != v.Owner {
			continue
		}
		n++
		if o.Name == v.Name {
			return fmt.Errorf("volume name %q: %w", v.Name, ErrNameTaken)
		}
	}
	if c.Max > 0 && n >= c.Max {
		return fmt.Errorf("%w: the token holds %d volumes, at most %d", ErrQuota, n, c.Max)
	}
	v.CreatedAt = utc(v.CreatedAt)
	f.volumes[v.ID] = &v
	return v
}

// deleteVolume forgets a volume no sandbox uses: one that is not over yet (running,
// paused, restarting) keeps it, checked here so that no start can slip in between.
func (f *fsm) deleteVolume(id string) any {
	v, ok := f.volumes[id]
	if !ok {
		return ErrNotFound
	}
	if users := f.volumeUsers(id); len(users) > 0 {
		return fmt.Errorf("%w: volume %s is used by sandbox %s, running or to run again under its restart policy (stop or remove it first)", ErrInUse, v.Name, strings.Join(users, ", "))
	}
	if v.Move != nil {
		return fmt.Errorf("%w: volume %s is being moved; remove it once it has moved", ErrInUse, v.Name)
	}
	for _, s := range f.snapshots {
		if s.MemorySpec != nil && slices.ContainsFunc(s.MemorySpec.Volumes, func(m VolumeMount) bool { return m.Volume == id }) {
			return fmt.Errorf("%w: volume %s is mounted by the processes of snapshot %s, which would not start without it (remove the snapshot first)", ErrInUse, v.Name, s.Name)
		}
	}
	delete(f.volumes, id)
	return nil
}

// volumeUsers are the sandboxes, not over (or over but to run again under their restart
// policy), that mount volume id.
func (f *fsm) volumeUsers(id string) []string {
	var users []string
	for _, sb := range f.sandboxes {
		if sb.Status.Terminal() && !sb.MayRestart() {
			continue
		}
		if slices.ContainsFunc(sb.Spec.Volumes, func(m VolumeMount) bool { return m.Volume == id }) {
			users = append(users, sb.ID)
		}
	}
	slices.Sort(users)
	return users
}

// getVolume finds owner's volume (anyone's, with any) by ID, name or ID prefix; failing
// that, one shared with owner.
func (f *fsm) getVolume(ref, owner string, any bool) (Volume, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	key := func(v *Volume) (string, string, string) { return v.ID, v.Name, v.Owner }
	v, err := findByRef("volume", f.volumes, ref, owner, any, key)
	if any || !errors.Is(err, ErrNotFound) {
		return v, err
	}
	shared := map[string]*Volume{}
	for id, v := range f.volumes {
		if _, ok := v.ShareOf(owner); ok {
			shared[id] = v
		}
	}
	return findByRef("volume", shared, ref, owner, true, key)
}

// PutVolume records a volume a node has made; max bounds the owner's (0: none).
func (s *Store) PutVolume(ctx context.Context, v Volume, max int) (Volume, error) {
	resp, err := s.apply(ctx, cmdPutVolume, putVolumeCmd{Volume: v, Max: max})
	if err != nil {
		return Volume{}, fmt.Errorf("record volume %s: %w", v.Name, err)
	}
	out, ok := resp.(Volume)
	if !ok {
		return Volume{}, fmt.Errorf("record volume %s: state machine answered %T", v.Name, resp)
	}
	return out, nil
}

// DeleteVolume forgets a volume; it fails (ErrInUse) while a sandbox that is not over
// mounts it.
func (s *Store) DeleteVolume(ctx context.Context, id string) error {
	if _, err := s.apply(ctx, cmdDeleteVolume, deleteVolumeCmd{ID: id}); err != nil {
		return fmt.Errorf("delete volume %s: %w", id, err)
	}
	return nil
}

// ShareVolume shares volume id with a token (Remove: takes the share back).
func (s *Store) ShareVolume(ctx context.Context, id string, share VolumeShare, remove bool) (Volume, error) {
	resp, err := s.apply(ctx, cmdShareVolume, shareVolumeCmd{ID: id, Share: share, Remove: remove})
	if err != nil {
		return Volume{}, fmt.Errorf("share volume %s: %w", id, err)
	}
	out, ok := resp.(Volume)
	if !ok {
		return Volume{}, fmt.Errorf("share volume %s: state machine answered %T", id, resp)
	}
	return out, nil
}

// GetVolume finds a volume of owner (of anyone's with all) by ID, name or prefix.
func (s *Store) GetVolume(ctx context.Context, ref, owner string, all bool) (Volume, error) {
	if err := s.read(ctx); err != nil {
		return Volume{}, err
	}
	return s.fsm.getVolume(ref, owner, all)
}

// LocalVolumes is ListVolumes on this server's copy, without confirming leadership (for
// the leader's passes, which confirm it once).
func (s *Store) LocalVolumes() ([]Volume, map[string][]string) {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	out := make([]Volume, 0, len(s.fsm.volumes))
	users := map[string][]string{}
	for _, id := range slices.Sorted(maps.Keys(s.fsm.volumes)) {
		out = append(out, *s.fsm.volumes[id])
		if u := s.fsm.volumeUsers(id); len(u) > 0 {
			users[id] = u
		}
	}
	return out, users
}

// ListVolumes lists every volume, with the sandboxes (not over) that mount each.
func (s *Store) ListVolumes(ctx context.Context) ([]Volume, map[string][]string, error) {
	if err := s.read(ctx); err != nil {
		return nil, nil, err
	}
	out, users := s.LocalVolumes()
	return out, users, nil
}

// findByRef finds owner's item (anyone's, with any) in items by ID, by name, or by a
// unique ID prefix of at least 4 characters. Names are per owner: another owner's name
// counts only for any, and only if one owner has it. key gives an item's ID, name and
// owner; what names the kind of item in errors.
func findByRef[T any](what string, items map[string]*T, ref, owner string, any bool, key func(*T) (id, name, owner string)) (T, error) {
	var zero T
	var match, named []*T
	for _, it := range items {
		id, name, o := key(it)
		if !any && o != owner {
			continue
		}
		switch {
		case id == ref, name == ref && o == owner:
			return *it, nil // an ID, or the caller's own name
		case name == ref:
			named = append(named, it) // another token's name (any: an admin's call)
		case len(ref) >= 4 && strings.HasPrefix(id, ref):
			match = append(match, it)
		}
	}
	switch len(named) {
	case 0:
	case 1:
		return *named[0], nil
	default:
		return zero, fmt.Errorf("%s %q: %w (several tokens have a %s of that name: give its ID)", what, ref, ErrAmbiguous, what)
	}
	switch len(match) {
	case 0:
		return zero, fmt.Errorf("%s %q: %w", what, ref, ErrNotFound)
	case 1:
		return *match[0], nil
	}
	return zero, fmt.Errorf("%s %q: %w", what, ref, ErrAmbiguous)
}
