package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
)

// Options configures a Store. Zero values pick the defaults noted on each field.
type Options struct {
	// Dir holds raft.db (bolt: Raft log and stable store) and snapshots/. Required.
	Dir string
	// NodeID is this server's Raft ID. Required, and fixed for the life of Dir: the
	// bootstrapped configuration names it.
	NodeID string
	// Logger receives the store's and raft's logs (raft's through an hclog adapter, so
	// the handler's level filters both). Default slog.Default().
	Logger *slog.Logger

	// Transport is the seam for a multi-server cluster (e.g. raft.NewTCPTransport). Nil
	// means an in-process loopback transport addressed by NodeID, which is all a single
	// node needs. The first Open of a fresh Dir bootstraps a one-voter configuration of
	// this node with Transport.LocalAddr().
	Transport raft.Transport

	// SnapshotThreshold is how many log entries since the last snapshot trigger a new one
	// (checked every SnapshotInterval). Default 1024.
	SnapshotThreshold uint64
	// SnapshotInterval is how often raft checks SnapshotThreshold. Default 2m.
	SnapshotInterval time.Duration
	// TrailingLogs is how many entries a snapshot leaves in the log (for followers
	// catching up without a full snapshot). Default 512.
	TrailingLogs uint64
	// LeaderTimeout bounds how long Open waits to become leader and catch up. Default 30s.
	LeaderTimeout time.Duration

	// Peers, when set, is the full set of voters of a multi-server cluster (this node
	// included), bootstrapped on first start. Every server is given the same list, and
	// raft accepts the identical bootstrap on each. With Peers, Open waits until some
	// leader is known instead of for this node to lead.
	Peers []Peer
}

// Peer is one voting server: its Raft ID and transport address (host:port; a DNS name is
// kept as written and resolved on each dial).
type Peer struct {
	ID      string
	Address string
}

// retainSnapshots is how many snapshot files are kept: the newest, plus one in case the
// newest turns out to be unreadable.
const retainSnapshots = 2

// defaultApplyTimeout bounds the enqueueing of a command when ctx has no deadline.
const defaultApplyTimeout = 30 * time.Second

// Store is the replicated state. Writes go through the Raft log and return the FSM's
// verdict; reads are linearizable and return copies.
type Store struct {
	log   *slog.Logger
	id    string // this server's Raft ID, stamped into its commands' audit entries
	raft  *raft.Raft
	fsm   *fsm
	bolt  *raftboltdb.BoltStore
	snaps *raft.FileSnapshotStore

	// readyTerm is the Raft term in which this node, as leader, last completed a
	// Barrier. Until a new leader has committed an entry of its own term its commit
	// index may trail the cluster's, so the first read of each term pays for a Barrier;
	// later reads only confirm leadership (see readBarrier).
	readyTerm atomic.Uint64

	// mu orders calls into raft against Close. raft v1.7.3 queues VerifyLeader requests
	// on a buffered channel that nobody answers after Shutdown, so a read racing Close
	// could block forever; instead Close waits for calls in flight (they are bounded by
	// raft while it runs) and later calls get ErrClosed.
	mu       sync.RWMutex
	closed   bool
	closeErr error
}

// ErrClosed: the store was closed.
var ErrClosed = errors.New("state store closed")

