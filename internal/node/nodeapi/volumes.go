package nodeapi

import (
	"bufio"
	"context"
	"errors"
	"io"
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

// MoveVolume is not asked of a node: the servers run a move.
func (n *volumeService) MoveVolume(context.Context, *connect.Request[pb.MoveVolumeRequest]) (*connect.Response[pb.MoveVolumeResponse], error) {
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("a node does not move volumes: ask a server"))
}

// ExportVolume lets another node fetch a volume being moved to it (or, with no node,
// ends that).
func (n *volumeService) ExportVolume(ctx context.Context, req *connect.Request[pb.ExportVolumeRequest]) (*connect.Response[pb.ExportVolumeResponse], error) {
	if err := n.ag.ExportVolume(ctx, req.Msg.GetVolumeId(), req.Msg.GetToNode()); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.ExportVolumeResponse{}), nil
}

// ImportVolume fetches a volume being moved here from the node that exported it.
func (n *volumeService) ImportVolume(ctx context.Context, req *connect.Request[pb.ImportVolumeRequest]) (*connect.Response[pb.ImportVolumeResponse], error) {
	m := req.Msg
	if err := n.ag.ImportVolume(ctx, m.GetVolumeId(), int(m.GetSizeMib()), m.GetFromNode(), m.GetFromAddress()); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.ImportVolumeResponse{}), nil
}

// VolumeDataPath + VOLUME is where a node fetches a volume being moved to it from the
// node that holds it (GET, node certificates only; the holder checks that the volume
// was exported to the calling node).
const VolumeDataPath = "/fireworks.node/volumedata/"

func serveVolumeData(ag *agent.Agent, w http.ResponseWriter, r *http.Request, id string, log *slog.Logger) {
	role, peer, err := pki.PeerIdentity(r.TLS)
	if err != nil || role != pki.RoleAgent || r.Method != http.MethodGet {
		http.Error(w, "a volume's data is served to nodes only, with GET", http.StatusForbidden)
		return
	}
	if len(id) != 16 || strings.Trim(id, "0123456789abcdef") != "" {
		http.Error(w, "not a volume ID", http.StatusBadRequest)
		return
	}
	// Refused or sent, nothing is written before the check: the error is a status.
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(ag.SendVolume(r.Context(), id, peer, pw)) }()
	br := bufio.NewReaderSize(pr, 64<<10)
	if _, err := br.Peek(1); err != nil {
		pr.CloseWithError(err)
		log.Warn("volume data refused", "volume", id, "to", peer, "err", err)
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	if _, err := io.Copy(w, br); err != nil {
		pr.CloseWithError(err)
		log.Warn("send a volume's data", "volume", id, "to", peer, "err", err)
		panic(http.ErrAbortHandler) // the receiver must see a broken stream, not an end
	}
	log.Info("sent a volume's data", "volume", id, "to", peer)
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
