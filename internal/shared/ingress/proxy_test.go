package ingress

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// seenRequest is what the stand-in sandbox app saw.
type seenRequest struct {
	method, host, uri, body string
	proto                   int
	header                  http.Header
}

// recordingApp is a stand-in sandbox app (HTTP/1.1) that records each request and
// answers "hello from <sandbox>".
type recordingApp struct {
	name string
	mu   sync.Mutex
	seen []seenRequest
}

func (a *recordingApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.seen = append(a.seen, seenRequest{r.Method, r.Host, r.RequestURI, string(b), r.ProtoMajor, r.Header.Clone()})
	a.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain")
	io.WriteString(w, "hello from "+a.name)
}

func (a *recordingApp) last(t *testing.T) seenRequest {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.seen) == 0 {
		t.Fatal("sandbox app saw no request")
	}
	return a.seen[len(a.seen)-1]
}

func (a *recordingApp) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.seen)
}

func TestHTTP1ThroughEdgeAndNode(t *testing.T) {
	w := newWorld(t)
	app := &recordingApp{name: "a"}
	w.guests.set(sbA, 8080, startSandboxHTTP(t, app))
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{w.route(sbA, 8080, true, "")}})

	h := host(8080, sbA)
	req, _ := http.NewRequest(http.MethodPost, "http://"+h+"/some/path?q=1&r=%2F", strings.NewReader("payload"))
	// A client cannot forge its address.
	req.Header.Set("X-Forwarded-For", "6.6.6.6")
	req.Header.Set("Forwarded", "for=6.6.6.6")
	req.Header.Set("X-Real-Ip", "6.6.6.6")
	req.Header.Set("Connection", "X-Hop")
	req.Header.Set("X-Hop", "must not pass")
	resp, err := client(w.edgeAddr).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "hello from a" {
		t.Fatalf("got %d %q, want 200 from the sandbox app", resp.StatusCode, body)
	}

	got := app.last(t)
	if got.method != http.MethodPost || got.uri != "/some/path?q=1&r=%2F" || got.body != "payload" {
		t.Errorf("app saw %s %s body %q", got.method, got.uri, got.body)
	}
	if got.host != h {
		t.Errorf("app saw Host %q, want %q", got.host, h)
	}
	if got.proto != 1 {
		t.Errorf("app spoke HTTP/%d, want HTTP/1.1", got.proto)
	}
	if xff := got.header.Values("X-Forwarded-For"); len(xff) != 1 || xff[0] != "127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q, want [127.0.0.1]", xff)
	}
	if got.header.Get("Forwarded") != "" || got.header.Get("X-Real-Ip") != "" {
		t.Errorf("client-supplied address headers reached the app: %v", got.header)
	}
	if p := got.header.Get("X-Forwarded-Proto"); p != "http" {
		t.Errorf("X-Forwarded-Proto = %q", p)
	}
	if fh := got.header.Get("X-Forwarded-Host"); fh != h {
		t.Errorf("X-Forwarded-Host = %q", fh)
	}
	if got.header.Get("X-Hop") != "" {
		t.Error("hop-by-hop header reached the app")
	}
	if n := w.dialer.n.Load(); n < 1 {
		t.Errorf("edge dialed %d times", n)
	}
}

func TestHTTP2ClientsReachHTTP1App(t *testing.T) {
	w := newWorld(t)
	app := &recordingApp{name: "a"}
	w.guests.set(sbA, 8080, startSandboxHTTP(t, app))
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{w.route(sbA, 8080, true, "")}})

	var h2c http.Protocols
	h2c.SetUnencryptedHTTP2(true)
	var h2 http.Protocols
	h2.SetHTTP2(true)
	cases := []struct {
		name, url, proto string
		tr               *http.Transport
	}{
		{"h2c prior knowledge", "http://" + host(8080, sbA) + "/x", "http", &http.Transport{
			Protocols: &h2c,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", w.edgeAddr)
			},
		}},
		{"TLS ALPN h2", "https://" + host(8080, sbA) + "/x", "https", &http.Transport{
			Protocols:       &h2,
			TLSClientConfig: &tls.Config{RootCAs: w.pki.ca.CertPool()},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", w.edgeTLS)
			},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer tc.tr.CloseIdleConnections()
			resp, err := (&http.Client{Transport: tc.tr}).Get(tc.url)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || string(body) != "hello from a" {
				t.Fatalf("got %d %q", resp.StatusCode, body)
			}
			if resp.ProtoMajor != 2 {
				t.Errorf("edge answered HTTP/%d, want 2", resp.ProtoMajor)
			}
			got := app.last(t)
			if got.proto != 1 {
				t.Errorf("app spoke HTTP/%d, want 1", got.proto)
			}
			if p := got.header.Get("X-Forwarded-Proto"); p != tc.proto {
				t.Errorf("X-Forwarded-Proto = %q, want %q", p, tc.proto)
			}
		})
	}
}

