package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Volume sizes, MiB (the node's store checks the same bounds).
const (
	defaultVolumeMiB = 10 << 10
	minVolumeMiB     = 16
	maxVolumeMiB     = 1 << 20
)

type volumeService struct{ s *Server }

// CreateVolume has a node make the volume's filesystem, then records it under the
// caller's token. Names are the token's own namespace.
func (h *volumeService) CreateVolume(ctx context.Context, req *connect.Request[pb.CreateVolumeRequest]) (*connect.Response[pb.CreateVolumeResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	name := req.Msg.GetName()
	if name == "" {
		return nil, toConnectError(invalid("a volume needs a name"))
	}
	if err := validName(name); err != nil {
		return nil, toConnectError(err)
	}
	size := cmp.Or(req.Msg.GetSizeMib(), defaultVolumeMiB)
	if size < minVolumeMiB || size > maxVolumeMiB {
		return nil, toConnectError(invalid("volume size %d MiB: want %d MiB to %d MiB (1 TiB)", size, minVolumeMiB, maxVolumeMiB))
	}
	if req.Msg.GetVolumeId() != "" {
		return nil, toConnectError(invalid("volume_id is chosen by the server"))
	}
	if req.Msg.GetNode() != "" && !who.Admin() {
		return nil, connect.NewError(connect.CodePermissionDenied, errors.New("choosing a volume's node needs an admin token"))
	}
	if _, err := h.s.store.GetVolume(ctx, name, who.TokenID, false); err == nil {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("volume %q exists already", name))
	}
	max := state.MaxVolumesPerOwner
	if who.Admin() {
		max = 0
	}
	node, err := h.s.volumeNode(ctx, req.Msg.GetNode(), "")
	if err != nil {
		return nil, err
	}
	c, err := h.s.node(ctx, node)
	if err != nil {
		return nil, toConnectError(err)
	}
	id := state.NewID()
	cctx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
	defer cancel()
	if _, err := c.volumes.CreateVolume(cctx, connect.NewRequest(&pb.CreateVolumeRequest{VolumeId: id, SizeMib: size})); err != nil {
		return nil, nodeError(c, "create volume "+name, err)
	}
	v, err := h.s.store.PutVolume(ctx, state.Volume{ID: id, Name: name, Owner: who.TokenID, Node: node, SizeMiB: int(size), CreatedAt: h.s.now()}, max)
	if err != nil {
		// Not recorded: its filesystem goes (best effort).
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), nodeCallTimeout)
		_, _ = c.volumes.DeleteVolume(dctx, connect.NewRequest(&pb.DeleteVolumeRequest{Volume: id}))
		dcancel()
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.CreateVolumeResponse{Volume: volumeView(who, v, nil)}), nil
}

// volumeNode is where a volume goes: the node an admin named, else the ready,
// uncordoned, undrained node other than but holding the fewest volumes (a new volume's
// data stays there, and sandboxes that mount it prefer it).
func (s *Server) volumeNode(ctx context.Context, named, but string) (string, error) {
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return "", toConnectError(err)
	}
	if named != "" {
		for _, n := range nodes {
			if n.ID == named {
				return n.ID, nil
			}
		}
		return "", connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q: %w", named, state.ErrNotFound))
	}
	vols, _, err := s.store.ListVolumes(ctx)
	if err != nil {
		return "", toConnectError(err)
	}
	if n := state.VolumeTarget(nodes, vols, but); n != "" {
		return n, nil
	}
	if but != "" {
		return "", connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("no other ready node to move the volume to (from %s)", but))
	}
	return "", connect.NewError(connect.CodeUnavailable, errors.New("no ready node to keep the volume on"))
}

