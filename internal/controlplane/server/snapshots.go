package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// snapshotCallTimeout bounds the node's copy of a sandbox's filesystem (sparse, but a
// large scratch disk takes a while).
const snapshotCallTimeout = 5 * time.Minute

// CreateSnapshot has the sandbox's node copy its filesystem (frozen for the copy), then
// records the snapshot under the caller's token. Names are the token's own namespace.
func (h *sandboxService) CreateSnapshot(ctx context.Context, req *connect.Request[pb.CreateSnapshotRequest]) (*connect.Response[pb.CreateSnapshotResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	name := req.Msg.GetName()
	if name == "" {
		return nil, toConnectError(invalid("a snapshot needs a name"))
	}
	if err := validName(name); err != nil {
		return nil, toConnectError(err) // "name …: use letters, digits and inner hyphens"
	}
	memory := req.Msg.GetMemory()
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if g := sb.Spec.Group; g != nil && len(g.Members) > 1 {
		return h.snapshotGroup(ctx, who, sb, name, memory)
	}
	var need int64
	if memory {
		need = int64(sb.Spec.Reserved().MemoryMiB) << 20
	}
	release, err := h.s.savedRoom(ctx, who, need)
	if err != nil {
		return nil, err
	}
	defer release()
	if sb, err = h.s.settled(ctx, sb); err != nil {
		return nil, toConnectError(err)
	}
	switch {
	case memory && sb.Status == state.StatusPaused && sb.Saved != nil:
	case sb.Status != state.StatusRunning || sb.Node == "":
		what := "a running sandbox"
		switch {
		case memory:
			what = "a running or paused sandbox"
		case sb.Status == state.StatusPaused:
			what = "a running sandbox (of a paused one, --memory keeps all of it; or resume it first)"
		}
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s: a snapshot is taken of %s", sb.ID, sb.Status, what))
	}
	if _, err := h.s.store.GetSnapshot(ctx, name, who.TokenID, false); err == nil {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("snapshot %q exists already", name))
	}
	max := state.MaxSnapshotsPerOwner
	if who.Admin() {
		max = 0
	}
	if max > 0 {
		// Before the copy, so that a token at its bound costs no node a disk copy (the
		// state machine checks again when it records it).
		all, err := h.s.store.ListSnapshots(ctx)
		if err != nil {
			return nil, toConnectError(err)
		}
		n := 0
		for _, s := range all {
			if s.Owner == who.TokenID {
				n++
			}
		}
		if n >= max {
			return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("the token holds %d snapshots, at most %d", n, max))
		}
	}
	if memory {
		// The saved VM is what a snapshot with memory keeps: a running sandbox pauses
		// for the save and goes on after the copy.
		var resume func()
		if sb, resume, err = h.pauseForSave(ctx, sb, "snapshot "+name); err != nil {
			return nil, err
		}
		defer resume()
	}
	snap, err := h.takeSnapshot(ctx, sb, state.Snapshot{ID: state.NewID(), Name: name, Owner: who.TokenID}, memory, max)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.CreateSnapshotResponse{Snapshot: snapshotView(who, snap)}), nil
}