func TestPrivatePort(t *testing.T) {
	w := newWorld(t)
	app := &recordingApp{name: "a"}
	w.guests.set(sbA, 3000, startSandboxHTTP(t, app))
	const token = "s3cret-token"
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{w.route(sbA, 3000, false, token)}})
	c := client(w.edgeAddr)
	url := "http://" + host(3000, sbA) + "/"

	if code, _ := get(t, c, url, nil); code != http.StatusUnauthorized {
		t.Errorf("no token: %d, want 401", code)
	}
	if code, _ := get(t, c, url, http.Header{routes.TokenHeader: {""}}); code != http.StatusUnauthorized {
		t.Errorf("empty token: %d, want 401", code)
	}
	if code, _ := get(t, c, url, http.Header{routes.TokenHeader: {"s3cret-tokeN"}}); code != http.StatusForbidden {
		t.Errorf("wrong token: %d, want 403", code)
	}
	if code, _ := get(t, c, url, http.Header{routes.TokenHeader: {"s3cret"}}); code != http.StatusForbidden {
		t.Errorf("token prefix: %d, want 403", code)
	}
	if code, _ := get(t, c, url, http.Header{routes.TokenHeader: {token, "other"}}); code != http.StatusForbidden {
		t.Errorf("two tokens: %d, want 403", code)
	}
	if n := app.count(); n != 0 {
		t.Fatalf("refused requests reached the app (%d)", n)
	}
	if n := w.dialer.n.Load(); n != 0 {
		t.Fatalf("refused requests dialed the sandbox (%d)", n)
	}

	code, body := get(t, c, url, http.Header{"Fireworks-Access-Token": {token}})
	if code != http.StatusOK || body != "hello from a" {
		t.Fatalf("right token: %d %q", code, body)
	}
	if v := app.last(t).header.Values(routes.TokenHeader); len(v) != 0 {
		t.Errorf("token reached the app: %q", v)
	}
}

func TestPrivatePortWithoutTokenIsClosed(t *testing.T) {
	w := newWorld(t)
	w.guests.set(sbA, 3000, startSandboxHTTP(t, &recordingApp{name: "a"}))
	// A private route whose token is missing is a bug upstream; it must not open up.
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{w.route(sbA, 3000, false, "")}})
	code, _ := get(t, client(w.edgeAddr), "http://"+host(3000, sbA)+"/", http.Header{routes.TokenHeader: {"anything"}})
	if code != http.StatusForbidden {
		t.Fatalf("got %d, want 403", code)
	}
}

func TestUnknownHostsAndHostileInput(t *testing.T) {
	w := newWorld(t)
	app := &recordingApp{name: "a"}
	w.guests.set(sbA, 8080, startSandboxHTTP(t, app))
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{w.route(sbA, 8080, true, "")}})
	c := client(w.edgeAddr)

	cases := []struct {
		host string
		want int
	}{
		{host(8080, sbA), 200},
		{strings.ToUpper(host(8080, sbA)), 200},
		{host(8080, sbA) + ".", 200},
		{host(8080, sbA) + ":443", 200},
		{host(9090, sbA), 404},                           // port not published
		{host(8080, sbB), 404},                           // unknown sandbox
		{sbA + "." + testDomain, 404},                    // no port prefix
		{"0-" + sbA + "." + testDomain, 404},             // port 0
		{"65536-" + sbA + "." + testDomain, 404},         // port out of range
		{"08080-" + sbA + "." + testDomain, 404},         // leading zero
		{"+8080-" + sbA + "." + testDomain, 404},         // sign
		{"8080--" + sbA + "." + testDomain, 404},         // double dash
		{"8080-" + sbA + "0." + testDomain, 404},         // too long ID
		{"8080-" + sbA[:15] + "g." + testDomain, 404},    // not hex
		{"x." + host(8080, sbA), 404},                    // extra label in front
		{host(8080, sbA) + ".evil.com", 404},             // domain not at the end
		{"8080-" + sbA + ".other.example", 404},          // other domain
		{testDomain, 404},                                // the bare domain
		{"127.0.0.1", 404},                               // an address
		{"8080-" + sbA + "." + testDomain + "x", 404},    // domain suffix glued
		{"8080-" + sbA + ".x" + testDomain, 404},         // domain prefix glued
		{"[::1]:80", 404},                                // IPv6 literal
		{"8080-" + sbA + "." + testDomain + ":x:y", 404}, // junk port
	}
	for _, tc := range cases {
		req, _ := http.NewRequest(http.MethodGet, "http://placeholder/", nil)
		req.Host = tc.host
		resp, err := c.Do(req)
		if err != nil {
			t.Errorf("Host %q: %v", tc.host, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("Host %q: %d %q, want %d", tc.host, resp.StatusCode, body, tc.want)
		}
		if tc.want == 404 && !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
			t.Errorf("Host %q: 404 Content-Type %q, want text/plain", tc.host, resp.Header.Get("Content-Type"))
		}
	}

	// An empty Host (valid HTTP/1.1 syntax) on a raw connection.
	conn, err := net.Dial("tcp", w.edgeAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("empty Host: %d, want 404", resp.StatusCode)
	}
}

