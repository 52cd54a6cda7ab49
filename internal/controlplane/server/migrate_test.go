package server

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A migration the sandbox's state does not allow is refused with words a person reads:
// users may not migrate; a sandbox being paused or stopped says so (not the state's
// internal wording); an unknown one is not found.
func TestMigrateRefusals(t *testing.T) {
	a := newTestAPI(t)
	ctx := context.Background()
	now := time.Now()
	for _, n := range []string{"n1", "n2"} {
		if _, err := a.store.RegisterNode(ctx, state.Node{ID: n, Address: n + ":1", Capacity: state.Resources{VCPUs: 4, MemoryMiB: 4096, DiskMiB: 10000}, UpdatedAt: now}); err != nil {
			t.Fatal(err)
		}
	}
	running := func(id string) {
		t.Helper()
		if err := a.store.CreateSandbox(ctx, state.Sandbox{ID: id, Owner: "admin", Status: state.StatusPending, CreatedAt: now,
			Spec: state.SandboxSpec{Image: "img", Cmd: []string{"sleep", "1"}}}); err != nil {
			t.Fatal(err)
		}
		if res, err := a.store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: id, NodeID: "n1"}}, scheduler.Config{CPUOvercommit: 1, MemoryOvercommit: 1}, now); err != nil || res[0].Err != "" {
			t.Fatalf("place %s: %+v %v", id, res, err)
		}
		n1, zero := "n1", 0
		for _, st := range []state.Status{state.StatusStarting, state.StatusRunning} {
			if _, err := a.store.UpdateSandbox(ctx, id, state.Update{Status: &st, IfNode: &n1, IfResumes: &zero, Time: now}); err != nil {
				t.Fatal(err)
			}
		}
	}
	migrate := func(token, id string) error {
		_, err := a.sandboxes.MigrateSandbox(ctx, as(token, &pb.MigrateSandboxRequest{Sandbox: id}))
		return err
	}
	running("aaaa000000000001")
	wantCode(t, "a user's migrate", migrate(a.user, "aaaa000000000001"), connect.CodePermissionDenied, "admin")
	if _, err := a.store.UpdateSandbox(ctx, "aaaa000000000001", state.Update{RequestPause: true, Time: now}); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "migrate while pausing", migrate(a.admin, "aaaa000000000001"), connect.CodeFailedPrecondition, "is being paused")
	running("aaaa000000000002")
	grace := time.Second
	if _, err := a.store.UpdateSandbox(ctx, "aaaa000000000002", state.Update{StopGrace: &grace, Time: now}); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "migrate while stopping", migrate(a.admin, "aaaa000000000002"), connect.CodeFailedPrecondition, "is being stopped")
	wantCode(t, "migrate an unknown sandbox", migrate(a.admin, "ffff000000000009"), connect.CodeNotFound, "")
}
