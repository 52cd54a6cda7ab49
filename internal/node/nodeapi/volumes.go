package nodeapi

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
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

// VolumePath + SANDBOX/INDEX is where the node running a sandbox relays its guest's
// connection to listener INDEX of the sandbox's volume server on the volumes' node (a
// mount's, the portmapper's, the lock manager's: see agent.VolumeStream); POST, full
// duplex, node certificates only, and the volumes' node checks in the state that the
// calling node runs that sandbox.
const VolumePath = "/fireworks.node/volume/"

func serveVolumeStream(ag *agent.Agent, w http.ResponseWriter, r *http.Request, rest string, log *slog.Logger) {
	role, peer, err := pki.PeerIdentity(r.TLS)
	if err != nil || role != pki.RoleAgent || r.Method != http.MethodPost {
		http.Error(w, "volumes are relayed to nodes only, with POST", http.StatusForbidden)
		return
	}
	id, idx, ok := strings.Cut(rest, "/")
	index, err := strconv.Atoi(idx)
	if !ok || checkID(id) != nil || err != nil || index < 0 || index > proto.MaxVolumeMounts+2 {
		http.Error(w, "want "+VolumePath+"SANDBOX/INDEX", http.StatusBadRequest)
		return
	}
	conn, err := ag.VolumeStream(r.Context(), peer, id, index)
	if err != nil {
		log.Warn("volume stream refused", "sandbox", id, "from", peer, "err", err)
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	serveDuplex(w, r, conn)
}
