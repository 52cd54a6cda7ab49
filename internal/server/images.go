package server

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/image"
)

type imageService struct{ s *Server }

func (h *imageService) PullImage(ctx context.Context, req *connect.Request[pb.PullImageRequest], stream *connect.ServerStream[pb.PullImageResponse]) error {
	if req.Msg.GetRef() == "" {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("no image reference given"))
	}
	if err := checkImageSource(ctx, req.Msg.GetRef()); err != nil {
		return err
	}
	who, err := caller(ctx)
	if err != nil {
		return err
	}
	if len(req.Msg.GetInsecureRegistries()) > 0 && !who.Admin() {
		// As for a sandbox: plain-HTTP registries make the node connect wherever told.
		return connect.NewError(connect.CodePermissionDenied, errors.New("--insecure-registry needs an admin token"))
	}
	if h.s.agent == nil {
		return errNoLocalNode
	}
	opts := h.s.agent.PullOptions(req.Msg.GetInsecureRegistries(), who.Admin(), who.TokenID)
	opts.Progress = func(p image.Progress) {
		// Progress is best effort: a slow client must not fail the pull.
		_ = stream.Send(&pb.PullImageResponse{Msg: &pb.PullImageResponse_Progress{Progress: &pb.PullProgress{
			Layer: p.Layer, Complete: p.Complete, Total: p.Total}}})
	}
	img, err := h.s.agent.Images().Pull(ctx, req.Msg.GetRef(), opts)
	if errors.Is(err, image.ErrOwnerBudget) {
		return connect.NewError(connect.CodeResourceExhausted, err)
	}
	if err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err) // it names the reference
	}
	if !who.Admin() {
		if err := h.s.agent.FitImages(ctx, who.TokenID, img.Digest); err != nil {
			return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("pull %s: %w", req.Msg.GetRef(), err))
		}
	}
	return stream.Send(&pb.PullImageResponse{Msg: &pb.PullImageResponse_Image{Image: imageToPB(*img)}})
}

func (h *imageService) ListImages(ctx context.Context, _ *connect.Request[pb.ListImagesRequest]) (*connect.Response[pb.ListImagesResponse], error) {
	// A node's images are every tenant's: which ones it holds is the operator's to see.
	if _, err := requireAdmin(ctx, "listing images"); err != nil {
		return nil, err
	}
	if h.s.agent == nil {
		return nil, errNoLocalNode
	}
	imgs, err := h.s.agent.Images().List(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListImagesResponse{}
	for _, img := range imgs {
		resp.Images = append(resp.Images, imageToPB(img))
	}
	return connect.NewResponse(resp), nil
}

func (h *imageService) RemoveImage(ctx context.Context, req *connect.Request[pb.RemoveImageRequest]) (*connect.Response[pb.RemoveImageResponse], error) {
	// Images are shared by every user's sandboxes on the node.
	if _, err := requireAdmin(ctx, "removing an image"); err != nil {
		return nil, err
	}
	if h.s.agent == nil {
		return nil, errNoLocalNode
	}
	if err := h.s.agent.RemoveImage(ctx, req.Msg.GetRef()); err != nil {
		return nil, toConnectError(fmt.Errorf("remove image %s: %w", req.Msg.GetRef(), err))
	}
	return connect.NewResponse(&pb.RemoveImageResponse{}), nil
}

func imageToPB(img image.Image) *pb.Image {
	return &pb.Image{Ref: img.Ref, Digest: img.Digest, Size: img.Size, Created: ts(img.Created),
		Entrypoint: img.Config.Entrypoint, Cmd: img.Config.Cmd}
}

type systemService struct{ s *Server }

func (h *systemService) Info(ctx context.Context, _ *connect.Request[pb.InfoRequest]) (*connect.Response[pb.InfoResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := h.info()
	if err == nil && !who.Admin() {
		// What a tenant needs (versions, the accelerator, the largest sandbox shape), not
		// the node's size, its load or where it keeps its data.
		resp.Msg = &pb.InfoResponse{Version: resp.Msg.GetVersion(), Accel: resp.Msg.GetAccel(), KernelRelease: resp.Msg.GetKernelRelease(),
			InitVersion: resp.Msg.GetInitVersion(), QemuVersion: resp.Msg.GetQemuVersion(), MaxVcpus: resp.Msg.GetMaxVcpus(), MaxMemoryMib: resp.Msg.GetMaxMemoryMib()}
	}
	return resp, err
}

func (h *systemService) info() (*connect.Response[pb.InfoResponse], error) {
	if h.s.agent == nil {
		id, _ := h.s.store.Leader()
		nodes := h.s.store.LocalNodes()
		resp := &pb.InfoResponse{Version: Version, Node: fmt.Sprintf("cluster (leader %s, %d nodes)", id, len(nodes))}
		for _, n := range nodes {
			resp.NodeVcpus += int32(n.Capacity.VCPUs)
			resp.NodeMemoryMib += int64(n.Capacity.MemoryMiB)
			resp.MaxVcpus = max(resp.MaxVcpus, int32(n.Capacity.VCPUs))
			resp.MaxMemoryMib = max(resp.MaxMemoryMib, int32(n.Capacity.MemoryMiB))
			if resp.Accel == "" {
				resp.Accel, resp.KernelRelease = n.Accel, n.Kernel
			}
		}
		return connect.NewResponse(resp), nil
	}
	i := h.s.agent.Info()
	return connect.NewResponse(&pb.InfoResponse{
		Version: Version, Node: i.Node, Accel: i.Accel, AccelReason: i.AccelReason,
		KernelRelease: i.KernelRelease, InitVersion: i.InitVersion, QemuVersion: i.QEMUVersion,
		NodeVcpus: int32(i.NodeVCPUs), NodeMemoryMib: i.NodeMemoryMiB, MaxVcpus: int32(i.MaxVCPUs),
		MaxMemoryMib: int32(i.MaxMemoryMiB), SandboxesRunning: int32(i.Running), DataDir: i.DataDir,
	}), nil
}

// checkImageSource keeps local image sources to admins: oci:DIR and docker-archive:FILE are
// read by the server with its own privileges, so a user token must not name server paths.
func checkImageSource(ctx context.Context, ref string) error {
	if !strings.HasPrefix(ref, image.OCIPrefix) && !strings.HasPrefix(ref, image.DockerArchivePrefix) {
		return nil
	}
	_, err := requireAdmin(ctx, "a local image source ("+image.OCIPrefix+" or "+image.DockerArchivePrefix+", read from the server's filesystem)")
	return err
}

// errNoLocalNode answers image calls on a cluster server: images live on the nodes, which
// pull them when a sandbox starts there.
var errNoLocalNode = connect.NewError(connect.CodeFailedPrecondition,
	errors.New("this server runs no sandboxes: images are pulled by each node when a sandbox starts there (see `fireworks node ls` for what nodes hold)"))
