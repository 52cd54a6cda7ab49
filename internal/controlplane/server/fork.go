package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// forksFit refuses, before anything is paused or made, n forks of src that would not all
// fit in the cluster beside what is there, a running source's own place included (it
// resumes after): each on the node holding (or about to hold) its saved state if there
// is room, else on another, which fetches it.
func (s *Server) forksFit(src state.Sandbox, n int) error {
	node := src.Node
	if src.Saved != nil {
		node = src.Saved.Node
	}
	if node == "" {
		return nil // not placed: the fork call says why below
	}
	var cfg scheduler.Config
	if cp := s.cluster.ControlPlane; cp != nil {
		cfg = cp.Scheduling()
	}
	sched, err := scheduler.New(s.store.SchedulerSnapshot(), cfg)
	if err != nil {
		return toConnectError(err)
	}
	req, err := state.SchedulerRequest(src)
	if err != nil {
		return toConnectError(err)
	}
	req.Node, req.Prefer = "", node
	for i := range n {
		req.SandboxID = fmt.Sprintf("fork-%d", i)
		p, err := sched.Place(req)
		if err != nil {
			return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("fork %s: room for %d of the %d forks in the cluster: %v",
				src.ID, i, n, hideNodes(src, err.Error())))
		}
		if err := sched.Assume(scheduler.Allocation{SandboxID: req.SandboxID, NodeID: p.NodeID, Resources: req.Resources}); err != nil {
			return toConnectError(err)
		}
	}
	return nil
}

// dropForks removes forks a fork call made before it gave up.
func (s *Server) dropForks(ctx context.Context, ids []string) {
	for _, id := range ids {
		if err := s.store.DeleteSandbox(context.WithoutCancel(ctx), id); err != nil {
			s.log.Warn("remove a fork that was not started", "sandbox", id, "err", err)
		}
	}
}

// maxForks bounds one fork call.
const maxForks = 16

// ForkSandbox makes count running copies of a sandbox from its saved state (a running one
// is paused for the save, and resumed once the forks run). Each fork is a new sandbox of
// the caller's, a new machine carrying on from the saved instant (see agent.forkSteps),
// on the node that holds the saved state if it has room (forks there share its memory),
// else on another, which fetches the saved state from it.
func (h *sandboxService) ForkSandbox(ctx context.Context, req *connect.Request[pb.ForkSandboxRequest]) (*connect.Response[pb.ForkSandboxResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	n := int(req.Msg.GetCount())
	if n == 0 {
		n = 1
	}
	if n < 1 || n > maxForks {
		return nil, toConnectError(invalid("fork count %d: want 1..%d", n, maxForks))
	}
	src, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if g := src.Spec.Group; g != nil && len(g.Members) > 1 {
		return h.forkGroup(ctx, who, src, n)
	}
	if src, err = h.s.settled(ctx, src); err != nil {
		return nil, toConnectError(err)
	}
	wasRunning := src.Status == state.StatusRunning
	if err := h.s.forksFit(src, n); err != nil {
		return nil, err
	}
	if !wasRunning && src.Status != state.StatusPaused {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s: a running or paused sandbox can be forked", src.ID, src.Status))
	}
	// The forks mount the source's volumes: the caller must be allowed them now (a share
	// taken back, or made read-only, since the source started is not carried on).
	check := src.Spec
	if err := h.s.resolveVolumes(ctx, who, &check, nil); err != nil {
		return nil, err
	}
	// The source goes on once the forks run (they restore its saved state).
	src, resume, err := h.pauseForSave(ctx, src, "fork")
	if err != nil {
		return nil, err
	}
	defer resume()
	spec := src.Spec
	spec.ForkOf, spec.ForkNode, spec.ForkAddress, spec.Snapshot, spec.SnapshotNode = src.ID, src.Saved.Node, src.Saved.Address, "", ""
	// An admin's policy on the source stays an admin's in forks only an admin makes.
	spec.PolicyAdmin = spec.PolicyAdmin && who.Admin()
	cp := h.s.cluster.ControlPlane
	var ids []string
	for range n {
		now := h.s.now()
		// The image the source ran: a saved record that names another is refused.
		fork := state.Sandbox{ID: state.NewID(), Spec: spec, Status: state.StatusPending, Owner: who.TokenID, AccessToken: newAccessToken(), ImageDigest: src.ImageDigest,
			CreatedAt: now, Events: []state.Event{{Time: now, Status: state.StatusPending, Reason: "forked from " + src.ID}}}
		// Placed in the same command: on the node that holds the saved state if it fits
		// there, else on another (the state machine checks, as for any placement).
		var sched scheduler.Config
		node := spec.ForkNode
		if cp != nil {
			node, sched = cp.Choose(fork)
		}
		if err := h.s.store.CreateAndPlace(ctx, fork, h.s.limits.quota(who.Admin()), node, sched); err != nil {
			h.s.dropForks(ctx, ids)
			return nil, toConnectError(fmt.Errorf("fork %d of %s: %w", len(ids)+1, src.ID, err))
		}
		ids = append(ids, fork.ID)
		placed, err := h.s.store.GetSandbox(ctx, fork.ID)
		if err != nil {
			h.s.dropForks(ctx, ids)
			return nil, toConnectError(err)
		}
		if placed.Node == "" {
			// One that fits nowhere now would wait while the source stays paused for it:
			// none are made.
			h.s.dropForks(ctx, ids)
			return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("fork %d of %s: the cluster has room for %d of the %d forks now",
				len(ids), src.ID, len(ids)-1, n))
		}
	}
	if cp != nil {
		cp.Notify()
	}
	resp := &pb.ForkSandboxResponse{}
	var failed []string
	for _, id := range ids {
		wctx, cancel := context.WithTimeout(ctx, pauseWait)
		sb, err := h.s.waitFor(wctx, id, true, func(sb state.Sandbox) bool {
			return sb.Status == state.StatusRunning || sb.Status.Terminal()
		})
		cancel()
		if err != nil {
			return nil, toConnectError(fmt.Errorf("fork %s of %s: %w", id, src.ID, err))
		}
		if sb.Status != state.StatusRunning {
			failed = append(failed, fmt.Sprintf("%s is %s: %s", id, sb.Status, h.s.textFor(ctx, sb, sb.Reason)))
		}
		resp.Forks = append(resp.Forks, h.s.view(ctx, sb))
	}
	if len(failed) > 0 {
		return nil, connect.NewError(connect.CodeAborted, errors.New("forks of "+src.ID+" did not start: "+strings.Join(failed, "; ")))
	}
	return connect.NewResponse(resp), nil
}

