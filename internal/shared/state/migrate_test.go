package state

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// Live migration in the state machine: only a running sandbox migrates, one migration
// at a time; commit and end exclude each other (whichever is written first wins); a
// commit moves the sandbox as a new run, so the source's late reports are refused; a
// migration past its deadline cannot commit; a stop or the sandbox's end ends it; the
// target holds the sandbox's shape while it runs; the history keeps the latest few.
func TestMigration(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	for _, n := range []string{"n1", "n2"} {
		if _, err := s.RegisterNode(ctx, Node{ID: n, Address: n + ":1", Capacity: Resources{VCPUs: 1, MemoryMiB: 1024, DiskMiB: 10000}, UpdatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := scheduler.Config{CPUOvercommit: 1, MemoryOvercommit: 1}
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	st := func(s Status) *Status { return &s }
	const a = "aaaa000000000001"
	sb := newSandbox(a, "", at(0))
	sb.Spec.MemoryMiB = 600
	if err := s.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if res, err := s.PlaceSandboxes(ctx, []Plan{{a, "n1"}}, cfg, at(0)); err != nil || res[0].Err != "" {
		t.Fatalf("place: %+v %v", res, err)
	}
	mig := func(id string, deadline int) *Migration {
		return &Migration{ID: id, From: "n1", To: "n2", ToAddress: "n2:1", Deadline: at(deadline)}
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: mig("m1", 60), Time: at(1)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("migration of a pending sandbox: %v", err)
	}
	n1, zero := "n1", 0
	for _, to := range []Status{StatusStarting, StatusRunning} {
		if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(to), IfNode: &n1, IfResumes: &zero, Time: at(2)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: &Migration{ID: "m0", From: "n2", To: "n1", Deadline: at(60)}, Time: at(3)}); !errors.Is(err, ErrInvalid) {
		t.Errorf("a migration from a node the sandbox is not on: %v", err)
	}
	// Ended by the source (the target failed): it stays where it is.
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: mig("m1", 60), Time: at(3)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: mig("m2", 60), Time: at(3)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a second migration at once: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{RequestPause: true, Time: at(3)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a pause while migrating: %v", err)
	}
	pol := "deny 10.0.0.0/8"
	if _, err := s.UpdateSandbox(ctx, a, Update{Policy: &pol, Time: at(3)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a policy change while migrating (the target's network is made from the old one): %v", err)
	}
	// Only the target commits; only a party ends it.
	if _, err := s.UpdateSandbox(ctx, a, Update{CommitMigration: "m1", MigrationBy: "n1", Time: at(3)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a commit by the source: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{EndMigration: "m1", MigrationBy: "n3", Time: at(3)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("an end by a node that takes no part: %v", err)
	}
	// While it runs, the target holds the sandbox's shape: nothing else fits there.
	if used := nodeUse(s, "n2"); used != 600 {
		t.Errorf("the migration's target has %d MiB reserved, want the sandbox's 600", used)
	}
	got, err := s.UpdateSandbox(ctx, a, Update{EndMigration: "m1", Reason: "the target failed", Time: at(4)})
	if err != nil || got.Migration != nil || got.Node != "n1" || len(got.Migrations) != 1 || got.Migrations[0].Outcome != "failed: the target failed" {
		t.Fatalf("end: %+v %v", got, err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{CommitMigration: "m1", Time: at(5)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a commit after the end: %v", err)
	}
	if used := nodeUse(s, "n2"); used != 0 {
		t.Errorf("the target still holds %d MiB after the migration ended", used)
	}
	// Past its deadline it cannot commit.
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: mig("m2", 10), Time: at(6)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{CommitMigration: "m2", Time: at(11)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a commit past the deadline: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{EndMigration: "m2", Reason: "timed out", Time: at(11)}); err != nil {
		t.Fatal(err)
	}
	// Committed: the sandbox is on the target, as a new run.
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: mig("m3", 60), Time: at(12)}); err != nil {
		t.Fatal(err)
	}
	got, err = s.UpdateSandbox(ctx, a, Update{CommitMigration: "m3", MigrationStats: &MigrationStats{Downtime: 5 * time.Millisecond, Bytes: 70 << 20}, Time: at(13)})
	if err != nil || got.Node != "n2" || got.Resumes != 1 || got.Migration != nil || got.Status != StatusRunning {
		t.Fatalf("commit: %+v %v", got, err)
	}
	last := got.Migrations[len(got.Migrations)-1]
	if last.Outcome != MigrationMoved || last.Downtime != 5*time.Millisecond || last.Took() != time.Second {
		t.Errorf("the committed migration's record: %+v", last)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{EndMigration: "m3", Time: at(14)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("an end after the commit: %v", err)
	}
	failed := StatusFailed
	if _, err := s.UpdateSandbox(ctx, a, Update{Status: &failed, IfNode: &n1, IfResumes: &zero, Time: at(14)}); !errors.Is(err, ErrStaleReport) {
		t.Errorf("the source's late report after the commit: %v", err)
	}
	// A stop ends a migration in progress; so does the sandbox's end.
	if _, err := s.UpdateSandbox(ctx, a, Update{StartMigration: &Migration{ID: "m4", From: "n2", To: "n1", Deadline: at(60)}, Time: at(15)}); err != nil {
		t.Fatal(err)
	}
	grace := time.Second
	got, err = s.UpdateSandbox(ctx, a, Update{StopGrace: &grace, Time: at(16)})
	if err != nil || got.Migration != nil || got.Migrations[len(got.Migrations)-1].Outcome != "failed: the sandbox was stopped" {
		t.Fatalf("stop while migrating: %+v %v", got, err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{CommitMigration: "m4", Time: at(17)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("a commit after a stop: %v", err)
	}
	// The history keeps the latest few.
	sb2 := newSandbox("bbbb000000000002", "", at(20))
	if err := s.CreateSandbox(ctx, sb2); err != nil {
		t.Fatal(err)
	}
	if res, err := s.PlaceSandboxes(ctx, []Plan{{sb2.ID, "n1"}}, cfg, at(20)); err != nil || res[0].Err != "" {
		t.Fatalf("place: %+v %v", res, err)
	}
	for _, to := range []Status{StatusStarting, StatusRunning} {
		if _, err := s.UpdateSandbox(ctx, sb2.ID, Update{Status: st(to), Time: at(21)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range maxMigrations + 3 {
		if _, err := s.UpdateSandbox(ctx, sb2.ID, Update{StartMigration: &Migration{ID: "x", From: "n1", To: "n1", Deadline: at(100)}, Time: at(22 + i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.UpdateSandbox(ctx, sb2.ID, Update{EndMigration: "x", Time: at(22 + i)}); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := s.GetSandbox(ctx, sb2.ID); len(got.Migrations) != maxMigrations {
		t.Errorf("history of %d migrations kept, want the latest %d", len(got.Migrations), maxMigrations)
	}
}

// nodeUse is the memory the scheduler sees reserved on node.
func nodeUse(s *Store, node string) int {
	used := 0
	for _, a := range SchedulerSnapshotOf(s.LocalNodes(), s.LocalSandboxes()).Allocations {
		if a.NodeID == node {
			used += a.Resources.MemoryMiB
		}
	}
	return used
}
