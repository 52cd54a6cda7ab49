package e2e

import (
	"context"
	"encoding/json"
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

	"github.com/coder/websocket"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	grpcxds "google.golang.org/grpc/xds" // registers the xds:/// resolver and its balancers

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// ingressDomain is dev's default ingress domain.
const ingressDomain = "fireworks.localhost"

// pushWebImage pushes busybox plus /bin/guestweb (HTTP/1.1, h2c, WebSocket echo; see
// internal/testutil/guestweb) as web:latest and returns its ref.
func pushWebImage(t *testing.T) string { return pushToolImage(t, "guestweb", "web:latest") }

// pushToolImage pushes busybox plus the test program ./internal/testutil/TOOL as
// /bin/TOOL, tagged tag, and returns its ref.
func pushToolImage(t *testing.T, tool, tag string) string {
	t.Helper()
	bin, err := testutil.BuildGuestTool(t.TempDir(), tool)
	if err != nil {
		t.Fatal(err)
	}
	body, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	img := testimage.WithLayers(t, testimage.Busybox(t),
		testimage.Layer(t, testimage.Entry{Name: "bin/" + tool, Mode: 0o755, Body: string(body)}))
	ref := image(tag)
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

// freeLoopbackAddr picks a loopback port for a server the test starts in another process.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// edgeClient talks to the ingress at addr whatever host a URL names, as DNS pointing
// *.domain at the edge would.
type edgeClient struct {
	addr      string
	h1, h2c   *http.Client
	wsDialCtx func(ctx context.Context, network, _ string) (net.Conn, error)
}

func newEdgeClient(addr string) *edgeClient {
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
	var h2 http.Protocols
	h2.SetUnencryptedHTTP2(true)
	return &edgeClient{
		addr:      addr,
		h1:        &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}, Timeout: 30 * time.Second},
		h2c:       &http.Client{Transport: &http.Transport{DialContext: dial, Protocols: &h2}, Timeout: 30 * time.Second},
		wsDialCtx: dial,
	}
}

type edgeAnswer struct {
	code  int
	proto string
	body  string
}

func (c *edgeClient) get(t *testing.T, hc *http.Client, host, path string, header http.Header) edgeAnswer {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+host+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET http://%s%s via %s: %v", host, path, c.addr, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return edgeAnswer{code: resp.StatusCode, proto: resp.Proto, body: string(b)}
}