// Open opens (or on first use creates and bootstraps) the store in opts.Dir, waits until
// this node leads and has applied the whole log, and returns it.
func Open(ctx context.Context, opts Options) (_ *Store, err error) {
	if opts.Dir == "" {
		return nil, fmt.Errorf("open state store: %w: no directory", ErrInvalid)
	}
	if opts.NodeID == "" {
		return nil, fmt.Errorf("open state store %s: %w: no node ID", opts.Dir, ErrInvalid)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "state")
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}

	var cleanup []func()
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
		}
	}()

	dbPath := filepath.Join(opts.Dir, "raft.db")
	// bbolt blocks forever on a file another process has locked; a timeout turns that
	// into an error naming the likely cause.
	bolt, err := raftboltdb.New(raftboltdb.Options{Path: dbPath, BoltOptions: &bbolt.Options{Timeout: 2 * time.Second}})
	if err != nil {
		return nil, fmt.Errorf("open raft log %s (is another server using this directory?): %w", dbPath, err)
	}
	cleanup = append(cleanup, func() { _ = bolt.Close() })
	logs, err := raft.NewLogCache(256, bolt)
	if err != nil {
		return nil, fmt.Errorf("create raft log cache: %w", err)
	}

	hlog := newHCLog(log, "raft")
	snaps, err := raft.NewFileSnapshotStoreWithLogger(opts.Dir, retainSnapshots, hlog.Named("snapshots"))
	if err != nil {
		return nil, fmt.Errorf("open raft snapshot store in %s: %w", opts.Dir, err)
	}

	trans := opts.Transport
	conf := raft.DefaultConfig()
	conf.LocalID = raft.ServerID(opts.NodeID)
	conf.Logger = hlog
	conf.SnapshotThreshold = orDefault(opts.SnapshotThreshold, 1024)
	conf.SnapshotInterval = orDefault(opts.SnapshotInterval, 2*time.Minute)
	conf.TrailingLogs = orDefault(opts.TrailingLogs, 512)
	if trans == nil {
		// Loopback: a fixed address keeps the bootstrapped configuration valid across
		// restarts. With no peers there is nothing to time out against, so short
		// timeouts only make the first election (on every start) quick.
		_, trans = raft.NewInmemTransport(raft.ServerAddress(opts.NodeID))
		conf.HeartbeatTimeout = 100 * time.Millisecond
		conf.ElectionTimeout = 100 * time.Millisecond
		conf.LeaderLeaseTimeout = 50 * time.Millisecond
	}
	if err := raft.ValidateConfig(conf); err != nil {
		return nil, fmt.Errorf("raft config: %w", err)
	}

	existing, err := raft.HasExistingState(logs, bolt, snaps)
	if err != nil {
		return nil, fmt.Errorf("inspect state in %s: %w", opts.Dir, err)
	}
	if !existing {
		cfg := raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: conf.LocalID, Address: trans.LocalAddr()}}}
		if len(opts.Peers) > 0 {
			cfg.Servers = nil
			for _, p := range opts.Peers {
				cfg.Servers = append(cfg.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Address)})
			}
		}
		if err := raft.BootstrapCluster(conf, logs, bolt, snaps, trans, cfg); err != nil {
			return nil, fmt.Errorf("bootstrap state in %s: %w", opts.Dir, err)
		}
		log.Info("bootstrapped new state", "dir", opts.Dir, "node", opts.NodeID)
	}

	f := newFSM(log)
	r, err := raft.NewRaft(conf, f, logs, bolt, snaps, trans)
	if err != nil {
		if c, ok := trans.(raft.WithClose); ok {
			_ = c.Close()
		}
		return nil, fmt.Errorf("start raft in %s: %w", opts.Dir, err)
	}
	// Registered after bolt's cleanup so it runs first: raft must stop before its log.
	cleanup = append(cleanup, func() { _ = r.Shutdown().Error() })

	s := &Store{log: log, id: opts.NodeID, raft: r, fsm: f, bolt: bolt, snaps: snaps}
	if err := s.checkMember(opts.NodeID); err != nil {
		return nil, err
	}

	timeout := orDefault(opts.LeaderTimeout, 30*time.Second)
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if len(opts.Peers) > 0 {
		// A cluster member serves as soon as it knows a leader: followers forward.
		if err := s.waitAnyLeader(wctx); err != nil {
			return nil, fmt.Errorf("open state store %s: %w", opts.Dir, err)
		}
		return s, nil
	}
	if err := s.waitLeader(wctx); err != nil {
		return nil, fmt.Errorf("open state store %s: %w", opts.Dir, err)
	}
	// The log entries after the last snapshot are applied only once this term's leader
	// commits; the barrier makes Open return with the whole state loaded.
	if err := s.readBarrier(wctx); err != nil {
		return nil, fmt.Errorf("open state store %s: replay log: %w", opts.Dir, err)
	}
	return s, nil
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// checkMember catches a Dir opened with a different NodeID than it was bootstrapped with,
// which would otherwise just never elect a leader.
func (s *Store) checkMember(nodeID string) error {
	fut := s.raft.GetConfiguration()
	if err := fut.Error(); err != nil {
		return fmt.Errorf("read raft configuration: %w", err)
	}
	var ids []raft.ServerID
	for _, srv := range fut.Configuration().Servers {
		if srv.ID == raft.ServerID(nodeID) && srv.Suffrage == raft.Voter {
			return nil
		}
		ids = append(ids, srv.ID)
	}
	return fmt.Errorf("node %q is not a voter of the state in this directory (voters: %v); was it created with another node ID?", nodeID, ids)
}

