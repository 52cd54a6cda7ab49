package e2e

import (
	"context"
	"strings"
	"testing"
	"time"
)

// `fireworks dev` is a one-node cluster: its node is listed and can be cordoned and
// drained, a start is placed by the control plane (constraints, pending reasons, restart
// policies), as on a cluster.
func TestDevIsAOneNodeCluster(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	lines := strings.Split(strings.TrimSpace(fw(t, 0, "node", "ls").stdout), "\n")
	if len(lines) != 2 || len(strings.Fields(lines[1])) < 2 || strings.Fields(lines[1])[1] != "ready" {
		t.Fatalf("node ls: want one ready node:\n%s", strings.Join(lines, "\n"))
	}
	node := strings.Fields(lines[1])[0]

	// A constraint no node meets: the sandbox waits, says why, and `run` tells the user.
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--constraint", "zone==nowhere", img, "--", "true").stdout)
	defer world.cli(context.Background(), nil, "rm", "-f", id)
	waitReason(t, id, "constraint zone==nowhere")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	r := world.cli(ctx, nil, "run", "--name", "never-placed", "--constraint", "zone==nowhere", img, "--", "true")
	cancel()
	defer world.cli(context.Background(), nil, "rm", "-f", "never-placed")
	if !strings.Contains(r.stderr, "is waiting for a node") || !strings.Contains(r.stderr, "zone==nowhere") {
		t.Errorf("an attached run of a sandbox no node takes says nothing about why it waits:\n%s", r.stderr)
	}

	// A cordoned node takes nothing new; uncordoned, it takes what waited.
	fw(t, 0, "node", "cordon", node)
	id2 := strings.TrimSpace(fw(t, 0, "run", "-d", img, "--", "true").stdout)
	defer world.cli(context.Background(), nil, "rm", "-f", id2)
	waitReason(t, id2, "cordoned")
	fw(t, 0, "node", "uncordon", node)
	waitStatus(t, id2, "exited")

	// A restart policy restarts a failing command (with backoff), up to its limit.
	id3 := strings.TrimSpace(fw(t, 0, "run", "-d", "--restart", "on-failure", img, "--", "sh", "-c", "exit 3").stdout)
	defer world.cli(context.Background(), nil, "rm", "-f", id3)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		sb := inspect(t, id3)
		if n, _ := sb["restarts"].(float64); n >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--restart on-failure: no restart after %s: %v %v", 2*time.Minute, sb["status"], sb["reason"])
		}
		time.Sleep(500 * time.Millisecond)
	}
	fw(t, 0, "rm", "-f", id3)

	// Draining the only node stops what runs there (--restart always: it is placed again
	// once the node takes sandboxes again).
	id4 := strings.TrimSpace(fw(t, 0, "run", "-d", "--restart", "always", img, "--", "sleep", "600").stdout)
	defer world.cli(context.Background(), nil, "rm", "-f", id4)
	waitStatus(t, id4, "running")
	fw(t, 0, "node", "drain", node)
	waitReason(t, id4, "draining")
	fw(t, 0, "node", "uncordon", node)
	sb := waitStatus(t, id4, "running")
	if n, _ := sb["restarts"].(float64); n < 1 {
		t.Errorf("after the drain the sandbox runs again with restarts %v, want at least 1", sb["restarts"])
	}
}

// waitReason waits until sandbox id is pending with a reason containing want.
func waitReason(t *testing.T, id, want string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		sb := inspect(t, id)
		reason, _ := sb["reason"].(string)
		if sb["status"] == "pending" && strings.Contains(reason, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s: %v (%q), want pending with a reason containing %q", id, sb["status"], reason, want)
		}
		time.Sleep(300 * time.Millisecond)
	}
}