// waitAnswer polls host until it answers want (the guest's servers take a moment to start,
// and the edge's table follows the state asynchronously).
func (c *edgeClient) waitAnswer(t *testing.T, host string, header http.Header, want int) edgeAnswer {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var a edgeAnswer
	for time.Now().Before(deadline) {
		a = c.get(t, c.h1, host, "/", header)
		if a.code == want {
			return a
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatalf("%s: last answer %d %q, want %d", host, a.code, a.body, want)
	return a
}

// seen is what guestweb reports about a request.
type seen struct {
	Proto       string `json:"proto"`
	Host        string `json:"host"`
	AccessToken string `json:"access_token"`
	XFF         string `json:"x_forwarded_for"`
}

func decodeSeen(t *testing.T, a edgeAnswer) seen {
	t.Helper()
	var s seen
	if err := json.Unmarshal([]byte(a.body), &s); err != nil {
		t.Fatalf("guestweb answer %d %q: %v", a.code, a.body, err)
	}
	return s
}

// The built-in ingress in `fireworks dev` routes <port>-<sandbox>.<domain> to a real
// sandbox's published ports: HTTP/1.1, h2c, WebSocket; private ports need the sandbox's
// token; unknown hosts get 404, a stopped sandbox 502 and a removed one 404.
func TestIngress(t *testing.T) {
	need(t)
	web := pushWebImage(t)
	addr, xdsAddr := freeLoopbackAddr(t), freeLoopbackAddr(t)
	restartDev(t, "--ingress-listen", addr, "--xds-listen", xdsAddr)
	t.Cleanup(func() { restartDev(t) })
	c := newEdgeClient(addr)

	// One VM serves every case: busybox httpd on 8000 (private), guestweb on 8080
	// (public, with gRPC on 9090, public) and 8081 (private).
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "ingress-web", "-p", "8000", "-p", "8080:public", "-p", "8081",
		"-p", "9090:public", web, "--",
		"sh", "-c", "mkdir -p /tmp/www && echo hello-from-httpd > /tmp/www/index.html && httpd -p 8000 -h /tmp/www && "+
			"(guestweb -listen :8081 &) && exec guestweb -listen :8080 -grpc :9090").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", id) })
	sb := waitStatus(t, id, "running")
	token, _ := sb["access_token"].(string)
	if token == "" {
		t.Fatalf("inspect shows no access token to the owner: %v", sb)
	}
	httpd := routes.Host(8000, id, ingressDomain)
	public := routes.Host(8080, id, ingressDomain)
	private := routes.Host(8081, id, ingressDomain)
	withToken := func(tok string) http.Header { return http.Header{routes.TokenHeader: {tok}} }

	t.Run("http", func(t *testing.T) {
		c.waitAnswer(t, public, nil, http.StatusOK)
		a := c.waitAnswer(t, httpd, withToken(token), http.StatusOK)
		if strings.TrimSpace(a.body) != "hello-from-httpd" {
			t.Errorf("httpd through the ingress: %q", a.body)
		}
		s := decodeSeen(t, c.get(t, c.h1, public, "/", nil))
		if s.Host != public || s.Proto != "HTTP/1.1" || s.XFF == "" {
			t.Errorf("the app saw host %q proto %q X-Forwarded-For %q; want %q, HTTP/1.1, the client", s.Host, s.Proto, s.XFF, public)
		}
		// The host may carry the edge's port, as browsers send it.
		_, port, _ := net.SplitHostPort(addr)
		if a := c.get(t, c.h1, public+":"+port, "/", nil); a.code != http.StatusOK {
			t.Errorf("host with port: %d %q", a.code, a.body)
		}
	})

	t.Run("private port token", func(t *testing.T) {
		if a := c.get(t, c.h1, httpd, "/", nil); a.code != http.StatusUnauthorized {
			t.Errorf("no token: %d %q, want 401", a.code, a.body)
		}
		if a := c.get(t, c.h1, httpd, "/", withToken(strings.Repeat("0", len(token)))); a.code != http.StatusForbidden {
			t.Errorf("wrong token: %d %q, want 403", a.code, a.body)
		}
		a := c.get(t, c.h1, private, "/", withToken(token))
		if a.code != http.StatusOK {
			t.Fatalf("right token: %d %q, want 200", a.code, a.body)
		}
		if s := decodeSeen(t, a); s.AccessToken != "" {
			t.Errorf("the app received the access token %q; the edge must strip it", s.AccessToken)
		}
		// The same sandbox's public port being open does not open its private one.
		if a := c.get(t, c.h1, private, "/", nil); a.code != http.StatusUnauthorized {
			t.Errorf("private guestweb without token: %d, want 401", a.code)
		}
	})

	t.Run("websocket", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		hc := &http.Client{Transport: &http.Transport{DialContext: c.wsDialCtx}}
		for _, tc := range []struct {
			host string
			hdr  http.Header
		}{{public, nil}, {private, withToken(token)}} {
			conn, _, err := websocket.Dial(ctx, "ws://"+tc.host+"/ws", &websocket.DialOptions{HTTPClient: hc, HTTPHeader: tc.hdr})
			if err != nil {
				t.Fatalf("websocket to %s: %v", tc.host, err)
			}
			for i := range 3 {
				msg := fmt.Sprintf("ping-%d", i)
				if err := conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
					t.Fatalf("websocket write: %v", err)
				}
				_, got, err := conn.Read(ctx)
				if err != nil {
					t.Fatalf("websocket read: %v", err)
				}
				if string(got) != "echo:"+msg {
					t.Errorf("websocket echo %q, want %q", got, "echo:"+msg)
				}
			}
			conn.Close(websocket.StatusNormalClosure, "")
		}
		if _, _, err := websocket.Dial(ctx, "ws://"+private+"/ws", &websocket.DialOptions{HTTPClient: hc}); err == nil {
			t.Error("websocket to a private port without the token was accepted")
		}
	})

	t.Run("h2c", func(t *testing.T) {
		// HTTP/2 with prior knowledge from the client; an ordinary request reaches the app
		// over HTTP/1.1, a gRPC one over HTTP/2 (gRPC cannot work over HTTP/1.1).
		a := c.get(t, c.h2c, public, "/", nil)
		if a.code != http.StatusOK || a.proto != "HTTP/2.0" {
			t.Fatalf("h2c to the ingress: %d %s %q", a.code, a.proto, a.body)
		}
		if s := decodeSeen(t, a); s.Proto != "HTTP/1.1" {
			t.Errorf("plain request over h2c reached the app as %s", s.Proto)
		}
		a = c.get(t, c.h2c, public, "/", http.Header{"Content-Type": {"application/grpc"}})
		if a.code != http.StatusOK {
			t.Fatalf("gRPC-typed request: %d %q", a.code, a.body)
		}
		if s := decodeSeen(t, a); s.Proto != "HTTP/2.0" {
			t.Errorf("gRPC-typed request reached the app as %s, want HTTP/2.0", s.Proto)
		}
	})

	t.Run("xds grpc", func(t *testing.T) {
		// grpc-go's own xDS client resolves the sandbox port from dev's xDS feed and
		// calls the guest's gRPC server through the node's data listener.
		grpcHost := routes.Host(9090, id, ingressDomain)
		bootstrap := fmt.Sprintf(`{"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
			"node": {"id": "e2e-grpc-client"}}`, xdsAddr)
		rb, err := grpcxds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
		if err != nil {
			t.Fatalf("xDS resolver: %v", err)
		}
		conn, err := grpc.NewClient("xds:///"+grpcHost, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb))
		if err != nil {
			t.Fatalf("dial xds:///%s: %v", grpcHost, err)
		}
		defer conn.Close()
		deadline := time.Now().Add(60 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "guestweb"})
			cancel()
			if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("gRPC health of the guest through xDS: %v %v", resp, err)
			}
			time.Sleep(500 * time.Millisecond)
		}
	})

	t.Run("xds and node data refuse other local users", func(t *testing.T) {
		// dev serves both without TLS on loopback; another local user (nobody) must get
		// nothing from either: not the routes (with private ports' tokens), not a tunnel.
		var data string
		for _, l := range strings.Split(world.devLogText(), "\n") {
			if _, v, ok := strings.Cut(l, "node_data_address="); ok && strings.Contains(l, "dev xDS") {
				data = strings.Fields(v)[0]
			}
		}
		if data == "" {
			t.Fatal("dev's log names no node data address")
		}
		probe := func(asNobody bool, addr string) string {
			host, port, _ := net.SplitHostPort(addr)
			args := []string{"sh", "-c", fmt.Sprintf(`printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' | busybox nc -w 3 %s %s`, public, host, port)}
			if asNobody {
				args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}, args...)
			}
			out, _ := exec.Command(args[0], args[1:]...).CombinedOutput()
			return string(out)
		}
		if got := probe(false, data); !strings.HasPrefix(got, "HTTP/") {
			t.Fatalf("the node data listener did not answer dev's own user: %q", got)
		}
		if got := probe(true, data); strings.Contains(got, "HTTP/") {
			t.Errorf("the node data listener answered another local user: %q", got)
		}
		if got := probe(true, xdsAddr); got != "" {
			t.Errorf("the xDS listener answered another local user: %q", got)
		}
	})

	t.Run("unknown host", func(t *testing.T) {
		for _, host := range []string{
			routes.Host(9999, id, ingressDomain),                 // a port it does not publish
			routes.Host(8080, "0123456789abcdef", ingressDomain), // no such sandbox
			"example.com", "8080-" + id + ".other.domain",
		} {
			if a := c.get(t, c.h1, host, "/", nil); a.code != http.StatusNotFound {
				t.Errorf("%s: %d %q, want 404", host, a.code, a.body)
			}
		}
	})

	t.Run("paused then resumed", func(t *testing.T) {
		// While paused nothing answers; after the resume the same servers answer at the
		// same hosts (the guest's address never changed, its node's network is new).
		fw(t, 0, "pause", id)
		if a := c.waitAnswer(t, public, nil, http.StatusBadGateway); !strings.Contains(a.body, "not running") {
			t.Errorf("paused sandbox: %q", a.body)
		}
		fw(t, 0, "resume", id)
		c.waitAnswer(t, public, nil, http.StatusOK)
		if a := c.waitAnswer(t, httpd, withToken(token), http.StatusOK); strings.TrimSpace(a.body) != "hello-from-httpd" {
			t.Errorf("httpd after the resume: %q", a.body)
		}
	})

	t.Run("stopped then removed", func(t *testing.T) {
		fw(t, 0, "stop", id)
		a := c.waitAnswer(t, public, nil, http.StatusBadGateway)
		if !strings.Contains(a.body, "not running") {
			t.Errorf("stopped sandbox: %q", a.body)
		}
		fw(t, 0, "rm", id)
		c.waitAnswer(t, public, nil, http.StatusNotFound)
	})
}

// The xDS endpoint of `fireworks dev` is refused anywhere but on loopback: it has no TLS
// and its resources carry private ports' tokens.
func TestIngressXDSLoopbackOnly(t *testing.T) {
	need(t)
	// Refused before dev touches anything (this data dir, the shared CLI config).
	r := world.cli(context.Background(), nil, "dev", "--data-dir", filepath.Join(t.TempDir(), "d"), "--listen", "127.0.0.1:0",
		"--init-binary", world.initBin, "--xds-listen", "0.0.0.0:0")
	if r.code == 0 || !strings.Contains(r.stderr, "loopback") {
		t.Errorf("dev --xds-listen 0.0.0.0:0: exit %d, stderr %q; want a refusal naming loopback", r.code, r.stderr)
	}
}
