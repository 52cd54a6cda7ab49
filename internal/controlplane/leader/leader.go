// Package leader is the leader's loops: it tracks node heartbeats (in memory, not
// in the Raft log), declares silent nodes down and their sandboxes lost, re-runs
// sandboxes per their restart policy, moves sandboxes off draining nodes, and places
// pending sandboxes with the scheduler, committing plans that the state machine re-checks.
//
// Every pass reads the state fresh and decides from it alone, so a new leader simply
// picks up where the old one stopped.
package leader

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Config tunes the loops. Zero values pick the defaults noted.
type Config struct {
	// HeartbeatTTL is how long a node may stay silent before it is declared down (15s).
	HeartbeatTTL time.Duration
	// Interval is the longest time between passes (1s); Notify triggers one sooner.
	Interval time.Duration
	// Scheduler tunes placement (overcommit, locality weights).
	Scheduler scheduler.Config
	// MaxRestarts within RestartWindow (5 in 10m): past it a sandbox is left as it ended,
	// so a crashing command does not loop forever.
	MaxRestarts   int
	RestartWindow time.Duration
	// Now is the clock (time.Now).
	Now func() time.Time
}

func (c *Config) defaults() {
	if c.HeartbeatTTL == 0 {
		c.HeartbeatTTL = 15 * time.Second
	}
	if c.Interval == 0 {
		c.Interval = time.Second
	}
	if c.MaxRestarts == 0 {
		c.MaxRestarts = 5
	}
	if c.RestartWindow == 0 {
		c.RestartWindow = 10 * time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Store is what the loops need from the replicated state.
type Store interface {
	IsLeader() bool
	// The Local reads read this server's copy without confirming leadership: a pass
	// confirms it once (Sync), and its own writes are applied here before they return.
	LocalSandboxesWhere(keep func(*state.Sandbox) bool) []state.Sandbox
	LocalSandbox(id string) (state.Sandbox, bool)
	LocalNodes() []state.Node
	// Sync confirms this server leads and has applied what was committed before it.
	Sync(ctx context.Context) error
	// SchedulerSnapshot is the scheduler's view of every node and allocation.
	SchedulerSnapshot() *scheduler.Snapshot
	// PlacementView is what a create's placement needs, read without copying every
	// sandbox: whether one waits in the queue and the scheduler's snapshot.
	PlacementView() (queued bool, _ *scheduler.Snapshot)
	UpdateNode(ctx context.Context, id string, u state.NodeUpdate) (state.Node, error)
	UpdateSandbox(ctx context.Context, id string, u state.Update) (state.Sandbox, error)
	PlaceSandboxes(ctx context.Context, plans []state.Plan, cfg scheduler.Config, now time.Time) ([]state.PlanResult, error)
	ResumeSandbox(ctx context.Context, id, node string, cfg scheduler.Config, now, endAt time.Time) (state.Sandbox, error)
	LocalVolumes() ([]state.Volume, map[string][]string)
	MoveVolume(ctx context.Context, id, to, why string, now time.Time) (state.Volume, error)
	NoteVolume(ctx context.Context, id, note string, now time.Time) (state.Volume, error)
}

// Manager runs the loops while its server leads.
type Manager struct {
	store  Store
	cfg    Config
	log    *slog.Logger
	notify chan struct{}

	mu     sync.Mutex
	beats  map[string]time.Time
	leader bool // as of the last pass
	// held are the sandboxes this server's calls paused for their saves (see Hold).
	held map[string]int
	// mover runs volume moves (nil: none are run); moving are those under way here.
	mover  VolumeMover
	moving map[string]bool
	moves  sync.WaitGroup
	// nodeScaler asks for nodes and gives idle ones back (nil: none).
	nodeScaler NodeScaler
	// attention is attention; the tests make it select everything, to check that the
	// pass then acts on nothing attention would have left out.
	attention func([]state.Node) func(*state.Sandbox) bool
}

// Hold records that a call here paused sandbox id for its save and will resume it: a
// pass does not resume it as an orphan (resumeOrphans) until release is called.
func (m *Manager) Hold(id string) (release func()) {
	m.mu.Lock()
	if m.held == nil {
		m.held = map[string]int{}
	}
	m.held[id]++
	m.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			if m.held[id]--; m.held[id] <= 0 {
				delete(m.held, id)
			}
			m.mu.Unlock()
		})
	}
}

// New returns a manager; Run starts it.
func New(store Store, cfg Config, log *slog.Logger) *Manager {
	cfg.defaults()
	if log == nil {
		log = slog.Default()
	}
	return &Manager{store: store, cfg: cfg, log: log.With("component", "controlplane"), notify: make(chan struct{}, 1), beats: map[string]time.Time{}, attention: attention}
}

