package ingress

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

const (
	testDomain = "test.example"
	sbA        = "0123456789abcdef"
	sbB        = "fedcba9876543210"
)

func testLog() *slog.Logger {
	if os.Getenv("INGRESS_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// testPKI is a cluster CA with a node (agent) certificate, an edge (server) certificate,
// a plain client certificate and a certificate for the edge's public name.
type testPKI struct {
	ca                         *pki.CA
	node, edge, client, public tls.Certificate
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	ca, err := pki.CreateCA(t.TempDir(), "ingress-test")
	if err != nil {
		t.Fatalf("CreateCA: %v", err)
	}
	issue := func(role pki.Role, cn string, dns ...string) tls.Certificate {
		certPEM, keyPEM, err := ca.Issue(pki.IssueRequest{
			CommonName: cn, Role: role, DNSNames: dns,
			IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, TTL: time.Hour,
		})
		if err != nil {
			t.Fatalf("Issue %s: %v", cn, err)
		}
		kp, err := pki.KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatalf("KeyPair %s: %v", cn, err)
		}
		return kp
	}
	return &testPKI{
		ca:     ca,
		node:   issue(pki.RoleAgent, "node-a", "localhost"),
		edge:   issue(pki.RoleServer, "edge"),
		client: issue(pki.RoleClient, "someone"),
		public: issue(pki.RoleServer, "public", "*."+testDomain),
	}
}

// edgeDialer is the edge's real tunnel dialer, with this CA and the edge certificate.
func (p *testPKI) edgeDialer() *TunnelDialer {
	return &TunnelDialer{TLS: pki.ClientTLS(p.ca, &p.edge, "", pki.RoleAgent), Timeout: 10 * time.Second}
}

// onlyServers is the node authorisation a deployment would use: the peer must be the edge
// (a server certificate).
func onlyServers(r *http.Request) error {
	role, cn, err := pki.PeerIdentity(r.TLS)
	if err != nil {
		return err
	}
	if role != pki.RoleServer {
		return fmt.Errorf("peer %q has role %s", cn, role)
	}
	return nil
}

// guestNet stands in for a node's guest networking: it maps a sandbox port to a TCP
// address on 127.0.0.1 where a stand-in "sandbox app" listens.
type guestNet struct {
	mu    sync.Mutex
	addrs map[routeID]string
}

func (g *guestNet) set(sandbox string, port uint16, addr string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.addrs == nil {
		g.addrs = map[routeID]string{}
	}
	g.addrs[routeID{sandbox, port}] = addr
}

func (g *guestNet) DialSandbox(ctx context.Context, r routes.Route) (net.Conn, error) {
	g.mu.Lock()
	addr, ok := g.addrs[routeID{r.Sandbox, r.Port}]
	g.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no sandbox %s port %d on this node", r.Sandbox, r.Port)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// countingDialer counts dials and passes them on.
type countingDialer struct {
	next Dialer
	n    atomic.Int64
}

func (c *countingDialer) DialSandbox(ctx context.Context, r routes.Route) (net.Conn, error) {
	c.n.Add(1)
	return c.next.DialSandbox(ctx, r)
}

// serveT runs Serve on a fresh 127.0.0.1 listener until the test ends, and checks that
// it shuts down cleanly.
func serveT(t *testing.T, h http.Handler, tlsCfg *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, h, tlsCfg, testLog()) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ln.Addr().String()
}

// startNode serves a NodeHandler over mutual TLS for the edge.
func startNode(t *testing.T, p *testPKI, local Dialer) (*NodeHandler, string) {
	t.Helper()
	h := NewNodeHandler(testDomain, local, testLog())
	h.Authorize = onlyServers
	return h, serveT(t, h, pki.ServerTLS(p.ca, p.node, true))
}

// startSandboxHTTP starts a plain HTTP/1.1 server on 127.0.0.1 standing in for an app
// in a sandbox.
func startSandboxHTTP(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return ln.Addr().String()
}

// deadAddr is a 127.0.0.1 address where nothing listens.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// world is an edge in front of one node.
type world struct {
	pki      *testPKI
	guests   *guestNet
	node     *NodeHandler
	nodeAddr string
	dialer   *countingDialer
	proxy    *Proxy
	edgeAddr string // h1 + h2c
	edgeTLS  string // https, h2 via ALPN
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{pki: newTestPKI(t), guests: &guestNet{}}
	w.node, w.nodeAddr = startNode(t, w.pki, w.guests)
	w.dialer = &countingDialer{next: w.pki.edgeDialer()}
	w.proxy = NewProxy(testDomain, w.dialer, testLog())
	w.edgeAddr = serveT(t, w.proxy, nil)
	w.edgeTLS = serveT(t, w.proxy, &tls.Config{Certificates: []tls.Certificate{w.pki.public}})
	return w
}

// route is a running route on the world's node.
func (w *world) route(sandbox string, port uint16, public bool, token string) routes.Route {
	return routes.Route{Sandbox: sandbox, Port: port, Public: public, Token: token,
		Node: "node-a", NodeAddr: w.nodeAddr, Running: true}
}

// client is an HTTP/1.1 client whose every connection goes to addr, so URLs can carry
// the sandbox host names.
func client(addr string) *http.Client {
	var p http.Protocols
	p.SetHTTP1(true)
	return &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			},
			Protocols: &p,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

func host(port uint16, sandbox string) string { return routes.Host(port, sandbox, testDomain) }

func get(t *testing.T, c *http.Client, url string, hdr http.Header) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// echoTCP starts a TCP server standing in for a raw sandbox service: it reads everything
// until the client half-closes, then answers "got <bytes>" and closes.
func echoTCP(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  []net.Conn
		closed bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				b, err := io.ReadAll(c)
				if err != nil {
					return
				}
				_, _ = c.Write(append([]byte("got "), b...))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func portOf(t *testing.T, addr string) uint16 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		t.Fatal(err)
	}
	return uint16(n)
}
