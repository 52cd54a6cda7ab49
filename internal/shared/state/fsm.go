package state

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/hashicorp/raft"
)

// minPrefix is the shortest ID prefix GetSandbox resolves; shorter ones would match too
// much by accident.
const minPrefix = 4

// fsm is the deterministic state machine. Apply depends only on the current state and
// the log entry: IDs and times come in the command, nothing reads the clock or a random
// source, and map iteration never decides an outcome.
//
// Stored values are copy-on-write: a *Sandbox or meta []byte in the maps is never
// mutated after insertion, only replaced. That lets Snapshot copy just the maps and
// Persist encode them while Apply carries on.
type fsm struct {
	log *slog.Logger

	mu        sync.RWMutex
	sandboxes map[string]*Sandbox // by ID
	names     map[string]string   // name → ID, for sandboxes with a name
	meta      map[string][]byte
	nodes     map[string]*Node       // by ID
	tokens    map[string]*Token      // by ID
	pools     map[string]*Pool       // by image
	certs     map[string]*IssuedCert // agent certificates joins issued and edge certificates, by serial
	removed   map[string]time.Time   // nodes removed, when (for unrecorded certificates)
	// tokenTombs are the tokens revoked, when: a restore of an older state file revokes
	// them again (see RestoreState).
	tokenTombs map[string]time.Time
	snapshots  map[string]*Snapshot // by ID
	volumes    map[string]*Volume   // by ID
	templates  map[string]*Template // by ID
	// audit is the audit log, oldest first (see audit.go). Entries are values, appended
	// only; trimming makes a new array, so a snapshot's slice of it never changes.
	audit []AuditEntry
	// involved indexes, per node, the sandboxes it has a part in; assignVer versions
	// each node's set (see assign.go).
	involved  map[string]map[string]bool
	nodeUse   map[string]scheduler.Resources
	ownerUse  map[string]Quota // what each owner's sandboxes hold, as quotas count it
	queued    int              // how many sandboxes wait in the leader's queue (Queued)
	assignVer map[string]uint64
	assignSeq uint64
	// index is the last log index applied (0 after a restore until the next command):
	// the point a state file is taken at.
	index uint64

	// changed is closed (and replaced) after every applied command and restore, so
	// watchers (assignment streams, the leader's loops) wake on any change.
	changed chan struct{}
}

var _ raft.FSM = (*fsm)(nil)

func newFSM(log *slog.Logger) *fsm {
	return &fsm{
		log:        log,
		sandboxes:  map[string]*Sandbox{},
		names:      map[string]string{},
		meta:       map[string][]byte{},
		nodes:      map[string]*Node{},
		tokens:     map[string]*Token{},
		pools:      map[string]*Pool{},
		certs:      map[string]*IssuedCert{},
		removed:    map[string]time.Time{},
		tokenTombs: map[string]time.Time{},
		snapshots:  map[string]*Snapshot{},
		volumes:    map[string]*Volume{},
		templates:  map[string]*Template{},
		involved:   map[string]map[string]bool{},
		nodeUse:    map[string]scheduler.Resources{},
		ownerUse:   map[string]Quota{},
		assignVer:  map[string]uint64{},
		changed:    make(chan struct{}),
	}
}

// notifyLocked wakes watchers; called with f.mu held for writing.
func (f *fsm) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// watch returns a channel closed at the next change.
func (f *fsm) watch() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed
}

// Apply executes one committed command. The result is what Store sees as the future's
// Response: an error, a Sandbox (for updates), or nil. It never panics on bad input: a log
// entry is replayed on every start, so a panic would brick the store.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	if len(l.Data) == 0 {
		return fmt.Errorf("%w: empty command at index %d", ErrInvalid, l.Index)
	}
	t, body := cmdType(l.Data[0]), l.Data[1:]

	f.mu.Lock()
	defer f.mu.Unlock()
	defer f.notifyLocked()
	res := f.applyLocked(l.Index, t, body)
	f.recordAudit(l.Index, t, body, res)
	f.index = l.Index
	return res
}