// takeSnapshot has sb's node copy its files (with memory: its saved state, sb paused)
// into snapshot rec (its ID, name, owner, and group parts set) and records it within the
// owner's bound max. What the node kept goes again if it cannot be recorded.
func (h *sandboxService) takeSnapshot(ctx context.Context, sb state.Sandbox, rec state.Snapshot, memory bool, max int) (state.Snapshot, error) {
	var c *nodeConn
	var err error
	if memory {
		c, err = h.s.node(ctx, sb.Saved.Node)
	} else {
		c, err = h.s.nodeFor(ctx, sb)
	}
	if err != nil {
		return rec, toConnectError(err)
	}
	id := rec.ID
	cctx, cancel := context.WithTimeout(ctx, snapshotCallTimeout)
	defer cancel()
	r, err := c.sandboxes.CreateSnapshot(cctx, connect.NewRequest(&pb.CreateSnapshotRequest{Sandbox: sb.ID, SnapshotId: id, Memory: memory}))
	if err != nil {
		// Whatever the node managed to keep goes (best effort).
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), nodeCallTimeout)
		_, _ = c.sandboxes.DeleteSnapshot(dctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: id}))
		dcancel()
		return rec, h.s.userError(ctx, sb, nodeError(c, "snapshot sandbox "+sb.ID, err))
	}
	rec.Node, rec.Sandbox, rec.Image, rec.ImageDigest, rec.Bytes, rec.CreatedAt = c.name, sb.ID, sb.Spec.Image,
		r.Msg.GetSnapshot().GetImageDigest(), r.Msg.GetSnapshot().GetBytes(), h.s.now()
	if memory {
		spec := sb.Spec
		spec.Snapshot, spec.SnapshotNode, spec.ForkOf, spec.ForkNode, spec.ForkAddress = "", "", "", "", ""
		spec.VCPUs, spec.MemoryMiB = spec.Reserved().VCPUs, spec.Reserved().MemoryMiB
		spec.Group, spec.Ready = nil, "" // a start from it makes a group of its own
		rec.MemorySpec = &spec
	}
	snap, err := h.s.store.PutSnapshot(ctx, rec, max)
	if err != nil {
		// Not recorded: its files go (best effort; a node keeps no file the state does
		// not know for long, see DeleteSnapshot).
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), nodeCallTimeout)
		_, _ = c.sandboxes.DeleteSnapshot(dctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: id}))
		dcancel()
		return rec, toConnectError(err)
	}
	return snap, nil
}

// snapshotGroup snapshots sb's whole sandbox group under name: a snapshot of each
// member's (its sidecars' first, as parts named "<name>/<sidecar>"), then the main's,
// which lists them. With memory, the whole group is paused for the saves (the main
// first) and resumed after the copies, so that the members' saved states are of one
// moment. A sidecar that has ended is left out. If any part fails, the parts taken go.
func (h *sandboxService) snapshotGroup(ctx context.Context, who auth.Identity, sb state.Sandbox, name string, memory bool) (*connect.Response[pb.CreateSnapshotResponse], error) {
	members, err := h.s.groupOf(ctx, sb)
	if err != nil {
		return nil, err
	}
	main := members[0]
	if main.ID != main.Spec.Group.Main || main.Status.Terminal() {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the group of sandbox %s has ended: snapshot its members one by one", sb.ID))
	}
	if _, err := h.s.store.GetSnapshot(ctx, name, who.TokenID, false); err == nil {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("snapshot %q exists already", name))
	}
	var live []state.Sandbox
	var need int64
	for _, m := range members {
		if m, err = h.s.settled(ctx, m); err != nil {
			return nil, toConnectError(err)
		}
		switch {
		case m.Status.Terminal() && m.ID != main.ID:
			continue
		case memory && m.Status == state.StatusPaused && m.Saved != nil:
		case m.Status != state.StatusRunning || m.Node == "":
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s (%q of the group of %s) is %s: a group's snapshot is taken while all of it runs",
				m.ID, main.Spec.Group.MemberName(m.ID), main.ID, m.Status))
		}
		if memory {
			need += int64(m.Spec.Reserved().MemoryMiB) << 20
		}
		live = append(live, m)
	}
	release, err := h.s.savedRoom(ctx, who, need)
	if err != nil {
		return nil, err
	}
	defer release()
	max := state.MaxSnapshotsPerOwner
	if who.Admin() {
		max = 0
	}
	if memory {
		var resumes []func()
		defer func() {
			for _, r := range resumes {
				r()
			}
		}()
		for i, m := range live {
			got, resume, err := h.pauseForSave(ctx, m, "snapshot "+name)
			if err != nil {
				return nil, err
			}
			live[i] = got
			resumes = append(resumes, resume)
		}
	}
	groupID := state.NewID()
	var parts []state.Snapshot
	undo := func() {
		dctx := context.WithoutCancel(ctx)
		for _, p := range parts {
			if err := h.dropSnapshot(dctx, p); err != nil {
				h.s.log.Warn("remove a part of a group snapshot that failed", "snapshot", p.Name, "err", err)
			}
		}
	}
	var memberRecs []state.SnapshotMember
	for _, m := range live[1:] {
		mname := main.Spec.Group.MemberName(m.ID)
		p, err := h.takeSnapshot(ctx, m, state.Snapshot{ID: state.NewID(), Name: name + "/" + mname, Owner: who.TokenID, PartOf: groupID}, memory, max)
		if err != nil {
			undo()
			return nil, fmt.Errorf("snapshot sidecar %q of the group: %w", mname, err)
		}
		parts = append(parts, p)
		rec := state.SnapshotMember{Name: mname, Snapshot: p.ID, Ready: m.Spec.Ready, Restart: m.Spec.Restart}
		if !memory {
			spec := m.Spec
			spec.Snapshot, spec.SnapshotNode, spec.ForkOf, spec.ForkNode, spec.ForkAddress, spec.Group, spec.Ready = "", "", "", "", "", nil, ""
			rec.Spec = &spec
		}
		memberRecs = append(memberRecs, rec)
	}
	snap, err := h.takeSnapshot(ctx, live[0], state.Snapshot{ID: groupID, Name: name, Owner: who.TokenID, Members: memberRecs}, memory, max)
	if err != nil {
		undo()
		return nil, err
	}
	v := snapshotView(who, snap)
	for _, p := range parts {
		v.Bytes += p.Bytes // the whole group's
	}
	return connect.NewResponse(&pb.CreateSnapshotResponse{Snapshot: v}), nil
}

