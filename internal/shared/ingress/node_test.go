package ingress

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

func dialCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// roundTripRaw writes msg on a tunnel, half-closes it and reads the answer to EOF.
func roundTripRaw(t *testing.T, c net.Conn, msg string) string {
	t.Helper()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		t.Fatalf("tunnel %T cannot half-close", c)
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func TestTunnelHalfClose(t *testing.T) {
	p := newTestPKI(t)
	g := &guestNet{}
	g.set(sbA, 22, echoTCP(t))
	_, nodeAddr := startNode(t, p, g)

	c, err := p.edgeDialer().DialSandbox(dialCtx(t), routes.Route{Sandbox: sbA, Port: 22, NodeAddr: nodeAddr})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The guest answers only after it saw our EOF: both half-closes must travel.
	msg := strings.Repeat("0123456789", 50_000)
	if got := roundTripRaw(t, c, msg); got != "got "+msg {
		t.Fatalf("got %d bytes back, want %d", len(got), len("got "+msg))
	}
}

func TestTunnelRefusals(t *testing.T) {
	p := newTestPKI(t)
	g := &guestNet{}
	g.set(sbA, 22, deadAddr(t))
	g.set(sbA, 23, echoTCP(t))
	_, nodeAddr := startNode(t, p, g)

	cases := []struct {
		name   string
		d      *TunnelDialer
		r      routes.Route
		status string
	}{
		{"guest not listening", p.edgeDialer(), routes.Route{Sandbox: sbA, Port: 22, NodeAddr: nodeAddr}, "502"},
		{"unknown sandbox port", p.edgeDialer(), routes.Route{Sandbox: sbB, Port: 22, NodeAddr: nodeAddr}, "502"},
		{"bad sandbox ID", p.edgeDialer(), routes.Route{Sandbox: "../../etc", Port: 22, NodeAddr: nodeAddr}, "400"},
		{"port 0", p.edgeDialer(), routes.Route{Sandbox: sbA, Port: 0, NodeAddr: nodeAddr}, "400"},
		{"not the edge", &TunnelDialer{TLS: pki.ClientTLS(p.ca, &p.client, "", pki.RoleAgent)}, routes.Route{Sandbox: sbA, Port: 23, NodeAddr: nodeAddr}, "403"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.d.DialSandbox(dialCtx(t), tc.r)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			if !strings.Contains(err.Error(), "node answered "+tc.status) {
				t.Fatalf("error %q does not name status %s", err, tc.status)
			}
		})
	}

	t.Run("no node address", func(t *testing.T) {
		_, err := p.edgeDialer().DialSandbox(dialCtx(t), routes.Route{Sandbox: sbA, Port: 23})
		if err == nil || !strings.Contains(err.Error(), sbA) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("no client certificate", func(t *testing.T) {
		d := &TunnelDialer{TLS: pki.ClientTLS(p.ca, nil, "", pki.RoleAgent)}
		c, err := d.DialSandbox(dialCtx(t), routes.Route{Sandbox: sbA, Port: 23, NodeAddr: nodeAddr})
		if err == nil {
			// TLS 1.3 reports the server's refusal of the certificate on the first read.
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil {
			t.Fatal("tunnel opened without a client certificate")
		}
	})
}

// TestTunnelKeepsBytesAfterResponse uses a stand-in node that sends the CONNECT response
// and the guest's first bytes in one write, so they arrive in one read.
func TestTunnelKeepsBytesAfterResponse(t *testing.T) {
	p := newTestPKI(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", pki.ServerTLS(p.ca, p.node, true))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err.Error()
			return
		}
		defer c.Close()
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			done <- err.Error()
			return
		}
		done <- req.Method + " " + req.RequestURI + " " + req.Host
		io.WriteString(c, "HTTP/1.1 200 OK\r\n\r\nSSH-2.0-banner\r\n")
		io.Copy(io.Discard, c)
	}()

	c, err := p.edgeDialer().DialSandbox(dialCtx(t), routes.Route{Sandbox: sbA, Port: 22, NodeAddr: ln.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := <-done; got != "CONNECT "+sbA+":22 "+sbA+":22" {
		t.Fatalf("node got %q", got)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "SSH-2.0-banner\r\n" {
		t.Fatalf("first bytes %q, %v", line, err)
	}
	if _, ok := c.(interface{ CloseWrite() error }); !ok {
		t.Fatalf("%T cannot half-close", c)
	}
}

func TestNodeReverseProxy(t *testing.T) {
	p := newTestPKI(t)
	app := &recordingApp{name: "a"}
	g := &guestNet{}
	g.set(sbA, 8080, startSandboxHTTP(t, app))
	g.set(sbA, 8081, deadAddr(t))
	_, nodeAddr := startNode(t, p, g)

	newClient := func(cert *tls.Certificate, h2 bool) *http.Client {
		var pr http.Protocols
		if h2 {
			pr.SetHTTP2(true)
		} else {
			pr.SetHTTP1(true)
		}
		return &http.Client{Transport: &http.Transport{
			Protocols:       &pr,
			TLSClientConfig: pki.ClientTLS(p.ca, cert, "127.0.0.1", pki.RoleAgent),
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", nodeAddr)
			},
		}}
	}

	for _, h2 := range []bool{false, true} {
		c := newClient(&p.edge, h2)
		hdr := http.Header{
			"X-Forwarded-For":   {"203.0.113.7"},
			"X-Forwarded-Proto": {"https"},
			routes.TokenHeader:  {"tok"},
		}
		code, body := get(t, c, "https://"+host(8080, sbA)+"/p?x=1", hdr)
		if code != 200 || body != "hello from a" {
			t.Fatalf("h2=%v: %d %q", h2, code, body)
		}
		got := app.last(t)
		if got.host != host(8080, sbA) || got.uri != "/p?x=1" || got.proto != 1 {
			t.Errorf("h2=%v: app saw host %q uri %q HTTP/%d", h2, got.host, got.uri, got.proto)
		}
		// The edge's view of the client is kept; the token never reaches the app.
		if v := got.header.Get("X-Forwarded-For"); v != "203.0.113.7" {
			t.Errorf("h2=%v: X-Forwarded-For %q", h2, v)
		}
		if v := got.header.Get("X-Forwarded-Proto"); v != "https" {
			t.Errorf("h2=%v: X-Forwarded-Proto %q", h2, v)
		}
		if v := got.header.Get(routes.TokenHeader); v != "" {
			t.Errorf("h2=%v: token reached the app", h2)
		}

		if code, _ := get(t, c, "https://"+host(8081, sbA)+"/", nil); code != http.StatusBadGateway {
			t.Errorf("h2=%v: dead guest: %d, want 502", h2, code)
		}
		for _, bad := range []string{"localhost", sbA + "." + testDomain, "0-" + sbA + "." + testDomain, "8080-xyz." + testDomain} {
			if code, _ := get(t, c, "https://"+bad+"/", nil); code != http.StatusNotFound {
				t.Errorf("h2=%v: Host %q: %d, want 404", h2, bad, code)
			}
		}
	}

	// Without X-Forwarded-For (a direct caller), the node sets them itself.
	code, _ := get(t, newClient(&p.edge, false), "https://"+host(8080, sbA)+"/", nil)
	if code != 200 {
		t.Fatalf("%d", code)
	}
	if v := app.last(t).header.Get("X-Forwarded-For"); v != "127.0.0.1" {
		t.Errorf("X-Forwarded-For %q, want 127.0.0.1", v)
	}

	before := app.count()
	if code, _ := get(t, newClient(&p.client, false), "https://"+host(8080, sbA)+"/", nil); code != http.StatusForbidden {
		t.Errorf("unauthorised peer: %d, want 403", code)
	}
	if app.count() != before {
		t.Error("unauthorised request reached the app")
	}
}

// TestNodeConnectOverHTTP2 opens a tunnel as an HTTP/2 CONNECT stream (as Envoy's TCP
// tunnelling does).
func TestNodeConnectOverHTTP2(t *testing.T) {
	p := newTestPKI(t)
	g := &guestNet{}
	g.set(sbA, 22, echoTCP(t))
	_, nodeAddr := startNode(t, p, g)

	var pr http.Protocols
	pr.SetHTTP2(true)
	tr := &http.Transport{Protocols: &pr, TLSClientConfig: pki.ClientTLS(p.ca, &p.edge, "127.0.0.1", pki.RoleAgent)}
	defer tr.CloseIdleConnections()
	body := strings.NewReader("over h2")
	req := (&http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Scheme: "https", Host: nodeAddr},
		Host:   sbA + ":22",
		Header: http.Header{},
		Body:   io.NopCloser(body),
	}).WithContext(dialCtx(t))
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		t.Fatalf("%d HTTP/%d", resp.StatusCode, resp.ProtoMajor)
	}
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "got over h2" {
		t.Fatalf("got %q", got)
	}
}

