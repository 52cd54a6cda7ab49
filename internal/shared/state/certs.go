package state

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"
)

// IssuedCert is a certificate the cluster CA issued, kept until it expires so that it can
// be refused once revoked: an agent certificate a join bought (Node set; revoked when its
// node is removed), or an edge's ingress certificate (Token set; revoked with the token).
type IssuedCert struct {
	Serial    string    `json:"serial"` // hex
	Node      string    `json:"node,omitempty"`
	Token     string    `json:"token,omitempty"` // the token an edge certificate was issued to
	Name      string    `json:"name,omitempty"`  // an edge certificate's name
	NotAfter  time.Time `json:"not_after"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// JoinRecord is one join: the certificate it bought, with a use of a join token (Token)
// or with another proof the server checked (Via, e.g. "kubernetes": a ServiceAccount
// token of a pod on the node), which spends nothing.
type JoinRecord struct {
	Token    string    `json:"token"`
	Via      string    `json:"via,omitempty"`
	Node     string    `json:"node"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	Time     time.Time `json:"time"`
}

type removeNodeCmd struct {
	ID   string    `json:"id"`
	Time time.Time `json:"time"`
}

// legacyCertTTL bounds how long a removal is remembered for certificates issued before
// joins were recorded (pki.DefaultLeafTTL): after it, every such certificate expired.
const legacyCertTTL = 366 * 24 * time.Hour

// RecordJoin spends one use of a join token on the certificate it bought. Errors:
// ErrQuota (the token's uses are spent), ErrNotFound or ErrInvalid (not a valid join
// token at r.Time): the caller must not hand out the certificate then.
func (s *Store) RecordJoin(ctx context.Context, r JoinRecord) error {
	if _, err := s.apply(ctx, cmdJoin, r); err != nil {
		return fmt.Errorf("record join of %s: %w", r.Node, err)
	}
	return nil
}

// RemoveNode forgets node id (it must hold no live sandbox) and revokes every agent
// certificate issued to it: from then on it cannot reach the servers, and only a new join
// (a new certificate) brings a host back under the name. Errors: ErrNotFound, ErrInvalid.
func (s *Store) RemoveNode(ctx context.Context, id string, now time.Time) error {
	if _, err := s.apply(ctx, cmdRemoveNode, removeNodeCmd{ID: id, Time: now}); err != nil {
		return fmt.Errorf("remove node %s: %w", id, err)
	}
	return nil
}

// HasLiveCerts reports whether node holds an agent certificate a join issued that is not
// revoked (nor expired at now): its name is taken until `node rm`.
func (s *Store) HasLiveCerts(node string, now time.Time) bool {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	for _, c := range s.fsm.certs {
		if c.Node == node && c.Token == "" && c.RevokedAt.IsZero() && c.NotAfter.After(now) {
			return true
		}
	}
	return false
}

func ptrTo[T any](v T) *T { return &v }

// RecordEdgeCert records an ingress certificate issued to token c.Token (which must be a
// valid token at now), before it is handed out: revoking the token revokes it. Errors:
// ErrNotFound, ErrInvalid.
func (s *Store) RecordEdgeCert(ctx context.Context, c IssuedCert, now time.Time) error {
	c.RevokedAt = time.Time{}
	if _, err := s.apply(ctx, cmdIssueEdgeCert, issueEdgeCertCmd{Cert: c, Time: now}); err != nil {
		return fmt.Errorf("record ingress certificate %s: %w", c.Name, err)
	}
	return nil
}

// EdgeCertRevoked reports whether an ingress certificate (its serial in hex) was revoked
// with its token. A certificate issued before they were recorded is not known here.
func (s *Store) EdgeCertRevoked(serial string) bool {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	c, ok := s.fsm.certs[serial]
	return ok && c.Token != "" && !c.RevokedAt.IsZero()
}

// RevokedEdgeCerts lists the serials of ingress certificates revoked and not yet expired
// at now, sorted: what nodes must refuse.
func (s *Store) RevokedEdgeCerts(now time.Time) []string {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	var out []string
	for serial, c := range s.fsm.certs {
		if c.Token != "" && !c.RevokedAt.IsZero() && c.NotAfter.After(now) {
			out = append(out, serial)
		}
	}
	slices.Sort(out)
	return out
}