// Heartbeat records that node's agent is alive.
func (m *Manager) Heartbeat(node string) {
	m.mu.Lock()
	m.beats[node] = m.cfg.Now()
	m.mu.Unlock()
}

// Choose picks a node for sb, a sandbox about to be created, on this server's copy of
// the state, so that the create commits its placement too (re-checked by the state
// machine) and the node gets it without waiting for a pass and another commit. It
// chooses only while this server leads and nothing older waits for a node (first come,
// first placed); "" leaves the sandbox to the next pass. The scheduler configuration
// comes with it, for the re-check.
func (m *Manager) Choose(sb state.Sandbox) (string, scheduler.Config) {
	if !m.store.IsLeader() || !sb.StopRequestedAt.IsZero() {
		return "", m.cfg.Scheduler
	}
	// An older sandbox waiting for a node goes first, through the pass, unless the last
	// pass found no node for it (a constraint no node meets, a shape that does not fit):
	// the pass places later ones past it too, and one such sandbox must not take every
	// later create off this path.
	queued, snap := m.store.PlacementView()
	if queued {
		return "", m.cfg.Scheduler
	}
	sched, err := scheduler.New(snap, m.cfg.Scheduler)
	if err != nil {
		return "", m.cfg.Scheduler
	}
	req, err := state.SchedulerRequest(sb)
	if err != nil {
		return "", m.cfg.Scheduler
	}
	p, err := sched.Place(req)
	if err != nil {
		return "", m.cfg.Scheduler // the pass records why it waits
	}
	return p.NodeID, m.cfg.Scheduler
}

// Scheduling is the scheduler configuration the leader's placements use.
func (m *Manager) Scheduling() scheduler.Config { return m.cfg.Scheduler }

// Notify asks for a pass now.
func (m *Manager) Notify() {
	select {
	case m.notify <- struct{}{}:
	default:
	}
}

// Run makes passes until ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	// What the passes change is the scheduler's and the lifecycle timers' doing.
	ctx = state.WithActor(ctx, state.Actor{Kind: "system", Name: "leader"})
	t := time.NewTicker(m.cfg.Interval)
	defer t.Stop()
	defer m.moves.Wait()
	for {
		if err := m.Pass(ctx); err != nil && ctx.Err() == nil {
			m.log.Warn("control pass", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-m.notify:
		}
	}
}

// Pass runs the loops once if this server leads (exported for tests).
func (m *Manager) Pass(ctx context.Context) error {
	if !m.store.IsLeader() {
		m.mu.Lock()
		m.leader = false
		m.mu.Unlock()
		return nil
	}
	now := m.cfg.Now()
	m.mu.Lock()
	if !m.leader {
		// A new leader has no heartbeat history: every node gets a full TTL of grace.
		m.leader = true
		m.beats = map[string]time.Time{}
	}
	m.mu.Unlock()

	// One linearizable read per pass (a leader's confirmation costs a round trip to a
	// quorum); the re-reads below see this pass's own writes, applied here before they
	// returned. Placement is re-checked by the state machine at commit anyway.
	if err := m.store.Sync(ctx); err != nil {
		return err
	}
	nodes := m.store.LocalNodes()
	sbs := m.store.LocalSandboxesWhere(m.attention(nodes))
	var errs []error
	errs = append(errs, m.resumeOrphans(ctx, now, sbs))
	errs = append(errs, m.endMigrations(ctx, now, m.store.LocalNodes(), sbs))
	errs = append(errs, m.endLifetimes(ctx, now, sbs))
	errs = append(errs, m.checkHeartbeats(ctx, now, nodes))
	// Re-read: a node just declared down changed its sandboxes (lost ones must not be
	// "drained" back to life against their restart policy).
	nodes = m.store.LocalNodes()
	sbs = m.store.LocalSandboxesWhere(m.attention(nodes))
	errs = append(errs, m.drain(ctx, now, nodes, sbs))
	errs = append(errs, m.volumes(ctx, now, nodes))
	// Re-read: the steps above changed sandboxes the next ones look at.
	errs = append(errs, m.restart(ctx, now, m.store.LocalSandboxesWhere(m.attention(m.store.LocalNodes()))))
	errs = append(errs, m.place(ctx, now, m.store.LocalSandboxesWhere(m.attention(m.store.LocalNodes()))))
	// Last: the autoscaler sees what placement could not place.
	m.mu.Lock()
	ns := m.nodeScaler
	m.mu.Unlock()
	if ns != nil {
		errs = append(errs, ns.Pass(ctx, now))
	}
	return errors.Join(errs...)
}

