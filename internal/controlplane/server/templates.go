package server

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// templateService manages named templates (state.Template): what E2B's template IDs
// name. Every call acts on the caller's own templates only.
type templateService struct{ s *Server }

func (h *templateService) CreateTemplate(ctx context.Context, req *connect.Request[pb.CreateTemplateRequest]) (*connect.Response[pb.CreateTemplateResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	in := req.Msg.GetTemplate()
	t := state.Template{ID: state.NewID(), Name: in.GetName(), Owner: who.TokenID, Image: in.GetImage(),
		VCPUs: int(in.GetVcpus()), MemoryMiB: int(in.GetMemoryMib()), DiskMiB: int(in.GetDiskMib()),
		Env: in.GetEnv(), CreatedAt: h.s.now(), User: in.GetUser(), WorkingDir: in.GetWorkingDir()}
	if ref := in.GetSnapshot(); ref != "" {
		// The caller's own snapshot only (as a start from it would be): its sandboxes
		// start from it, so its image and, with memory, its shape are the template's.
		snap, err := h.s.store.GetSnapshot(ctx, ref, who.TokenID, false)
		if err != nil {
			return nil, toConnectError(fmt.Errorf("template %q: snapshot %.64q: %w", t.Name, ref, err))
		}
		if t.Image != "" && t.Image != snap.Image {
			return nil, toConnectError(invalid("template %q: snapshot %s is of image %s, not %s", t.Name, snap.Name, snap.Image, t.Image))
		}
		t.Snapshot, t.Image = snap.ID, snap.Image
		if m := snap.MemorySpec; m != nil {
			t.VCPUs, t.MemoryMiB, t.DiskMiB = m.VCPUs, m.MemoryMiB, m.DiskMiB
		}
	}
	if (t.User != "" || t.WorkingDir != "") && t.Snapshot == "" {
		// An image's template gives its sandboxes' spec: its user is the image's or -u's.
		return nil, toConnectError(invalid("template %q: a user or working directory is a snapshot template's", t.Name))
	}
	if t.Image == "" {
		return nil, toConnectError(invalid("a template needs an image or a snapshot"))
	}
	if err := validateEnvPB(t.Env); err != nil {
		return nil, toConnectError(invalid("%v", err))
	}
	// The sandboxes it starts are checked as any: an image source this caller may not
	// use, or a shape out of bounds, is refused now rather than at every start.
	spec := state.SandboxSpec{Image: t.Image, VCPUs: t.VCPUs, MemoryMiB: t.MemoryMiB, DiskMiB: t.DiskMiB, Env: t.Env, User: t.User, WorkingDir: t.WorkingDir}
	if err := spec.CheckSizes(); err != nil {
		return nil, toConnectError(err)
	}
	if err := checkImageSource(ctx, t.Image); err != nil {
		return nil, err
	}
	if err := h.s.validateSpec(&spec); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("template %q: %w", t.Name, err))
	}
	got, err := h.s.store.PutTemplate(ctx, t, req.Msg.GetReplace())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.CreateTemplateResponse{Template: templateToPB(got)}), nil
}

func (h *templateService) ListNamedTemplates(ctx context.Context, _ *connect.Request[pb.ListNamedTemplatesRequest]) (*connect.Response[pb.ListNamedTemplatesResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	out := &pb.ListNamedTemplatesResponse{}
	for _, t := range h.s.store.Templates(who.TokenID, false) {
		out.Templates = append(out.Templates, templateToPB(t))
	}
	return connect.NewResponse(out), nil
}

// find resolves the caller's own template by ID or name.
func (h *templateService) find(ctx context.Context, ref string) (state.Template, error) {
	who, err := caller(ctx)
	if err != nil {
		return state.Template{}, err
	}
	t, err := h.s.store.FindTemplate(who.TokenID, ref)
	if err != nil {
		return t, toConnectError(err)
	}
	return t, nil
}

func (h *templateService) GetTemplate(ctx context.Context, req *connect.Request[pb.GetTemplateRequest]) (*connect.Response[pb.GetTemplateResponse], error) {
	t, err := h.find(ctx, req.Msg.GetTemplate())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.GetTemplateResponse{Template: templateToPB(t)}), nil
}

func (h *templateService) DeleteTemplate(ctx context.Context, req *connect.Request[pb.DeleteTemplateRequest]) (*connect.Response[pb.DeleteTemplateResponse], error) {
	t, err := h.find(ctx, req.Msg.GetTemplate())
	if err != nil {
		return nil, err
	}
	if err := h.s.store.DeleteTemplate(ctx, t.ID); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.DeleteTemplateResponse{}), nil
}

func templateToPB(t state.Template) *pb.NamedTemplate {
	return &pb.NamedTemplate{Id: t.ID, Name: t.Name, Owner: t.Owner, Image: t.Image, Vcpus: int32(t.VCPUs),
		MemoryMib: int32(t.MemoryMiB), DiskMib: int32(t.DiskMiB), Env: t.Env, CreatedAt: ts(t.CreatedAt), Snapshot: t.Snapshot,
		User: t.User, WorkingDir: t.WorkingDir}
}