// applyLocked executes one command; f.mu is held for writing.
func (f *fsm) applyLocked(index uint64, t cmdType, body []byte) any {
	switch t {
	case cmdRestored:
		return nil // the audit entry is all it makes
	case cmdCreateSandbox:
		var c createSandboxCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		if err := f.createSandbox(c.Sandbox, c.Quota, false); err != nil {
			return err
		}
		if c.Place != "" {
			// The verdict does not matter: a plan that does not fit leaves it pending.
			f.placeSandboxes(placeSandboxesCmd{Plans: []Plan{{SandboxID: c.Sandbox.ID, NodeID: c.Place}}, Config: c.Scheduler, Time: c.Sandbox.CreatedAt})
		}
		return nil
	case cmdCreateGroup:
		var c createGroupCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.createGroup(c)
	case cmdUpdateSandbox:
		var c updateSandboxCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.updateSandbox(c.ID, c.Update)
	case cmdPutSnapshot:
		var c putSnapshotCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.putSnapshot(c)
	case cmdDeleteSnapshot:
		var c deleteSnapshotCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.deleteSnapshot(c.ID)
	case cmdPutVolume:
		var c putVolumeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.putVolume(c)
	case cmdDeleteVolume:
		var c deleteVolumeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.deleteVolume(c.ID)
	case cmdShareVolume:
		var c shareVolumeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.shareVolume(c)
	case cmdPutTemplate:
		var c putTemplateCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.putTemplate(c)
	case cmdDeleteTemplate:
		var c deleteTemplateCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.deleteTemplate(c.ID)
	case cmdMoveVolume:
		var c moveVolumeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.moveVolume(c)
	case cmdVolumeMoved:
		var c volumeMovedCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.volumeMoved(c)
	case cmdResume:
		var c resumeSandboxCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.resumeSandbox(c)
	case cmdDeleteSandbox:
		var c deleteSandboxCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.deleteSandbox(c.ID)
	case cmdSetMeta:
		var c setMetaCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.setMeta(c)
	case cmdUpsertNode:
		var c upsertNodeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.upsertNode(c.Node)
	case cmdUpdateNode:
		var c updateNodeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.updateNode(c.ID, c.Update)
	case cmdDeleteNode:
		var c deleteNodeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.deleteNode(c.ID)
	case cmdCreateToken:
		var c createTokenCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.createToken(c.Token)
	case cmdDeleteToken:
		var c deleteTokenCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.deleteToken(c)
	case cmdPlace:
		var c placeSandboxesCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.placeSandboxes(c)
	case cmdSetPool:
		var c setPoolCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.setPool(c.Pool)
	case cmdJoin:
		var c JoinRecord
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.recordJoin(c)
	case cmdRemoveNode:
		var c removeNodeCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.removeNode(c)
	case cmdIssueEdgeCert:
		var c issueEdgeCertCmd
		if err := decodeBody(t, body, &c); err != nil {
			return err
		}
		return f.issueEdgeCert(c)
	}
	if t&cmdIgnorable != 0 {
		f.log.Warn("skipping unknown ignorable state command; a newer server wrote it", "type", byte(t), "index", index)
		return nil
	}
	return fmt.Errorf("%w %d at index %d (written by a newer server?)", ErrUnknownCommand, byte(t), index)
}

func (f *fsm) createSandbox(sb Sandbox, q Quota, inGroup bool) any {
	sb = *sb.clone() // the decoded value is ours already, but keep ownership obvious
	if err := sb.validateNew(); err != nil {
		return err
	}
	if !inGroup && (sb.Spec.Group != nil || sb.Spec.Ready != "") {
		// A group's members are created together (createGroup), which checks them.
		return fmt.Errorf("%w: a group member is created with its group", ErrInvalid)
	}
	if q != (Quota{}) {
		if err := q.check(sb.Owner, f.ownerUse[sb.Owner], sb); err != nil {
			return err
		}
	}
	sb.normalize()
	if _, ok := f.sandboxes[sb.ID]; ok {
		return fmt.Errorf("ID %w", ErrExists)
	}
	if err := f.checkVolumes(sb.Spec); err != nil {
		return err
	}
	if sb.Name != "" {
		if id, ok := f.names[sb.Name]; ok {
			if f.sandboxes[id].Owner != sb.Owner {
				// Names are one namespace; which sandbox holds another owner's name is
				// that owner's business (its ID is its ingress route's key).
				return fmt.Errorf("name %q: %w", sb.Name, ErrNameTaken)
			}
			return fmt.Errorf("name %q (used by %s): %w", sb.Name, id, ErrNameTaken)
		}
		// A name equal to another sandbox's ID would be shadowed by the ID in lookups.
		if _, ok := f.sandboxes[sb.Name]; ok {
			return fmt.Errorf("name %q is another sandbox's ID: %w", sb.Name, ErrNameTaken)
		}
		f.names[sb.Name] = sb.ID
	}
	f.putSandbox(&sb)
	return nil
}

