package nodeapi

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/version"
)

// imageService is the node's images, templates and warm pools. The server checked the
// caller's right to each call; the node charges a user's pulls to the user's token.
type imageService struct {
	fireworksv1connect.UnimplementedImageServiceHandler
	ag *agent.Agent
}

func (h *imageService) PullImage(ctx context.Context, req *connect.Request[pb.PullImageRequest], stream *connect.ServerStream[pb.PullImageResponse]) error {
	if req.Msg.GetRef() == "" {
		return errNoRef
	}
	who := callerOf(req.Header())
	if err := who.checkSource(req.Msg.GetRef()); err != nil {
		return err
	}
	opts := h.ag.PullOptions(req.Msg.GetInsecureRegistries(), who.admin, who.token)
	node := h.ag.NodeName()
	opts.Progress = func(p image.Progress) {
		// Progress is best effort: a slow client must not fail the pull.
		_ = stream.Send(&pb.PullImageResponse{Msg: &pb.PullImageResponse_Progress{Progress: &pb.PullProgress{
			Layer: p.Layer, Complete: p.Complete, Total: p.Total, Node: node}}})
	}
	img, err := h.ag.Images().Pull(ctx, req.Msg.GetRef(), opts)
	if errors.Is(err, image.ErrOwnerBudget) {
		return connect.NewError(connect.CodeResourceExhausted, err)
	}
	if err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err) // it names the reference
	}
	if !who.admin {
		if err := h.ag.FitImages(ctx, who.token, img.Digest); err != nil {
			return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("pull %s: %w", req.Msg.GetRef(), err))
		}
	}
	return stream.Send(&pb.PullImageResponse{Msg: &pb.PullImageResponse_Image{Image: imageToPB(*img, node)}})
}

func (h *imageService) ListImages(ctx context.Context, req *connect.Request[pb.ListImagesRequest]) (*connect.Response[pb.ListImagesResponse], error) {
	if err := requireAdmin(req.Header(), "listing images"); err != nil {
		return nil, err
	}
	imgs, err := h.ag.Images().List(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListImagesResponse{}
	for _, img := range imgs {
		resp.Images = append(resp.Images, imageToPB(img, h.ag.NodeName()))
	}
	return connect.NewResponse(resp), nil
}

func (h *imageService) RemoveImage(ctx context.Context, req *connect.Request[pb.RemoveImageRequest]) (*connect.Response[pb.RemoveImageResponse], error) {
	if err := requireAdmin(req.Header(), "removing an image"); err != nil {
		return nil, err
	}
	r, err := h.ag.RemoveImage(ctx, req.Msg.GetRef())
	if err != nil {
		return nil, toConnectError(fmt.Errorf("remove image %s on node %s: %w", req.Msg.GetRef(), h.ag.NodeName(), err))
	}
	return connect.NewResponse(&pb.RemoveImageResponse{TemplatesDropped: int32(r.TemplatesDropped), SandboxesUsing: int32(r.SandboxesUsing)}), nil
}

func (h *imageService) WarmImage(ctx context.Context, req *connect.Request[pb.WarmImageRequest]) (*connect.Response[pb.WarmImageResponse], error) {
	if req.Msg.GetRef() == "" {
		return nil, errNoRef
	}
	if err := requireAdmin(req.Header(), "warming an image"); err != nil {
		return nil, err
	}
	who := callerOf(req.Header())
	t, err := h.ag.WarmImage(ctx, req.Msg.GetRef(), h.ag.PullOptions(req.Msg.GetInsecureRegistries(), who.admin, who.token))
	if err != nil {
		var ce *connect.Error
		if errors.As(err, &ce) || ctx.Err() != nil {
			return nil, toConnectError(err)
		}
		// Mostly a pull or boot problem with this image: the caller's to fix.
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("warm %s on node %s: %w", req.Msg.GetRef(), h.ag.NodeName(), err))
	}
	resp := &pb.WarmImageResponse{Template: templateToPB(t, h.ag.NodeName()), Built: t.Built}
	if t.Built {
		resp.BuildTime = durationpb.New(t.BuildTime)
	}
	return connect.NewResponse(resp), nil
}

func (h *imageService) ListTemplates(_ context.Context, req *connect.Request[pb.ListTemplatesRequest]) (*connect.Response[pb.ListTemplatesResponse], error) {
	if err := requireAdmin(req.Header(), "listing templates"); err != nil {
		return nil, err
	}
	resp := &pb.ListTemplatesResponse{}
	for _, t := range h.ag.Templates() {
		resp.Templates = append(resp.Templates, templateToPB(t, h.ag.NodeName()))
	}
	return connect.NewResponse(resp), nil
}

// ListPools reports the node's warm pools as they are now (the servers also get them
// with every heartbeat, which may be a beat old).
func (h *imageService) ListPools(_ context.Context, req *connect.Request[pb.ListPoolsRequest]) (*connect.Response[pb.ListPoolsResponse], error) {
	if err := requireAdmin(req.Header(), "listing pools"); err != nil {
		return nil, err
	}
	resp := &pb.ListPoolsResponse{}
	for _, st := range PoolStatuses(h.ag) {
		resp.Pools = append(resp.Pools, &pb.Pool{Image: st.GetImage(), Nodes: []*pb.PoolNodeStatus{st}})
	}
	return connect.NewResponse(resp), nil
}

// PoolStatuses is the node's report about its warm pools.
func PoolStatuses(ag *agent.Agent) []*pb.PoolNodeStatus {
	var out []*pb.PoolNodeStatus
	for _, p := range ag.Pools() {
		out = append(out, &pb.PoolNodeStatus{Node: ag.NodeName(), Image: p.Image, Digest: p.Digest, Target: int32(p.Target),
			Ready: int32(p.Ready), Filling: int32(p.Filling), ClaimsLastMinute: int32(p.Claims), Error: p.Error, Local: p.Local, Size: int32(p.Size), Max: int32(p.Max)})
	}
	return out
}

func imageToPB(img image.Image, node string) *pb.Image {
	return &pb.Image{Ref: img.Ref, Digest: img.Digest, Size: img.Size, Created: ts(img.Created),
		Entrypoint: img.Config.Entrypoint, Cmd: img.Config.Cmd, Node: node}
}

func templateToPB(t agent.TemplateInfo, node string) *pb.Template {
	return &pb.Template{Key: t.Key, Image: t.Image, Digest: t.Digest, Vcpus: int32(t.VCPUs),
		MemoryMib: int32(t.MemoryMiB), Size: t.SizeBytes, LastUsed: ts(t.LastUsed), Node: node}
}

// systemService is the node's Info.
type systemService struct {
	fireworksv1connect.UnimplementedSystemServiceHandler
	ag *agent.Agent
}

func (h *systemService) Info(context.Context, *connect.Request[pb.InfoRequest]) (*connect.Response[pb.InfoResponse], error) {
	i := h.ag.Info()
	return connect.NewResponse(&pb.InfoResponse{
		Version: version.Version, Node: i.Node, Accel: i.Accel, AccelReason: i.AccelReason,
		KernelRelease: i.KernelRelease, InitVersion: i.InitVersion, QemuVersion: i.QEMUVersion,
		NodeVcpus: int32(i.NodeVCPUs), NodeMemoryMib: i.NodeMemoryMiB, MaxVcpus: int32(i.MaxVCPUs),
		MaxMemoryMib: int32(i.MaxMemoryMiB), SandboxesRunning: int32(i.Running), DataDir: i.DataDir,
	}), nil
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}
