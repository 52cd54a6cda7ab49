package cluster

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	"github.com/fireworks-sandbox/fireworks/internal/shared/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

const (
	ingressDomain = "fireworks.localhost" // the servers' and agents' default
	xdsPort       = "7770"
)

// edge is a `fireworks ingress` process in the test's own (root) namespace, which reaches
// the servers and the nodes over the bridge like any other host.
type edge struct {
	addr string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func startEdge(t *testing.T, token string) *edge {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &edge{addr: ln.Addr().String(), done: make(chan struct{}), log: filepath.Join(w.root, "ingress.log")}
	ln.Close()
	logf, err := os.Create(e.log)
	if err != nil {
		t.Fatal(err)
	}
	e.cmd = exec.Command(w.bin, "ingress", "--server", "https://"+w.serverList(), "--token", token,
		"--ca", filepath.Join(w.caDir, pki.CACertFile), "--listen", e.addr, "--name", "test-edge", "--log-level", "debug")
	e.cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+filepath.Join(w.root, "none.json"))
	e.cmd.Stdout, e.cmd.Stderr = logf, logf
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = e.cmd.Wait(); logf.Close(); close(e.done) }()
	t.Cleanup(func() {
		_ = e.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-e.done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-e.cmd.Process.Pid, syscall.SIGKILL)
			<-e.done
		}
		if t.Failed() {
			data, _ := os.ReadFile(e.log)
			if len(data) > 6000 {
				data = data[len(data)-6000:]
			}
			fmt.Fprintf(os.Stderr, "---- ingress.log (tail) ----\n%s\n", data)
		}
	})
	return e
}