// MaxEdgeCertsPerToken bounds the edge certificates one token holds at a time.
const MaxEdgeCertsPerToken = 16

type issueEdgeCertCmd struct {
	Cert IssuedCert `json:"cert"`
	Time time.Time  `json:"time"`
}

func (f *fsm) issueEdgeCert(cmd issueEdgeCertCmd) any {
	c, now := cmd.Cert, cmd.Time
	c.RevokedAt = time.Time{}
	if c.Serial == "" || c.Token == "" || c.Name == "" || now.IsZero() || c.Node != "" {
		return fmt.Errorf("%w: an edge certificate record needs a serial, a token, a name and a time", ErrInvalid)
	}
	t, ok := f.tokens[c.Token]
	if !ok {
		// Revoked between the check of the request and now: no certificate for it.
		return fmt.Errorf("token %q: %w", c.Token, ErrNotFound)
	}
	if !t.ValidAt(now) || (t.Role != RoleIngress && t.Role != RoleAdmin) {
		return fmt.Errorf("%w: token %s may not get an ingress certificate", ErrInvalid, c.Token)
	}
	if _, dup := f.certs[c.Serial]; dup {
		return fmt.Errorf("%w: certificate serial %s is recorded already", ErrInvalid, c.Serial)
	}
	if !t.ExpiresAt.IsZero() && c.NotAfter.After(t.ExpiresAt) {
		return fmt.Errorf("%w: an edge certificate may not outlive its token (%s > %s)", ErrInvalid, c.NotAfter, t.ExpiresAt)
	}
	f.pruneCerts(now)
	live := 0
	for _, o := range f.certs {
		if o.Token == c.Token && o.RevokedAt.IsZero() {
			live++
		}
	}
	if live >= MaxEdgeCertsPerToken {
		// Each record stays until it expires, and a revoked one goes to every node with
		// every heartbeat: one token must not be able to grow that list without bound.
		return fmt.Errorf("%w: token %s holds %d live edge certificates, the most one may (they expire, or revoke the token)", ErrQuota, c.Token, live)
	}
	c.NotAfter = utc(c.NotAfter)
	f.certs[c.Serial] = &c
	return nil
}

// CertRevoked reports whether an agent certificate (its serial in hex, its node name) may
// no longer be used: revoked when its node was removed, or issued before joins were
// recorded to a node removed since. Read from this server's copy of the state.
func (s *Store) CertRevoked(serial, node string) bool {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	if c, ok := s.fsm.certs[serial]; ok {
		return !c.RevokedAt.IsZero()
	}
	_, removed := s.fsm.removed[node]
	return removed
}

func (f *fsm) recordJoin(r JoinRecord) any {
	if r.Serial == "" || r.Node == "" || r.Time.IsZero() || (r.Token == "") == (r.Via == "") {
		return fmt.Errorf("%w: a join record needs a serial, a node, a time, and a join token or another proof", ErrInvalid)
	}
	if r.Via != "" {
		// A node proven by its platform (its Kubernetes pod's token) is that node: its new
		// certificate replaces the ones it had (a join whose answer was lost, a data
		// directory wiped, a node made again under its name), which are revoked here,
		// in the log's order: of joins racing for one name, the last holds.
		for s, c := range f.certs {
			if c.Node == r.Node && c.Token == "" && c.RevokedAt.IsZero() {
				n := *c
				n.RevokedAt = utc(r.Time)
				f.certs[s] = &n
			}
		}
		f.pruneCerts(r.Time)
		f.certs[r.Serial] = &IssuedCert{Serial: r.Serial, Node: r.Node, NotAfter: utc(r.NotAfter)}
		return nil
	}
	// A join token proves no node: the name must be free (no node registered under it,
	// no live certificate for it), decided here, in the log's order: two joins racing
	// for one name get one certificate.
	if _, ok := f.nodes[r.Node]; ok {
		return fmt.Errorf("node name %q: %w: a node is registered under it", r.Node, ErrExists)
	}
	for _, c := range f.certs {
		if c.Node == r.Node && c.Token == "" && c.RevokedAt.IsZero() && c.NotAfter.After(r.Time) {
			return fmt.Errorf("node name %q: %w: a live certificate is issued for it", r.Node, ErrExists)
		}
	}
	t, ok := f.tokens[r.Token]
	if !ok {
		return fmt.Errorf("join token %q: %w", r.Token, ErrNotFound)
	}
	if t.Role != RoleJoin || !t.ValidAt(r.Time) {
		return fmt.Errorf("%w: token %s is not a valid join token", ErrInvalid, r.Token)
	}
	if t.Uses >= max(t.MaxUses, 1) { // a token made before uses were counted joins one host
		return fmt.Errorf("%w: join token %s was used %d times, all it may be", ErrQuota, t.ID, t.Uses)
	}
	nt := *t // copy-on-write
	nt.Uses++
	f.tokens[t.ID] = &nt
	f.pruneCerts(r.Time)
	f.certs[r.Serial] = &IssuedCert{Serial: r.Serial, Node: r.Node, NotAfter: utc(r.NotAfter)}
	return nil
}