// ListVolumes lists the caller's volumes (an admin's: every token's).
func (h *volumeService) ListVolumes(ctx context.Context, _ *connect.Request[pb.ListVolumesRequest]) (*connect.Response[pb.ListVolumesResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	all, users, err := h.s.store.ListVolumes(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListVolumesResponse{}
	for _, v := range all {
		if _, shared := v.ShareOf(who.TokenID); who.CanAccess(v.Owner) || shared {
			resp.Volumes = append(resp.Volumes, volumeView(who, v, users[v.ID]))
		}
	}
	return connect.NewResponse(resp), nil
}

// GetVolume shows one volume, with the space it uses now (asked of its node, best
// effort).
func (h *volumeService) GetVolume(ctx context.Context, req *connect.Request[pb.GetVolumeRequest]) (*connect.Response[pb.GetVolumeResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	v, err := h.s.store.GetVolume(ctx, req.Msg.GetVolume(), who.TokenID, who.Admin())
	if err != nil {
		return nil, toConnectError(err)
	}
	users, err := h.s.volumeUsers(ctx, v.ID)
	if err != nil {
		return nil, err
	}
	out := volumeView(who, v, users)
	if v.Lost == "" && v.Move == nil { // a moving volume is not mounted to be measured
		if c, err := h.s.node(ctx, v.Node); err == nil {
			nctx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
			if r, err := c.volumes.GetVolume(nctx, connect.NewRequest(&pb.GetVolumeRequest{Volume: v.ID})); err == nil {
				out.UsedBytes = r.Msg.GetVolume().GetUsedBytes()
			}
			cancel()
		}
	}
	return connect.NewResponse(&pb.GetVolumeResponse{Volume: out}), nil
}

// DeleteVolume removes a volume: the record (refused while a sandbox that is not over
// mounts it, checked by the state machine so that no start slips in), then its data.
func (h *volumeService) DeleteVolume(ctx context.Context, req *connect.Request[pb.DeleteVolumeRequest]) (*connect.Response[pb.DeleteVolumeResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	v, err := h.s.store.GetVolume(ctx, req.Msg.GetVolume(), who.TokenID, who.Admin())
	if err != nil {
		return nil, toConnectError(err)
	}
	if !who.CanAccess(v.Owner) {
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("volume %s is shared with this token, not its own: only its owner or an admin removes it", v.Name))
	}
	if err := h.s.store.DeleteVolume(ctx, v.ID); err != nil {
		if errors.Is(err, state.ErrInUse) {
			return nil, connect.NewError(connect.CodeFailedPrecondition, err)
		}
		return nil, toConnectError(err)
	}
	if v.Lost != "" {
		return connect.NewResponse(&pb.DeleteVolumeResponse{}), nil
	}
	c, err := h.s.node(ctx, v.Node)
	if err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("volume %s is forgotten, but its data on its node stays until the node is back: %w", v.Name, err))
	}
	dctx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
	defer cancel()
	if _, err := c.volumes.DeleteVolume(dctx, connect.NewRequest(&pb.DeleteVolumeRequest{Volume: v.ID})); err != nil {
		return nil, nodeError(c, "remove the data of volume "+v.Name, err)
	}
	return connect.NewResponse(&pb.DeleteVolumeResponse{}), nil
}

// ShareVolume lets another token mount a volume, or stops it (admins only: who shares
// what across tokens is the operator's to decide).
func (h *volumeService) ShareVolume(ctx context.Context, req *connect.Request[pb.ShareVolumeRequest]) (*connect.Response[pb.ShareVolumeResponse], error) {
	who, err := requireAdmin(ctx, "sharing a volume")
	if err != nil {
		return nil, err
	}
	v, err := h.s.store.GetVolume(ctx, req.Msg.GetVolume(), who.TokenID, true)
	if err != nil {
		return nil, toConnectError(err)
	}
	token := req.Msg.GetToken()
	if !req.Msg.GetUnshare() {
		if _, err := h.s.store.GetToken(ctx, token); err != nil {
			return nil, toConnectError(err) // names the token
		}
	}
	v, err = h.s.store.ShareVolume(ctx, v.ID, state.VolumeShare{Token: token, ReadOnly: req.Msg.GetReadOnly()}, req.Msg.GetUnshare())
	if err != nil {
		return nil, toConnectError(err)
	}
	users, err := h.s.volumeUsers(ctx, v.ID)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.ShareVolumeResponse{Volume: volumeView(who, v, users)}), nil
}

