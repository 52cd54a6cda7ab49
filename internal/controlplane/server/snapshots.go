package server

import (
	"context"
	"errors"
	"fmt"
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
		return nil, toConnectError(invalid("snapshot %v", err))
	}
	if req.Msg.GetMemory() {
		return nil, connect.NewError(connect.CodeUnimplemented, errors.New("snapshots with memory are not there yet: `fireworks pause` keeps a sandbox's memory; a snapshot keeps its files"))
	}
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if sb.Status != state.StatusRunning || sb.Node == "" {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s: a snapshot is taken of a running sandbox", sb.ID, sb.Status))
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
	c, err := h.s.nodeFor(ctx, sb)
	if err != nil {
		return nil, toConnectError(err)
	}
	id := state.NewID()
	cctx, cancel := context.WithTimeout(ctx, snapshotCallTimeout)
	defer cancel()
	r, err := c.sandboxes.CreateSnapshot(cctx, connect.NewRequest(&pb.CreateSnapshotRequest{Sandbox: sb.ID, SnapshotId: id}))
	if err != nil {
		// Whatever the node managed to keep goes (best effort).
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), nodeCallTimeout)
		_, _ = c.sandboxes.DeleteSnapshot(dctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: id}))
		dcancel()
		return nil, nodeError(c, "snapshot sandbox "+sb.ID, err)
	}
	snap, err := h.s.store.PutSnapshot(ctx, state.Snapshot{ID: id, Name: name, Owner: who.TokenID, Node: sb.Node, Sandbox: sb.ID,
		Image: sb.Spec.Image, ImageDigest: r.Msg.GetSnapshot().GetImageDigest(), Bytes: r.Msg.GetSnapshot().GetBytes(), CreatedAt: h.s.now()}, max)
	if err != nil {
		// Not recorded: its files go (best effort; a node keeps no file the state does
		// not know for long, see DeleteSnapshot).
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), nodeCallTimeout)
		_, _ = c.sandboxes.DeleteSnapshot(dctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: id}))
		dcancel()
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.CreateSnapshotResponse{Snapshot: snapshotView(who, snap)}), nil
}

// ListSnapshots lists the caller's snapshots (an admin's: every token's).
func (h *sandboxService) ListSnapshots(ctx context.Context, _ *connect.Request[pb.ListSnapshotsRequest]) (*connect.Response[pb.ListSnapshotsResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	all, err := h.s.store.ListSnapshots(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListSnapshotsResponse{}
	for _, s := range all {
		if who.CanAccess(s.Owner) {
			resp.Snapshots = append(resp.Snapshots, snapshotView(who, s))
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
	if snap.Lost == "" {
		c, err := h.s.node(ctx, snap.Node)
		if err != nil {
			return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("remove snapshot %s on node %s: %w", snap.Name, snap.Node, err))
		}
		dctx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
		_, err = c.sandboxes.DeleteSnapshot(dctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: snap.ID}))
		cancel()
		if err != nil {
			return nil, nodeError(c, "remove snapshot "+snap.Name, err)
		}
	}
	if err := h.s.store.DeleteSnapshot(ctx, snap.ID); err != nil {
		return nil, toConnectError(err)
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
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("snapshot %s is lost: %s", snap.Name, snap.Lost))
	}
	if spec.Image != "" && spec.Image != snap.Image && spec.Image != snap.ImageDigest {
		return toConnectError(invalid("snapshot %s is of image %s, not %s (leave the image out)", snap.Name, snap.Image, spec.Image))
	}
	spec.Image, spec.Snapshot, spec.SnapshotNode = snap.Image, snap.ID, snap.Node
	return nil
}

func snapshotView(who auth.Identity, s state.Snapshot) *pb.Snapshot {
	out := &pb.Snapshot{Id: s.ID, Name: s.Name, Owner: s.Owner, Sandbox: s.Sandbox, Image: s.Image, ImageDigest: s.ImageDigest,
		Bytes: s.Bytes, CreatedAt: ts(s.CreatedAt), Lost: s.Lost}
	if who.Admin() {
		out.Node = s.Node
	}
	return out
}