// attention selects what a pass looks at, given the nodes: every sandbox one of its
// loops may act on. The rest need nothing from the leader until they change: running
// or placed on a ready node that is not draining, with no lifetime, migration, group or
// call's pause; or ended with no restart to come. A pass used to copy every sandbox
// four times a second, and with thousands placed that was the leader's largest cost
// under a stream of creates (found by the API throughput bench).
//
// A loop of the pass that starts to look at another kind of sandbox must be given it
// here. The leader's tests check it: their passes see every sandbox, and a write to one
// attention leaves out fails the test (gatedStore).
func attention(nodes []state.Node) func(*state.Sandbox) bool {
	calm := make(map[string]bool, len(nodes))
	for _, n := range nodes {
		calm[n.ID] = n.Status == state.NodeReady && !n.Draining
	}
	return func(sb *state.Sandbox) bool {
		switch {
		case sb.Spec.Group != nil || sb.PausedFor != "" || sb.Migration != nil || sb.Runtime[drainDetail] != "":
			return true // groups (members look each other up), a call's pause, a move, a drain's word
		case sb.Status.Terminal():
			// restart: ended, and its policy may run it again
			return sb.StopRequestedAt.IsZero() && (sb.Spec.Restart == state.RestartAlways || sb.Spec.Restart == state.RestartOnFailure)
		}
		// endLifetimes; place (no node); checkHeartbeats and drain (its node is down,
		// draining or otherwise not ready)
		return !sb.EndAt.IsZero() || !calm[sb.Node]
	}
}

// NodeScaler is the node autoscaler (internal/controlplane/nodescale), run at the end
// of every pass while this server leads.
type NodeScaler interface {
	Pass(ctx context.Context, now time.Time) error
}

// SetNodeScaler sets the node autoscaler (nil: none).
func (m *Manager) SetNodeScaler(ns NodeScaler) {
	m.mu.Lock()
	m.nodeScaler = ns
	m.mu.Unlock()
}

// endMigrations ends the live migrations that cannot commit any more: past their
// deadline, or whose target node is down or gone. The source resumes the sandbox once
// it sees the end (see state.Migration).
func (m *Manager) endMigrations(ctx context.Context, now time.Time, nodes []state.Node, sbs []state.Sandbox) error {
	up := map[string]bool{}
	for _, n := range nodes {
		up[n.ID] = n.Status != state.NodeDown
	}
	var errs []error
	for _, sb := range sbs {
		mig := sb.Migration
		if mig == nil {
			continue
		}
		var why string
		switch {
		case now.After(mig.Deadline):
			why = fmt.Sprintf("timed out (deadline %s)", mig.Deadline.Format(time.RFC3339))
		case !up[mig.To]:
			why = fmt.Sprintf("the target node %s is down", mig.To)
		default:
			continue
		}
		if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{EndMigration: mig.ID, Reason: why, Time: now}); err != nil && !errors.Is(err, state.ErrInvalidTransition) {
			errs = append(errs, fmt.Errorf("end migration %s of sandbox %s: %w", mig.ID, sb.ID, err))
			continue
		}
		m.log.Info("live migration ended", "sandbox", sb.ID, "migration", mig.ID, "from", mig.From, "to", mig.To, "why", why)
	}
	return errors.Join(errs...)
}

// lifetimeGrace is how long a sandbox whose lifetime ended has to stop before it is
// killed (E2B's sandboxes end at once; a short grace lets the guest's processes flush).
const lifetimeGrace = 2 * time.Second

// endLifetimes stops, or pauses (Spec.OnEnd), the sandboxes whose lifetime has ended
// (Sandbox.EndAt). A sandbox to pause that is not running yet waits until it is; one
// whose pause its node refused, or a sidecar group's main (a group pauses through its
// server, main first), is stopped instead.
func (m *Manager) endLifetimes(ctx context.Context, now time.Time, sbs []state.Sandbox) error {
	var errs []error
	for _, sb := range sbs {
		if sb.EndAt.IsZero() || now.Before(sb.EndAt) || sb.Status.Terminal() || sb.Status == state.StatusPaused ||
			!sb.StopRequestedAt.IsZero() || !sb.PauseRequestedAt.IsZero() {
			continue
		}
		if sb.Spec.OnEnd == state.LifetimePause && sb.Spec.Group == nil && sb.Runtime["pause_refused"] == "" {
			if sb.Status != state.StatusRunning || sb.Migration != nil {
				continue
			}
			_, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{RequestPause: true, Time: now})
			if err != nil && !errors.Is(err, state.ErrInvalidTransition) {
				errs = append(errs, fmt.Errorf("pause sandbox %s at the end of its lifetime: %w", sb.ID, err))
				continue
			}
			m.log.Info("lifetime ended: pausing", "sandbox", sb.ID, "end_at", sb.EndAt)
			continue
		}
		grace := lifetimeGrace
		_, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{StopGrace: &grace, StopReason: "its lifetime ended", Time: now})
		if err != nil && !errors.Is(err, state.ErrInvalidTransition) {
			errs = append(errs, fmt.Errorf("stop sandbox %s at the end of its lifetime: %w", sb.ID, err))
			continue
		}
		m.log.Info("lifetime ended: stopping", "sandbox", sb.ID, "end_at", sb.EndAt)
	}
	return errors.Join(errs...)
}