func (s *Store) waitAnyLeader(ctx context.Context) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		if addr, _ := s.raft.LeaderWithID(); addr != "" {
			return nil
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("no leader elected (raft state %s): %w", s.raft.State(), context.Cause(ctx))
		}
	}
}

// Leader returns the current leader's Raft ID and address ("" when none is known).
func (s *Store) Leader() (id, addr string) {
	a, i := s.raft.LeaderWithID()
	return string(i), string(a)
}

// HeardFromLeader reports whether this server leads or heard from a leader within d: its
// copy of the state (tokens and their revocations included) is at most that stale.
func (s *Store) HeardFromLeader(d time.Duration) bool {
	if s.IsLeader() {
		return true
	}
	last := s.raft.LastContact()
	return !last.IsZero() && time.Since(last) <= d
}

// IsLeader reports whether this server currently leads.
func (s *Store) IsLeader() bool { return s.raft.State() == raft.Leader }

// ErrNotLeader: a write or linearizable read reached a follower; send it to Leader().
var ErrNotLeader = raft.ErrNotLeader

func (s *Store) waitLeader(ctx context.Context) error {
	if s.raft.State() == raft.Leader {
		return nil
	}
	for {
		select {
		case isLeader := <-s.raft.LeaderCh():
			if isLeader {
				return nil
			}
		case <-ctx.Done():
			return fmt.Errorf("no leadership (raft state %s): %w", s.raft.State(), context.Cause(ctx))
		}
	}
}

// Close stops raft and closes the log. Safe to call more than once.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return s.closeErr
	}
	s.closed = true
	err := s.raft.Shutdown().Error()
	if err != nil {
		err = fmt.Errorf("stop raft: %w", err)
	}
	if cerr := s.bolt.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("close raft log: %w", cerr))
	}
	s.closeErr = err
	return err
}

// timeoutOf turns ctx's deadline into the duration raft's API wants.
func timeoutOf(ctx context.Context, def time.Duration) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		if d := time.Until(dl); d > 0 {
			return d
		}
		return time.Millisecond
	}
	return def
}

// apply proposes a command and waits for it to be committed and applied. The FSM's
// verdict comes back as the future's Response: an error there is the caller's error.
// ctx bounds the wait to enqueue; once enqueued, raft itself bounds the wait (the entry
// commits, or leadership is lost, or raft shuts down), so a cancelled ctx cannot leave
// the caller unsure whether a write it gave up on happened.
func (s *Store) apply(ctx context.Context, t cmdType, body any) (any, error) {
	data, err := encodeCommand(t, body, newStamp(ctx, s.id, body, time.Now()))
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", t, err)
	}
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.mu.RUnlock()
	fut := s.raft.Apply(data, timeoutOf(ctx, defaultApplyTimeout))
	if err := fut.Error(); err != nil {
		return nil, fmt.Errorf("commit %s: %w", t, err)
	}
	resp := fut.Response()
	if err, ok := resp.(error); ok {
		return nil, err
	}
	return resp, nil
}

