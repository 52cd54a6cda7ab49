package controller

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	fwclient "github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// Fireworks is the controller's side of the Fireworks API: the calls it makes, with
// "not found" turned into nil results where the controller treats absence as a state.
type Fireworks struct{ C *fwclient.Client }

func (f Fireworks) get(ctx context.Context, name string) (*pb.Sandbox, error) {
	r, err := f.C.Sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: name}))
	if connect.CodeOf(err) == connect.CodeNotFound {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get sandbox %s: %w", name, err)
	}
	return r.Msg.GetSandbox(), nil
}

func (f Fireworks) create(ctx context.Context, name string, spec *pb.SandboxSpec) (*pb.Sandbox, error) {
	r, err := f.C.Sandboxes.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Name: name, Spec: spec}))
	if err != nil {
		return nil, fmt.Errorf("create sandbox %s: %w", name, err)
	}
	return r.Msg.GetSandbox(), nil
}

// remove ends and removes the sandbox; one that is not there is removed already.
func (f Fireworks) remove(ctx context.Context, name string) error {
	_, err := f.C.Sandboxes.RemoveSandbox(ctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: name, Force: true}))
	if err != nil && connect.CodeOf(err) != connect.CodeNotFound {
		return fmt.Errorf("remove sandbox %s: %w", name, err)
	}
	return nil
}

func (f Fireworks) pause(ctx context.Context, id string) (*pb.Sandbox, error) {
	r, err := f.C.Sandboxes.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Sandbox: id}))
	if err != nil {
		return nil, fmt.Errorf("pause sandbox %s: %w", id, err)
	}
	return r.Msg.GetSandbox(), nil
}

func (f Fireworks) resume(ctx context.Context, id string) (*pb.Sandbox, error) {
	r, err := f.C.Sandboxes.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Sandbox: id}))
	if err != nil {
		return nil, fmt.Errorf("resume sandbox %s: %w", id, err)
	}
	return r.Msg.GetSandbox(), nil
}

// putTemplate creates or replaces a named template.
func (f Fireworks) putTemplate(ctx context.Context, t *pb.NamedTemplate) (*pb.NamedTemplate, error) {
	r, err := f.C.Templates.CreateTemplate(ctx, connect.NewRequest(&pb.CreateTemplateRequest{Template: t, Replace: true}))
	if err != nil {
		return nil, fmt.Errorf("create template %s: %w", t.GetName(), err)
	}
	return r.Msg.GetTemplate(), nil
}

func (f Fireworks) deleteTemplate(ctx context.Context, name string) error {
	_, err := f.C.Templates.DeleteTemplate(ctx, connect.NewRequest(&pb.DeleteTemplateRequest{Template: name}))
	if err != nil && connect.CodeOf(err) != connect.CodeNotFound {
		return fmt.Errorf("delete template %s: %w", name, err)
	}
	return nil
}

func (f Fireworks) setPool(ctx context.Context, p *pb.Pool) error {
	if _, err := f.C.Images.SetPool(ctx, connect.NewRequest(&pb.SetPoolRequest{Pool: p})); err != nil {
		return fmt.Errorf("set the warm pool of %s: %w", p.GetImage(), err)
	}
	return nil
}

func (f Fireworks) deletePool(ctx context.Context, image string) error {
	_, err := f.C.Images.DeletePool(ctx, connect.NewRequest(&pb.DeletePoolRequest{Image: image}))
	if err != nil && connect.CodeOf(err) != connect.CodeNotFound {
		return fmt.Errorf("delete the warm pool of %s: %w", image, err)
	}
	return nil
}

func (f Fireworks) pools(ctx context.Context) ([]*pb.Pool, error) {
	r, err := f.C.Images.ListPools(ctx, connect.NewRequest(&pb.ListPoolsRequest{}))
	if err != nil {
		return nil, fmt.Errorf("list warm pools: %w", err)
	}
	return r.Msg.GetPools(), nil
}

// pull pulls ref with f's token onto a node of the cluster's choosing (a user's pull:
// what that user's own sandbox could start from).
func (f Fireworks) pull(ctx context.Context, ref string) error {
	s, err := f.C.Images.PullImage(ctx, connect.NewRequest(&pb.PullImageRequest{Ref: ref}))
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	defer s.Close()
	for s.Receive() {
	}
	if err := s.Err(); err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	return nil
}