// TestServeEndsTunnelsOnShutdown: hijacked tunnels are not tracked by http.Server, yet
// Serve must end them and return once its context is done.
func TestServeEndsTunnelsOnShutdown(t *testing.T) {
	p := newTestPKI(t)
	g := &guestNet{}
	g.set(sbA, 22, echoTCP(t))
	h := NewNodeHandler(testDomain, g, testLog())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, h, pki.ServerTLS(p.ca, p.node, true), testLog()) }()

	c, err := p.edgeDialer().DialSandbox(dialCtx(t), routes.Route{Sandbox: sbA, Port: 22, NodeAddr: ln.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "unfinished"); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	// The tunnel is gone: this read ends only because the node cut it (the guest never
	// saw our EOF, so it had nothing to answer).
	if b, _ := io.ReadAll(c); len(b) != 0 {
		t.Errorf("read %q after shutdown", b)
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("listener still accepting after Serve returned")
	}
}

func TestParseConnectTarget(t *testing.T) {
	good := map[string]routes.Route{
		sbA + ":1":     {Sandbox: sbA, Port: 1},
		sbA + ":65535": {Sandbox: sbA, Port: 65535},
	}
	for in, want := range good {
		got, err := parseConnectTarget(in)
		if err != nil || got != want {
			t.Errorf("%q: %v %v", in, got, err)
		}
	}
	for _, in := range []string{
		"", sbA, sbA + ":", sbA + ":0", sbA + ":65536", sbA + ":022", sbA + ":+22", sbA + ":-1",
		sbA + ":22x", strings.ToUpper(sbA) + ":22", sbA[:15] + ":22", "[" + sbA + "]:22x",
		"127.0.0.1:22", "[::1]:22", sbA + ":" + strconv.Itoa(1<<20),
	} {
		if r, err := parseConnectTarget(in); err == nil {
			t.Errorf("%q accepted as %v", in, r)
		}
	}
}