// resumeOrphans resumes the sandboxes a call paused for its save (a fork, a snapshot
// with memory: Sandbox.PausedFor) that no call here holds (Hold): calls run on the
// leader, so the server that made those went down or lost its leadership before it was
// done.
func (m *Manager) resumeOrphans(ctx context.Context, now time.Time, sbs []state.Sandbox) error {
	var errs []error
	for _, sb := range sbs {
		m.mu.Lock()
		held := m.held[sb.ID] > 0
		m.mu.Unlock()
		if sb.PausedFor == "" || held || !sb.StopRequestedAt.IsZero() || sb.Status != state.StatusPaused {
			continue
		}
		// Its lifetime is what it was: the pause was the call's, not a new start.
		if _, err := m.store.ResumeSandbox(ctx, sb.ID, "", m.cfg.Scheduler, now, sb.EndAt); err != nil {
			errs = append(errs, fmt.Errorf("resume sandbox %s, paused for an interrupted %s: %w", sb.ID, sb.PausedFor, err))
			continue
		}
		m.log.Info("resumed a sandbox paused for a call that was interrupted", "sandbox", sb.ID, "call", sb.PausedFor)
	}
	return errors.Join(errs...)
}

// checkHeartbeats declares silent ready nodes down, then gives up what every down node
// held. The second step looks at all down nodes, not only the ones this pass declared:
// a leader that stopped between the two writes (or a write that failed) leaves sandboxes
// "running" on a dead node, and only a later pass, maybe another leader's, can finish.
func (m *Manager) checkHeartbeats(ctx context.Context, now time.Time, nodes []state.Node) error {
	var errs []error
	for i, n := range nodes {
		m.mu.Lock()
		last, ok := m.beats[n.ID]
		if !ok {
			m.beats[n.ID] = now
			last = now
		}
		m.mu.Unlock()
		if n.Status != state.NodeReady || now.Sub(last) <= m.cfg.HeartbeatTTL {
			continue
		}
		reason := fmt.Sprintf("missed heartbeats for %s", m.cfg.HeartbeatTTL)
		down := state.NodeDown
		if _, err := m.store.UpdateNode(ctx, n.ID, state.NodeUpdate{Status: &down, StatusReason: &reason, Time: now}); err != nil {
			errs = append(errs, err)
			continue
		}
		m.log.Warn("node down", "node", n.ID, "reason", reason)
		nodes[i].Status, nodes[i].StatusReason = down, reason
	}
	downs := map[string]state.Node{}
	for _, n := range nodes {
		if n.Status == state.NodeDown {
			downs[n.ID] = n
		}
	}
	if len(downs) == 0 {
		return errors.Join(errs...)
	}
	// Read after the nodes declared down above: the pass's read saw them up.
	for _, sb := range m.store.LocalSandboxesWhere(func(sb *state.Sandbox) bool { _, down := downs[sb.Node]; return down }) {
		n, ok := downs[sb.Node]
		if ok && sb.Spec.Group != nil {
			// Its group's main may have ended above, ending it too: act on it as it is.
			if cur, found := m.store.LocalSandbox(sb.ID); found {
				sb = cur
			}
		}
		if !ok || sb.Status.Terminal() || sb.Saved != nil {
			// A paused sandbox (or one about to resume) has its state on the node's disk:
			// it waits for the node to come back (or for `node rm`, which gives it up).
			continue
		}
		if sb.Status == state.StatusPending {
			if !sb.StopRequestedAt.IsZero() {
				// Placed, never started, and its user asked for a stop: end it here, as
				// the server does for a sandbox stopped before placement (the node that
				// would have acted on the request is gone).
				exited, code := state.StatusExited, 128+15
				if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{Status: &exited, ExitCode: &code, Time: now,
					Reason: fmt.Sprintf("stopped by request before it started (node %s is down)", n.ID)}); err != nil {
					errs = append(errs, err)
				}
				continue
			}
			// Placed but never started: just place it again.
			errs = append(errs, m.replace(ctx, now, sb, fmt.Sprintf("node %s is down before the sandbox started; placing it again", n.ID)))
			continue
		}
		lost := state.StatusLost
		if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{Status: &lost, Reason: fmt.Sprintf("node %s is down (%s)", n.ID, n.StatusReason), Time: now}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// drain moves live sandboxes off draining nodes. A running one migrates live to the
// scheduler's choice of node (a few at a time per node); one that cannot (no other node
// fits it, or its migration failed) is stopped and placed again only if its restart
// policy allows it, and otherwise stays, with the reason in its details (inspect) and
// `node ls` counting it. One not running yet is placed again. A paused one stays with
// its saved state; a stopped one is left to end.
func (m *Manager) drain(ctx context.Context, now time.Time, nodes []state.Node, sbs []state.Sandbox) error {
	var errs []error
	draining := map[string]bool{}
	for _, n := range nodes {
		draining[n.ID] = n.Draining
	}
	for _, sb := range sbs {
		// A drain that ended (uncordon) takes its word back.
		if sb.Runtime[drainDetail] != "" && !draining[sb.Node] {
			if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{Runtime: map[string]string{drainDetail: ""}, Time: now}); err != nil {
				errs = append(errs, err)
			}
		}
	}
	groupsSeen := map[string]bool{}
	for _, n := range nodes {
		if !n.Draining {
			continue
		}
		inflight := 0
		for _, sb := range sbs {
			if sb.Migration != nil && sb.Migration.From == n.ID {
				inflight++
			}
		}
		for _, sb := range sbs {
			if sb.Node != n.ID || sb.Status.Terminal() || !sb.StopRequestedAt.IsZero() || sb.Saved != nil || sb.Migration != nil {
				continue
			}
			if g := sb.Spec.Group; g != nil && len(g.Members) > 1 {
				// Its group runs on one node: it moves as one, member by member (see
				// drainGroup), once per group and pass.
				if groupsSeen[g.Main] {
					continue
				}
				groupsSeen[g.Main] = true
				if inflight >= maxDrainMigrations {
					continue
				}
				started, note, err := m.drainGroup(ctx, now, nodes, sbs, n, sb)
				inflight += started
				if err != nil {
					errs = append(errs, err)
				}
				if note != "" {
					for _, gm := range g.Members {
						if mb, ok := byID(sbs, gm.ID); ok && !mb.Status.Terminal() && mb.Runtime[drainDetail] != note {
							if _, err := m.store.UpdateSandbox(ctx, mb.ID, state.Update{Runtime: map[string]string{drainDetail: note}, Time: now}); err != nil {
								errs = append(errs, err)
							}
						}
					}
				}
				continue
			}
			if sb.Status != state.StatusRunning || !sb.PauseRequestedAt.IsZero() {
				errs = append(errs, m.replace(ctx, now, sb, "drained from node "+n.ID))
				continue
			}
			why := failedSince(sb, n.DrainingSince)
			if why == "" {
				if inflight >= maxDrainMigrations {
					continue
				}
				started, err := m.migrateAway(ctx, now, nodes, sbs, sb)
				if err == nil {
					inflight += started
					continue
				}
				why = err.Error()
			}
			if sb.Spec.Restart == state.RestartOnFailure || sb.Spec.Restart == state.RestartAlways {
				// Why it could not move (a node's error names nodes and addresses) is in
				// the log and in the migration's outcome, both the operator's; the
				// reason is the sandbox's, its owner reads it.
				m.log.Warn("drain: a sandbox that could not move live is stopped and placed again", "sandbox", sb.ID, "node", n.ID, "why", why)
				errs = append(errs, m.replace(ctx, now, sb, fmt.Sprintf("drained from node %s (stopped and placed again: it could not move live)", n.ID)))
				continue
			}
			note := fmt.Sprintf("stays on draining node %s: it could not move live (%s) and its restart policy (%s) does not allow a stop and a new start", n.ID, why, cmp.Or(string(sb.Spec.Restart), string(state.RestartNever)))
			if sb.Runtime[drainDetail] != note {
				if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{Runtime: map[string]string{drainDetail: note}, Time: now}); err != nil {
					errs = append(errs, err)
				}
				m.log.Warn("sandbox stays on a draining node", "sandbox", sb.ID, "node", n.ID, "why", why)
			}
		}
	}
	return errors.Join(errs...)
}

