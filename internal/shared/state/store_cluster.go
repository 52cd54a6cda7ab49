package state

import (
	"context"
	"fmt"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// RegisterNode records a node's registration (or refreshes it) and marks it ready.
// n.UpdatedAt is the registration time (required).
func (s *Store) RegisterNode(ctx context.Context, n Node) (Node, error) {
	resp, err := s.apply(ctx, cmdUpsertNode, upsertNodeCmd{Node: n})
	if err != nil {
		return Node{}, fmt.Errorf("register node %s: %w", n.ID, err)
	}
	out, ok := resp.(Node)
	if !ok {
		return Node{}, fmt.Errorf("register node %s: state machine answered %T", n.ID, resp)
	}
	return out, nil
}

// UpdateNode applies u to node id. Errors: ErrNotFound, ErrInvalid.
func (s *Store) UpdateNode(ctx context.Context, id string, u NodeUpdate) (Node, error) {
	resp, err := s.apply(ctx, cmdUpdateNode, updateNodeCmd{ID: id, Update: u})
	if err != nil {
		return Node{}, fmt.Errorf("update node %s: %w", id, err)
	}
	out, ok := resp.(Node)
	if !ok {
		return Node{}, fmt.Errorf("update node %s: state machine answered %T", id, resp)
	}
	return out, nil
}

// DeleteNode forgets a node that holds no live sandbox. Errors: ErrNotFound, ErrInvalid.
func (s *Store) DeleteNode(ctx context.Context, id string) error {
	if _, err := s.apply(ctx, cmdDeleteNode, deleteNodeCmd{ID: id}); err != nil {
		return fmt.Errorf("delete node %s: %w", id, err)
	}
	return nil
}

// GetNode returns node id. Errors: ErrNotFound.
func (s *Store) GetNode(ctx context.Context, id string) (Node, error) {
	if err := s.read(ctx); err != nil {
		return Node{}, fmt.Errorf("get node %q: %w", id, err)
	}
	return s.fsm.getNode(id)
}

// ListNodes returns every node sorted by ID.
func (s *Store) ListNodes(ctx context.Context) ([]Node, error) {
	if err := s.read(ctx); err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	return s.fsm.listNodes(), nil
}

// CreateToken stores a token (its secret already hashed). Errors: ErrExists, ErrInvalid.
func (s *Store) CreateToken(ctx context.Context, t Token) error {
	if _, err := s.apply(ctx, cmdCreateToken, createTokenCmd{Token: t}); err != nil {
		return fmt.Errorf("create token %s: %w", t.ID, err)
	}
	return nil
}

// DeleteToken revokes token id, and the edge certificates it got. Errors: ErrNotFound.
func (s *Store) DeleteToken(ctx context.Context, id string) error {
	if _, err := s.apply(ctx, cmdDeleteToken, deleteTokenCmd{ID: id, Time: time.Now()}); err != nil {
		return fmt.Errorf("revoke token %s: %w", id, err)
	}
	return nil
}

// GetToken returns token id. Errors: ErrNotFound.
func (s *Store) GetToken(ctx context.Context, id string) (Token, error) {
	if err := s.read(ctx); err != nil {
		return Token{}, fmt.Errorf("get token %q: %w", id, err)
	}
	return s.fsm.getToken(id)
}

// ListTokens returns every token (with secret hashes) sorted by creation time.
func (s *Store) ListTokens(ctx context.Context) ([]Token, error) {
	if err := s.read(ctx); err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	return s.fsm.listTokens(), nil
}

// LocalToken reads token id from this server's copy of the state without a Raft round
// trip. It is for authenticating requests on the leader, whose copy holds every committed
// change; on a follower it may lag (a just-revoked token may still pass there).
func (s *Store) LocalToken(id string) (Token, error) {
	return s.fsm.getToken(id)
}

// Changed returns a channel closed at the next change this server applies (any command,
// or a snapshot restore). Watchers re-read what they need and call Changed again.
func (s *Store) Changed() <-chan struct{} { return s.fsm.watch() }

// LocalSandboxes returns this server's copy of every sandbox without a Raft round trip:
// for watchers that follow changes (assignment streams), where staleness is bounded by
// replication and corrected by the next change.
func (s *Store) LocalSandboxes() []Sandbox { return s.fsm.list() }

// LocalSandboxesWhere is LocalSandboxes of only the sandboxes keep selects (it sees each
// record read-only, under the state's lock): only those are copied. Oldest first, as
// ListSandboxes.
func (s *Store) LocalSandboxesWhere(keep func(*Sandbox) bool) []Sandbox {
	return s.fsm.listWhere(keep)
}

// LocalSandbox is this server's copy of sandbox id, without a Raft round trip.
func (s *Store) LocalSandbox(id string) (Sandbox, bool) {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	sb := s.fsm.sandboxes[id]
	if sb == nil {
		return Sandbox{}, false
	}
	return *sb.clone(), true
}

// Sync returns once this server has applied every change committed before the call, and
// (a leader) still leads: what a linearizable read waits for, for a caller that then
// reads the Local copies.
func (s *Store) Sync(ctx context.Context) error {
	if err := s.read(ctx); err != nil {
		return fmt.Errorf("sync with the cluster's state: %w", err)
	}
	return nil
}

// LargestNode is, from this server's copy, the most vCPUs and the most memory any node
// offers to sandboxes, and how many nodes there are.
func (s *Store) LargestNode() (most Resources, nodes int) {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	for _, n := range s.fsm.nodes {
		most.VCPUs = max(most.VCPUs, n.Capacity.VCPUs)
		most.MemoryMiB = max(most.MemoryMiB, n.Capacity.MemoryMiB)
	}
	return most, len(s.fsm.nodes)
}

// LocalNodes is LocalSandboxes for nodes.
func (s *Store) LocalNodes() []Node { return s.fsm.listNodes() }

// PlaceSandboxes commits placement plans; each is re-checked against the state at commit
// time and applied only if it still fits (see PlanResult.Err).
func (s *Store) PlaceSandboxes(ctx context.Context, plans []Plan, cfg scheduler.Config, now time.Time) ([]PlanResult, error) {
	resp, err := s.apply(ctx, cmdPlace, placeSandboxesCmd{Plans: plans, Config: cfg, Time: now})
	if err != nil {
		return nil, fmt.Errorf("place sandboxes: %w", err)
	}
	out, ok := resp.([]PlanResult)
	if !ok {
		return nil, fmt.Errorf("place sandboxes: state machine answered %T", resp)
	}
	return out, nil
}

// PlacementView answers, from this server's copy and without copying every sandbox
// (the create path calls it once per create): whether some sandbox waits in the leader's
// queue (Sandbox.Queued), and if none does, the scheduler's snapshot of nodes and
// allocations.
func (s *Store) PlacementView() (queued bool, _ *scheduler.Snapshot) {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	if s.fsm.queued > 0 {
		return true, nil
	}
	return false, s.fsm.schedulerSnapshot()
}

// SchedulerSnapshot returns the scheduler's view of this server's state.
func (s *Store) SchedulerSnapshot() *scheduler.Snapshot {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	return s.fsm.schedulerSnapshot()
}

// LocalMeta returns this server's copy of key's value without a Raft round trip (it may
// be behind the leader's). Errors: ErrNotFound.
func (s *Store) LocalMeta(key string) ([]byte, error) { return s.fsm.getMeta(key) }