// resolveVolumes fills in a create's mounts from the volumes they name (the caller's
// own; an admin's call may name any token's) and their node, which the scheduler
// prefers for the sandbox.
// Mounts already by ID (a snapshot with memory carries its sandbox's) are checked the
// same way: the caller must be allowed each volume.
func (s *Server) resolveVolumes(ctx context.Context, who auth.Identity, spec *state.SandboxSpec, given []*pb.VolumeMount) error {
	if len(given) > 0 {
		if len(spec.Volumes) > 0 {
			return toConnectError(invalid("the snapshot has memory: its sandboxes mount the volumes it had (give no -v)"))
		}
		for _, m := range given {
			spec.Volumes = append(spec.Volumes, state.VolumeMount{Volume: m.GetVolume(), Path: m.GetPath(), ReadOnly: m.GetReadOnly()})
		}
	}
	spec.VolumeNode, spec.VolumeAddress = "", ""
	if len(spec.Volumes) == 0 {
		return nil
	}
	if err := spec.CheckSizes(); err != nil {
		return toConnectError(err)
	}
	seen, seenVol := map[string]bool{}, map[string]bool{}
	for i, m := range spec.Volumes {
		v, err := s.store.GetVolume(ctx, m.Volume, who.TokenID, who.Admin())
		if err != nil {
			return toConnectError(err)
		}
		share, shared := v.ShareOf(who.TokenID)
		shared = shared && !who.CanAccess(v.Owner)
		switch {
		case shared && share.ReadOnly && !m.ReadOnly:
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("volume %s is shared with this token read-only: mount it with :ro", v.Name))
		case v.Lost != "":
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("volume %s is lost: %s", v.Name, volumeView(who, v, nil).GetLost()))
		case spec.VolumeNode != "" && v.Node != spec.VolumeNode:
			return toConnectError(invalid("volumes %s and %s are on different nodes: a sandbox mounts volumes of one node", v.Name, spec.Volumes[0].Volume))
		case seen[m.Path]:
			return toConnectError(invalid("two volumes are mounted at %s", m.Path))
		case seenVol[v.ID]:
			return toConnectError(invalid("volume %s is mounted twice: mount it once", v.Name))
		}
		if _, _, err := state.ParseVolumeMount(v.Name + ":" + m.Path); err != nil {
			return toConnectError(err)
		}
		seen[m.Path], seenVol[v.ID] = true, true
		spec.Volumes[i].Volume, spec.VolumeNode = v.ID, v.Node
	}
	// A node that runs the sandbox elsewhere relays its volume traffic to theirs, there.
	n, err := s.store.GetNode(ctx, spec.VolumeNode)
	if err != nil {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the node of volume %s: %w", spec.Volumes[0].Volume, err))
	}
	spec.VolumeAddress = n.Address
	return nil
}

// volumeUsers are the sandboxes, not over, that mount volume id.
func (s *Server) volumeUsers(ctx context.Context, id string) ([]string, error) {
	_, users, err := s.store.ListVolumes(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	return users[id], nil
}

func volumeView(who auth.Identity, v state.Volume, users []string) *pb.Volume {
	out := &pb.Volume{Id: v.ID, Name: v.Name, Owner: v.Owner, SizeMib: int64(v.SizeMiB), CreatedAt: ts(v.CreatedAt), Lost: v.Lost}
	if who.CanAccess(v.Owner) {
		// Its owner sees who mounts it and whom it is shared with; a token it is shared
		// with sees neither (other tokens' sandboxes and tokens are not its business).
		out.UsedBy = slices.Clone(users)
		for _, s := range v.Shares {
			out.Shares = append(out.Shares, &pb.VolumeShare{Token: s.Token, ReadOnly: s.ReadOnly})
		}
	} else if s, ok := v.ShareOf(who.TokenID); ok {
		out.Shared, out.SharedReadOnly, out.Owner = true, s.ReadOnly, ""
	}
	if who.Admin() {
		out.Node, out.MoveNote = v.Node, v.MoveNote
		if v.Move != nil {
			out.MovingTo = v.Move.To + " (" + v.Move.Why + ")"
		}
	} else {
		out.Lost = strings.ReplaceAll(out.Lost, "node "+v.Node, "its node")
		if v.Move != nil {
			out.MovingTo = "another node"
		}
	}
	return out
}

// MoveVolume starts moving a volume's data to another node (admins): refused while a
// sandbox that is not over mounts it. The leader runs the move (see moveVolumeData).
func (h *volumeService) MoveVolume(ctx context.Context, req *connect.Request[pb.MoveVolumeRequest]) (*connect.Response[pb.MoveVolumeResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	if !who.Admin() {
		return nil, connect.NewError(connect.CodePermissionDenied, errors.New("moving a volume needs an admin token"))
	}
	v, err := h.s.store.GetVolume(ctx, req.Msg.GetVolume(), who.TokenID, true)
	if err != nil {
		return nil, toConnectError(err)
	}
	to, err := h.s.volumeNode(ctx, req.Msg.GetNode(), v.Node)
	if err != nil {
		return nil, err
	}
	v, err = h.s.store.MoveVolume(ctx, v.ID, to, "moved by an admin", h.s.now())
	if err != nil {
		return nil, toConnectError(err)
	}
	if h.s.cluster.ControlPlane != nil {
		h.s.cluster.ControlPlane.Notify()
	}
	return connect.NewResponse(&pb.MoveVolumeResponse{Volume: volumeView(who, v, nil)}), nil
}

// ExportVolume is the node API's.
func (h *volumeService) ExportVolume(context.Context, *connect.Request[pb.ExportVolumeRequest]) (*connect.Response[pb.ExportVolumeResponse], error) {
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("ExportVolume is a node's call"))
}

// ImportVolume is the node API's.
func (h *volumeService) ImportVolume(context.Context, *connect.Request[pb.ImportVolumeRequest]) (*connect.Response[pb.ImportVolumeResponse], error) {
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("ImportVolume is a node's call"))
}