// drainGroup moves the sandbox group of sb (a member on draining node n) off n, live, one
// member per call: its sidecars first, then its main, all to one node chosen for the
// whole group (or the one its first moved member went to). While it moves, the members
// on two nodes do not reach each other. If a member's move fails, the members that moved
// are moved back to n and the group stays, saying why (note); so does a group nothing
// can take. It returns the migrations it started.
func (m *Manager) drainGroup(ctx context.Context, now time.Time, nodes []state.Node, sbs []state.Sandbox, n state.Node, sb state.Sandbox) (int, string, error) {
	g := sb.Spec.Group
	main, ok := byID(sbs, g.Main)
	if !ok || main.Status.Terminal() {
		return 0, "", nil // its end stops the rest
	}
	var live []state.Sandbox // the main first
	for _, gm := range g.Members {
		mb, ok := byID(sbs, gm.ID)
		if !ok || mb.Status.Terminal() {
			continue
		}
		if mb.Migration != nil {
			return 0, "", nil // one move at a time; the next pass goes on
		}
		if mb.Status != state.StatusRunning || !mb.StopRequestedAt.IsZero() || !mb.PauseRequestedAt.IsZero() {
			return 0, fmt.Sprintf("stays on draining node %s: a member of its sandbox group (%s) is %s, and a group moves live only while all of it runs", n.ID, mb.ID, mb.Status), nil
		}
		live = append(live, mb)
	}
	var here, moved []state.Sandbox
	failed := ""
	for _, mb := range live {
		if mb.Node == n.ID {
			here = append(here, mb)
		} else {
			moved = append(moved, mb)
		}
		if why := failedSince(mb, n.DrainingSince); why != "" && failed == "" {
			failed = why
		}
	}
	if failed != "" {
		// A member could not move: the ones that did come back, and the group stays.
		if len(moved) > 0 {
			started, err := m.migrateTo(ctx, now, nodes, moved[0], n.ID)
			return started, "", err
		}
		return 0, fmt.Sprintf("stays on draining node %s: its sandbox group could not move live (%s)", n.ID, failed), nil
	}
	if len(here) == 0 {
		return 0, "", nil
	}
	target := ""
	if len(moved) > 0 {
		target = moved[0].Node
	} else {
		sched, err := scheduler.New(m.store.SchedulerSnapshot(), m.cfg.Scheduler)
		if err != nil {
			return 0, "", err
		}
		req, err := state.SchedulerRequest(main)
		if err != nil {
			return 0, "", err
		}
		state.ReserveMore(&req, state.GroupReserved(main))
		req.Avoid = n.ID
		p, err := sched.Place(req)
		if err != nil {
			return 0, fmt.Sprintf("stays on draining node %s: no node takes its whole sandbox group: %v", n.ID, err), nil
		}
		target = p.NodeID
	}
	next := here[0]
	if len(here) > 1 && here[0].ID == g.Main {
		next = here[1] // the sidecars first, the main last
	}
	started, err := m.migrateTo(ctx, now, nodes, next, target)
	return started, "", err
}

