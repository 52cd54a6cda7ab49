package cluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
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
			nodeIP = a.h.ip
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
	pol := filepath.Join(t.TempDir(), "policy")
	if err := os.WriteFile(pol, []byte("default allow\ndeny "+regHost+" tcp\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mustFW(t, "policy", "apply", id, pol)
	if got := statusLine(t, id, w.registry, "/v2/"); got != "" {
		t.Errorf("registry answered after the policy denied it: %q", got)
	}
	show := mustFW(t, "policy", "show", id)
	if !strings.Contains(show, "deny "+regHost) || !strings.Contains(show, "Egress:") {
		t.Errorf("policy show from the node:\n%s", show)
	}
	if p := inspect(t, id)["details"].(map[string]any)["pid"]; p != pid {
		t.Errorf("the VM changed (pid %v -> %v)", pid, p)
	}

	// port-forward from this machine.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pf := exec.CommandContext(ctx, w.bin, "port-forward", id, fmt.Sprintf("%d:8080", port))
	pf.Env = append(os.Environ(), "FIREWORKS_CONFIG="+filepath.Join(w.root, "none.json"), "FIREWORKS_SERVER=https://"+w.serverList(),
		"FIREWORKS_TOKEN="+w.token, "FIREWORKS_CA="+filepath.Join(w.caDir, "ca.pem"))
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer pf.Wait()
	body := ""
	for i := 0; i < 100 && body == ""; i++ {
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port)); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = strings.TrimSpace(string(b))
		} else {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if body != "hello-cluster" {
		t.Errorf("through port-forward: %q", body)
	}
	cancel()

	mustFW(t, "rm", "-f", id)
	waitFor(t, 30*time.Second, "the sandbox's network namespace to go", func() bool {
		_, err := os.Stat(filepath.Join("/run/netns", netns))
		return os.IsNotExist(err)
	})
}