func (f *fsm) updateSandbox(id string, u Update) any {
	cur, ok := f.sandboxes[id]
	if !ok {
		return ErrNotFound
	}
	next := cur.clone()
	if err := next.apply(u); err != nil {
		return err
	}
	if u.Restart && len(next.Spec.Volumes) > 0 {
		if err := f.refreshVolumeNode(&next.Spec); err != nil {
			return err
		}
	}
	f.putSandbox(next)
	if next.IsGroupMain() && next.Status.Terminal() && !cur.Status.Terminal() {
		f.groupEnded(next, utc(u.Time))
	}
	return *next.clone()
}

func (f *fsm) deleteSandbox(id string) any {
	sb, ok := f.sandboxes[id]
	if !ok {
		return ErrNotFound
	}
	f.dropSandbox(id)
	if sb.Name != "" {
		delete(f.names, sb.Name)
	}
	return nil
}

func (f *fsm) setMeta(c setMetaCmd) any {
	if c.Key == "" {
		return fmt.Errorf("%w: empty meta key", ErrInvalid)
	}
	if c.Delete {
		delete(f.meta, c.Key)
		return nil
	}
	f.meta[c.Key] = slices.Clone(c.Value)
	return nil
}

// get resolves a full ID, then an exact name, then a unique ID prefix of at least
// minPrefix characters.
func (f *fsm) get(idOrName string) (Sandbox, error) { return f.getOwned(idOrName, "") }

// getOwned is get among owner's sandboxes only ("" = everyone's): another owner's
// sandbox is not found by its ID, its name or a prefix of its ID (and does not make a
// prefix ambiguous), so lookups tell a user nothing about other users' sandboxes.
func (f *fsm) getOwned(idOrName, owner string) (Sandbox, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	mine := func(sb *Sandbox) bool { return owner == "" || sb.Owner == owner }
	if sb, ok := f.sandboxes[idOrName]; ok && mine(sb) {
		return *sb.clone(), nil
	}
	if id, ok := f.names[idOrName]; ok && mine(f.sandboxes[id]) {
		return *f.sandboxes[id].clone(), nil
	}
	if len(idOrName) < minPrefix {
		return Sandbox{}, fmt.Errorf("sandbox %q (ID prefixes need at least %d characters): %w", idOrName, minPrefix, ErrNotFound)
	}
	var match *Sandbox
	n := 0
	for id, sb := range f.sandboxes {
		if strings.HasPrefix(id, idOrName) && mine(sb) {
			match = sb
			n++
		}
	}
	switch n {
	case 0:
		return Sandbox{}, fmt.Errorf("sandbox %q: %w", idOrName, ErrNotFound)
	case 1:
		return *match.clone(), nil
	}
	return Sandbox{}, fmt.Errorf("sandbox ID prefix %q matches %d sandboxes: %w", idOrName, n, ErrAmbiguous)
}

// list returns copies sorted by creation time, then ID, so the order is stable.
func (f *fsm) list() []Sandbox { return f.listWhere(nil) }