// dropSnapshot removes snapshot snap: its node's files, then its record.
func (h *sandboxService) dropSnapshot(ctx context.Context, snap state.Snapshot) error {
	if snap.Lost == "" {
		c, err := h.s.node(ctx, snap.Node)
		if err != nil {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("remove snapshot %s on node %s: %w", snap.Name, snap.Node, err))
		}
		dctx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
		_, err = c.sandboxes.DeleteSnapshot(dctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: snap.ID}))
		cancel()
		if err != nil {
			return nodeError(c, "remove snapshot "+snap.Name, err)
		}
	}
	if err := h.s.store.DeleteSnapshot(ctx, snap.ID); err != nil {
		return toConnectError(err)
	}
	return nil
}

// ListSnapshots lists the caller's snapshots (an admin's: every token's).
func (h *sandboxService) ListSnapshots(ctx context.Context, req *connect.Request[pb.ListSnapshotsRequest]) (*connect.Response[pb.ListSnapshotsResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	all, err := h.s.store.ListSnapshots(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListSnapshotsResponse{}
	parts := map[string]int64{} // a group snapshot's parts' bytes, by its ID
	for _, s := range all {
		if s.PartOf != "" {
			parts[s.PartOf] += s.Bytes
		}
	}
	for _, s := range all {
		if who.CanAccess(s.Owner) && s.PartOf == "" && (!req.Msg.GetMine() || s.Owner == who.TokenID) {
			v := snapshotView(who, s)
			v.Bytes += parts[s.ID] // the whole group's
			resp.Snapshots = append(resp.Snapshots, v)
		}
	}
	return connect.NewResponse(resp), nil
}

// DeleteSnapshot removes a snapshot: its node's files, then the record.
func (h *sandboxService) DeleteSnapshot(ctx context.Context, req *connect.Request[pb.DeleteSnapshotRequest]) (*connect.Response[pb.DeleteSnapshotResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	snap, err := h.s.store.GetSnapshot(ctx, req.Msg.GetSnapshot(), who.TokenID, who.Admin())
	if err != nil {
		return nil, toConnectError(err)
	}
	if snap.PartOf != "" {
		group, _, _ := strings.Cut(snap.Name, "/")
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("snapshot %s is a part of the sandbox group's snapshot %s: remove that one (its parts go with it)", snap.Name, group))
	}
	// A sandbox whose start (or restart) reads it keeps it; one that runs from it
	// already does not need it.
	ids := append([]string{snap.ID}, snap.Parts()...)
	for _, sb := range h.s.store.LocalSandboxesWhere(func(sb *state.Sandbox) bool { return sb.Spec.Snapshot != "" }) {
		if !slices.Contains(ids, sb.Spec.Snapshot) || sb.Status.Terminal() {
			continue
		}
		if sb.Status == state.StatusPending || sb.Status == state.StatusStarting || sb.Spec.Restart != "" && sb.Spec.Restart != state.RestartNever {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("snapshot %s is needed by sandbox %s, which starts from it (still starting, or again at each --restart): remove that sandbox first", snap.Name, sb.ID))
		}
	}
	// A group's parts first: the group's record names them until it goes.
	for _, pid := range snap.Parts() {
		p, err := h.s.store.GetSnapshot(ctx, pid, "", true)
		if errors.Is(err, state.ErrNotFound) {
			continue
		}
		if err == nil {
			err = h.dropSnapshot(ctx, p)
		}
		if err != nil {
			return nil, err
		}
	}
	if err := h.dropSnapshot(ctx, snap); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.DeleteSnapshotResponse{}), nil
}

