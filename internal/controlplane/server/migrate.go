package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// MigrateSandbox moves a running sandbox to another node live (see state.Migration and
// agent/migrate.go): it records the migration, which the source's node drives, and
// waits for it to end. Admins only: where sandboxes run is the operator's to decide
// (users neither name nor see nodes).
func (h *sandboxService) MigrateSandbox(ctx context.Context, req *connect.Request[pb.MigrateSandboxRequest]) (*connect.Response[pb.MigrateSandboxResponse], error) {
	if _, err := requireAdmin(ctx, "migrating a sandbox"); err != nil {
		return nil, err
	}
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if g := sb.Spec.Group; g != nil && len(g.Members) > 1 {
		return h.migrateGroup(ctx, sb, req.Msg.GetTo())
	}
	if sb.Status == state.StatusPending {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is pending (not running on a node yet): nothing to migrate", sb.ID))
	}
	if sb, err = h.s.settled(ctx, sb); err != nil {
		return nil, toConnectError(err)
	}
	mig, err := h.s.StartMigration(ctx, sb, req.Msg.GetTo())
	if err != nil {
		return nil, err
	}
	sb, m, err := h.s.waitMigration(ctx, sb.ID, mig.ID)
	if err != nil {
		return nil, toConnectError(fmt.Errorf("migrate sandbox %s: %w", sb.ID, err))
	}
	out := &pb.MigrateSandboxResponse{Sandbox: h.s.view(ctx, sb), Migration: migrationToPB(m)}
	if m.Outcome != state.MigrationMoved {
		where := ""
		if sb.Status == state.StatusRunning && sb.StopRequestedAt.IsZero() {
			where = " (it runs on where it was)"
		}
		return nil, connect.NewError(connect.CodeAborted, fmt.Errorf("migrate sandbox %s from node %s to node %s: %s%s", sb.ID, m.From, m.To, m.Outcome, where))
	}
	return connect.NewResponse(out), nil
}

