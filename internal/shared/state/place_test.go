package state

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

func TestPlaceSandboxesRechecksAtCommit(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	if _, err := s.RegisterNode(ctx, Node{ID: "n1", Address: "a:1", Capacity: Resources{VCPUs: 2, MemoryMiB: 1024}, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	mk := func(id string, mem int) {
		sb := newSandbox(id, "", t0)
		sb.Spec.MemoryMiB = mem
		if err := s.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
	}
	mk("aaaa000000000001", 600)
	mk("aaaa000000000002", 600)
	mk("aaaa000000000003", 300)
	cfg := scheduler.Config{CPUOvercommit: 4, MemoryOvercommit: 1}
	// Two plans made on the same (stale) snapshot, each alone fits: the second batch
	// must be refused at commit, not overcommit the node.
	res, err := s.PlaceSandboxes(ctx, []Plan{{"aaaa000000000001", "n1"}}, cfg, t0.Add(time.Second))
	if err != nil || len(res) != 1 || res[0].Err != "" {
		t.Fatalf("first plan: %+v %v", res, err)
	}
	res, err = s.PlaceSandboxes(ctx, []Plan{{"aaaa000000000002", "n1"}, {"aaaa000000000003", "n1"}, {"aaaa000000000001", "n1"}, {"nope", "n1"}}, cfg, t0.Add(2*time.Second))
	if err != nil || len(res) != 4 {
		t.Fatalf("second batch: %+v %v", res, err)
	}
	if !strings.Contains(res[0].Err, "memory") {
		t.Errorf("overcommitting plan accepted: %+v", res[0])
	}
	if res[1].Err != "" {
		t.Errorf("fitting plan refused: %+v", res[1])
	}
	if !strings.Contains(res[2].Err, "not waiting") || !strings.Contains(res[3].Err, "not found") {
		t.Errorf("re-placing / unknown: %+v %+v", res[2], res[3])
	}
	sb, _ := s.GetSandbox(ctx, "aaaa000000000002")
	if sb.Node != "" || sb.Status != StatusPending {
		t.Errorf("refused plan changed the sandbox: %+v", sb)
	}
	sb, _ = s.GetSandbox(ctx, "aaaa000000000003")
	if sb.Node != "n1" || sb.Reason != "placed on node n1" {
		t.Errorf("placed sandbox: node %q reason %q", sb.Node, sb.Reason)
	}
	// The pending reason shows why a sandbox waits, without an event.
	why := "no node fits: 1 node lacks memory"
	sb, err = s.UpdateSandbox(ctx, "aaaa000000000002", Update{PendingReason: &why, Time: t0.Add(3 * time.Second)})
	if err != nil || sb.Reason != why || len(sb.Events) != 1 {
		t.Fatalf("pending reason: %q events %d %v", sb.Reason, len(sb.Events), err)
	}
	if _, err := s.PlaceSandboxes(ctx, nil, cfg, time.Time{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("placement without time: %v", err)
	}
}
