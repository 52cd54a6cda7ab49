package cluster

import (
	"strconv"
	"strings"
	"testing"
)

// Pause and resume on a cluster node, through the servers: the saved state is on the
// sandbox's node; a restart of that node's agent while it is paused keeps it; the resume
// runs it there again, its counter carrying on.
func TestPauseResumeOnTheCluster(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "sleeper", "--constraint", "host==a1", "--insecure-registry", w.registry, image(), "--",
		"sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"))
	defer mustFW(t, "rm", "-f", id)
	waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	count := func() int {
		t.Helper()
		n, err := strconv.Atoi(strings.TrimSpace(mustFW(t, "exec", id, "--", "cat", "/tmp/count")))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitFor(t, minute, "the counter", func() bool {
		_, _, code := w.cli(t.Context(), nil, "exec", id, "--", "test", "-s", "/tmp/count")
		return code == 0
	})
	before := count()
	mustFW(t, "pause", id)
	sb := inspect(t, id)
	saved, _ := sb["saved"].(map[string]any)
	if sb["status"] != "paused" || saved == nil || saved["node"] != "a1" {
		t.Fatalf("paused: status %v, saved %v", sb["status"], saved)
	}
	if vms := w.vmsOf(w.agents[1], id); len(vms) > 0 {
		t.Errorf("a paused sandbox's VMM still runs on a1: %v", vms)
	}
	// The node's agent restarts while it is paused: nothing of it is lost.
	w.stop(w.agents[1], false)
	w.ensureRunning()
	if err := w.waitNodes(3, "ready", 2*minute); err != nil {
		t.Fatal(err)
	}
	if st := inspect(t, id)["status"]; st != "paused" {
		t.Fatalf("after a1's agent restarted: %v", st)
	}
	mustFW(t, "resume", id)
	sb = inspect(t, id)
	if sb["status"] != "running" || sb["node"] != "a1" || sb["details"].(map[string]any)["start_mode"] != "resume" {
		t.Fatalf("resumed: status %v node %v details %v", sb["status"], sb["node"], sb["details"])
	}
	if after := count(); after < before {
		t.Fatalf("counter went from %d to %d: restarted, not resumed", before, after)
	}
}
