package nodeapi

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// volumeService is the node's side of volumes: the server records them, the node keeps
// their data.
type volumeService struct{ ag *agent.Agent }

// CreateVolume makes the filesystem of the volume the server named.
func (n *volumeService) CreateVolume(ctx context.Context, req *connect.Request[pb.CreateVolumeRequest]) (*connect.Response[pb.CreateVolumeResponse], error) {
	id := req.Msg.GetVolumeId()
	if err := n.ag.CreateVolume(ctx, id, int(req.Msg.GetSizeMib())); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.CreateVolumeResponse{Volume: &pb.Volume{Id: id, SizeMib: req.Msg.GetSizeMib(), Node: n.ag.NodeName()}}), nil
}

// ListVolumes is not asked of a node: the servers' state lists volumes.
func (n *volumeService) ListVolumes(context.Context, *connect.Request[pb.ListVolumesRequest]) (*connect.Response[pb.ListVolumesResponse], error) {
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("a node does not list volumes: ask a server"))
}

// ShareVolume is not asked of a node: shares are the servers' state.
func (n *volumeService) ShareVolume(context.Context, *connect.Request[pb.ShareVolumeRequest]) (*connect.Response[pb.ShareVolumeResponse], error) {
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("a node does not share volumes: ask a server"))
}

// GetVolume reports the space a volume's filesystem uses.
func (n *volumeService) GetVolume(ctx context.Context, req *connect.Request[pb.GetVolumeRequest]) (*connect.Response[pb.GetVolumeResponse], error) {
	used, err := n.ag.VolumeUsage(ctx, req.Msg.GetVolume())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.GetVolumeResponse{Volume: &pb.Volume{Id: req.Msg.GetVolume(), UsedBytes: used, Node: n.ag.NodeName()}}), nil
}

// DeleteVolume removes a volume's data (the server has forgotten it).
func (n *volumeService) DeleteVolume(ctx context.Context, req *connect.Request[pb.DeleteVolumeRequest]) (*connect.Response[pb.DeleteVolumeResponse], error) {
	if err := n.ag.RemoveVolume(ctx, req.Msg.GetVolume()); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.DeleteVolumeResponse{}), nil
}