// get sends GET / for host to the edge; code -1 when the edge did not answer.
func (e *edge) get(host string, header http.Header) (int, string) {
	req, _ := http.NewRequest(http.MethodGet, "http://"+e.addr+"/", nil)
	req.Host = host
	for k, v := range header {
		req.Header[k] = v
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return -1, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitFor polls host until it answers want.
func (e *edge) waitFor(t *testing.T, host string, header http.Header, want int, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	var (
		code int
		body string
	)
	for time.Now().Before(deadline) {
		if code, body = e.get(host, header); code == want {
			return body
		}
		select {
		case <-e.done:
			t.Fatalf("fireworks ingress exited (log %s)", e.log)
		case <-time.After(300 * time.Millisecond):
		}
	}
	t.Fatalf("%s through the ingress: last %d %q, want %d", host, code, body, want)
	return ""
}

// ingressCert gets an ingress certificate with `fireworks ingress certificate`.
func ingressCert(t *testing.T, token string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	dir := t.TempDir()
	if _, err := w.fw([]string{"FIREWORKS_TOKEN=" + token}, "ingress", "certificate", "--out", dir, "--name", "test-certs"); err != nil {
		t.Fatal(err)
	}
	return loadCertDir(t, dir, "ingress")
}

// loadCertDir loads key pair name and the cluster CA from a certificate directory.
func loadCertDir(t *testing.T, dir, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	cert, err := pki.LoadKeyPair(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, pki.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return cert, pool
}

func agentAddr(node string) string {
	for i, a := range w.agents {
		if fmt.Sprintf("a%d", i) == node {
			return a.h.IP + ":" + nodePort
		}
	}
	return ""
}

// A standalone `fireworks ingress` follows the 3-server cluster's route table with an
// ingress token, gets its node certificate with it, and routes each host to the sandbox
// on its own node; it keeps serving while the server it follows restarts and picks the
// feed up again. The servers' xDS endpoint serves the same table to mutual-TLS clients.
func TestIngressCluster(t *testing.T) {
	need(t)
	t.Cleanup(w.ensureRunning)
	// Who may follow routes: ingress and admin tokens; user tokens are refused, and an
	// ingress token opens nothing else.
	edgeToken := strings.TrimSpace(mustFW(t, "token", "create", "--role", "ingress", "--name", "edge"))
	userToken := strings.TrimSpace(mustFW(t, "token", "create", "--role", "user", "--name", "not-an-edge"))
	if _, errOut, code := w.cli(context.Background(), []string{"FIREWORKS_TOKEN=" + userToken}, "ingress", "certificate", "--out", t.TempDir()); code == 0 || !strings.Contains(errOut, "ingress or admin token") {
		t.Errorf("a user token got an ingress certificate: exit %d %s", code, errOut)
	}
	if _, errOut, code := w.cli(context.Background(), []string{"FIREWORKS_TOKEN=" + edgeToken}, "ps"); code == 0 || !strings.Contains(errOut, "ingress token") {
		t.Errorf("an ingress token listed sandboxes: exit %d %s", code, errOut)
	}

	// Two sandboxes on two nodes, each serving its own name.
	serve := func(name, node string, port string) string {
		return strings.TrimSpace(mustFW(t, "run", "-d", "--name", name, "--constraint", "host=="+node, "-p", port, image(), "--",
			"sh", "-c", "mkdir -p /tmp/www && echo served-by-"+name+" > /tmp/www/index.html && exec httpd -f -p 8000 -h /tmp/www"))
	}
	idA := serve("ingress-a", "a0", "8000")        // private
	idB := serve("ingress-b", "a2", "8000:public") // public
	t.Cleanup(func() { _, _ = w.fw(nil, "rm", "-f", idA, idB) })
	sbA := waitSandbox(t, idA, 3*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	waitSandbox(t, idB, 3*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	tokenA, _ := sbA["access_token"].(string)
	hostA, hostB := routes.Host(8000, idA, ingressDomain), routes.Host(8000, idB, ingressDomain)
	withToken := http.Header{routes.TokenHeader: {tokenA}}

	e := startEdge(t, edgeToken)
	if body := e.waitFor(t, hostA, withToken, http.StatusOK, minute); strings.TrimSpace(body) != "served-by-ingress-a" {
		t.Errorf("%s (node a0): %q", hostA, body)
	}
	if body := e.waitFor(t, hostB, nil, http.StatusOK, minute); strings.TrimSpace(body) != "served-by-ingress-b" {
		t.Errorf("%s (node a2): %q", hostB, body)
	}
	if code, body := e.get(hostA, nil); code != http.StatusUnauthorized {
		t.Errorf("private port without token: %d %q", code, body)
	}
	if code, _ := e.get(routes.Host(8001, idB, ingressDomain), nil); code != http.StatusNotFound {
		t.Errorf("unpublished port: %d, want 404", code)
	}

	// E2B's REST API on the standalone edge: each call is made with its own key (the
	// edge's token gives none of its rights); a sandbox made through it runs on a node and
	// its envd answers through the edge by E2B's headers.
	e2bCall(t, e, "GET", "/v2/sandboxes", "", "", http.StatusUnauthorized)
	e2bCall(t, e, "GET", "/v2/sandboxes", edgeToken, "", http.StatusForbidden)
	if body := e2bCall(t, e, "GET", "/v2/sandboxes", userToken, "", http.StatusOK); strings.TrimSpace(body) != "[]" {
		t.Errorf("the user's sandboxes through E2B's API: %s", body)
	}
	// (As the admin: a user's sandbox may not pull from the test registry's private address.)
	mustFW(t, "template", "create", "cluster-e2b", image())
	e2bCall(t, e, "POST", "/sandboxes", userToken, `{"templateID":"cluster-e2b"}`, http.StatusNotFound) // the admin's template
	created := e2bCall(t, e, "POST", "/sandboxes", w.token, `{"templateID":"cluster-e2b","timeout":300,"metadata":{"k":"v"}}`, http.StatusCreated)
	var sbx struct{ SandboxID, EnvdAccessToken string }
	if err := json.Unmarshal([]byte(created), &sbx); err != nil || sbx.SandboxID == "" || sbx.EnvdAccessToken == "" {
		t.Fatalf("create through E2B's API: %s (%v)", created, err)
	}
	envd := http.Header{"E2b-Sandbox-Id": {sbx.SandboxID}, "E2b-Sandbox-Port": {"49983"}}
	// envd itself answers (through the node's tunnel): the path needs its token.
	if body := e.waitFor(t, "anything.example", envd, http.StatusUnauthorized, minute); !strings.Contains(body, "X-Access-Token") {
		t.Errorf("envd through the edge by E2B's headers: %q", body)
	}
	e2bCall(t, e, "DELETE", "/sandboxes/"+sbx.SandboxID, userToken, "", http.StatusNotFound) // not the user's
	e2bCall(t, e, "DELETE", "/sandboxes/"+sbx.SandboxID, w.token, "", http.StatusNoContent)
	e2bCall(t, e, "GET", "/sandboxes/"+sbx.SandboxID, w.token, "", http.StatusNotFound)

	// The node side: only edges with a certificate get in, and only to published ports of
	// sandboxes that node runs.
	cert, pool := ingressCert(t, edgeToken)
	td := &ingress.TunnelDialer{TLS: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool}, Timeout: 10 * time.Second}
	tunnelGet := func(r routes.Route) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c, err := td.DialSandbox(ctx, r)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if body, err := tunnelGet(routes.Route{Sandbox: idA, Port: 8000, NodeAddr: agentAddr("a0")}); err != nil || !strings.Contains(body, "served-by-ingress-a") {
		t.Errorf("tunnel to a0 with an ingress certificate: %q %v", body, err)
	}
	if _, err := tunnelGet(routes.Route{Sandbox: idA, Port: 22, NodeAddr: agentAddr("a0")}); err == nil || !strings.Contains(err.Error(), "502") {
		t.Errorf("tunnel to an unpublished port: %v, want a 502 refusal", err)
	}
	if _, err := tunnelGet(routes.Route{Sandbox: idA, Port: 8000, NodeAddr: agentAddr("a1")}); err == nil {
		t.Error("node a1 opened a tunnel to a sandbox it does not run")
	}
	noCert := &ingress.TunnelDialer{TLS: &tls.Config{RootCAs: pool}, Timeout: 10 * time.Second}
	if _, err := noCert.DialSandbox(context.Background(), routes.Route{Sandbox: idA, Port: 8000, NodeAddr: agentAddr("a0")}); err == nil {
		t.Error("a node opened a tunnel for a client without a certificate")
	}

	// s0 (first in the edge's server list, so the one it follows through) restarts with
	// an xDS listener. The edge keeps serving the last table meanwhile, then reconnects.
	s0 := w.servers[0]
	origArgs := slices.Clone(s0.args)
	t.Cleanup(func() { s0.args = origArgs })
	w.stop(s0, false)
	if code, body := e.get(hostB, nil); code != http.StatusOK {
		t.Errorf("with the followed server down: %d %q, want the last table to keep serving", code, body)
	}
	s0.args = append(slices.Clone(origArgs), "--xds-listen", s0.h.IP+":"+xdsPort)
	if err := w.start(s0); err != nil {
		t.Fatal(err)
	}
	if err := w.waitAPI(time.Minute); err != nil {
		t.Fatal(err)
	}

	xdsAddr := s0.h.IP + ":" + xdsPort
	names := func(creds credentials.TransportCredentials) ([]string, error) {
		conn, err := grpc.NewClient(xdsAddr, grpc.WithTransportCredentials(creds))
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			return nil, err
		}
		if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: "test-envoy", UserAgentName: "envoy"},
			TypeUrl: resourcev3.RouteType, ResourceNames: []string{xds.RouteConfigName}}); err != nil {
			return nil, err
		}
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		var out []string
		for _, a := range resp.GetResources() {
			var rc routev3.RouteConfiguration
			if err := a.UnmarshalTo(&rc); err != nil {
				return nil, err
			}
			for _, vh := range rc.GetVirtualHosts() {
				out = append(out, vh.GetName())
			}
		}
		return out, nil
	}
	mtls := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: s0.h.IP})
	t.Run("xds", func(t *testing.T) {
		deadline := time.Now().Add(minute)
		for {
			got, err := names(mtls)
			if err == nil && slices.Contains(got, hostA) && slices.Contains(got, hostB) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("xDS route configuration from s0: %v %v; want virtual hosts %s and %s", got, err, hostA, hostB)
			}
			time.Sleep(500 * time.Millisecond)
		}
		if got, err := names(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: s0.h.IP})); err == nil {
			t.Errorf("xDS answered a client without a certificate: %v", got)
		}
	})

	// The edge follows the feed again: a stop shows as 502, a removal as 404.
	mustFW(t, "stop", idB)
	e.waitFor(t, hostB, nil, http.StatusBadGateway, minute)
	mustFW(t, "rm", idB)
	e.waitFor(t, hostB, nil, http.StatusNotFound, minute)
	if body := e.waitFor(t, hostA, withToken, http.StatusOK, minute); strings.TrimSpace(body) != "served-by-ingress-a" {
		t.Errorf("%s after the feed reconnected: %q", hostA, body)
	}

	// Revoking the edge's token revokes the certificate it got: the servers' xDS refuses
	// it (and ends a stream it holds open), nodes refuse its tunnels after their next
	// heartbeat.
	open, err := grpc.NewClient(xdsAddr, grpc.WithTransportCredentials(mtls))
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
	defer scancel()
	held, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(open).StreamAggregatedResources(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: "held", UserAgentName: "envoy"},
		TypeUrl: resourcev3.RouteType, ResourceNames: []string{xds.RouteConfigName}}); err != nil {
		t.Fatal(err)
	}
	if _, err := held.Recv(); err != nil {
		t.Fatalf("an xDS stream before the revocation: %v", err)
	}
	edgeID, _, err := auth.Parse(edgeToken)
	if err != nil {
		t.Fatal(err)
	}
	mustFW(t, "token", "revoke", edgeID)
	ended := make(chan error, 1)
	go func() { // ends when the stream does (the server ends it, or sctx)
		for {
			if _, err := held.Recv(); err != nil {
				ended <- err
				return
			}
		}
	}()
	select {
	case err := <-ended:
		if sctx.Err() != nil {
			t.Errorf("the xDS stream of a revoked certificate stayed open a minute: %v", err)
		}
	case <-sctx.Done():
		t.Error("the xDS stream of a revoked certificate stayed open a minute")
	}
	if got, err := names(mtls); err == nil {
		t.Errorf("xDS answered a revoked edge certificate: %v", got)
	}
	deadline := time.Now().Add(30 * time.Second) // a few heartbeats
	for {
		_, err := tunnelGet(routes.Route{Sandbox: idA, Port: 8000, NodeAddr: agentAddr("a0")})
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("node a0 still opens tunnels for a revoked edge certificate 30 s after the revocation")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// e2bCall makes a call of E2B's REST API through the edge with key, wants code, and
// returns the body.
func e2bCall(t *testing.T, e *edge, method, path, key, body string, want int) string {
	t.Helper()
	req, _ := http.NewRequest(method, "http://"+e.addr+path, strings.NewReader(body))
	req.Host = "api." + ingressDomain
	if key != "" {
		req.Header.Set("X-API-Key", key)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := (&http.Client{Timeout: 5 * minute}).Do(req)
	if err != nil {
		t.Fatalf("%s %s through the edge: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Errorf("%s %s: %d %s, want %d", method, path, resp.StatusCode, b, want)
	}
	return string(b)
}
