package state

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// newGroup makes a main and sidecars named names, each reserving mem MiB.
func newGroup(mainID string, mem int, names ...string) []Sandbox {
	g := &Group{Main: mainID}
	var members []Sandbox
	for i, name := range append([]string{MainMemberName}, names...) {
		id := mainID
		if i > 0 {
			id = mainID[:15] + string(rune('a'+i))
		}
		sb := newSandbox(id, "", t0)
		sb.Owner = "u1"
		sb.Spec.MemoryMiB = mem
		sb.Spec.Group = g
		g.Members = append(g.Members, GroupMember{Name: name, ID: id, Reserved: sb.Spec.Reserved()})
		members = append(members, sb)
	}
	return members
}

// A group is created and placed as one: room for all of it on one node or none of it
// placed; a group that does not hold together, or passes the quota, creates nothing.
func TestGroupCreatedAndPlacedAsOne(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	if _, err := s.RegisterNode(ctx, Node{ID: "n1", Address: "a:1", Capacity: Resources{VCPUs: 8, MemoryMiB: 1000}, UpdatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	cfg := scheduler.Config{CPUOvercommit: 4, MemoryOvercommit: 1}

	// 3 x 400 MiB does not fit 1000 MiB: nothing is placed, though the main alone would.
	big := newGroup("b000000000000000", 400, "db", "cache")
	if err := s.CreateGroup(ctx, big, Quota{}, "n1", cfg); err != nil {
		t.Fatal(err)
	}
	for _, m := range big {
		if sb, _ := s.GetSandbox(ctx, m.ID); sb.Node != "" {
			t.Errorf("member %s of a group that does not fit was placed on %q", m.ID, sb.Node)
		}
	}
	// Nor by a later plan of the main alone.
	res, err := s.PlaceSandboxes(ctx, []Plan{{big[0].ID, "n1"}}, cfg, t0.Add(time.Second))
	if err != nil || len(res) != 1 || !strings.Contains(res[0].Err, "memory") {
		t.Errorf("placing the big group's main: %+v %v", res, err)
	}
	// Nor a sidecar on its own.
	res, _ = s.PlaceSandboxes(ctx, []Plan{{big[1].ID, "n1"}}, cfg, t0.Add(time.Second))
	if len(res) != 1 || !strings.Contains(res[0].Err, "sidecar") {
		t.Errorf("placing a sidecar whose main has no node: %+v", res)
	}

	small := newGroup("c000000000000000", 300, "db", "cache")
	if err := s.CreateGroup(ctx, small, Quota{}, "n1", cfg); err != nil {
		t.Fatal(err)
	}
	for _, m := range small {
		if sb, _ := s.GetSandbox(ctx, m.ID); sb.Node != "n1" {
			t.Errorf("member %s of a fitting group is on %q", m.ID, sb.Node)
		}
	}

	// Refused whole: a bad name, a main with a restart policy, a broken record, the quota.
	bad := newGroup("d000000000000000", 128, "DB")
	if err := s.CreateGroup(ctx, bad, Quota{}, "", cfg); !errors.Is(err, ErrInvalid) {
		t.Errorf("a sidecar named DB: %v", err)
	}
	bad = newGroup("d000000000000000", 128, "db")
	bad[0].Spec.Restart = RestartAlways
	if err := s.CreateGroup(ctx, bad, Quota{}, "", cfg); !errors.Is(err, ErrInvalid) {
		t.Errorf("a main that restarts: %v", err)
	}
	bad = newGroup("d000000000000000", 128, "db", "db2")
	bad[2].Spec.Group = &Group{Main: bad[0].ID, Members: bad[0].Spec.Group.Members[:2]}
	if err := s.CreateGroup(ctx, bad, Quota{}, "", cfg); !errors.Is(err, ErrInvalid) {
		t.Errorf("a member recording another group: %v", err)
	}
	bad = newGroup("d000000000000000", 128, "db")
	bad[1].Spec.Group.Members[1].Reserved.MemoryMiB = 1 // under-reserving the group's room
	if err := s.CreateGroup(ctx, bad, Quota{}, "", cfg); !errors.Is(err, ErrInvalid) {
		t.Errorf("a member recording less than it reserves: %v", err)
	}
	lone := newGroup("d000000000000000", 128, "db")[1]
	if err := s.CreateSandbox(ctx, lone); !errors.Is(err, ErrInvalid) {
		t.Errorf("a group member created alone: %v", err)
	}
	bad = newGroup("d000000000000000", 128, "db", "db2")
	if err := s.CreateGroup(ctx, bad, Quota{Sandboxes: 8}, "", cfg); !errors.Is(err, ErrQuota) {
		t.Errorf("a group past the token's bound (6 held, 3 more): %v", err)
	}
	for _, m := range bad {
		if _, err := s.GetSandbox(ctx, m.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("member %s of a refused group exists: %v", m.ID, err)
		}
	}
}

// When the main ends, the running sidecars are asked to stop and the unplaced ones end.
func TestGroupEndsWithItsMain(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	g := newGroup("e000000000000000", 128, "db", "late")
	if err := s.CreateGroup(ctx, g, Quota{}, "", scheduler.Config{}); err != nil {
		t.Fatal(err)
	}
	// main and db are placed by hand (no node registered), late never is.
	for _, id := range []string{g[0].ID, g[1].ID} {
		n := "n1"
		if _, err := s.UpdateSandbox(ctx, id, Update{Status: ptrStatus(StatusStarting), Node: &n, Time: t0.Add(time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	code := 0
	if _, err := s.UpdateSandbox(ctx, g[0].ID, Update{Status: ptrStatus(StatusExited), ExitCode: &code, Time: t0.Add(2 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	db, _ := s.GetSandbox(ctx, g[1].ID)
	if db.StopRequestedAt.IsZero() || db.StopGrace != GroupStopGrace || db.Status.Terminal() {
		t.Errorf("the running sidecar after its main ended: %s, stop requested %v (grace %s)", db.Status, db.StopRequestedAt, db.StopGrace)
	}
	late, _ := s.GetSandbox(ctx, g[2].ID)
	if late.Status != StatusExited || !strings.Contains(late.Reason, "group") {
		t.Errorf("the unplaced sidecar after its main ended: %s %q", late.Status, late.Reason)
	}
}

func ptrStatus(s Status) *Status { return &s }

// A group's snapshot lists parts that exist, are its own, of its owner and on its node;
// anything else is refused.
func TestGroupSnapshotParts(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	part := Snapshot{ID: "p000000000000001", Name: "g/db", Owner: "u1", Node: "n1", CreatedAt: t0, PartOf: "g000000000000001"}
	if _, err := s.PutSnapshot(ctx, part, 0); err != nil {
		t.Fatal(err)
	}
	group := Snapshot{ID: "g000000000000001", Name: "g", Owner: "u1", Node: "n1", CreatedAt: t0,
		Members: []SnapshotMember{{Name: "db", Snapshot: part.ID, Ready: "tcp:5432", Restart: RestartOnFailure}}}
	for _, bad := range []func(Snapshot) Snapshot{
		func(g Snapshot) Snapshot { g.Node = "n2"; return g },
		func(g Snapshot) Snapshot { g.Owner = "u2"; return g },
		func(g Snapshot) Snapshot { g.ID = "g000000000000002"; return g },
		func(g Snapshot) Snapshot {
			g.Members = []SnapshotMember{{Name: "db", Snapshot: "nope"}}
			return g
		},
		func(g Snapshot) Snapshot {
			g.Members = []SnapshotMember{{Name: "DB", Snapshot: part.ID}}
			return g
		},
		func(g Snapshot) Snapshot {
			g.Members = []SnapshotMember{{Name: "db", Snapshot: part.ID, Ready: "udp:1"}}
			return g
		},
	} {
		if _, err := s.PutSnapshot(ctx, bad(group), 0); !errors.Is(err, ErrInvalid) {
			t.Errorf("a group snapshot %+v: %v", bad(group), err)
		}
	}
	if _, err := s.PutSnapshot(ctx, group, 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetSnapshot(ctx, "g", "u1", false); len(got.Parts()) != 1 || got.Parts()[0] != part.ID {
		t.Errorf("the group snapshot's parts: %v", got.Parts())
	}
}
