package state

import (
	"bytes"
	"context"
	"errors"
	"io"
	"reflect"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

func TestPoolsSetListDelete(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})

	changed := s.Changed()
	got, err := s.SetPool(ctx, Pool{Image: "reg/b:1", Size: 2, VCPUs: 2, MemoryMiB: 512, InsecureRegistries: []string{"reg"}, UpdatedAt: t0})
	if err != nil {
		t.Fatal(err)
	}
	want := Pool{Image: "reg/b:1", Size: 2, Max: 2, VCPUs: 2, MemoryMiB: 512, InsecureRegistries: []string{"reg"}, UpdatedAt: t0}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("SetPool = %+v, want %+v (max defaults to size)", got, want)
	}
	select {
	case <-changed:
	default:
		t.Error("setting a pool did not signal Changed")
	}
	if _, err := s.SetPool(ctx, Pool{Image: "reg/a:1", Size: 1, Max: 5}); err != nil {
		t.Fatal(err)
	}
	// Replacing a pool keeps one entry per image.
	if _, err := s.SetPool(ctx, Pool{Image: "reg/b:1", Size: 3, Max: 4, UpdatedAt: t0.Add(time.Second)}); err != nil {
		t.Fatal(err)
	}
	pools, err := s.ListPools(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(pools) != 2 || pools[0].Image != "reg/a:1" || pools[1].Image != "reg/b:1" {
		t.Fatalf("ListPools = %+v, want a then b", pools)
	}
	if p := pools[0]; p.Size != 1 || p.Max != 5 || p.UpdatedAt.IsZero() {
		t.Errorf("pool a = %+v (a zero time defaults to now)", p)
	}
	if p := pools[1]; p.Size != 3 || p.Max != 4 || p.VCPUs != 0 || p.InsecureRegistries != nil || !p.UpdatedAt.Equal(t0.Add(time.Second)) {
		t.Errorf("replaced pool b = %+v", p)
	}
	// Callers get copies.
	pools[1].InsecureRegistries = append(pools[1].InsecureRegistries, "x")
	if again := s.LocalPools(); again[1].InsecureRegistries != nil {
		t.Errorf("a caller's change reached the store: %+v", again[1])
	}

	if err := s.DeletePool(ctx, "reg/a:1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePool(ctx, "reg/a:1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleting a missing pool: %v, want ErrNotFound", err)
	}
	// Size and max 0 delete too, and a missing pool is fine then.
	if _, err := s.SetPool(ctx, Pool{Image: "reg/b:1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetPool(ctx, Pool{Image: "reg/none"}); err != nil {
		t.Errorf("size 0 for an image without pool: %v", err)
	}
	if pools, _ := s.ListPools(ctx); len(pools) != 0 {
		t.Errorf("after deletes: %+v", pools)
	}
}

func TestPoolValidation(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	for _, p := range []Pool{
		{Size: 1},
		{Image: "x", Size: -1},
		{Image: "x", Size: MaxPoolSize + 1},
		{Image: "x", Size: 3, Max: 2},
		{Image: "x", Size: 1, Max: MaxPoolSize + 1},
		{Image: "x", Size: 0, Max: -1},
		{Image: "x", Size: 1, VCPUs: -1},
		{Image: "x", Size: 1, MemoryMiB: -1},
	} {
		if _, err := s.SetPool(ctx, p); !errors.Is(err, ErrInvalid) {
			t.Errorf("SetPool(%+v) = %v, want ErrInvalid", p, err)
		}
	}
	if err := s.DeletePool(ctx, ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("DeletePool(\"\") = %v", err)
	}
	// The limits themselves are fine; size 0 with a max lets the autoscaler start from none.
	for _, p := range []Pool{{Image: "x", Size: MaxPoolSize}, {Image: "y", Max: 3}} {
		if _, err := s.SetPool(ctx, p); err != nil {
			t.Errorf("SetPool(%+v): %v", p, err)
		}
	}
	// The state machine checks commands itself too (a log entry may come from anywhere).
	f := newFSM(quietLogger(t))
	res := applyAll(f, [][]byte{mustCmd(t, cmdSetPool, setPoolCmd{Pool{Image: "x", Size: 2, Max: 1, UpdatedAt: t0}}),
		mustCmd(t, cmdSetPool, setPoolCmd{Pool{Image: "x", Size: 1}})})
	for i, r := range res {
		if err, _ := r.(error); !errors.Is(err, ErrInvalid) {
			t.Errorf("entry %d: %v, want ErrInvalid", i+1, r)
		}
	}
}

func TestPoolsSurviveReopenAndSnapshot(t *testing.T) {
	ctx := context.Background()
	opts := Options{Dir: t.TempDir(), NodeID: "n1", TrailingLogs: 1}
	s := openStore(t, opts)
	if _, err := s.SetPool(ctx, Pool{Image: "in-snapshot", Size: 1, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetPool(ctx, Pool{Image: "deleted-later", Size: 1, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if err := s.raft.Snapshot().Error(); err != nil {
		t.Fatalf("force snapshot: %v", err)
	}
	if _, err := s.SetPool(ctx, Pool{Image: "in-log", Size: 2, Max: 3, MemoryMiB: 512, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePool(ctx, "deleted-later"); err != nil {
		t.Fatal(err)
	}
	want, _ := s.ListPools(ctx)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, opts)
	got, err := s.ListPools(ctx)
	if err != nil || len(got) != 2 || !reflect.DeepEqual(got, want) {
		t.Fatalf("pools after reopen: %+v %v\nwant %+v", got, err, want)
	}

	// An FSM snapshot carries pools to a replica that restores it.
	f := newFSM(quietLogger(t))
	applyAll(f, [][]byte{
		mustCmd(t, cmdSetPool, setPoolCmd{Pool{Image: "b", Size: 1, UpdatedAt: t0}}),
		mustCmd(t, cmdSetPool, setPoolCmd{Pool{Image: "a", Size: 2, Max: 4, InsecureRegistries: []string{"r"}, UpdatedAt: t0}}),
	})
	snap := persist(t, f)
	g := newFSM(quietLogger(t))
	if err := g.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	if a, b := f.listPools(), g.listPools(); !reflect.DeepEqual(a, b) || len(b) != 2 {
		t.Fatalf("restored pools %+v, want %+v", b, a)
	}
	if again := persist(t, g); !bytes.Equal(snap, again) {
		t.Errorf("restored state persists differently:\n%s\n%s", snap, again)
	}
}

// A node that reports the image's reference in Warm ranks first for a sandbox whose
// image has no digest yet (before its first pull anywhere).
func TestWarmLocalityByReference(t *testing.T) {
	const ref = "registry.example/app:1"
	n1 := &Node{ID: "n1", Status: NodeReady, Capacity: Resources{VCPUs: 4, MemoryMiB: 4096}}
	n2 := &Node{ID: "n2", Status: NodeReady, Capacity: Resources{VCPUs: 4, MemoryMiB: 4096}, Warm: []string{"sha256:other", ref}}
	snap := SchedulerSnapshot([]*Node{n1, n2}, nil)
	sb := newSandbox("aaaa000000000001", "", t0)
	sb.Spec.Image = ref
	req, err := SchedulerRequest(sb)
	if err != nil {
		t.Fatal(err)
	}
	p, err := scheduler.Place(snap, scheduler.Config{}, req)
	if err != nil || p.NodeID != "n2" {
		t.Fatalf("placed on %+v (%v), want n2 (warm for the reference)", p, err)
	}
	// Once the digest is known it is what counts.
	sb.ImageDigest = "sha256:d1"
	n1.Warm = []string{"sha256:d1"}
	req, _ = SchedulerRequest(sb)
	p, err = scheduler.Place(SchedulerSnapshot([]*Node{n1, n2}, nil), scheduler.Config{}, req)
	if err != nil || p.NodeID != "n1" {
		t.Fatalf("placed on %+v (%v), want n1 (warm for the digest)", p, err)
	}
}