// migrateTo starts the live migration of sb to node to.
func (m *Manager) migrateTo(ctx context.Context, now time.Time, nodes []state.Node, sb state.Sandbox, to string) (int, error) {
	var addr string
	for _, n := range nodes {
		if n.ID == to {
			addr = n.Address
		}
	}
	mig := state.Migration{ID: state.NewMigrationID(), From: sb.Node, To: to, ToAddress: addr, Deadline: now.Add(state.MigrationDeadline)}
	if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{StartMigration: &mig, Time: now}); err != nil {
		return 0, fmt.Errorf("start the live migration of %s: %w", sb.ID, err)
	}
	m.log.Info("draining: live migration of a group member started", "sandbox", sb.ID, "migration", mig.ID, "from", mig.From, "to", mig.To)
	return 1, nil
}

// byID finds sandbox id in sbs.
func byID(sbs []state.Sandbox, id string) (state.Sandbox, bool) {
	for _, sb := range sbs {
		if sb.ID == id {
			return sb, true
		}
	}
	return state.Sandbox{}, false
}

// maxDrainMigrations bounds the live migrations a drain runs at once off one node.
const maxDrainMigrations = 2

// drainDetail is the detail (inspect) that says why a sandbox stays on a draining node.
const drainDetail = "drain"

// failedSince is why the last live migration of sb failed, if it began at or after
// since (a drain does not try again what failed during it); "" if none did.
func failedSince(sb state.Sandbox, since time.Time) string {
	if len(sb.Migrations) == 0 {
		return ""
	}
	last := sb.Migrations[len(sb.Migrations)-1]
	if last.Outcome == state.MigrationMoved || last.Started.Before(since) {
		return ""
	}
	return "live migration " + last.Outcome
}

