package cluster

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// statusLine asks for path at addr (host:port) from inside sandbox id and returns the
// HTTP status line, or "" when the connection failed.
func statusLine(t *testing.T, id, addr, path string) string {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	out, err := w.fw(nil, "exec", id, "--", "sh", "-c",
		fmt.Sprintf(`printf 'GET %s HTTP/1.0\r\n\r\n' | nc -w 3 %s %s 2>/dev/null | head -n 1; true`, path, host, port))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// A sandbox on a cluster node reaches other hosts through its node's NAT but not its
// node's own address; a policy applied through any server reaches the node and takes
// effect on the running VM; port-forward goes CLI → server → node → guest; the network
// goes with the sandbox.
func TestNetworkOnTheCluster(t *testing.T) {
	need(t)
	w.ensureRunning()
	id := strings.TrimSpace(mustFW(t, "run", "-d", image(), "--", "sh", "-c",
		"mkdir -p /tmp/www && echo hello-cluster > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"))
	defer w.fw(nil, "rm", "-f", id)
	sb := waitSandbox(t, id, 3*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	details, _ := sb["details"].(map[string]any)
	pid, netns := details["pid"], fmt.Sprint(details["netns"])
	var nodeIP string
	for i, a := range w.agents {
		if fmt.Sprintf("a%d", i) == sb["node"] {
			nodeIP = a.h.IP
		}
	}
	if nodeIP == "" {
		t.Fatalf("sandbox on unknown node %v", sb["node"])
	}

	// The registry on the bridge is another host as far as the node is concerned.
	if got := statusLine(t, id, w.registry, "/v2/"); !strings.Contains(got, "200") {
		t.Fatalf("registry %s from the sandbox: %q", w.registry, got)
	}
	if got := statusLine(t, id, net.JoinHostPort(nodeIP, nodePort), "/"); got != "" {
		t.Errorf("the sandbox reached its own node's address %s: %q", nodeIP, got)
	}

	// Applied through a server (the CLI's first), enforced on the node.
	regHost, _, _ := net.SplitHostPort(w.registry)
	denyRegistry(t, id)
	show := mustFW(t, "policy", "show", id)
	if !strings.Contains(show, "deny "+regHost) || !strings.Contains(show, "Egress:") {
		t.Errorf("policy show from the node:\n%s", show)
	}
	if p := inspect(t, id)["details"].(map[string]any)["pid"]; p != pid {
		t.Errorf("the VM changed (pid %v -> %v)", pid, p)
	}

	// port-forward from this machine.
	if body := getLocal(t, portForward(t, id, 8080)); body != "hello-cluster" {
		t.Errorf("through port-forward: %q", body)
	}

	mustFW(t, "rm", "-f", id)
	waitFor(t, 30*time.Second, "the sandbox's network namespace to go", func() bool {
		_, err := os.Stat(filepath.Join("/run/netns", netns))
		return os.IsNotExist(err)
	})
}