// resolveSnapshot fills in a create's spec from the snapshot it names: the image it was
// taken of (a different one given is refused), its node, its ID.
func (s *Server) resolveSnapshot(ctx context.Context, spec *state.SandboxSpec, ref string) error {
	who, err := caller(ctx)
	if err != nil {
		return err
	}
	snap, err := s.store.GetSnapshot(ctx, ref, who.TokenID, who.Admin())
	if err != nil {
		return toConnectError(err)
	}
	if snap.Lost != "" {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("snapshot %s is lost: %s", snap.Name, snapshotView(who, snap).GetLost()))
	}
	if spec.Image != "" && spec.Image != snap.Image && spec.Image != snap.ImageDigest {
		return toConnectError(invalid("snapshot %s is of image %s, not %s (leave the image out)", snap.Name, snap.Image, spec.Image))
	}
	if snap.MemorySpec != nil {
		if err := withMemorySpec(spec, snap); err != nil {
			return toConnectError(err)
		}
	}
	spec.Image, spec.Snapshot, spec.SnapshotNode = snap.Image, snap.ID, snap.Node
	return nil
}

// withMemorySpec makes spec a start from snapshot snap, which has memory: the processes
// of the sandbox it was taken of carry on, so what they are (command, environment, user,
// terminal) and the VM they run in (shape, network device) are that sandbox's. What is
// the new sandbox's own (its policy, ports, lifetime, restart policy, placement) may be
// given.
func withMemorySpec(spec *state.SandboxSpec, snap state.Snapshot) error {
	src := *snap.MemorySpec
	// A keep-alive sandbox's main process is init's idle program: an environment, user or
	// working directory given is for the commands run in the new sandbox (E2B's envVars
	// on a create from a template, a built template's USER and WORKDIR), which nothing
	// running depends on.
	defaults := src.KeepAlive
	if len(spec.Entrypoint)+len(spec.Cmd) > 0 || !defaults && (len(spec.Env) > 0 || spec.WorkingDir != "" || spec.User != "") || spec.TTY || spec.Stdin {
		return invalid("snapshot %s has memory: its processes carry on as they were (give no command, -e, -w, -u, -t or -i)", snap.Name)
	}
	if (spec.VCPUs != 0 && spec.VCPUs != src.VCPUs) || (spec.MemoryMiB != 0 && spec.MemoryMiB != src.MemoryMiB) {
		return invalid("snapshot %s has memory: its sandboxes have %d vCPUs and %d MiB, as it was taken", snap.Name, src.VCPUs, src.MemoryMiB)
	}
	if spec.DiskMiB != 0 && spec.DiskMiB != src.DiskMiB {
		return invalid("snapshot %s has memory: its sandboxes have its scratch disk", snap.Name)
	}
	if spec.Network != "" && spec.Network != src.Network {
		return invalid("snapshot %s has memory: its sandboxes have its network (%q)", snap.Name, cmp.Or(src.Network, "nat"))
	}
	own := *spec
	*spec = src
	// Its group (if it was a member of one) is not the new sandbox's: a group's
	// snapshot makes a group of its own (CreateSandbox).
	spec.Group, spec.Ready = nil, ""
	spec.Timeout, spec.Restart, spec.Constraints, spec.Spread, spec.Boot = own.Timeout, own.Restart, own.Constraints, own.Spread, own.Boot
	// Its lifetime, labels and template name are the new sandbox's, not its source's.
	spec.Lifetime, spec.OnEnd, spec.Metadata, spec.Template = own.Lifetime, own.OnEnd, own.Metadata, own.Template
	spec.Env = append(slices.Clone(src.Env), own.Env...)
	spec.User, spec.WorkingDir = cmp.Or(own.User, src.User), cmp.Or(own.WorkingDir, src.WorkingDir)
	if own.Policy != "" {
		spec.Policy = own.Policy
	}
	if len(own.Ports) > 0 {
		spec.Ports = own.Ports
	}
	if own.Policy != "" {
		spec.PolicyAdmin = false // the caller's: set from the caller, as for any create
	}
	return nil
}