// migrateAway starts a live migration of running sb to the scheduler's choice among
// the other nodes; it returns 1 if it started one.
func (m *Manager) migrateAway(ctx context.Context, now time.Time, nodes []state.Node, sbs []state.Sandbox, sb state.Sandbox) (int, error) {
	sched, err := scheduler.New(m.store.SchedulerSnapshot(), m.cfg.Scheduler)
	if err != nil {
		return 0, err
	}
	req, err := state.SchedulerRequest(sb)
	if err != nil {
		return 0, err
	}
	req.Avoid = sb.Node
	p, err := sched.Place(req)
	if err != nil {
		return 0, err
	}
	var addr string
	for _, n := range nodes {
		if n.ID == p.NodeID {
			addr = n.Address
		}
	}
	mig := state.Migration{ID: state.NewMigrationID(), From: sb.Node, To: p.NodeID, ToAddress: addr, Deadline: now.Add(state.MigrationDeadline)}
	if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{StartMigration: &mig, Time: now}); err != nil {
		return 0, fmt.Errorf("start its live migration: %w", err)
	}
	m.log.Info("draining: live migration started", "sandbox", sb.ID, "migration", mig.ID, "from", mig.From, "to", mig.To)
	return 1, nil
}

// replace sends a sandbox back to pending for a new placement.
func (m *Manager) replace(ctx context.Context, now time.Time, sb state.Sandbox, reason string) error {
	pending := state.StatusPending
	_, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{Restart: true, Status: &pending, Reason: reason, Time: now})
	if err != nil {
		return fmt.Errorf("re-place sandbox %s: %w", sb.ID, err)
	}
	m.log.Info("sandbox re-placed", "sandbox", sb.ID, "reason", reason)
	return nil
}

// restart re-runs ended sandboxes per their restart policy.
func (m *Manager) restart(ctx context.Context, now time.Time, sbs []state.Sandbox) error {
	var errs []error
	for _, sb := range sbs {
		if !sb.Status.Terminal() || !sb.StopRequestedAt.IsZero() {
			continue
		}
		why := restartReason(sb)
		if why == "" {
			// A sidecar that completed (exit code 0) is done: an init job, say. One that
			// failed and does not run again fails its group.
			if sb.IsSidecar() && !(sb.Status == state.StatusExited && sb.ExitCode == 0 && sb.Signal == 0) {
				errs = append(errs, m.failGroup(ctx, now, sbs, sb, fmt.Sprintf("ended (%s), and its restart policy (%s) does not run it again",
					sb.EndText(), cmp.Or(string(sb.Spec.Restart), string(state.RestartNever)))))
			}
			continue
		}
		var restarts []time.Time // when the control plane re-ran it, oldest first
		recent := 0
		for _, e := range sb.Events {
			if e.Status == state.StatusPending && strings.HasPrefix(e.Reason, "restarting") {
				restarts = append(restarts, e.Time)
				if now.Sub(e.Time) < m.cfg.RestartWindow {
					recent++
				}
			}
		}
		// Given up once MaxRestarts restarts fell within one RestartWindow and it ended
		// again. That is judged from the restarts themselves, not from now, so it is
		// final: a sliding window would resume the loop later, forever, growing the
		// event history with it.
		if k := m.cfg.MaxRestarts; len(restarts) >= k && restarts[len(restarts)-1].Sub(restarts[len(restarts)-k]) < m.cfg.RestartWindow {
			if sb.Runtime[restartDetail] == "" {
				// The status is final and keeps its reason (how it last ended), so the
				// verdict goes into the details that inspect shows.
				note := fmt.Sprintf("not restarted any more: %d restarts within %s (policy %s)", k, m.cfg.RestartWindow, sb.Spec.Restart)
				if _, err := m.store.UpdateSandbox(ctx, sb.ID, state.Update{Runtime: map[string]string{restartDetail: note}, Time: now}); err != nil {
					errs = append(errs, err)
				}
				m.log.Warn("sandbox keeps ending; restart limit reached", "sandbox", sb.ID, "restarts", sb.Restarts)
			}
			if sb.IsSidecar() {
				errs = append(errs, m.failGroup(ctx, now, sbs, sb, fmt.Sprintf("ended (%s) and reached its restart limit", sb.EndText())))
			}
			continue
		}
		// Back off: 1s, 2s, 4s... after the end, so a crash loop does not spin.
		if wait := time.Second << min(recent, 6); now.Sub(sb.FinishedAt) < wait {
			continue
		}
		errs = append(errs, m.replace(ctx, now, sb, fmt.Sprintf("restarting (%s, policy %s, restart %d)", why, sb.Spec.Restart, sb.Restarts+1)))
	}
	return errors.Join(errs...)
}

