package state

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// Volumes are per-token names with a bound; a sandbox mounts only volumes that exist, on
// one node; a volume is not forgotten while a sandbox that is not over mounts it; and the
// records survive a reopen from a snapshot.
func TestVolumeRecords(t *testing.T) {
	ctx := context.Background()
	opts := Options{Dir: t.TempDir(), TrailingLogs: 1}
	s := openStore(t, opts)
	vol := func(id, name, owner, node string) Volume {
		return Volume{ID: id, Name: name, Owner: owner, Node: node, SizeMiB: 64, CreatedAt: t0}
	}
	if _, err := s.PutVolume(ctx, vol("a000000000000001", "data", "u1", "n1"), 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutVolume(ctx, vol("a000000000000002", "data", "u1", "n1"), 2); !errors.Is(err, ErrNameTaken) {
		t.Errorf("same name, same token: %v", err)
	}
	if _, err := s.PutVolume(ctx, vol("a000000000000003", "data", "u2", "n2"), 2); err != nil {
		t.Errorf("same name, another token: %v", err)
	}
	if _, err := s.PutVolume(ctx, vol("a000000000000004", "more", "u1", "n1"), 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutVolume(ctx, vol("a000000000000005", "third", "u1", "n1"), 2); !errors.Is(err, ErrQuota) {
		t.Errorf("past the token's bound: %v", err)
	}
	if v, err := s.GetVolume(ctx, "data", "u2", false); err != nil || v.ID != "a000000000000003" {
		t.Errorf("u2's data: %+v %v", v, err)
	}
	if _, err := s.GetVolume(ctx, "more", "u2", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("another token's volume by name: %v", err)
	}
	if _, err := s.GetVolume(ctx, "data", "", true); !errors.Is(err, ErrAmbiguous) {
		t.Errorf("an admin's lookup of a name two tokens have: %v", err)
	}

	mount := func(id string, m ...VolumeMount) Sandbox {
		return Sandbox{ID: id, Owner: "u1", Status: StatusPending, CreatedAt: t0,
			Spec: SandboxSpec{Image: "busybox", Volumes: m, VolumeNode: "n1"}}
	}
	if err := s.CreateSandbox(ctx, mount("b000000000000001", VolumeMount{Volume: "a0000000000000ff", Path: "/x"})); !errors.Is(err, ErrNotFound) {
		t.Errorf("a sandbox mounting a volume that is not there: %v", err)
	}
	if err := s.CreateSandbox(ctx, mount("b000000000000002", VolumeMount{Volume: "a000000000000003", Path: "/x"})); !errors.Is(err, ErrInvalid) {
		t.Errorf("a sandbox mounting a volume of another node: %v", err)
	}
	if err := s.CreateSandbox(ctx, mount("b000000000000003", VolumeMount{Volume: "a000000000000001", Path: "/x"}, VolumeMount{Volume: "a000000000000004", Path: "/x"})); !errors.Is(err, ErrInvalid) {
		t.Errorf("two volumes at one path: %v", err)
	}
	if err := s.CreateSandbox(ctx, mount("b000000000000004", VolumeMount{Volume: "a000000000000001", Path: "/proc/x"})); !errors.Is(err, ErrInvalid) {
		t.Errorf("a mount under /proc: %v", err)
	}
	if err := s.CreateSandbox(ctx, mount("b000000000000005", VolumeMount{Volume: "a000000000000001", Path: "/data", ReadOnly: true})); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "a000000000000001"); !errors.Is(err, ErrInUse) {
		t.Errorf("delete of a mounted volume: %v", err)
	}
	if _, users, err := s.ListVolumes(ctx); err != nil || len(users["a000000000000001"]) != 1 || users["a000000000000001"][0] != "b000000000000005" {
		t.Errorf("users: %v %v", users, err)
	}
	if err := s.raft.Snapshot().Error(); err != nil {
		t.Fatalf("force snapshot: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, opts)
	vols, _, err := s.ListVolumes(ctx)
	if err != nil || len(vols) != 3 {
		t.Fatalf("volumes after reopen: %+v %v", vols, err)
	}
	if err := s.DeleteVolume(ctx, "a000000000000001"); !errors.Is(err, ErrInUse) {
		t.Errorf("delete of a mounted volume after reopen: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, "b000000000000005", Update{Status: ptr(StatusFailed), Reason: "gone", Time: t0}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "a000000000000001"); err != nil {
		t.Errorf("delete once its sandbox is over: %v", err)
	}
}

func TestParseVolumeMount(t *testing.T) {
	for in, want := range map[string]VolumeMount{"data:/d": {Path: "/d"}, "data:/d/e:ro": {Path: "/d/e", ReadOnly: true}, "data:/d:rw": {Path: "/d"}} {
		ref, m, err := ParseVolumeMount(in)
		if err != nil || ref != "data" || m != want {
			t.Errorf("ParseVolumeMount(%q) = %q %+v %v", in, ref, m, err)
		}
	}
	for _, bad := range []string{"data", ":/d", "data:d", "data:/", "data:/d:rx", "data:/d/../e", "data:/sys", "data:/a,b", "data:/d:ro:x"} {
		if _, _, err := ParseVolumeMount(bad); err == nil {
			t.Errorf("ParseVolumeMount(%q) accepted", bad)
		}
	}
}

// A volume shared with a token is found by it (by name or ID), as its owner's own are
// not; unshared, it is not.
func TestVolumeShares(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	if _, err := s.PutVolume(ctx, Volume{ID: "c000000000000001", Name: "data", Owner: "u1", Node: "n1", SizeMiB: 64, CreatedAt: t0}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetVolume(ctx, "data", "u2", false); !errors.Is(err, ErrNotFound) {
		t.Fatalf("before the share: %v", err)
	}
	if _, err := s.ShareVolume(ctx, "c000000000000001", VolumeShare{Token: "u1"}, false); !errors.Is(err, ErrInvalid) {
		t.Errorf("shared with its owner: %v", err)
	}
	v, err := s.ShareVolume(ctx, "c000000000000001", VolumeShare{Token: "u2", ReadOnly: true}, false)
	if sh, ok := v.ShareOf("u2"); err != nil || !ok || !sh.ReadOnly {
		t.Fatalf("share: %+v %v", v, err)
	}
	for _, ref := range []string{"data", "c000000000000001", "c0000000"} {
		if got, err := s.GetVolume(ctx, ref, "u2", false); err != nil || got.ID != "c000000000000001" {
			t.Errorf("the shared volume by %q: %+v %v", ref, got, err)
		}
	}
	if _, err := s.GetVolume(ctx, "data", "u3", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("a token it is not shared with: %v", err)
	}
	if _, err := s.ShareVolume(ctx, "c000000000000001", VolumeShare{Token: "u2"}, true); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetVolume(ctx, "data", "u2", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("after the unshare: %v", err)
	}
}

// A volume moves only while no sandbox that is not over mounts it, to a ready node; no
// sandbox may mount it while it moves; its end moves it, or (failed) leaves it with a note.
func TestVolumeMove(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	for _, n := range []string{"n1", "n2", "n3"} {
		if _, err := s.RegisterNode(ctx, Node{ID: n, Address: n + ":1", Capacity: Resources{VCPUs: 4, MemoryMiB: 4096, DiskMiB: 10000}, UpdatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.UpdateNode(ctx, "n3", NodeUpdate{Draining: ptr(true), Time: t0}); err != nil {
		t.Fatal(err)
	}
	const id = "d000000000000001"
	if _, err := s.PutVolume(ctx, Volume{ID: id, Name: "data", Owner: "u1", Node: "n1", SizeMiB: 64, CreatedAt: t0}, 0); err != nil {
		t.Fatal(err)
	}
	user := Sandbox{ID: "e000000000000001", Owner: "u1", Status: StatusPending, CreatedAt: t0,
		Spec: SandboxSpec{Image: "busybox", Volumes: []VolumeMount{{Volume: id, Path: "/data"}}, VolumeNode: "n1"}}
	if err := s.CreateSandbox(ctx, user); err != nil {
		t.Fatal(err)
	}
	if _, err := s.MoveVolume(ctx, id, "n2", "test", t0); !errors.Is(err, ErrInUse) {
		t.Errorf("move of a mounted volume: %v", err)
	}
	if _, err := s.UpdateSandbox(ctx, user.ID, Update{Status: ptr(StatusFailed), Reason: "gone", Time: t0}); err != nil {
		t.Fatal(err)
	}
	for to, want := range map[string]error{"n1": ErrInvalid, "n3": ErrNoRoom, "nx": ErrNotFound} {
		if _, err := s.MoveVolume(ctx, id, to, "test", t0); !errors.Is(err, want) {
			t.Errorf("move to %s: %v, want %v", to, err, want)
		}
	}
	if got := VolumeTarget(s.LocalNodes(), nil, "n1"); got != "n2" {
		t.Errorf("the target of a move off n1 (n3 draining): %q", got)
	}
	v, err := s.MoveVolume(ctx, id, "n2", "test", t0)
	if err != nil || v.Move == nil || v.Move.To != "n2" {
		t.Fatalf("move: %+v %v", v, err)
	}
	user.ID, user.Status = "e000000000000002", StatusPending
	if err := s.CreateSandbox(ctx, user); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "being moved") {
		t.Errorf("a sandbox mounting a moving volume: %v", err)
	}
	if _, err := s.VolumeMoved(ctx, id, "n1", "", t0); !errors.Is(err, ErrStaleReport) {
		t.Errorf("the end of a move elsewhere: %v", err)
	}
	if v, err = s.VolumeMoved(ctx, id, "n2", "the copy failed", t0); err != nil || v.Node != "n1" || v.Move != nil || v.MoveNote != "the copy failed" {
		t.Fatalf("a failed move: %+v %v", v, err)
	}
	if _, err := s.MoveVolume(ctx, id, "n2", "test", t0); err != nil {
		t.Fatal(err)
	}
	if v, err = s.VolumeMoved(ctx, id, "n2", "", t0); err != nil || v.Node != "n2" || v.Move != nil || v.MoveNote != "" {
		t.Fatalf("a move: %+v %v", v, err)
	}
	user.Spec.VolumeNode = "n2"
	if err := s.CreateSandbox(ctx, user); err != nil {
		t.Errorf("a sandbox mounting the moved volume on its new node: %v", err)
	}
}

// The volumes' node is told of the sandboxes it serves volumes to: placed on another
// node (or migrating off it), not over.
func TestVolumesOn(t *testing.T) {
	spec := SandboxSpec{Volumes: []VolumeMount{{Volume: "v", Path: "/v"}}, VolumeNode: "n1"}
	mig := &Migration{ID: "m", From: "n1", To: "n2"}
	for _, c := range []struct {
		sb   Sandbox
		want string
	}{
		{Sandbox{Spec: spec, Node: "n2", Status: StatusRunning}, "n1"},
		{Sandbox{Spec: spec, Node: "n2", Status: StatusPaused}, "n1"},
		{Sandbox{Spec: spec, Node: "n1", Status: StatusRunning}, ""},
		{Sandbox{Spec: spec, Node: "n1", Status: StatusRunning, Migration: mig}, "n1"},
		{Sandbox{Spec: spec, Node: "n2", Status: StatusExited}, ""},
		{Sandbox{Spec: spec, Status: StatusPending}, ""},
		{Sandbox{Node: "n2", Status: StatusRunning}, ""},
	} {
		if got := c.sb.VolumesOn(); got != c.want {
			t.Errorf("%s on %q (migration %v): VolumesOn %q, want %q", c.sb.Status, c.sb.Node, c.sb.Migration, got, c.want)
		}
		if c.want != "" && !c.sb.Involves(c.want) {
			t.Errorf("%s on %q: does not involve %s", c.sb.Status, c.sb.Node, c.want)
		}
	}
}

// A sandbox over but to run again under its restart policy holds its volume (no move,
// no delete); one run again after its volume moved mounts it where it is now; while it
// moves, the restart waits.
func TestRestartFollowsAMovedVolume(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	for _, n := range []string{"n1", "n2"} {
		if _, err := s.RegisterNode(ctx, Node{ID: n, Address: n + ":1", Capacity: Resources{VCPUs: 4, MemoryMiB: 4096, DiskMiB: 10000}, UpdatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	const id = "f000000000000001"
	if _, err := s.PutVolume(ctx, Volume{ID: id, Name: "data", Owner: "u1", Node: "n1", SizeMiB: 64, CreatedAt: t0}, 0); err != nil {
		t.Fatal(err)
	}
	sb := Sandbox{ID: "f100000000000001", Owner: "u1", Status: StatusPending, CreatedAt: t0,
		Spec: SandboxSpec{Image: "busybox", Restart: RestartAlways, Volumes: []VolumeMount{{Volume: id, Path: "/data"}}, VolumeNode: "n1", VolumeAddress: "n1:1"}}
	if err := s.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateSandbox(ctx, sb.ID, Update{Status: ptr(StatusFailed), Reason: "crashed", Time: t0}); err != nil {
		t.Fatal(err)
	}
	// Over but to run again: it still uses the volume.
	if _, err := s.MoveVolume(ctx, id, "n2", "test", t0); !errors.Is(err, ErrInUse) {
		t.Fatalf("a move of a volume a sandbox to restart mounts: %v", err)
	}
	if err := s.DeleteVolume(ctx, id); !errors.Is(err, ErrInUse) {
		t.Fatalf("a delete of a volume a sandbox to restart mounts: %v", err)
	}
	// Given up by the leader: no longer.
	if _, err := s.UpdateSandbox(ctx, sb.ID, Update{Runtime: map[string]string{RestartGivenUp: "limit"}, Time: t0}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.MoveVolume(ctx, id, "n2", "test", t0); err != nil {
		t.Fatal(err)
	}
	restart := Update{Status: ptr(StatusPending), Restart: true, Reason: "restart", Time: t0}
	if _, err := s.UpdateSandbox(ctx, sb.ID, restart); !errors.Is(err, ErrInUse) {
		t.Errorf("a restart while its volume moves: %v", err)
	}
	if _, err := s.VolumeMoved(ctx, id, "n2", "", t0); err != nil {
		t.Fatal(err)
	}
	got, err := s.UpdateSandbox(ctx, sb.ID, restart)
	if err != nil || got.Spec.VolumeNode != "n2" || got.Spec.VolumeAddress != "n2:1" {
		t.Fatalf("restarted after its volume moved: %+v %v", got.Spec, err)
	}
}

// The volume node's view of a sandbox it serves volumes to keeps what VolumesOn reads
// and drops its secrets.
func TestForVolumeNode(t *testing.T) {
	sb := Sandbox{ID: "x", Status: StatusRunning, Node: "n2", AccessToken: "secret", Migration: &Migration{ID: "m", From: "n2", To: "n3"},
		Spec: SandboxSpec{Image: "img", Env: []string{"K=V"}, Volumes: []VolumeMount{{Volume: "v", Path: "/v"}}, VolumeNode: "n1"}}
	v := sb.ForVolumeNode()
	if v.AccessToken != "" || len(v.Spec.Env) != 0 || v.Spec.Image != "" {
		t.Errorf("the volume node's view keeps %+v", v)
	}
	if v.VolumesOn() != "n1" || v.MigratingTo() != sb.MigratingTo() || v.Node != "n2" || len(v.Spec.Volumes) != 1 {
		t.Errorf("the volume node's view: VolumesOn %q, MigratingTo %q, node %q", v.VolumesOn(), v.MigratingTo(), v.Node)
	}
}