func TestNoTableYet(t *testing.T) {
	p := NewProxy(testDomain, &countingDialer{}, testLog())
	addr := serveT(t, p, nil)
	if code, _ := get(t, client(addr), "http://"+host(8080, sbA)+"/", nil); code != http.StatusNotFound {
		t.Fatalf("got %d, want 404", code)
	}
}

func TestStoppedRouteAnswers502WithoutDialing(t *testing.T) {
	w := newWorld(t)
	app := &recordingApp{name: "a"}
	w.guests.set(sbA, 8080, startSandboxHTTP(t, app))
	r := w.route(sbA, 8080, false, "tok")
	r.Running = false
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{r}})

	code, body := get(t, client(w.edgeAddr), "http://"+host(8080, sbA)+"/", http.Header{routes.TokenHeader: {"tok"}})
	if code != http.StatusBadGateway || !strings.Contains(body, "not running") {
		t.Fatalf("got %d %q, want 502 not running", code, body)
	}
	if n := w.dialer.n.Load(); n != 0 {
		t.Fatalf("dialer called %d times for a stopped route", n)
	}
}

func TestDeadBackend502(t *testing.T) {
	w := newWorld(t)
	w.guests.set(sbA, 8080, deadAddr(t)) // the sandbox app is not listening
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{
		w.route(sbA, 8080, true, ""),
		// and a node that is not there at all
		{Sandbox: sbB, Port: 8080, Public: true, Node: "gone", NodeAddr: deadAddr(t), Running: true},
	}})
	c := client(w.edgeAddr)
	for _, sb := range []string{sbA, sbB} {
		code, body := get(t, c, "http://"+host(8080, sb)+"/", nil)
		if code != http.StatusBadGateway {
			t.Errorf("%s: got %d %q, want 502", sb, code, body)
		}
	}
}

func TestOlderTableIgnored(t *testing.T) {
	w := newWorld(t)
	w.guests.set(sbA, 8080, startSandboxHTTP(t, &recordingApp{name: "a"}))
	w.guests.set(sbB, 8080, startSandboxHTTP(t, &recordingApp{name: "b"}))
	c := client(w.edgeAddr)

	w.proxy.SetTable(routes.Table{Version: 5, Routes: []routes.Route{w.route(sbA, 8080, true, "")}})
	w.proxy.SetTable(routes.Table{Version: 4, Routes: []routes.Route{w.route(sbB, 8080, true, "")}})
	if v := w.proxy.TableVersion(); v != 5 {
		t.Fatalf("version %d after a stale update, want 5", v)
	}
	if code, _ := get(t, c, "http://"+host(8080, sbA)+"/", nil); code != 200 {
		t.Errorf("route of v5 gone after a stale v4: %d", code)
	}
	if code, _ := get(t, c, "http://"+host(8080, sbB)+"/", nil); code != 404 {
		t.Errorf("route of stale v4 applied: %d", code)
	}

	// A newer table replaces the routes entirely.
	w.proxy.SetTable(routes.Table{Version: 6, Routes: []routes.Route{w.route(sbB, 8080, true, "")}})
	if code, _ := get(t, c, "http://"+host(8080, sbA)+"/", nil); code != 404 {
		t.Errorf("route removed in v6 still served: %d", code)
	}
	if code, body := get(t, c, "http://"+host(8080, sbB)+"/", nil); code != 200 || body != "hello from b" {
		t.Errorf("route of v6: %d %q", code, body)
	}
}

func TestSetTableConcurrentWithRequests(t *testing.T) {
	w := newWorld(t)
	w.guests.set(sbA, 8080, startSandboxHTTP(t, &recordingApp{name: "a"}))
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{w.route(sbA, 8080, true, "")}})
	c := client(w.edgeAddr)

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for v := uint64(2); v < 200; v++ {
			w.proxy.SetTable(routes.Table{Version: v, Routes: []routes.Route{w.route(sbA, 8080, true, "")}})
		}
	}()
	for range 20 {
		if code, _ := get(t, c, "http://"+host(8080, sbA)+"/", nil); code != 200 {
			t.Errorf("got %d while tables change", code)
		}
	}
	wg.Wait()
}