// failGroup stops the main of sidecar sc's group (which ends the rest) because sc ended
// for good, unless the main is over or stopping already.
func (m *Manager) failGroup(ctx context.Context, now time.Time, sbs []state.Sandbox, sc state.Sandbox, why string) error {
	var main state.Sandbox
	found := false
	for _, sb := range sbs {
		if sb.ID == sc.Spec.Group.Main {
			main, found = sb, true
		}
	}
	if !found || main.Status.Terminal() || !main.StopRequestedAt.IsZero() {
		return nil
	}
	name := sc.Spec.Group.MemberName(sc.ID)
	reason := fmt.Sprintf("its sidecar %q (%s) %s", name, sc.ID, why)
	grace := state.GroupStopGrace
	// The main is stopped, and its end is a failure with this reason (see
	// Sandbox.StopReason): the group failed.
	u := state.Update{StopGrace: &grace, StopReason: reason, StopFails: true, Runtime: map[string]string{groupDetail: "stopped: " + reason}, Time: now}
	if main.Status == state.StatusPending && main.Node == "" || main.Status == state.StatusPaused {
		// Nothing runs to stop: it is over now.
		st, code := state.StatusFailed, 128+15
		u.Status, u.ExitCode, u.Reason = &st, &code, reason
	}
	if _, err := m.store.UpdateSandbox(ctx, main.ID, u); err != nil {
		return fmt.Errorf("stop group %s after its sidecar %s ended: %w", main.ID, sc.ID, err)
	}
	m.log.Info("group stopped: a sidecar ended for good", "sandbox", main.ID, "sidecar", name, "why", why)
	return nil
}

// groupDetail is the Sandbox.Runtime key saying why a group's main was stopped.
const groupDetail = "group"

// restartDetail is the Sandbox.Runtime key saying why the restart policy stopped applying.
const restartDetail = state.RestartGivenUp

// restartReason says why sb should run again under its policy, or "" if it should not.
func restartReason(sb state.Sandbox) string {
	var why string
	switch sb.Status {
	case state.StatusLost:
		why = "lost: " + sb.Reason
	case state.StatusFailed:
		why = "failed: " + sb.Reason
	case state.StatusExited:
		why = fmt.Sprintf("exited with code %d", sb.ExitCode)
	}
	switch sb.Spec.Restart {
	case state.RestartAlways:
		return why
	case state.RestartOnFailure:
		if sb.Status == state.StatusExited && sb.ExitCode == 0 && sb.Signal == 0 {
			return ""
		}
		return why
	}
	return ""
}

// place schedules every pending sandbox that has no node (oldest first) and records why
// the ones that fit nowhere wait.
func (m *Manager) place(ctx context.Context, now time.Time, sbs []state.Sandbox) error {
	var waiting []state.Sandbox
	byID := map[string]state.Sandbox{}
	for _, sb := range sbs {
		byID[sb.ID] = sb
		if sb.Status == state.StatusPending && sb.Node == "" && sb.StopRequestedAt.IsZero() {
			waiting = append(waiting, sb)
		}
	}
	if len(waiting) == 0 {
		return nil
	}
	// Every sandbox's allocation, from the state's per-node sums (sbs holds only the
	// ones the pass looks at).
	sched, err := scheduler.New(m.store.SchedulerSnapshot(), m.cfg.Scheduler)
	if err != nil {
		return fmt.Errorf("scheduler: %w", err)
	}
	var plans []state.Plan
	var errs []error
	for _, sb := range waiting { // LocalSandboxesWhere is oldest first
		if sb.IsSidecar() {
			// A sidecar goes where its main runs (placed with it, or restarted beside
			// it), never through the scheduler: a group is never split.
			if main, ok := byID[sb.Spec.Group.Main]; ok && main.Node != "" && !main.Status.Terminal() {
				plans = append(plans, state.Plan{SandboxID: sb.ID, NodeID: main.Node})
			}
			continue
		}
		req, err := state.SchedulerRequest(sb)
		if err == nil {
			var p scheduler.Placement
			p, err = sched.Place(req)
			if err == nil {
				if aerr := sched.Assume(scheduler.Allocation{SandboxID: sb.ID, NodeID: p.NodeID, Resources: req.Resources}); aerr != nil {
					errs = append(errs, aerr)
					continue
				}
				plans = append(plans, state.Plan{SandboxID: sb.ID, NodeID: p.NodeID})
				continue
			}
		}
		reason := "waiting for a node: " + err.Error()
		if sb.Reason != reason {
			if _, uerr := m.store.UpdateSandbox(ctx, sb.ID, state.Update{PendingReason: &reason, Time: now}); uerr != nil {
				errs = append(errs, uerr)
			}
		}
	}
	if len(plans) == 0 {
		return errors.Join(errs...)
	}
	res, err := m.store.PlaceSandboxes(ctx, plans, m.cfg.Scheduler, now)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, r := range res {
		if r.Err != "" {
			m.log.Info("placement refused at commit; re-planning next pass", "sandbox", r.SandboxID, "node", r.NodeID, "err", r.Err)
			m.Notify()
			continue
		}
		m.log.Info("sandbox placed", "sandbox", r.SandboxID, "node", r.NodeID)
	}
	return errors.Join(errs...)
}
