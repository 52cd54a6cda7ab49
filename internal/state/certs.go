package state

import (
	"context"
	"fmt"
	"maps"
	"time"
)

// IssuedCert is an agent certificate a join issued, kept until it expires so that a
// removed node's certificates can be refused.
type IssuedCert struct {
	Serial    string    `json:"serial"` // hex
	Node      string    `json:"node"`
	NotAfter  time.Time `json:"not_after"`
	RevokedAt time.Time `json:"revoked_at,omitzero"` // set when its node was removed
}

// JoinRecord is one use of a join token: the certificate it bought.
type JoinRecord struct {
	Token    string    `json:"token"`
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
		if c.Node == node && c.RevokedAt.IsZero() && c.NotAfter.After(now) {
			return true
		}
	}
	return false
}

func ptrTo[T any](v T) *T { return &v }

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
	if r.Serial == "" || r.Node == "" || r.Time.IsZero() {
		return fmt.Errorf("%w: a join record needs a serial, a node and a time", ErrInvalid)
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
		for id, sb := range f.sandboxes {
			if sb.Node != c.ID || sb.Status.Terminal() {
				continue
			}
			next := sb.clone()
			if sb.Status == StatusPending {
				next.Node = "" // placed but not started: placed again
				next.Reason = boundReason("node " + c.ID + " was removed before the sandbox started")
			} else if err := next.apply(Update{Status: ptrTo(StatusLost), Reason: "node " + c.ID + " was removed from the cluster", Time: c.Time}); err != nil {
				return err
			}
			f.sandboxes[id] = next
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
