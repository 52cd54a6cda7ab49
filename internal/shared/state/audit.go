package state

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"
)

// The audit log records every state change: who asked (the token, node or server
// process behind the call), what (the command, what it acted on, a short summary) and
// when, with the FSM's verdict. It lives in the replicated state itself, so every server
// holds the same log, it survives restarts, leader changes and snapshots, and an admin
// reads it from any server (`fireworks audit`).
//
// Refused changes are recorded with why when an admin or the servers made them; a
// user's or a node's refusals are not (they changed nothing, and cost nothing to repeat).
//
// Who and when come from the server that proposed the command: it stamps them into the
// log entry (see stampAudit), so the FSM stays deterministic. Reads are not state changes
// and are not recorded; neither are calls refused before they reached the state (an
// unknown token, a user acting on another's sandbox): those are in the servers' logs.

// MaxAudit is how many audit entries the state keeps at least: the oldest beyond it are
// dropped, a quarter at a time. Each entry is bounded (auditField), so the log costs a
// few MiB of every server's memory and snapshot. Longer retention: export with
// `fireworks audit --after INDEX --json` periodically.
const MaxAudit = 10000

// auditField bounds each free-text field of an entry.
const auditField = 256

// Actor is who caused a state change.
type Actor struct {
	// Kind is "token" (an API call), "node" (an agent's certificate), "join" (a node
	// joining: ID is the join token, or Name says how it was proven) or "system" (the
	// servers themselves: the leader's scheduler, autoscaler, timers).
	Kind string `json:"kind,omitempty"`
	ID   string `json:"id,omitempty"`   // a token's ID, a node's name
	Name string `json:"name,omitempty"` // a token's name
	Role Role   `json:"role,omitempty"` // a token's role
}

func (a Actor) String() string {
	switch {
	case a.Kind == "":
		return "unknown"
	case a.ID == "" && a.Name == "":
		return a.Kind
	case a.Name == "":
		return a.Kind + " " + a.ID
	case a.ID == "":
		return a.Kind + " (" + a.Name + ")"
	}
	return a.Kind + " " + a.ID + " (" + a.Name + ")"
}

type actorKey struct{}

// WithActor marks ctx with who acts: the state changes made with it are recorded as
// theirs. A change without one is recorded as the system's.
func WithActor(ctx context.Context, a Actor) context.Context {
	return context.WithValue(ctx, actorKey{}, a)
}

// ActorFrom returns the actor ctx carries, if any.
func ActorFrom(ctx context.Context) (Actor, bool) {
	a, ok := ctx.Value(actorKey{}).(Actor)
	return a, ok
}

// AuditEntry is one state change.
type AuditEntry struct {
	Index  uint64    `json:"index"` // the Raft log index: unique, increasing
	At     time.Time `json:"at"`
	By     Actor     `json:"by"`
	Server string    `json:"server,omitempty"` // the server that proposed it
	Op     string    `json:"op"`               // e.g. create-sandbox
	Target string    `json:"target,omitempty"` // what it acted on (IDs, names)
	Detail string    `json:"detail,omitempty"` // a short summary of the change
	Error  string    `json:"error,omitempty"`  // why the state refused it ("" applied)
}

// auditStamp is what the proposing server adds to a command (as its "_audit" member):
// fields of the entry that the FSM cannot know deterministically.
type auditStamp struct {
	By     Actor     `json:"by"`
	At     time.Time `json:"at"`
	Server string    `json:"server,omitempty"`
	Target string    `json:"target,omitempty"`
	Detail string    `json:"detail,omitempty"`
}

// audited is a command body that says what it acts on. Every command implements it;
// one that did not would be recorded with its type alone.
type audited interface {
	audit() (target, detail string)
}