func snapshotView(who auth.Identity, s state.Snapshot) *pb.Snapshot {
	out := &pb.Snapshot{Id: s.ID, Name: s.Name, Owner: s.Owner, Sandbox: s.Sandbox, Image: s.Image, ImageDigest: s.ImageDigest,
		Bytes: s.Bytes, CreatedAt: ts(s.CreatedAt), Lost: s.Lost, Memory: s.MemorySpec != nil}
	if m := s.MemorySpec; m != nil {
		out.Vcpus, out.MemoryMib = int32(m.VCPUs), int32(m.MemoryMiB)
	}
	for _, m := range s.Members {
		out.Sidecars = append(out.Sidecars, m.Name)
	}
	if who.Admin() {
		out.Node = s.Node
	} else {
		out.Lost = strings.ReplaceAll(out.Lost, "node "+s.Node, "its node")
	}
	return out
}

// savedRoom refuses a call that would keep more saved state (a pause, a fork of a
// running sandbox, a snapshot) for a user token whose snapshots, paused sandboxes and
// saves under way take its bound already (--max-saved-per-token); otherwise it holds
// need (the save's likely size: it is known only after) for the token until release is
// called, so that concurrent calls see each other. A token may pass its bound by one save.
func (s *Server) savedRoom(ctx context.Context, who auth.Identity, need int64) (release func(), err error) {
	max := int64(s.limits.SavedMiBPerOwner) << 20
	if who.Admin() || max <= 0 {
		return func() {}, nil
	}
	var used int64
	for _, sb := range s.store.LocalSandboxesWhere(func(sb *state.Sandbox) bool { return sb.Saved != nil }) {
		if sb.Owner == who.TokenID {
			used += sb.Saved.Bytes
		}
	}
	snaps, err := s.store.ListSnapshots(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	for _, sn := range snaps {
		if sn.Owner == who.TokenID && sn.Lost == "" {
			used += sn.Bytes
		}
	}
	s.savedMu.Lock()
	defer s.savedMu.Unlock()
	held := s.savedHeld[who.TokenID]
	if used+held >= max {
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("the token's snapshots and paused sandboxes take %d MiB (%d MiB more being saved), its bound is %d MiB (--max-saved-per-token): remove snapshots, or resume or remove paused sandboxes",
			used>>20, held>>20, max>>20))
	}
	if s.savedHeld == nil {
		s.savedHeld = map[string]int64{}
	}
	s.savedHeld[who.TokenID] += need
	var once sync.Once
	return func() {
		once.Do(func() {
			s.savedMu.Lock()
			defer s.savedMu.Unlock()
			if s.savedHeld[who.TokenID] -= need; s.savedHeld[who.TokenID] <= 0 {
				delete(s.savedHeld, who.TokenID)
			}
		})
	}, nil
}