func (f *fsm) removeNode(c removeNodeCmd) any {
	if c.Time.IsZero() {
		return fmt.Errorf("%w: removing a node needs a time", ErrInvalid)
	}
	_, known := f.nodes[c.ID]
	revoked := 0
	for s, ic := range f.certs {
		if ic.Node == c.ID && ic.RevokedAt.IsZero() {
			n := *ic
			n.RevokedAt = utc(c.Time)
			f.certs[s] = &n
			revoked++
		}
	}
	if !known && revoked == 0 {
		return fmt.Errorf("node %q: %w", c.ID, ErrNotFound)
	}
	if known {
		// Revoked first, then its sandboxes given up as lost (the restart policies place
		// them elsewhere): a node that keeps reporting them live must not be able to
		// keep itself from being removed.
		for _, sb := range f.sandboxes {
			holds := sb.Saved != nil && sb.Saved.Node == c.ID
			if (sb.Node != c.ID && !holds) || sb.Status.Terminal() {
				continue
			}
			next := sb.clone()
			if holds && (sb.Status == StatusPending || sb.Status == StatusPaused) {
				// Paused, or a resume that had not begun: its saved state went with the node.
				next.Status, next.Reason, next.Saved, next.FinishedAt = StatusLost, "node "+c.ID+" was removed with the sandbox's saved state", nil, utc(c.Time)
				next.addEvent(Event{Time: utc(c.Time), Status: StatusLost, Reason: next.Reason})
			} else if sb.Status == StatusPending && sb.Saved != nil {
				next.Node = "" // the resume's target went: placed again; the holder still has it
				next.Reason = boundReason("node " + c.ID + " was removed before the sandbox resumed there")
			} else if holds {
				continue // it runs elsewhere now; the holder's copy was not needed any more
			} else if sb.Status == StatusPending {
				next.Node = "" // placed but not started: placed again
				next.Reason = boundReason("node " + c.ID + " was removed before the sandbox started")
			} else if err := next.apply(Update{Status: ptrTo(StatusLost), Reason: "node " + c.ID + " was removed from the cluster", Time: c.Time}); err != nil {
				return err
			}
			f.putSandbox(next)
		}
		for id, s := range f.snapshots {
			if s.Node == c.ID && s.Lost == "" {
				lost := *s
				lost.Lost = "node " + c.ID + " was removed with the snapshot's files"
				f.snapshots[id] = &lost
			}
		}
		if err := f.deleteNode(c.ID); err != nil {
			return err
		}
	}
	f.removed[c.ID] = utc(c.Time)
	f.pruneCerts(c.Time)
	return nil
}

// pruneCerts drops records of certificates expired at now, and removals older than any
// unrecorded certificate could live.
func (f *fsm) pruneCerts(now time.Time) {
	maps.DeleteFunc(f.certs, func(_ string, c *IssuedCert) bool { return c.NotAfter.Before(now) })
	maps.DeleteFunc(f.removed, func(_ string, at time.Time) bool { return at.Add(legacyCertTTL).Before(now) })
}
