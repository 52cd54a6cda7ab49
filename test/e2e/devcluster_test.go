package e2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
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
	// vCPUs are shown of what the scheduler may place (4x the node's by default), with the
	// node's own count beside.
	if !strings.Contains(lines[1], " x4)") {
		t.Errorf("node ls: want the vCPUs after overcommit and the node's own count (\"0/8 (2 x4)\"):\n%s", strings.Join(lines, "\n"))
	}

	// A constraint no node meets: the sandbox waits, says why, and `run` tells the user.
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--constraint", "zone==nowhere", img, "--", "true").stdout)
	defer world.cli(context.Background(), nil, "rm", "-f", id)
	waitReason(t, id, "constraint zone==nowhere")
	// An attached run says why it waits, and Ctrl-C ends the wait (the sandbox stays).
	defer world.cli(context.Background(), nil, "rm", "-f", "never-placed")
	cmd := exec.Command(world.bin, "run", "--name", "never-placed", "--constraint", "zone==nowhere", img, "--", "true")
	cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+world.config)
	var stderr testutil.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(stderr.String(), "is waiting for a node") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(stderr.String(), "zone==nowhere") {
		t.Errorf("an attached run of a sandbox no node takes says nothing about why it waits:\n%s", stderr.String())
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	select {
	case <-waited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("Ctrl-C did not end an attached run waiting for a node:\n%s", stderr.String())
	}
	if code := cmd.ProcessState.ExitCode(); code != 130 || !strings.Contains(stderr.String(), "stays pending") {
		t.Errorf("Ctrl-C while waiting: exit %d, want 130 and a word on the sandbox left pending:\n%s", code, stderr.String())
	}
	if sb := inspect(t, "never-placed"); sb["status"] != "pending" {
		t.Errorf("the interrupted run's sandbox is %v, want still pending", sb["status"])
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
	deadline = time.Now().Add(2 * time.Minute)
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