// readBarrier makes the next FSM read linearizable: this node was the leader when the
// call began, and every write completed before it is applied here.
//
// Why this is enough: the first read of each term runs a Barrier, which applies every
// entry of earlier terms (a new leader holds all committed ones). Within the term, every
// write goes through this leader's Apply, whose future answers only after the FSM applied
// it. So, once the term's barrier is done, a VerifyLeader suffices; raft's AppliedIndex
// cannot be used instead, as it counts entries handed to the FSM, not applied by it.
func (s *Store) readBarrier(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	term := s.raft.CurrentTerm()
	if s.readyTerm.Load() != term {
		if err := s.raft.Barrier(timeoutOf(ctx, defaultApplyTimeout)).Error(); err != nil {
			return fmt.Errorf("wait for state to catch up: %w", err)
		}
		s.readyTerm.Store(term)
		return nil
	}
	if err := s.raft.VerifyLeader().Error(); err != nil {
		return fmt.Errorf("verify leadership: %w", err)
	}
	return nil
}

// read prepares a linearizable read of the FSM, or, for a context marked WithStaleReads,
// a read of this server's copy as it is.
func (s *Store) read(ctx context.Context) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.mu.RUnlock()
	if stale, _ := ctx.Value(staleKey{}).(bool); stale {
		return nil
	}
	return s.readBarrier(ctx)
}

type staleKey struct{}

// WithStaleReads marks ctx so reads answer from this server's copy of the state without
// checking leadership: possibly behind the leader, but available on a follower or a
// partitioned server (for diagnosis, `--stale` in the CLI).
func WithStaleReads(ctx context.Context) context.Context {
	return context.WithValue(ctx, staleKey{}, true)
}

// enter admits one call into raft unless the store is closed; the caller must call
// s.mu.RUnlock when done. See Store.mu.
func (s *Store) enter() error {
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return ErrClosed
	}
	return nil
}

// CreateSandbox records a new sandbox. sb needs ID and CreatedAt; Status must be pending
// (or empty, meaning pending); if sb has no Events a "created" event at CreatedAt is
// added. Errors: ErrExists, ErrNameTaken, ErrInvalid.
func (s *Store) CreateSandbox(ctx context.Context, sb Sandbox) error {
	return s.CreateSandboxWithin(ctx, sb, Quota{})
}

// CreateSandboxWithin creates sb unless its owner would pass q: ErrQuota.
func (s *Store) CreateSandboxWithin(ctx context.Context, sb Sandbox, q Quota) error {
	return s.CreateAndPlace(ctx, sb, q, "", scheduler.Config{})
}

// CreateAndPlace is CreateSandboxWithin that also places the sandbox on node in the same
// command, if the plan still fits when it commits (re-checked with cfg, as
// PlaceSandboxes does); otherwise the sandbox stays pending. "" places nothing.
func (s *Store) CreateAndPlace(ctx context.Context, sb Sandbox, q Quota, node string, cfg scheduler.Config) error {
	if _, err := s.apply(ctx, cmdCreateSandbox, createSandboxCmd{Sandbox: sb, Quota: q, Place: node, Scheduler: cfg}); err != nil {
		return fmt.Errorf("create sandbox %s: %w", sb.ID, err)
	}
	return nil
}

// CreateGroup creates a sandbox group's members (the main first; see Group) in one
// command, all or none, each within q, and places the group on node if it still fits
// when it commits ("" places nothing).
func (s *Store) CreateGroup(ctx context.Context, members []Sandbox, q Quota, node string, cfg scheduler.Config) error {
	if len(members) == 0 {
		return fmt.Errorf("create group: %w: no members", ErrInvalid)
	}
	if _, err := s.apply(ctx, cmdCreateGroup, createGroupCmd{Members: members, Quota: q, Place: node, Scheduler: cfg}); err != nil {
		return fmt.Errorf("create group of sandbox %s: %w", members[0].ID, err)
	}
	return nil
}

// UpdateSandbox applies u to the sandbox with the full ID id and returns the result.
// Errors: ErrNotFound, ErrInvalidTransition, ErrInvalid (e.g. u.Time zero).
func (s *Store) UpdateSandbox(ctx context.Context, id string, u Update) (Sandbox, error) {
	if u.Time.IsZero() {
		return Sandbox{}, fmt.Errorf("update sandbox %s: %w: no time", id, ErrInvalid)
	}
	resp, err := s.apply(ctx, cmdUpdateSandbox, updateSandboxCmd{ID: id, Update: u})
	if err != nil {
		return Sandbox{}, fmt.Errorf("update sandbox %s: %w", id, err)
	}
	sb, ok := resp.(Sandbox)
	if !ok {
		return Sandbox{}, fmt.Errorf("update sandbox %s: state machine answered %T", id, resp)
	}
	return sb, nil
}