// listWhere is list of the sandboxes keep selects (nil: all).
func (f *fsm) listWhere(keep func(*Sandbox) bool) []Sandbox {
	f.mu.RLock()
	var ptrs []*Sandbox
	if keep == nil {
		ptrs = slices.Collect(maps.Values(f.sandboxes))
	} else {
		for _, sb := range f.sandboxes {
			if keep(sb) {
				ptrs = append(ptrs, sb)
			}
		}
	}
	f.mu.RUnlock()
	// Sorted as pointers, then copied: stored values never change (copy-on-write), and
	// sorting the copies moved kilobytes per swap.
	slices.SortFunc(ptrs, func(a, b *Sandbox) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	out := make([]Sandbox, len(ptrs))
	for i, sb := range ptrs {
		out[i] = *sb.clone()
	}
	return out
}

func (f *fsm) getMeta(key string) ([]byte, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	v, ok := f.meta[key]
	if !ok {
		return nil, fmt.Errorf("meta key %q: %w", key, ErrNotFound)
	}
	return slices.Clone(v), nil
}

// snapshotVersion is the format of Persist's output; Restore refuses others.
const snapshotVersion = 1

type snapshotData struct {
	Version   int               `json:"version"`
	Sandboxes []*Sandbox        `json:"sandboxes"` // sorted by ID: same state, same bytes
	Meta      map[string][]byte `json:"meta,omitempty"`
	// Nodes and Tokens were added without a version bump: an older snapshot simply has
	// none, which is what an older cluster had.
	Nodes  []*Node  `json:"nodes,omitempty"`  // sorted by ID
	Tokens []*Token `json:"tokens,omitempty"` // sorted by ID
	// Pools likewise: an older snapshot has none.
	Pools []*Pool `json:"pools,omitempty"` // sorted by image
	// Certs and Removed likewise.
	Certs   []*IssuedCert        `json:"certs,omitempty"` // sorted by serial
	Removed map[string]time.Time `json:"removed,omitempty"`
	// Snapshots likewise.
	Snapshots []*Snapshot `json:"snapshots,omitempty"` // sorted by ID
	// Volumes likewise.
	Volumes []*Volume `json:"volumes,omitempty"` // sorted by ID
	// Templates likewise.
	Templates []*Template `json:"templates,omitempty"` // sorted by ID
	// Audit is the audit log, oldest first.
	Audit []AuditEntry `json:"audit,omitempty"`
	// TokenTombs are the revoked tokens' IDs, when.
	TokenTombs map[string]time.Time `json:"token_tombs,omitempty"`
}

// Snapshot captures the state cheaply (values are copy-on-write, so copying the maps is
// enough); the encoding happens in Persist, off raft's main loop.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &fsmSnapshot{
		sandboxes: slices.Collect(maps.Values(f.sandboxes)),
		meta:      maps.Clone(f.meta),
		nodes:     slices.Collect(maps.Values(f.nodes)),
		tokens:    slices.Collect(maps.Values(f.tokens)),
		pools:     slices.Collect(maps.Values(f.pools)),
		certs:     slices.Collect(maps.Values(f.certs)),
		removed:   maps.Clone(f.removed),
		snapshots: slices.Collect(maps.Values(f.snapshots)),
		volumes:   slices.Collect(maps.Values(f.volumes)),
		templates: slices.Collect(maps.Values(f.templates)),
		audit:     f.audit[:len(f.audit):len(f.audit)],
		tombs:     maps.Clone(f.tokenTombs),
	}, nil
}