// StartMigration records a live migration of running sandbox sb to node to (the
// scheduler's choice among the other nodes if ""). It returns once recorded.
func (s *Server) StartMigration(ctx context.Context, sb state.Sandbox, to string) (state.Migration, error) {
	switch {
	case sb.Status == state.StatusPending:
		return state.Migration{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is pending (not running on a node yet): nothing to migrate", sb.ID))
	case sb.Status != state.StatusRunning:
		return state.Migration{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s: only a running sandbox can be migrated", sb.ID, sb.Status))
	case sb.Migration != nil:
		return state.Migration{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is being migrated to node %s already", sb.ID, sb.Migration.To))
	case !sb.PauseRequestedAt.IsZero():
		return state.Migration{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is being paused: migrate it once it is resumed", sb.ID))
	case !sb.StopRequestedAt.IsZero():
		return state.Migration{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is being stopped: nothing to migrate", sb.ID))
	}
	node, err := s.migrationTarget(sb, to, state.Resources{})
	if err != nil {
		return state.Migration{}, err
	}
	now := s.now()
	m := state.Migration{ID: state.NewMigrationID(), From: sb.Node, To: node.ID, ToAddress: node.Address, Deadline: now.Add(state.MigrationDeadline)}
	if _, err := s.store.UpdateSandbox(ctx, sb.ID, state.Update{StartMigration: &m, Time: now}); err != nil {
		if errors.Is(err, state.ErrInvalidTransition) {
			// It changed since it was read (a pause, a stop or a migration began).
			return state.Migration{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s cannot be migrated now: %s", sb.ID, invalidWhy(err)))
		}
		return state.Migration{}, toConnectError(fmt.Errorf("migrate sandbox %s: %w", sb.ID, err))
	}
	s.log.Info("live migration started", "sandbox", sb.ID, "migration", m.ID, "from", m.From, "to", m.To)
	return m, nil
}

// migrationTarget is the node sb migrates to: to, if it can take it (with room for
// extra too: a group's other members), or the scheduler's choice among the nodes other
// than sb's; its own node if that is the one asked for, or the only one.
func (s *Server) migrationTarget(sb state.Sandbox, to string, extra state.Resources) (state.Node, error) {
	var cfg scheduler.Config
	if cp := s.cluster.ControlPlane; cp != nil {
		cfg = cp.Scheduling()
	}
	nodes := s.store.LocalNodes()
	sched, err := scheduler.New(s.store.SchedulerSnapshot(), cfg)
	if err != nil {
		return state.Node{}, toConnectError(err)
	}
	req, err := state.SchedulerRequest(sb)
	if err != nil {
		return state.Node{}, toConnectError(err)
	}
	state.ReserveMore(&req, extra)
	others := 0
	for _, n := range nodes {
		if n.ID != sb.Node {
			others++
		}
	}
	if to == sb.Node || to == "" && others == 0 {
		// Into a fresh VMM on its own node (how an operator replaces QEMU under running
		// sandboxes; the only move `fireworks dev` has): the same path, both VMs on one
		// node for the moment of the copy.
		for _, n := range nodes {
			if n.ID == sb.Node && n.Status == state.NodeReady {
				return n, nil
			}
		}
		return state.Node{}, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %s is not ready", sb.Node))
	}
	req.Avoid = sb.Node
	if to != "" {
		known := false
		for _, n := range nodes {
			known = known || n.ID == to
		}
		if !known {
			return state.Node{}, connect.NewError(connect.CodeNotFound, fmt.Errorf("no node named %q (fireworks node ls)", to))
		}
		req.Node, req.NodeWhy = to, "the node asked for"
	}
	p, err := sched.Place(req)
	if err != nil {
		return state.Node{}, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("migrate sandbox %s: %v", sb.ID, err))
	}
	for _, n := range nodes {
		if n.ID == p.NodeID {
			return n, nil
		}
	}
	return state.Node{}, connect.NewError(connect.CodeInternal, fmt.Errorf("node %s went away", p.NodeID))
}

// waitMigration waits for migration mid of sandbox id to end and returns its record.
func (s *Server) waitMigration(ctx context.Context, id, mid string) (state.Sandbox, state.Migration, error) {
	wctx, cancel := context.WithTimeout(ctx, state.MigrationDeadline+time.Minute)
	defer cancel()
	sb, err := s.waitFor(wctx, id, true, func(sb state.Sandbox) bool { return sb.Migration == nil || sb.Migration.ID != mid })
	if err != nil {
		return sb, state.Migration{}, err
	}
	for _, m := range sb.Migrations {
		if m.ID != mid {
			continue
		}
		if m.Outcome == state.MigrationMoved {
			// Returned once the target has said what it runs (its VM, its network), so
			// that inspect right after shows the sandbox where it is now; or once it
			// is over (the guest ended meanwhile), or after a while.
			rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if now, err := s.waitFor(rctx, id, true, func(sb state.Sandbox) bool {
				return sb.Runtime["migration"] == mid || sb.Status != state.StatusRunning || sb.Node != m.To
			}); err == nil {
				sb = now
			}
		}
		return sb, m, nil
	}
	return sb, state.Migration{}, fmt.Errorf("migration %s ended and left no record", mid)
}

func migrationToPB(m state.Migration) *pb.Migration {
	return &pb.Migration{Id: m.ID, From: m.From, To: m.To, Started: ts(m.Started), Ended: ts(m.Ended), Outcome: m.Outcome,
		DowntimeUs: m.Downtime.Microseconds(), Bytes: m.Bytes, DiskBytes: m.DiskBytes}
}

// waitMigrated returns sb once no live migration of it is in progress (at most until
// the migration's deadline).
func (s *Server) waitMigrated(ctx context.Context, sb state.Sandbox) (state.Sandbox, error) {
	if sb.Migration == nil {
		return sb, nil
	}
	wctx, cancel := context.WithDeadline(ctx, sb.Migration.Deadline.Add(10*time.Second))
	defer cancel()
	now, err := s.waitFor(wctx, sb.ID, false, func(sb state.Sandbox) bool { return sb.Migration == nil })
	if err != nil {
		return sb, toConnectError(fmt.Errorf("sandbox %s is migrating: %w", sb.ID, err))
	}
	return now, nil
}

// invalidWhy is the state's reason in an ErrInvalidTransition (what follows its
// wording), for a message a person reads.
func invalidWhy(err error) string {
	msg := err.Error()
	if _, why, ok := strings.Cut(msg, state.ErrInvalidTransition.Error()+": "); ok {
		return why
	}
	return msg
}

// migrateGroup moves sb's whole sandbox group to one node, live, member by member: the
// sidecars first, then the main (which then finds them where it arrives). The target
// is chosen for the whole group (the main's request reserves all of it). While the
// members are on two nodes they do not reach each other (the group's network is a
// node's); if a member cannot move, the ones that moved are moved back, so that the
// group is never left split.
func (h *sandboxService) migrateGroup(ctx context.Context, sb state.Sandbox, to string) (*connect.Response[pb.MigrateSandboxResponse], error) {
	members, err := h.s.groupOf(ctx, sb)
	if err != nil {
		return nil, err
	}
	main := members[0]
	if main.ID != main.Spec.Group.Main {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the group of sandbox %s has no main any more", sb.ID))
	}
	var live []state.Sandbox
	for _, m := range members {
		if m, err = h.s.settled(ctx, m); err != nil {
			return nil, toConnectError(err)
		}
		switch {
		case m.Status.Terminal():
			continue // a sidecar that ended (stopped by hand): nothing to move
		case m.Status != state.StatusRunning || m.Migration != nil || !m.PauseRequestedAt.IsZero() || !m.StopRequestedAt.IsZero():
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s (%q of the group of %s) is %s: a group migrates when all of it runs",
				m.ID, main.Spec.Group.MemberName(m.ID), main.ID, m.Status))
		case m.Node != main.Node:
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the group of %s is on two nodes (%s on %s, its main on %s)", main.ID, m.ID, m.Node, main.Node))
		}
		live = append(live, m)
	}
	target, err := h.s.migrationTarget(main, to, state.GroupReserved(main))
	if err != nil {
		return nil, err
	}
	from := main.Node
	// Sidecars first, then the main.
	order := append(append([]state.Sandbox(nil), live[1:]...), live[0])
	var moved []state.Sandbox
	var asked state.Migration
	for _, m := range order {
		// Each member's move is checked against the target for itself.
		mig, err := h.s.StartMigration(ctx, m, target.ID)
		if err == nil {
			var rec state.Migration
			_, rec, err = h.s.waitMigration(ctx, m.ID, mig.ID)
			if err == nil && rec.Outcome != state.MigrationMoved {
				err = fmt.Errorf("%s", rec.Outcome)
			}
			if m.ID == sb.ID {
				asked = rec
			}
		}
		if err != nil {
			back := h.s.moveBack(ctx, moved, from)
			return nil, connect.NewError(connect.CodeAborted, fmt.Errorf("migrate the group of %s from node %s to node %s: member %q (%s): %v%s",
				main.ID, from, target.ID, main.Spec.Group.MemberName(m.ID), m.ID, err, back))
		}
		moved = append(moved, m)
	}
	now, err := h.s.store.GetSandbox(ctx, sb.ID)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.MigrateSandboxResponse{Sandbox: h.s.view(ctx, now), Migration: migrationToPB(asked)}), nil
}

// moveBack migrates the group members that moved back to node from, after another
// could not move, and says how that went (for the error).
func (s *Server) moveBack(ctx context.Context, moved []state.Sandbox, from string) string {
	if len(moved) == 0 {
		return " (the group runs on where it was)"
	}
	var failed []string
	for _, m := range moved {
		cur, err := s.store.GetSandbox(ctx, m.ID)
		if err == nil {
			var mig state.Migration
			if mig, err = s.StartMigration(ctx, cur, from); err == nil {
				var rec state.Migration
				if _, rec, err = s.waitMigration(ctx, m.ID, mig.ID); err == nil && rec.Outcome != state.MigrationMoved {
					err = fmt.Errorf("%s", rec.Outcome)
				}
			}
		}
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s (%v)", m.ID, err))
		}
	}
	if len(failed) > 0 {
		return fmt.Sprintf("; moving back the members that had moved failed for %s: the group is split, migrate it again", strings.Join(failed, ", "))
	}
	return " (the members that had moved were moved back: the group runs on where it was)"
}
