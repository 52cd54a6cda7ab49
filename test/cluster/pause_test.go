package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Pause and resume on a cluster node, through the servers: the saved state is on the
// sandbox's node; a restart of that node's agent, and the leading server killed, while
// it is paused keep it; the resume runs it there again, its counter carrying on.
func TestPauseResumeOnTheCluster(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "sleeper", "--constraint", "host==a1", "--insecure-registry", w.registry, image(), "--",
		"sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"))
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
	// The leading server dies while it is paused: the state is replicated, and the new
	// leader resumes it.
	w.stop(w.servers[leader(t)], true)
	w.ensureRunning()
	leader(t) // a new one is elected
	if err := w.waitNodes(3, "ready", 2*minute); err != nil {
		t.Fatal(err)
	}
	if st := inspect(t, id)["status"]; st != "paused" {
		t.Fatalf("after the leader was killed: %v", st)
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

// A paused sandbox resumed on another node: that node fetches the saved state from the
// one that holds it (node to node, mutual TLS), builds its own root disk of the image,
// and the guest carries on there; the holder lets its copy go. With the holder cordoned,
// a plain resume goes to another node by itself.
func TestResumeOnAnotherNode(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "mover", "--insecure-registry", w.registry, image(), "--",
		// The count is replaced whole (mv), never seen half-written: `echo > /tmp/count`
		// truncates first, and an exec's read in between saw it empty.
		"sh", "-c", "echo moved-file > /tmp/f; i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"))
	defer mustFW(t, "rm", "-f", id)
	waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	waitFor(t, minute, "the counter", func() bool {
		_, _, code := w.cli(t.Context(), nil, "exec", id, "--", "test", "-s", "/tmp/count")
		return code == 0
	})
	count := func() int {
		t.Helper()
		n, err := strconv.Atoi(strings.TrimSpace(mustFW(t, "exec", id, "--", "cat", "/tmp/count")))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	first, _ := inspect(t, id)["node"].(string)
	others := []string{}
	for _, n := range []string{"a0", "a1", "a2"} {
		if n != first {
			others = append(others, n)
		}
	}
	for i, step := range []struct{ from, to string }{{first, others[0]}, {others[0], others[1]}} {
		before := count()
		mustFW(t, "pause", id)
		if i == 0 {
			mustFW(t, "resume", "--node", step.to, id)
		} else {
			// The holder cannot take it (cordoned): the resume goes elsewhere by itself;
			// the first node too, so that it is the third.
			mustFW(t, "node", "cordon", step.from)
			mustFW(t, "node", "cordon", first)
			// Uncordoned whatever happens: the tests after this one share the nodes.
			t.Cleanup(func() { _, _ = w.fw(nil, "node", "uncordon", step.from); _, _ = w.fw(nil, "node", "uncordon", first) })
			mustFW(t, "resume", id)
			mustFW(t, "node", "uncordon", step.from)
			mustFW(t, "node", "uncordon", first)
		}
		sb := inspect(t, id)
		d, _ := sb["details"].(map[string]any)
		if sb["status"] != "running" || sb["node"] != step.to || d["start_mode"] != "resume" || !strings.Contains(fmt.Sprint(d["start_phases"]), "fetch=") {
			t.Fatalf("resumed from %s: status %v node %v details %v", step.from, sb["status"], sb["node"], d)
		}
		if after := count(); after < before {
			t.Fatalf("on %s the counter went from %d to %d: restarted, not resumed", step.to, before, after)
		}
		if got := strings.TrimSpace(mustFW(t, "exec", id, "--", "cat", "/tmp/f")); got != "moved-file" {
			t.Errorf("on %s: /tmp/f holds %q", step.to, got)
		}
		// The holder lets its copy go once the sandbox runs elsewhere.
		var holder *proc
		for i, a := range w.agents {
			if fmt.Sprintf("a%d", i) == step.from {
				holder = a
			}
		}
		waitFor(t, minute, "the holder's copy removed", func() bool {
			_, err := os.Stat(filepath.Join(holder.dataDir, "sandboxes", id))
			return os.IsNotExist(err)
		})
	}
}

// A fork whose source's node has no room for it (cordoned) is placed on another node,
// which fetches the source's saved state over the cluster's mutual TLS: it carries on
// from the saved instant there, with the source's files; its fetched copy goes once it
// runs. The source goes on.
func TestForkOnAnotherNode(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "fork-far", "--insecure-registry", w.registry, image(), "--",
		"sh", "-c", "echo fork-file > /tmp/f; i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"))
	defer mustFW(t, "rm", "-f", id)
	waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	count := func(id string) int {
		t.Helper()
		out, _, code := w.cli(t.Context(), nil, "exec", id, "--", "cat", "/tmp/count")
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if code != 0 || err != nil {
			return -1
		}
		return n
	}
	waitFor(t, minute, "the counter", func() bool { return count(id) > 0 })
	holder, _ := inspect(t, id)["node"].(string)
	mustFW(t, "node", "cordon", holder)
	defer mustFW(t, "node", "uncordon", holder)
	before := count(id)
	forks := strings.Fields(mustFW(t, "fork", id))
	if len(forks) != 1 {
		t.Fatalf("fork printed %v", forks)
	}
	fid := forks[0]
	defer mustFW(t, "rm", "-f", fid)
	sb := inspect(t, fid)
	d, _ := sb["details"].(map[string]any)
	if sb["status"] != "running" || sb["node"] == holder || d["start_mode"] != "fork" || !strings.Contains(fmt.Sprint(d["start_phases"]), "fetch=") {
		t.Fatalf("fork of a sandbox on cordoned %s: status %v node %v details %v", holder, sb["status"], sb["node"], d)
	}
	if n := count(fid); n < before {
		t.Errorf("the fork counts %d, below the source's %d before the fork: it did not carry on", n, before)
	}
	if got := strings.TrimSpace(mustFW(t, "exec", fid, "--", "cat", "/tmp/f")); got != "fork-file" {
		t.Errorf("the fork's /tmp/f holds %q", got)
	}
	waitSandbox(t, id, 2*minute, "the source running again", func(sb map[string]any) bool { return sb["status"] == "running" })
	// The fork's node lets its fetched copy of the source's saved state go.
	var far *proc
	for i, a := range w.agents {
		if fmt.Sprintf("a%d", i) == sb["node"] {
			far = a
		}
	}
	waitFor(t, minute, "the fetched copy removed", func() bool {
		_, err := os.Stat(filepath.Join(far.dataDir, "sandboxes", fid, "source"))
		return os.IsNotExist(err)
	})
}
