package state

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// Pause and resume in the state machine: only a running sandbox may be asked to pause;
// the node's report of its saved state makes it paused, holding no CPU or RAM on its node;
// a resume makes it pending on the same node, as a new run, only if that node has room;
// reports from the run before the pause are refused after it; running again lets the
// saved state go; a paused sandbox can be stopped.
func TestPauseResume(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	if _, err := s.RegisterNode(ctx, Node{ID: "n1", Address: "a:1", Capacity: Resources{VCPUs: 1, MemoryMiB: 1024, DiskMiB: 10000}, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	cfg := scheduler.Config{CPUOvercommit: 1, MemoryOvercommit: 1}
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	st := func(s Status) *Status { return &s }
	mk := func(id string, mem int, when time.Time) {
		t.Helper()
		sb := newSandbox(id, "", when)
		sb.Spec.MemoryMiB = mem
		if err := s.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
		if res, err := s.PlaceSandboxes(ctx, []Plan{{id, "n1"}}, cfg, when); err != nil || res[0].Err != "" {
			t.Fatalf("place %s: %+v %v", id, res, err)
		}
	}
	const a = "aaaa000000000001"
	mk(a, 600, at(0))
	if _, err := s.UpdateSandbox(ctx, a, Update{RequestPause: true, Time: at(1)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("pause of a pending sandbox: %v", err)
	}
	node, zero := "n1", 0
	for _, to := range []Status{StatusStarting, StatusRunning} {
		if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(to), IfNode: &node, IfRestarts: &zero, IfResumes: &zero, Time: at(2)}); err != nil {
			t.Fatal(err)
		}
	}
	// A node cannot declare a pause nobody asked for.
	saved := &Saved{Node: "n1", Bytes: 300 << 20, At: at(3)}
	if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(StatusPaused), Saved: saved, Time: at(3)}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("unrequested pause: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{RequestPause: true, Time: at(4)}); err != nil {
		t.Fatal(err)
	}
	sb, err := s.UpdateSandbox(ctx, a, Update{Status: st(StatusPaused), Saved: saved, IfNode: &node, IfResumes: &zero, Time: at(5)})
	if err != nil || sb.Status != StatusPaused || sb.Saved == nil || sb.Saved.Bytes != 300<<20 || sb.Node != "n1" {
		t.Fatalf("paused: %+v %v", sb, err)
	}
	// Paused, it holds no memory: another sandbox fits where it was...
	const b = "aaaa000000000002"
	mk(b, 600, at(6))
	// ...and so a resume there finds no room, says so, and changes nothing.
	if _, err := s.ResumeSandbox(ctx, a, "n1", cfg, at(7), time.Time{}); !errors.Is(err, ErrNoRoom) {
		t.Fatalf("resume on a full node: %v", err)
	}
	if sb, _ := s.GetSandbox(ctx, a); sb.Status != StatusPaused || sb.Resumes != 0 {
		t.Fatalf("a refused resume changed it: %s, %d resumes", sb.Status, sb.Resumes)
	}
	if _, err := s.UpdateSandbox(ctx, b, Update{Status: st(StatusFailed), Reason: "gone", Time: at(8)}); err != nil {
		t.Fatal(err)
	}
	sb, err = s.ResumeSandbox(ctx, a, "", cfg, at(9), time.Time{})
	if err != nil || sb.Status != StatusPending || sb.Node != "n1" || sb.Resumes != 1 || sb.Saved == nil || !sb.PauseRequestedAt.IsZero() {
		t.Fatalf("resume: %+v %v", sb, err)
	}
	// A late report of the run before the pause lands nowhere.
	if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(StatusExited), IfNode: &node, IfResumes: &zero, Time: at(10)}); !errors.Is(err, ErrStaleReport) {
		t.Errorf("report of the paused run after the resume: %v", err)
	}
	one := 1
	for _, to := range []Status{StatusStarting, StatusRunning} {
		if sb, err = s.UpdateSandbox(ctx, a, Update{Status: st(to), IfNode: &node, IfResumes: &one, Time: at(11)}); err != nil {
			t.Fatal(err)
		}
	}
	if sb.Saved != nil || !sb.StartedAt.Equal(at(2).UTC()) {
		t.Errorf("resumed: saved %+v, started at %s (want the first start, %s)", sb.Saved, sb.StartedAt, at(2).UTC())
	}
	// Paused again; then stopped (below): over, its saved state let go.
	if _, err := s.UpdateSandbox(ctx, a, Update{RequestPause: true, Time: at(12)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(StatusPaused), Saved: saved, IfResumes: &one, Time: at(13)}); err != nil {
		t.Fatal(err)
	}
	// Its node full again: a plain resume waits for any node that has room (which then
	// fetches the saved state), keeping the saved state's place.
	const c = "aaaa000000000003"
	mk(c, 600, at(13))
	sb, err = s.ResumeSandbox(ctx, a, "", cfg, at(13), time.Time{})
	if err != nil || sb.Status != StatusPending || sb.Node != "" || sb.Saved == nil || sb.Saved.Node != "n1" || !strings.Contains(sb.Reason, "cannot take it now") {
		t.Fatalf("resume with its node full: %+v %v", sb, err)
	}
	code := 143
	sb, err = s.UpdateSandbox(ctx, a, Update{Status: st(StatusExited), ExitCode: &code, Time: at(14)})
	if err != nil || sb.Saved != nil || sb.Status != StatusExited {
		t.Fatalf("stop while paused: %+v %v", sb, err)
	}
	if _, err := s.ResumeSandbox(ctx, a, "", cfg, at(15), time.Time{}); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("resume of an exited sandbox: %v", err)
	}
}