// DeleteSandbox removes the sandbox with the full ID id, whatever its status (stopping
// it first is the caller's policy), and frees its name. Errors: ErrNotFound.
func (s *Store) DeleteSandbox(ctx context.Context, id string) error {
	if _, err := s.apply(ctx, cmdDeleteSandbox, deleteSandboxCmd{ID: id}); err != nil {
		return fmt.Errorf("delete sandbox %s: %w", id, err)
	}
	return nil
}

// GetSandbox finds a sandbox by full ID, name, or unique ID prefix of at least 4
// characters. Errors: ErrNotFound, ErrAmbiguous.
func (s *Store) GetSandbox(ctx context.Context, idOrName string) (Sandbox, error) {
	if err := s.read(ctx); err != nil {
		return Sandbox{}, fmt.Errorf("get sandbox %q: %w", idOrName, err)
	}
	return s.fsm.get(idOrName)
}

// GetOwnedSandbox is GetSandbox among owner's sandboxes only (see fsm.getOwned).
func (s *Store) GetOwnedSandbox(ctx context.Context, idOrName, owner string) (Sandbox, error) {
	if err := s.read(ctx); err != nil {
		return Sandbox{}, fmt.Errorf("get sandbox %q: %w", idOrName, err)
	}
	return s.fsm.getOwned(idOrName, owner)
}

// ListSandboxes returns all sandboxes sorted by CreatedAt (then ID).
func (s *Store) ListSandboxes(ctx context.Context) ([]Sandbox, error) {
	if err := s.read(ctx); err != nil {
		return nil, fmt.Errorf("list sandboxes: %w", err)
	}
	return s.fsm.list(), nil
}

// PutMeta sets key in a small replicated key/value namespace for cluster-wide settings.
func (s *Store) PutMeta(ctx context.Context, key string, value []byte) error {
	if _, err := s.apply(ctx, cmdSetMeta, setMetaCmd{Key: key, Value: value}); err != nil {
		return fmt.Errorf("put meta %q: %w", key, err)
	}
	return nil
}

// DeleteMeta removes key; a missing key is not an error.
func (s *Store) DeleteMeta(ctx context.Context, key string) error {
	if _, err := s.apply(ctx, cmdSetMeta, setMetaCmd{Key: key, Delete: true}); err != nil {
		return fmt.Errorf("delete meta %q: %w", key, err)
	}
	return nil
}

// GetMeta returns a copy of key's value. Errors: ErrNotFound.
func (s *Store) GetMeta(ctx context.Context, key string) ([]byte, error) {
	if err := s.read(ctx); err != nil {
		return nil, fmt.Errorf("get meta %q: %w", key, err)
	}
	return s.fsm.getMeta(key)
}

// ResumeSandbox makes the paused sandbox with the full ID id pending again on its node,
// which then resumes it from its saved state; ErrNoRoom if the node lacks room for it now
// (checked with cfg, as placements are). It returns the sandbox as it is then.
//
// node, if set, is where to resume it instead (that node fetches the saved state); else
// the holder if it has room now, or else whichever node the next placement pass finds.
func (s *Store) ResumeSandbox(ctx context.Context, id, node string, cfg scheduler.Config, now, endAt time.Time) (Sandbox, error) {
	resp, err := s.apply(ctx, cmdResume, resumeSandboxCmd{ID: id, Node: node, Scheduler: cfg, Time: now, EndAt: endAt})
	if err != nil {
		return Sandbox{}, fmt.Errorf("resume sandbox %s: %w", id, err)
	}
	sb, ok := resp.(Sandbox)
	if !ok {
		return Sandbox{}, fmt.Errorf("resume sandbox %s: state machine answered %T", id, resp)
	}
	return sb, nil
}
