package server

import (
	"net/http"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A template may name a snapshot (E2B's builds make these): the caller's own only; it
// takes the snapshot's image and, with memory, its shape. A start from a keep-alive
// snapshot with memory takes the new sandbox's own environment additions, lifetime and
// labels, never its source's, and its own user and directory for its commands; a command
// of its own is refused.
func TestTemplateOfSnapshot(t *testing.T) {
	a := newTestAPI(t)
	ctx := t.Context()
	templates := fireworksv1connect.NewTemplateServiceClient(http.DefaultClient, a.url)
	user := a.userID(t)
	src := state.SandboxSpec{Image: "busybox", KeepAlive: true, VCPUs: 2, MemoryMiB: 512, Env: []string{"BUILT=yes"}, User: "app",
		WorkingDir: "/app", Lifetime: time.Hour, Metadata: map[string]string{"e2b.build": "b1"}}
	snap := state.Snapshot{ID: state.NewID(), Name: "e2b-build-b1", Owner: user, Node: "n1", Sandbox: "x", Image: "busybox",
		CreatedAt: time.Now(), MemorySpec: &src}
	if _, err := a.store.PutSnapshot(ctx, snap, 0); err != nil {
		t.Fatal(err)
	}

	_, err := templates.CreateTemplate(ctx, as(a.admin, &pb.CreateTemplateRequest{Template: &pb.NamedTemplate{Name: "app", Snapshot: snap.Name}}))
	wantCode(t, "a template of another token's snapshot (an admin's too)", err, connect.CodeNotFound, "snapshot")
	_, err = templates.CreateTemplate(ctx, as(a.user, &pb.CreateTemplateRequest{Template: &pb.NamedTemplate{Name: "app", Snapshot: snap.Name, Image: "alpine"}}))
	wantCode(t, "a template of a snapshot and another image", err, connect.CodeInvalidArgument, "is of image busybox")
	r, err := templates.CreateTemplate(ctx, as(a.user, &pb.CreateTemplateRequest{Template: &pb.NamedTemplate{Name: "app", Snapshot: snap.Name}}))
	if err != nil {
		t.Fatal(err)
	}
	if tm := r.Msg.GetTemplate(); tm.GetSnapshot() != snap.ID || tm.GetImage() != "busybox" || tm.GetVcpus() != 2 || tm.GetMemoryMib() != 512 {
		t.Errorf("the template of a snapshot: %v", tm)
	}

	created, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Snapshot: snap.ID,
		KeepAlive: true, Env: []string{"EXTRA=given"}, Lifetime: durationpb.New(time.Minute), Metadata: map[string]string{"run": "2"}, Template: "app"}}))
	if err != nil {
		t.Fatal(err)
	}
	got, err := a.store.GetSandbox(ctx, created.Msg.GetSandbox().GetId())
	if err != nil {
		t.Fatal(err)
	}
	if s := got.Spec; !slices.Equal(s.Env, []string{"BUILT=yes", "EXTRA=given"}) || s.User != "app" || s.WorkingDir != "/app" ||
		s.Lifetime != time.Minute || s.Metadata["run"] != "2" || s.Metadata["e2b.build"] != "" || s.Template != "app" || s.VCPUs != 2 {
		t.Errorf("a start from the template's snapshot: %+v", s)
	}
	_, err = a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Snapshot: snap.ID, Cmd: []string{"sh"}}}))
	wantCode(t, "a start from a snapshot with memory, with a command", err, connect.CodeInvalidArgument, "has memory")
	// Its commands' user and directory may be given: its main process is init's.
	created, err = a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Snapshot: snap.ID, User: "root", WorkingDir: "/srv"}}))
	if err != nil {
		t.Fatal(err)
	}
	if got, err = a.store.GetSandbox(ctx, created.Msg.GetSandbox().GetId()); err != nil || got.Spec.User != "root" || got.Spec.WorkingDir != "/srv" {
		t.Errorf("a start as another user, in another directory: %+v %v", got.Spec, err)
	}
}
