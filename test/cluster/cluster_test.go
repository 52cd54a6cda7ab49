package cluster

import (
	"context"
	"strings"
	"testing"
)

// A sandbox submitted to the cluster is placed on a node, boots there, and its output,
// exec and logs come back through the servers.
func TestRunOnTheCluster(t *testing.T) {
	need(t)
	out := mustFW(t, "run", "--name", "hello", "--insecure-registry", w.registry, image(), "--", "sh", "-c", "echo hello-from-$(hostname); uname -r")
	if !strings.Contains(out, "hello-from-hello") || !strings.Contains(out, "cloud-amd64") {
		t.Fatalf("run output: %q", out)
	}
	sb := inspect(t, "hello")
	if node, _ := sb["node"].(string); !strings.HasPrefix(node, "a") || sb["status"] != "exited" {
		t.Fatalf("sandbox ran on node %v, status %v", sb["node"], sb["status"])
	}

	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "svc", "--insecure-registry", w.registry, image(), "--", "sh", "-c", "echo up; sleep 600"))
	waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	if out := mustFW(t, "exec", "svc", "--", "sh", "-c", "echo exec-ok"); strings.TrimSpace(out) != "exec-ok" {
		t.Errorf("exec: %q", out)
	}
	if out := mustFW(t, "logs", "svc"); strings.TrimSpace(out) != "up" {
		t.Errorf("logs: %q", out)
	}
	// A follower answers too (it forwards to the leader), and --stale reads its own copy.
	for _, s := range w.servers {
		stdout, stderr, code := w.cli(context.Background(), []string{"FIREWORKS_SERVER=https://" + s.h.IP + ":" + apiPort}, "ps")
		if code != 0 || !strings.Contains(stdout, "svc") {
			t.Errorf("ps via %s: exit %d %q %q", s.h.IP, code, stdout, stderr)
		}
	}
	mustFW(t, "rm", "-f", "svc")
}