// pauseForSave returns sb paused with its saved state, pausing it first if it runs; the
// returned resume (to be called once the save has served) brings back a sandbox it
// paused, and does nothing for one that was paused already.
func (h *sandboxService) pauseForSave(ctx context.Context, sb state.Sandbox, what string) (state.Sandbox, func(), error) {
	resume := func() {}
	if sb.Status == state.StatusRunning {
		// Held from before the pause is asked until the resume: a leader's pass resumes
		// a sandbox paused for a save that no call holds (its server went down).
		release := func() {}
		if cp := h.s.cluster.ControlPlane; cp != nil {
			release = cp.Hold(sb.ID)
		}
		if _, err := h.pause(ctx, sb, what); err != nil {
			release()
			return sb, resume, connect.NewError(connect.CodeOf(err), fmt.Errorf("%s: pausing %s for the save: %s", what, sb.ID, connectMessage(err)))
		}
		resume = func() {
			defer release()
			rctx := context.WithoutCancel(ctx)
			if _, err := h.ResumeSandbox(rctx, connect.NewRequest(&pb.ResumeSandboxRequest{Sandbox: sb.ID})); err != nil {
				h.s.log.Error("resume a sandbox paused for "+what, "sandbox", sb.ID, "err", err)
			}
		}
	}
	got, err := h.s.store.GetSandbox(ctx, sb.ID)
	if err != nil {
		resume()
		return sb, func() {}, toConnectError(err)
	}
	if got.Status != state.StatusPaused || got.Saved == nil {
		resume()
		return got, func() {}, connect.NewError(connect.CodeAborted, fmt.Errorf("sandbox %s is %s, without a saved state to keep", got.ID, got.Status))
	}
	return got, resume, nil
}

// connectMessage is err's message without the code a connect error prints before it.
func connectMessage(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Message()
	}
	return err.Error()
}