// Restore replaces the whole state with a snapshot's.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var d snapshotData
	if err := json.NewDecoder(rc).Decode(&d); err != nil {
		return fmt.Errorf("decode state snapshot: %w", err)
	}
	if d.Version != snapshotVersion {
		return fmt.Errorf("state snapshot has version %d, this server reads %d", d.Version, snapshotVersion)
	}
	sandboxes := make(map[string]*Sandbox, len(d.Sandboxes))
	names := map[string]string{}
	for _, sb := range d.Sandboxes {
		if sb == nil || sb.ID == "" {
			return fmt.Errorf("state snapshot holds a sandbox without ID")
		}
		sb.normalize()
		sandboxes[sb.ID] = sb
		if sb.Name != "" {
			names[sb.Name] = sb.ID
		}
	}
	if d.Meta == nil {
		d.Meta = map[string][]byte{}
	}
	nodes := make(map[string]*Node, len(d.Nodes))
	for _, n := range d.Nodes {
		if n == nil || n.ID == "" {
			return fmt.Errorf("state snapshot holds a node without ID")
		}
		n.RegisteredAt, n.UpdatedAt = utc(n.RegisteredAt), utc(n.UpdatedAt)
		nodes[n.ID] = n
	}
	tokens := make(map[string]*Token, len(d.Tokens))
	for _, t := range d.Tokens {
		if t == nil || t.ID == "" {
			return fmt.Errorf("state snapshot holds a token without ID")
		}
		t.CreatedAt, t.ExpiresAt = utc(t.CreatedAt), utc(t.ExpiresAt)
		tokens[t.ID] = t
	}
	pools := make(map[string]*Pool, len(d.Pools))
	for _, p := range d.Pools {
		if p == nil || p.Image == "" {
			return fmt.Errorf("state snapshot holds a pool without image")
		}
		np := p.normalize()
		pools[p.Image] = &np
	}
	certs := make(map[string]*IssuedCert, len(d.Certs))
	for _, c := range d.Certs {
		if c == nil || c.Serial == "" {
			return fmt.Errorf("state snapshot holds a certificate record without serial")
		}
		certs[c.Serial] = c
	}
	if d.Removed == nil {
		d.Removed = map[string]time.Time{}
	}
	snaps := make(map[string]*Snapshot, len(d.Snapshots))
	for _, s := range d.Snapshots {
		if s == nil || s.ID == "" {
			return fmt.Errorf("state snapshot holds a sandbox snapshot without ID")
		}
		s.CreatedAt = utc(s.CreatedAt)
		snaps[s.ID] = s
	}
	vols := make(map[string]*Volume, len(d.Volumes))
	for _, v := range d.Volumes {
		if v == nil || v.ID == "" {
			return fmt.Errorf("state snapshot holds a volume without ID")
		}
		v.CreatedAt = utc(v.CreatedAt)
		vols[v.ID] = v
	}
	tmpls := make(map[string]*Template, len(d.Templates))
	for _, t := range d.Templates {
		if t == nil || t.ID == "" {
			return fmt.Errorf("state snapshot holds a template without ID")
		}
		t.CreatedAt = utc(t.CreatedAt)
		tmpls[t.ID] = t
	}
	f.mu.Lock()
	f.sandboxes, f.names, f.meta, f.nodes, f.tokens, f.pools = sandboxes, names, d.Meta, nodes, tokens, pools
	f.certs, f.removed, f.snapshots, f.volumes, f.templates = certs, d.Removed, snaps, vols, tmpls
	if len(d.Audit) > MaxAudit+MaxAudit/4 {
		d.Audit = d.Audit[len(d.Audit)-MaxAudit:]
	}
	f.audit, f.index = d.Audit, 0
	if d.TokenTombs == nil {
		d.TokenTombs = map[string]time.Time{}
	}
	f.tokenTombs = d.TokenTombs
	f.reindex()
	f.notifyLocked()
	f.mu.Unlock()
	return nil
}

type fsmSnapshot struct {
	sandboxes []*Sandbox
	meta      map[string][]byte
	nodes     []*Node
	tokens    []*Token
	pools     []*Pool
	certs     []*IssuedCert
	removed   map[string]time.Time
	snapshots []*Snapshot
	volumes   []*Volume
	templates []*Template
	audit     []AuditEntry
	tombs     map[string]time.Time
}

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	err := s.write(sink)
	if err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("persist state snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("close state snapshot: %w", err)
	}
	return nil
}

func (s *fsmSnapshot) write(w io.Writer) error {
	slices.SortFunc(s.sandboxes, func(a, b *Sandbox) int { return cmp.Compare(a.ID, b.ID) })
	slices.SortFunc(s.nodes, func(a, b *Node) int { return cmp.Compare(a.ID, b.ID) })
	slices.SortFunc(s.tokens, func(a, b *Token) int { return cmp.Compare(a.ID, b.ID) })
	slices.SortFunc(s.pools, func(a, b *Pool) int { return cmp.Compare(a.Image, b.Image) })
	slices.SortFunc(s.certs, func(a, b *IssuedCert) int { return cmp.Compare(a.Serial, b.Serial) })
	slices.SortFunc(s.snapshots, func(a, b *Snapshot) int { return cmp.Compare(a.ID, b.ID) })
	slices.SortFunc(s.volumes, func(a, b *Volume) int { return cmp.Compare(a.ID, b.ID) })
	slices.SortFunc(s.templates, func(a, b *Template) int { return cmp.Compare(a.ID, b.ID) })
	return json.NewEncoder(w).Encode(snapshotData{Version: snapshotVersion, Sandboxes: s.sandboxes, Meta: s.meta, Nodes: s.nodes, Tokens: s.tokens, Pools: s.pools,
		Certs: s.certs, Removed: s.removed, Snapshots: s.snapshots, Volumes: s.volumes, Templates: s.templates, Audit: s.audit, TokenTombs: s.tombs})
}

func (s *fsmSnapshot) Release() {}