// stampAudit returns the encoded command body b (a JSON object) with the stamp added as
// its "_audit" member. Servers that predate the audit log ignore the member (command
// bodies are decoded leniently), so a rolling upgrade keeps working.
func stampAudit(b []byte, st auditStamp) ([]byte, error) {
	if len(b) < 2 || b[0] != '{' {
		return nil, fmt.Errorf("%w: command body is not a JSON object", ErrInvalid)
	}
	sb, err := json.Marshal(st)
	if err != nil {
		return nil, fmt.Errorf("encode audit stamp: %w", err)
	}
	out := make([]byte, 0, len(b)+len(sb)+12)
	out = append(out, `{"_audit":`...)
	out = append(out, sb...)
	if rest := b[1:]; len(strings.TrimSpace(string(rest))) > 1 { // not "}": more members follow
		out = append(out, ',')
		out = append(out, rest...)
	} else {
		out = append(out, '}')
	}
	return out, nil
}

// newStamp builds the stamp for body proposed by server with ctx's actor.
func newStamp(ctx context.Context, server string, body any, now time.Time) auditStamp {
	st := auditStamp{At: now.UTC(), Server: server}
	if a, ok := ActorFrom(ctx); ok {
		st.By = a
	} else {
		st.By = Actor{Kind: "system"}
	}
	if a, ok := body.(audited); ok {
		st.Target, st.Detail = a.audit()
	}
	st.By.ID, st.By.Name = clip(st.By.ID), clip(st.By.Name)
	st.Target, st.Detail = clip(st.Target), clip(st.Detail)
	return st
}

// clip bounds s to auditField bytes (at a rune boundary).
func clip(s string) string {
	if len(s) <= auditField {
		return s
	}
	cut := auditField - 3
	for cut > 0 && s[cut]&0xC0 == 0x80 {
		cut--
	}
	return s[:cut] + "..."
}

// stampOf reads the stamp of a command body, or nil. stampAudit puts it first, so only
// the stamp is decoded, not the whole body: this runs on every apply, under the state's
// write lock. A body stamped otherwise (or not at all) is decoded whole.
func stampOf(body []byte) *auditStamp {
	var st auditStamp
	if rest, ok := bytes.CutPrefix(body, []byte(`{"_audit":`)); ok {
		if json.NewDecoder(bytes.NewReader(rest)).Decode(&st) == nil {
			return &st
		}
		return nil
	}
	var c struct {
		Audit *auditStamp `json:"_audit"`
	}
	_ = json.Unmarshal(body, &c) // a body that did not decode was refused: res says so
	return c.Audit
}

// recordAudit appends the entry of one applied command; f.mu is held for writing.
func (f *fsm) recordAudit(index uint64, t cmdType, body []byte, res any) {
	e := AuditEntry{Index: index, Op: t.String()}
	if st := stampOf(body); st != nil {
		e.At, e.By, e.Server = st.At.UTC(), st.By, clip(st.Server)
		e.Target, e.Detail = clip(st.Target), clip(st.Detail)
		e.By.ID, e.By.Name, e.By.Kind = clip(e.By.ID), clip(e.By.Name), clip(e.By.Kind)
		e.By.Role = Role(clip(string(e.By.Role)))
	}
	if err, ok := res.(error); ok {
		// A refusal changed nothing. Those of users and nodes are not kept: looping
		// refused writes (over quota, stale reports) would otherwise flush the log of
		// everyone's changes for free. An admin's and the servers' are kept.
		if e.By.Kind == "node" || e.By.Kind == "token" && e.By.Role != RoleAdmin {
			return
		}
		e.Error = clip(err.Error())
	}
	f.audit = append(f.audit, e)
	if len(f.audit) > MaxAudit+MaxAudit/4 {
		// Trimmed into a new array: a snapshot taken earlier still holds the old one.
		f.audit = append([]AuditEntry(nil), f.audit[len(f.audit)-MaxAudit:]...)
	}
}