// Filesystem snapshots in the state: names are each token's own, a token's count is
// bounded, they survive a state snapshot, and removing their node marks them lost.
func TestSnapshotRecords(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	if _, err := s.RegisterNode(ctx, Node{ID: "n1", Address: "a:1", Capacity: Resources{VCPUs: 1, MemoryMiB: 1024}, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	snap := func(id, name, owner string) Snapshot {
		return Snapshot{ID: id, Name: name, Owner: owner, Node: "n1", Sandbox: "aaaa000000000001", Image: "busybox", ImageDigest: "sha256:x", CreatedAt: t0}
	}
	if _, err := s.PutSnapshot(ctx, snap("bbbb000000000001", "one", "u1"), 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutSnapshot(ctx, snap("bbbb000000000002", "one", "u1"), 2); !errors.Is(err, ErrNameTaken) {
		t.Errorf("same name, same token: %v", err)
	}
	if _, err := s.PutSnapshot(ctx, snap("bbbb000000000003", "one", "u2"), 2); err != nil {
		t.Errorf("same name, another token: %v", err)
	}
	if _, err := s.PutSnapshot(ctx, snap("bbbb000000000004", "two", "u1"), 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutSnapshot(ctx, snap("bbbb000000000005", "three", "u1"), 2); !errors.Is(err, ErrQuota) {
		t.Errorf("past the token's bound: %v", err)
	}
	if got, err := s.GetSnapshot(ctx, "one", "u2", false); err != nil || got.ID != "bbbb000000000003" {
		t.Errorf("u2's snapshot by name: %+v %v", got, err)
	}
	if _, err := s.GetSnapshot(ctx, "two", "u2", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("another token's snapshot: %v", err)
	}
	// An admin's call (any) finds its own name first; another's name held by several
	// tokens names none of them.
	if _, err := s.PutSnapshot(ctx, snap("bbbb000000000006", "one", "admin"), 0); err != nil {
		t.Fatal(err)
	}
	for range 5 { // map order must not decide
		if got, err := s.GetSnapshot(ctx, "one", "admin", true); err != nil || got.ID != "bbbb000000000006" {
			t.Fatalf("an admin's own snapshot by a name users share: %+v %v", got, err)
		}
	}
	if _, err := s.GetSnapshot(ctx, "one", "other-admin", true); !errors.Is(err, ErrAmbiguous) {
		t.Errorf("a name several tokens hold, by an admin who holds none: %v", err)
	}
	if err := s.DeleteSnapshot(ctx, "bbbb000000000006"); err != nil {
		t.Fatal(err)
	}
	// Through a state snapshot and back.
	f := newFSM(s.fsm.log)
	if err := f.Restore(io.NopCloser(bytes.NewReader(persist(t, s.fsm)))); err != nil {
		t.Fatal(err)
	}
	if got := f.listSnapshots(); len(got) != 3 {
		t.Errorf("after a state snapshot: %d snapshots", len(got))
	}
	if err := s.RemoveNode(ctx, "n1", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetSnapshot(ctx, "one", "u1", false); !strings.Contains(got.Lost, "n1 was removed") {
		t.Errorf("a snapshot of a removed node: lost %q", got.Lost)
	}
	if err := s.DeleteSnapshot(ctx, "bbbb000000000001"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetSnapshot(ctx, "one", "u1", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("after delete: %v", err)
	}
}

// A paused sandbox's own saved state is not counted against its resume on its node (the
// scheduler's view sums each node: its share is taken out).
func TestResumeDoesNotCountItsOwnSavedState(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	const a = "aaaa000000000009"
	sb := newSandbox(a, "", t0)
	sb.Spec.MemoryMiB, sb.Spec.DiskMiB = 600, 200
	// Room for the sandbox's disk and a little: not for it twice, nor for its disk and
	// its saved memory beside a second copy of it.
	disk := sb.Spec.Reserved().DiskMiB + 100
	if _, err := s.RegisterNode(ctx, Node{ID: "n1", Address: "a:1", Capacity: Resources{VCPUs: 1, MemoryMiB: 1024, DiskMiB: disk}, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	cfg := scheduler.Config{CPUOvercommit: 1, MemoryOvercommit: 1}
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	st := func(s Status) *Status { return &s }
	if err := s.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if res, err := s.PlaceSandboxes(ctx, []Plan{{a, "n1"}}, cfg, at(0)); err != nil || res[0].Err != "" {
		t.Fatalf("place: %+v %v", res, err)
	}
	node, zero := "n1", 0
	for _, to := range []Status{StatusStarting, StatusRunning} {
		if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(to), IfNode: &node, IfRestarts: &zero, IfResumes: &zero, Time: at(1)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{RequestPause: true, Time: at(2)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateSandbox(ctx, a, Update{Status: st(StatusPaused), Saved: &Saved{Node: "n1", Bytes: 300 << 20, At: at(3)}, IfNode: &node, IfResumes: &zero, Time: at(3)}); err != nil {
		t.Fatal(err)
	}
	got, err := s.ResumeSandbox(ctx, a, "", cfg, at(4), time.Time{})
	if err != nil || got.Node != "n1" || got.Status != StatusPending {
		t.Fatalf("resume on the node holding only it: node %q, %s (%s), %v", got.Node, got.Status, got.Reason, err)
	}
}