// volumeImportTimeout bounds the copy of a volume's data to its new node (a volume of
// a TiB at 300 MB/s takes an hour).
const volumeImportTimeout = 2 * time.Hour

// MoveVolumeData copies volume v's data to the node its move names, and records the
// move's end: moved, or failed and the volume where it was. The leader runs it (see
// leader.VolumeMover); it is safe to run again for a move an earlier leader began.
func (s *Server) MoveVolumeData(ctx context.Context, v state.Volume) error {
	if v.Move == nil {
		return nil
	}
	to := v.Move.To
	err := s.copyVolume(ctx, v)
	why := ""
	if err != nil {
		why = fmt.Sprintf("moving to node %s failed: %v", to, err)
	}
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), nodeCallTimeout)
	defer cancel()
	if _, rerr := s.store.VolumeMoved(ectx, v.ID, to, why, s.now()); rerr != nil {
		return fmt.Errorf("record the end of volume %s's move: %w (the move: %v)", v.ID, rerr, err)
	}
	if err != nil {
		// The volume stays where it was: its node may mount it again, and the new one
		// keeps nothing of it.
		if c, cerr := s.node(ectx, v.Node); cerr == nil {
			_, _ = c.volumes.ExportVolume(ectx, connect.NewRequest(&pb.ExportVolumeRequest{VolumeId: v.ID}))
		}
		if c, cerr := s.node(ectx, to); cerr == nil {
			_, _ = c.volumes.DeleteVolume(ectx, connect.NewRequest(&pb.DeleteVolumeRequest{Volume: v.ID}))
		}
		return err
	}
	if c, cerr := s.node(ectx, v.Node); cerr == nil {
		if _, derr := c.volumes.DeleteVolume(ectx, connect.NewRequest(&pb.DeleteVolumeRequest{Volume: v.ID})); derr != nil {
			s.log.Warn("remove a moved volume's old copy", "volume", v.ID, "node", v.Node, "err", derr)
		}
	}
	s.log.Info("volume moved", "volume", v.ID, "from", v.Node, "to", to)
	return nil
}

// copyVolume has v's node export it and the move's node import it.
func (s *Server) copyVolume(ctx context.Context, v state.Volume) error {
	from, err := s.store.GetNode(ctx, v.Node)
	if err != nil {
		return fmt.Errorf("node %s: %w", v.Node, err)
	}
	src, err := s.node(ctx, v.Node)
	if err != nil {
		return err
	}
	dst, err := s.node(ctx, v.Move.To)
	if err != nil {
		return err
	}
	ectx, cancel := context.WithTimeout(ctx, nodeCallTimeout)
	defer cancel()
	if _, err := src.volumes.ExportVolume(ectx, connect.NewRequest(&pb.ExportVolumeRequest{VolumeId: v.ID, ToNode: v.Move.To})); err != nil {
		return nodeError(src, "export volume "+v.Name, err)
	}
	ictx, icancel := context.WithTimeout(ctx, volumeImportTimeout)
	defer icancel()
	if _, err := dst.volumes.ImportVolume(ictx, connect.NewRequest(&pb.ImportVolumeRequest{VolumeId: v.ID, SizeMib: int64(v.SizeMiB),
		FromNode: v.Node, FromAddress: from.Address})); err != nil {
		return nodeError(dst, "import volume "+v.Name, err)
	}
	return nil
}