// AuditQuery selects audit entries. Zero fields select everything.
type AuditQuery struct {
	After  uint64 // entries with a larger index
	Actor  string // by this token, node or kind (ID, name or kind, exact)
	Target string // acting on this (a substring of the target: an ID, a name)
	Op     string // this command (exact, e.g. delete-sandbox)
	// Limit: at most this many (0: all kept): the newest of those selected, or with After
	// the oldest, so that a reader paging on from the last index it saw misses nothing.
	Limit int
}

func (q AuditQuery) match(e AuditEntry) bool {
	switch {
	case e.Index <= q.After:
		return false
	case q.Actor != "" && q.Actor != e.By.ID && q.Actor != e.By.Name && q.Actor != e.By.Kind:
		return false
	case q.Target != "" && !strings.Contains(e.Target, q.Target):
		return false
	case q.Op != "" && q.Op != e.Op:
		return false
	}
	return true
}

func (f *fsm) queryAudit(q AuditQuery) []AuditEntry {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []AuditEntry
	if q.After > 0 {
		// A page after an index: the oldest first, from the first entry past it.
		// (Entries are in index order: a restore continues the index past the file's.)
		for i := sort.Search(len(f.audit), func(i int) bool { return f.audit[i].Index > q.After }); i < len(f.audit); i++ {
			if q.match(f.audit[i]) {
				out = append(out, f.audit[i])
				if q.Limit > 0 && len(out) == q.Limit {
					break
				}
			}
		}
		return out
	}
	for i := len(f.audit) - 1; i >= 0; i-- { // newest first, so Limit keeps the newest
		e := f.audit[i]
		if e.Index <= q.After {
			break
		}
		if q.match(e) {
			out = append(out, e)
			if q.Limit > 0 && len(out) == q.Limit {
				break
			}
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// Audit returns the audit entries q selects, oldest first (a linearizable read).
func (s *Store) Audit(ctx context.Context, q AuditQuery) ([]AuditEntry, error) {
	if err := s.read(ctx); err != nil {
		return nil, err
	}
	return s.fsm.queryAudit(q), nil
}

// What each command acts on, for its audit entry. Secrets (token hashes) never appear.

func (c createSandboxCmd) audit() (string, string) {
	d := "image=" + c.Sandbox.Spec.Image
	if c.Sandbox.Name != "" {
		d = "name=" + c.Sandbox.Name + " " + d
	}
	if c.Place != "" {
		d += " node=" + c.Place
	}
	return c.Sandbox.ID, d
}

func (c createGroupCmd) audit() (string, string) {
	ids := make([]string, len(c.Members))
	for i, m := range c.Members {
		ids[i] = m.ID
	}
	d := fmt.Sprintf("%d members", len(c.Members))
	if len(c.Members) > 0 {
		d += " image=" + c.Members[0].Spec.Image
	}
	return strings.Join(ids, ","), d
}

func (c updateSandboxCmd) audit() (string, string) {
	u := c.Update
	var d []string
	if u.Status != nil {
		d = append(d, "status="+string(*u.Status))
	}
	if u.Reason != "" {
		d = append(d, "reason="+u.Reason)
	}
	if u.ExitCode != nil {
		d = append(d, fmt.Sprintf("exit=%d", *u.ExitCode))
	}
	if u.Node != nil {
		d = append(d, "node="+*u.Node)
	}
	if u.Restart {
		d = append(d, "restart")
	}
	if u.StopGrace != nil {
		d = append(d, "stop grace="+u.StopGrace.String())
	}
	if u.RequestPause {
		d = append(d, "pause requested")
	}
	if u.CancelPause != "" {
		d = append(d, "pause cancelled")
	}
	if u.Policy != nil {
		d = append(d, "policy set")
	}
	return c.ID, strings.Join(d, " ")
}

func (c resumeSandboxCmd) audit() (string, string) {
	if c.Node != "" {
		return c.ID, "node=" + c.Node
	}
	return c.ID, ""
}

func (c deleteSandboxCmd) audit() (string, string) { return c.ID, "" }

func (c setMetaCmd) audit() (string, string) {
	if c.Delete {
		return c.Key, "deleted"
	}
	return c.Key, ""
}

func (c upsertNodeCmd) audit() (string, string) {
	return c.Node.ID, fmt.Sprintf("registered address=%s vcpus=%d memory_mib=%d", c.Node.Address, c.Node.Capacity.VCPUs, c.Node.Capacity.MemoryMiB)
}

func (c updateNodeCmd) audit() (string, string) {
	u := c.Update
	var d []string
	if u.Status != nil {
		d = append(d, "status="+string(*u.Status))
	}
	if u.StatusReason != nil && *u.StatusReason != "" {
		d = append(d, "reason="+*u.StatusReason)
	}
	for _, b := range []struct {
		name string
		v    *bool
	}{{"cordoned", u.Cordoned}, {"draining", u.Draining}, {"parked", u.Parked}} {
		if b.v != nil {
			d = append(d, fmt.Sprintf("%s=%t", b.name, *b.v))
		}
	}
	if u.Images != nil {
		d = append(d, fmt.Sprintf("images=%d", len(*u.Images)))
	}
	if u.Warm != nil {
		d = append(d, fmt.Sprintf("warm=%d", len(*u.Warm)))
	}
	return c.ID, strings.Join(d, " ")
}

func (c deleteNodeCmd) audit() (string, string) { return c.ID, "" }

func (c createTokenCmd) audit() (string, string) {
	d := "role=" + string(c.Token.Role)
	if c.Token.Name != "" {
		d += " name=" + c.Token.Name
	}
	if !c.Token.ExpiresAt.IsZero() {
		d += " expires=" + c.Token.ExpiresAt.UTC().Format(time.RFC3339)
	}
	return c.Token.ID, d
}

func (c deleteTokenCmd) audit() (string, string) { return c.ID, "" }

func (c placeSandboxesCmd) audit() (string, string) {
	var b strings.Builder
	for i, p := range c.Plans {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p.SandboxID + "->" + p.NodeID)
		if b.Len() > auditField {
			break
		}
	}
	return b.String(), fmt.Sprintf("%d plans", len(c.Plans))
}

func (c setPoolCmd) audit() (string, string) {
	if c.Pool.Size == 0 && c.Pool.Max == 0 {
		return c.Pool.Image, "deleted"
	}
	return c.Pool.Image, fmt.Sprintf("size=%d max=%d", c.Pool.Size, c.Pool.Max)
}

func (c JoinRecord) audit() (string, string) {
	d := "serial=" + c.Serial
	if c.Via != "" {
		d += " via=" + c.Via
	}
	return c.Node, d
}

func (c removeNodeCmd) audit() (string, string) { return c.ID, "certificates revoked" }

func (c issueEdgeCertCmd) audit() (string, string) {
	return c.Cert.Name, "serial=" + c.Cert.Serial + " token=" + c.Cert.Token
}

func (c putSnapshotCmd) audit() (string, string) {
	return c.Snapshot.ID, "name=" + c.Snapshot.Name
}

func (c deleteSnapshotCmd) audit() (string, string) { return c.ID, "" }

func (c putVolumeCmd) audit() (string, string) { return c.Volume.ID, "name=" + c.Volume.Name }

func (c deleteVolumeCmd) audit() (string, string) { return c.ID, "" }

func (c shareVolumeCmd) audit() (string, string) {
	if c.Remove {
		return c.ID, "unshared"
	}
	return c.ID, "shared"
}

func (c moveVolumeCmd) audit() (string, string) { return c.ID, "to=" + c.To + " why=" + c.Why }

func (c volumeMovedCmd) audit() (string, string) {
	if c.Err != "" {
		return c.ID, "not moved: " + c.Err
	}
	return c.ID, "to=" + c.To
}

func (c putTemplateCmd) audit() (string, string) {
	return c.Template.ID, "name=" + c.Template.Name
}

func (c deleteTemplateCmd) audit() (string, string) { return c.ID, "" }
