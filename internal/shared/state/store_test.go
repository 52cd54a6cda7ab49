package state

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

func openStore(t *testing.T, opts Options) *Store {
	t.Helper()
	if opts.NodeID == "" {
		opts.NodeID = "test"
	}
	opts.Logger = quietLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Open(ctx, opts)
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func newSandbox(id, name string, at time.Time) Sandbox {
	return Sandbox{ID: id, Name: name, Spec: SandboxSpec{Image: "docker.io/library/alpine", Cmd: []string{"true"}, Timeout: time.Minute}, CreatedAt: at}
}

func TestStoreLifecycle(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})

	id := NewID()
	if len(id) != 16 || id == NewID() {
		t.Fatalf("NewID = %q", id)
	}
	// Times in another zone and with a monotonic reading come back as equal UTC times.
	created := time.Now().In(time.FixedZone("x", 3600))
	if err := s.CreateSandbox(ctx, newSandbox(id, "web", created)); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{id, "web", id[:4], id[:10]} {
		sb, err := s.GetSandbox(ctx, key)
		if err != nil {
			t.Fatalf("get %q: %v", key, err)
		}
		if sb.ID != id || sb.Status != StatusPending || !sb.CreatedAt.Equal(created) || sb.CreatedAt.Location().String() != "UTC" {
			t.Fatalf("get %q = %+v", key, sb)
		}
		if len(sb.Events) != 1 || sb.Events[0].Status != StatusPending {
			t.Fatalf("events = %+v", sb.Events)
		}
	}

	steps := []Update{
		{Status: ptr(StatusStarting), Node: ptr("node-a"), Accel: ptr("tcg")},
		{ImageDigest: ptr("sha256:abc"), Runtime: map[string]string{"pid": "123"}},
		{Status: ptr(StatusRunning)},
		{Status: ptr(StatusExited), Reason: "process exited", ExitCode: ptr(7), Signal: ptr(0)},
	}
	var last Sandbox
	for i, u := range steps {
		u.Time = created.Add(time.Duration(i+1) * time.Second)
		var err error
		if last, err = s.UpdateSandbox(ctx, id, u); err != nil {
			t.Fatalf("update %d: %v", i, err)
		}
	}
	got, err := s.GetSandbox(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, last) {
		t.Fatalf("get after update differs from update's result:\n%+v\n%+v", got, last)
	}
	if got.Status != StatusExited || got.ExitCode != 7 || got.Reason != "process exited" || got.Node != "node-a" ||
		got.Accel != "tcg" || got.ImageDigest != "sha256:abc" || got.Runtime["pid"] != "123" {
		t.Fatalf("after updates: %+v", got)
	}
	if !got.StartedAt.Equal(created.Add(3*time.Second)) || !got.FinishedAt.Equal(created.Add(4*time.Second)) {
		t.Fatalf("started %v finished %v", got.StartedAt, got.FinishedAt)
	}
	if n := len(got.Events); n != 4 || got.Events[3].Reason != "process exited" {
		t.Fatalf("events = %+v", got.Events)
	}

	_, err = s.UpdateSandbox(ctx, id, Update{Status: ptr(StatusRunning), Time: created})
	if !errors.Is(err, ErrInvalidTransition) || !strings.Contains(err.Error(), "exited is final") {
		t.Fatalf("exited→running: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, id, Update{Status: ptr(StatusExited)}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("update without time: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, "missing", Update{Time: created}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("update missing: %v", err)
	}

	if err := s.DeleteSandbox(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetSandbox(ctx, "web"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if err := s.DeleteSandbox(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	// The name is free again.
	if err := s.CreateSandbox(ctx, newSandbox(NewID(), "web", created)); err != nil {
		t.Fatalf("reuse name after delete: %v", err)
	}
}

func TestStoreUniqueness(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	if err := s.CreateSandbox(ctx, newSandbox("aaaa1111", "web", t0)); err != nil {
		t.Fatal(err)
	}
	err := s.CreateSandbox(ctx, newSandbox("bbbb2222", "web", t0))
	if !errors.Is(err, ErrNameTaken) || !strings.Contains(err.Error(), `"web"`) {
		t.Fatalf("duplicate name: %v", err)
	}
	if err := s.CreateSandbox(ctx, newSandbox("aaaa1111", "other", t0)); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate ID: %v", err)
	}
	// Unnamed sandboxes do not collide with each other.
	for _, id := range []string{"aaaa2222", "cccc3333"} {
		if err := s.CreateSandbox(ctx, newSandbox(id, "", t0.Add(time.Second))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.GetSandbox(ctx, "aaaa"); !errors.Is(err, ErrAmbiguous) {
		t.Fatalf("ambiguous prefix: %v", err)
	}
	if sb, err := s.GetSandbox(ctx, "aaaa2"); err != nil || sb.ID != "aaaa2222" {
		t.Fatalf("unique prefix: %v %v", sb.ID, err)
	}
	if _, err := s.GetSandbox(ctx, "ccc"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("too-short prefix: %v", err)
	}
	if _, err := s.GetSandbox(ctx, "dddd"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("no match: %v", err)
	}
	list, err := s.ListSandboxes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, sb := range list {
		ids = append(ids, sb.ID)
	}
	if want := []string{"aaaa1111", "aaaa2222", "cccc3333"}; !reflect.DeepEqual(ids, want) {
		t.Fatalf("list order = %v, want %v", ids, want)
	}
}

func TestStoreReopenAfterSnapshot(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	// TrailingLogs 1: a snapshot compacts the log, so reopening must use the snapshot.
	opts := Options{Dir: dir, NodeID: "n1", TrailingLogs: 1}
	s := openStore(t, opts)

	create := func(i int) {
		t.Helper()
		if err := s.CreateSandbox(ctx, newSandbox(fmt.Sprintf("%016x", i), fmt.Sprintf("sb-%d", i), t0.Add(time.Duration(i)*time.Second))); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		create(i)
	}
	if _, err := s.UpdateSandbox(ctx, fmt.Sprintf("%016x", 1), Update{Status: ptr(StatusStarting), Time: t0}); err != nil {
		t.Fatal(err)
	}
	// nil ("the image's") and empty (override to nothing) are different commands.
	empty := newSandbox("e000000000000000", "empty-entrypoint", t0)
	empty.Spec.Entrypoint, empty.Spec.Cmd = []string{}, nil
	if err := s.CreateSandbox(ctx, empty); err != nil {
		t.Fatal(err)
	}
	if err := s.PutMeta(ctx, "cluster-name", []byte("dev")); err != nil {
		t.Fatal(err)
	}
	if err := s.raft.Snapshot().Error(); err != nil {
		t.Fatalf("force snapshot: %v", err)
	}
	// More entries after the snapshot: they live only in the log.
	for i := 10; i < 15; i++ {
		create(i)
	}
	if _, err := s.UpdateSandbox(ctx, fmt.Sprintf("%016x", 1), Update{Status: ptr(StatusFailed), Reason: "boom", Time: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSandbox(ctx, fmt.Sprintf("%016x", 2)); err != nil {
		t.Fatal(err)
	}
	if err := s.PutMeta(ctx, "gone", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMeta(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	first, err := s.bolt.FirstIndex()
	if err != nil || first <= 1 {
		t.Fatalf("log not compacted by the snapshot: first index %d, %v", first, err)
	}
	before, err := s.ListSandboxes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(before) != 15 {
		t.Fatalf("before reopen: %d sandboxes", len(before))
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := s.GetSandbox(ctx, "sb-1"); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
	if err := s.CreateSandbox(ctx, newSandbox(NewID(), "", t0)); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after Close: %v", err)
	}

	s2 := openStore(t, opts)
	after, err := s2.ListSandboxes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("state changed across reopen:\nbefore %+v\nafter  %+v", before, after)
	}
	if v, err := s2.GetMeta(ctx, "cluster-name"); err != nil || string(v) != "dev" {
		t.Fatalf("meta after reopen: %q %v", v, err)
	}
	if _, err := s2.GetMeta(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted meta after reopen: %v", err)
	}
	if sb, err := s2.GetSandbox(ctx, "empty-entrypoint"); err != nil || sb.Spec.Entrypoint == nil || len(sb.Spec.Entrypoint) != 0 || sb.Spec.Cmd != nil {
		t.Fatalf("empty vs nil lost across reopen: %#v %#v, %v", sb.Spec.Entrypoint, sb.Spec.Cmd, err)
	}
	if sb, err := s2.GetSandbox(ctx, "sb-1"); err != nil || sb.Status != StatusFailed || len(sb.Events) != 3 {
		t.Fatalf("sb-1 after reopen: %+v %v", sb, err)
	}
	// Still writable, and the name index was rebuilt from the snapshot.
	if err := s2.CreateSandbox(ctx, newSandbox(NewID(), "sb-3", t0)); !errors.Is(err, ErrNameTaken) {
		t.Fatalf("name from the snapshot not enforced: %v", err)
	}
	if err := s2.CreateSandbox(ctx, newSandbox(NewID(), "sb-2", t0)); err != nil {
		t.Fatalf("name of a sandbox deleted after the snapshot: %v", err)
	}
}

func TestStoreSnapshotsAutomatically(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	opts := Options{Dir: dir, SnapshotThreshold: 4, SnapshotInterval: 10 * time.Millisecond, TrailingLogs: 2}
	s := openStore(t, opts)
	for i := range 20 {
		if err := s.CreateSandbox(ctx, newSandbox(NewID(), fmt.Sprintf("n%d", i), t0)); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		metas, err := s.snaps.List()
		if err != nil {
			t.Fatal(err)
		}
		first, err := s.bolt.FirstIndex()
		if err != nil {
			t.Fatal(err)
		}
		if len(metas) > 0 && first > 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no automatic snapshot and compaction: %d snapshots, first log index %d", len(metas), first)
		}
		time.Sleep(20 * time.Millisecond)
	}
	before, _ := s.ListSandboxes(ctx)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	after, err := openStore(t, opts).ListSandboxes(ctx)
	if err != nil || !reflect.DeepEqual(before, after) || len(after) != 20 {
		t.Fatalf("after reopen: %d sandboxes (%v), want the 20 from before", len(after), err)
	}
}

func TestStoreConcurrentCreates(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	const unique, contenders = 64, 16
	var wg sync.WaitGroup
	errs := make(chan error, unique+contenders)
	var mu sync.Mutex
	won := 0
	for i := range unique {
		wg.Go(func() {
			errs <- s.CreateSandbox(ctx, newSandbox(NewID(), fmt.Sprintf("u%d", i), t0.Add(time.Duration(i))))
		})
	}
	for range contenders {
		wg.Go(func() {
			err := s.CreateSandbox(ctx, newSandbox(NewID(), "shared", t0))
			switch {
			case err == nil:
				mu.Lock()
				won++
				mu.Unlock()
			case !errors.Is(err, ErrNameTaken):
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if won != 1 {
		t.Fatalf("%d creates of the same name succeeded, want 1", won)
	}
	list, err := s.ListSandboxes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != unique+1 {
		t.Fatalf("%d sandboxes, want %d", len(list), unique+1)
	}
	seen := map[string]bool{}
	for _, sb := range list {
		if seen[sb.ID] || seen[sb.Name] {
			t.Fatalf("duplicate %s/%s", sb.ID, sb.Name)
		}
		seen[sb.ID], seen[sb.Name] = true, true
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := Open(ctx, Options{NodeID: "x"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("no dir: %v", err)
	}
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir, NodeID: "a"})

	// A second opener of a live directory fails instead of hanging on bolt's lock.
	if s2, err := Open(ctx, Options{Dir: dir, NodeID: "a", Logger: quietLogger(t)}); err == nil {
		_ = s2.Close()
		t.Fatal("second Open of a directory in use succeeded")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := Open(ctx, Options{Dir: dir, NodeID: "b", Logger: quietLogger(t)})
	if err == nil || !strings.Contains(err.Error(), `"b"`) {
		t.Fatalf("reopen with another node ID: %v", err)
	}
	// The failed opens released everything: the right ID still opens.
	openStore(t, Options{Dir: dir, NodeID: "a"})
}

// Reads and writes racing Close end with ErrClosed (or succeed), never hang: raft leaves
// a VerifyLeader queued at Shutdown unanswered, which Store must not run into.
func TestStoreCloseWhileBusy(t *testing.T) {
	ctx := context.Background()
	for round := range 5 {
		s := openStore(t, Options{Dir: t.TempDir()})
		if err := s.CreateSandbox(ctx, newSandbox("abcd0000", "x", t0)); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		started := make(chan struct{}, 8)
		for i := range 8 {
			wg.Go(func() {
				started <- struct{}{}
				for {
					var err error
					if i%2 == 0 {
						_, err = s.GetSandbox(ctx, "x")
					} else {
						_, err = s.UpdateSandbox(ctx, "abcd0000", Update{Runtime: map[string]string{"k": fmt.Sprint(i)}, Time: t0})
					}
					if err != nil {
						if !errors.Is(err, ErrClosed) && !strings.Contains(err.Error(), "shut") {
							t.Errorf("round %d: %v", round, err)
						}
						return
					}
				}
			})
		}
		for range 8 {
			<-started
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: calls still blocked 30s after Close", round)
		}
	}
}

// A short ID (the guest's default hostname) is never all digits, which resolvers treat as
// a number.
func TestNewIDShortHasALetter(t *testing.T) {
	for range 20000 {
		if id := NewID(); strings.Trim(id[:12], "0123456789") == "" || len(id) != 16 {
			t.Fatalf("NewID() = %q", id)
		}
	}
}
