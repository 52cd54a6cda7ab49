package state

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// The per-node index answers what a scan of every sandbox would (Involves), through
// creates, placements, status changes, removals, a node's removal and a restore; a
// node's version changes exactly when its answer does.
func TestAssignedIndexMatchesAScan(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{Dir: t.TempDir()})
	nodes := []string{"n1", "n2", "n3"}
	for _, n := range nodes {
		if _, err := s.RegisterNode(ctx, Node{ID: n, Address: n + ":1", Capacity: Resources{VCPUs: 64, MemoryMiB: 1 << 20}, UpdatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	scan := func(node string) []string {
		var out []string
		for _, sb := range s.LocalSandboxes() {
			if sb.Involves(node) {
				out = append(out, sb.ID)
			}
		}
		slices.Sort(out)
		return out
	}
	lastVer := map[string]uint64{}
	lastSet := map[string][]string{}
	check := func(step string) {
		t.Helper()
		for _, n := range nodes {
			sbs, ver := s.Assigned(n)
			var ids []string
			for _, sb := range sbs {
				ids = append(ids, sb.ID)
			}
			if want := scan(n); !slices.Equal(ids, want) {
				t.Fatalf("%s: node %s: index %v, scan %v", step, n, ids, want)
			}
			if !slices.Equal(ids, lastSet[n]) && ver == lastVer[n] {
				t.Fatalf("%s: node %s's set changed, its version (%d) did not", step, n, ver)
			}
			lastVer[n], lastSet[n] = ver, ids
		}
		// The per-node sums the placements check against are a scan's too.
		s.fsm.mu.RLock()
		full := SchedulerSnapshot(slices.Collect(maps.Values(s.fsm.nodes)), slices.Collect(maps.Values(s.fsm.sandboxes)))
		kept := maps.Clone(s.fsm.nodeUse)
		s.fsm.mu.RUnlock()
		sums := map[string]scheduler.Resources{}
		for _, a := range full.Allocations {
			u := sums[a.NodeID]
			sums[a.NodeID] = scheduler.Resources{VCPUs: u.VCPUs + a.Resources.VCPUs, MemoryMiB: u.MemoryMiB + a.Resources.MemoryMiB, DiskMiB: u.DiskMiB + a.Resources.DiskMiB}
		}
		if !maps.Equal(sums, kept) {
			t.Fatalf("%s: per-node use kept %v, a scan gives %v", step, kept, sums)
		}
		owners := map[string]Quota{}
		for _, sb := range s.LocalSandboxes() {
			owners[sb.Owner] = owners[sb.Owner].plus(quotaUse(&sb), 1)
		}
		s.fsm.mu.RLock()
		keptOwners := maps.Clone(s.fsm.ownerUse)
		s.fsm.mu.RUnlock()
		if !maps.Equal(owners, keptOwners) {
			t.Fatalf("%s: per-owner use kept %v, a scan gives %v", step, keptOwners, owners)
		}
		queued := 0
		for _, sb := range s.LocalSandboxes() {
			if sb.Queued() {
				queued++
			}
		}
		if q, _ := s.PlacementView(); q != (queued > 0) || s.fsm.queued != queued {
			t.Fatalf("%s: %d queued kept (view says %v), a scan finds %d", step, s.fsm.queued, q, queued)
		}
	}
	cfg := scheduler.Config{CPUOvercommit: 4, MemoryOvercommit: 1}
	var ids []string
	for i := range 9 {
		id := fmt.Sprintf("bbbb%012d", i)
		ids = append(ids, id)
		if err := s.CreateAndPlace(ctx, newSandbox(id, "", t0), Quota{}, nodes[i%3], cfg); err != nil {
			t.Fatal(err)
		}
		check("create and place " + id)
	}
	starting, exited := StatusStarting, StatusExited
	if _, err := s.UpdateSandbox(ctx, ids[0], Update{Status: &starting, Time: t0.Add(time.Second)}); err != nil {
		t.Fatal(err)
	}
	check("a status change")
	if _, err := s.UpdateSandbox(ctx, ids[0], Update{Status: &exited, Time: t0.Add(2 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	check("an exit")
	if err := s.DeleteSandbox(ctx, ids[3]); err != nil {
		t.Fatal(err)
	}
	check("a removal")
	if err := s.RemoveNode(ctx, "n2", t0.Add(3*time.Second)); err != nil {
		t.Fatal(err)
	}
	check("a node removed")
	// The leader's queue: sandboxes created without a node.
	q := []string{"cccc000000000000", "cccc000000000001", "cccc000000000002"}
	for _, id := range q {
		if err := s.CreateSandbox(ctx, newSandbox(id, "", t0)); err != nil {
			t.Fatal(err)
		}
		check("a create left to the pass " + id)
	}
	noFit := "waiting for a node: " + (&scheduler.NoFitError{}).Error()
	if _, err := s.UpdateSandbox(ctx, q[0], Update{PendingReason: &noFit, Time: t0.Add(4 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	check("a queued sandbox that fits nowhere")
	grace := time.Second
	if _, err := s.UpdateSandbox(ctx, q[1], Update{StopGrace: &grace, StopReason: "test", Time: t0.Add(4 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	check("a queued sandbox asked to stop")
	if res, err := s.PlaceSandboxes(ctx, []Plan{{SandboxID: q[0], NodeID: "n1"}}, cfg, t0.Add(5*time.Second)); err != nil || res[0].Err != "" {
		t.Fatal(err, res)
	}
	check("a queued sandbox placed")
	snap, err := s.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSandbox(ctx, ids[1]); err != nil {
		t.Fatal(err)
	}
	check("a removal before the restore")
	if err := s.fsm.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	check("a restore")
}