// forkGroup makes n copies of src's whole sandbox group from its members' saved states
// (the running ones paused for the saves, at one moment, and resumed once the copies
// run): each copy is a new group of the caller's, every member carrying on from the
// saved instant, placed as one on one node. It answers with the copies' mains.
func (h *sandboxService) forkGroup(ctx context.Context, who auth.Identity, src state.Sandbox, n int) (*connect.Response[pb.ForkSandboxResponse], error) {
	members, err := h.s.groupOf(ctx, src)
	if err != nil {
		return nil, err
	}
	main := members[0]
	var live []state.Sandbox
	for _, m := range members {
		if m, err = h.s.settled(ctx, m); err != nil {
			return nil, toConnectError(err)
		}
		switch {
		case m.Status.Terminal() && m.ID != main.ID:
			continue // a sidecar that ended: the copies have none
		case m.Status != state.StatusRunning && m.Status != state.StatusPaused:
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s (%q of the group of %s) is %s: a group is forked while all of it runs or is paused",
				m.ID, main.Spec.Group.MemberName(m.ID), main.ID, m.Status))
		}
		if err := h.s.forksFit(m, n); err != nil {
			return nil, err
		}
		check := m.Spec
		if err := h.s.resolveVolumes(ctx, who, &check, nil); err != nil {
			return nil, err
		}
		live = append(live, m)
	}
	var resumes []func()
	defer func() {
		for _, r := range resumes {
			r()
		}
	}()
	for i, m := range live {
		got, resume, err := h.pauseForSave(ctx, m, "fork")
		if err != nil {
			return nil, err
		}
		live[i] = got
		resumes = append(resumes, resume)
	}
	for _, m := range live[1:] {
		if m.Saved.Node != live[0].Saved.Node {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the group of %s has its saved states on two nodes (%s, %s)", main.ID, live[0].Saved.Node, m.Saved.Node))
		}
	}
	cp := h.s.cluster.ControlPlane
	var mains, all []string
	for range n {
		now := h.s.now()
		g := &state.Group{}
		var copies []state.Sandbox
		for _, m := range live {
			spec := m.Spec
			spec.ForkOf, spec.ForkNode, spec.ForkAddress, spec.Snapshot, spec.SnapshotNode = m.ID, m.Saved.Node, m.Saved.Address, "", ""
			spec.PolicyAdmin = spec.PolicyAdmin && who.Admin()
			c := state.Sandbox{ID: state.NewID(), Spec: spec, Status: state.StatusPending, Owner: who.TokenID, AccessToken: newAccessToken(), ImageDigest: m.ImageDigest,
				CreatedAt: now, Events: []state.Event{{Time: now, Status: state.StatusPending, Reason: "forked from " + m.ID}}}
			if len(copies) == 0 {
				g.Main = c.ID
			}
			g.Members = append(g.Members, state.GroupMember{Name: main.Spec.Group.MemberName(m.ID), ID: c.ID, Reserved: spec.Reserved(), Ready: spec.Ready})
			copies = append(copies, c)
		}
		for i := range copies {
			copies[i].Spec.Group = g
		}
		var sched scheduler.Config
		node := copies[0].Spec.ForkNode
		if cp != nil {
			node, sched = cp.Choose(copies[0])
		}
		if err := h.s.store.CreateGroup(ctx, copies, h.s.limits.quota(who.Admin()), node, sched); err != nil {
			h.s.dropForks(ctx, all)
			return nil, toConnectError(fmt.Errorf("fork %d of the group of %s: %w", len(mains)+1, main.ID, err))
		}
		for _, c := range copies {
			all = append(all, c.ID)
		}
		mains = append(mains, copies[0].ID)
		placed, err := h.s.store.GetSandbox(ctx, copies[0].ID)
		if err != nil {
			h.s.dropForks(ctx, all)
			return nil, toConnectError(err)
		}
		if placed.Node == "" {
			h.s.dropForks(ctx, all)
			return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("fork %d of the group of %s: the cluster has room for %d of the %d copies of the group now",
				len(mains), main.ID, len(mains)-1, n))
		}
	}
	if cp != nil {
		cp.Notify()
	}
	resp := &pb.ForkSandboxResponse{}
	var failed []string
	for _, id := range all {
		wctx, cancel := context.WithTimeout(ctx, pauseWait)
		sb, err := h.s.waitFor(wctx, id, true, func(sb state.Sandbox) bool {
			return sb.Status == state.StatusRunning || sb.Status.Terminal()
		})
		cancel()
		if err != nil {
			return nil, toConnectError(fmt.Errorf("fork %s of the group of %s: %w", id, main.ID, err))
		}
		if sb.Status != state.StatusRunning {
			failed = append(failed, fmt.Sprintf("%s is %s: %s", id, sb.Status, h.s.textFor(ctx, sb, sb.Reason)))
		}
		if slices.Contains(mains, id) {
			resp.Forks = append(resp.Forks, h.s.view(ctx, sb))
		}
	}
	if len(failed) > 0 {
		return nil, connect.NewError(connect.CodeAborted, errors.New("copies of the group of "+main.ID+" did not start: "+strings.Join(failed, "; ")))
	}
	return connect.NewResponse(resp), nil
}