// E2B's conventions: a sandbox that publishes every port (a route of port 0) answers on
// any port unless a port has a route of its own; E2B's headers name the sandbox and
// port on any host; E2B's traffic-token header opens private ports like ours; requests
// that name no sandbox go to the API when there is one.
func TestEveryPortE2BHeadersAndAPI(t *testing.T) {
	w := newWorld(t)
	apps := map[uint16]*recordingApp{}
	for _, port := range []uint16{3000, 3001, 3002} {
		apps[port] = &recordingApp{name: fmt.Sprint(port)}
		w.guests.set(sbA, port, startSandboxHTTP(t, apps[port]))
	}
	const token = "s3cret-token"
	p := NewProxy(testDomain, w.dialer, testLog())
	p.API = http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { fmt.Fprint(rw, "api "+r.Host) })
	addr := serveT(t, p, nil)
	all := w.route(sbA, 0, true, "")
	p.SetTable(routes.Table{Version: 1, Routes: []routes.Route{all, w.route(sbA, 3001, false, token)}})
	c := client(addr)
	e2b := func(sandbox, port string) http.Header {
		return http.Header{"E2b-Sandbox-Id": {sandbox}, "E2b-Sandbox-Port": {port}}
	}

	if code, body := get(t, c, "http://"+host(3000, sbA)+"/", nil); code != http.StatusOK || body != "hello from 3000" {
		t.Errorf("a port the every-port route covers: %d %q", code, body)
	}
	if code, _ := get(t, c, "http://"+host(3001, sbA)+"/", nil); code != http.StatusUnauthorized {
		t.Errorf("a port with a private route of its own, no token: %d, want 401", code)
	}
	if code, body := get(t, c, "http://"+host(3001, sbA)+"/", http.Header{E2BTrafficTokenHeader: {routes.TrafficToken(token)}}); code != http.StatusOK || body != "hello from 3001" {
		t.Errorf("E2B's traffic token: %d %q", code, body)
	}
	if code, _ := get(t, c, "http://"+host(3001, sbA)+"/", http.Header{E2BTrafficTokenHeader: {token}}); code != http.StatusForbidden {
		t.Errorf("the access token in E2B's traffic header (which takes the traffic token): %d, want 403", code)
	}
	if code, _ := get(t, c, "http://"+host(3001, sbA)+"/", http.Header{routes.TokenHeader: {routes.TrafficToken(token)}}); code != http.StatusForbidden {
		t.Errorf("the traffic token in our header (which takes the access token): %d, want 403", code)
	}
	if v := apps[3001].last(t).header.Values(E2BTrafficTokenHeader); len(v) != 0 {
		t.Errorf("the traffic token reached the app: %q", v)
	}
	if code, body := get(t, c, "http://edge.example/", e2b(sbA, "3002")); code != http.StatusOK || body != "hello from 3002" {
		t.Errorf("by E2B's headers on another host: %d %q", code, body)
	}
	if code, _ := get(t, c, "http://edge.example/", e2b(sbA, "3001")); code != http.StatusUnauthorized {
		t.Errorf("by E2B's headers, a private port without token: %d, want 401", code)
	}
	for _, h := range []http.Header{e2b(sbB, "3000"), e2b(sbA, "0"), e2b(sbA, "x"), e2b("../etc", "3000")} {
		code, body := get(t, c, "http://edge.example/", h)
		if code == http.StatusOK || strings.HasPrefix(body, "api") {
			t.Errorf("E2B headers %v: %d %q", h, code, body)
		}
	}
	if code, _ := get(t, c, "http://edge.example/", e2b(sbB, "3000")); code != http.StatusBadGateway {
		t.Errorf("E2B headers naming an unknown sandbox: %d, want 502 (E2B's SDK reads it as ended)", code)
	}
	if code, body := get(t, c, "http://api."+testDomain+"/sandboxes", nil); code != http.StatusOK || body != "api api."+testDomain {
		t.Errorf("the API host: %d %q", code, body)
	}
	if code, body := get(t, c, "http://127.0.0.1:1/sandboxes", nil); code != http.StatusOK || !strings.HasPrefix(body, "api") {
		t.Errorf("the edge's own address: %d %q", code, body)
	}
	// Without an API, hosts that name no sandbox are unknown.
	if code, _ := get(t, client(w.edgeAddr), "http://api."+testDomain+"/", nil); code != http.StatusNotFound {
		t.Errorf("no API: %d, want 404", code)
	}
}
