package ingress

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// Proxy is the edge: it routes requests for `<port>-<sandbox>.<domain>` to the sandbox's
// port through the sandbox's node. It is an http.Handler; Serve runs it on a listener.
type Proxy struct {
	// DialTimeout bounds opening a tunnel to a sandbox (DefaultDialTimeout when zero).
	// Set it before serving.
	DialTimeout time.Duration
	// API, if set, serves the requests that name no sandbox (neither by host nor by
	// E2B's headers): the control plane's REST API (E2B's, at api.<domain> or at the
	// edge's own address). Unset, they get 404. Set it before serving.
	API http.Handler

	domain string
	dialer Dialer
	log    *slog.Logger
	fwd    *forwarder

	mu    sync.Mutex // serialises SetTable
	table atomic.Pointer[tableIndex]
}

type routeID struct {
	sandbox string
	port    uint16
}

// tableIndex is an immutable, indexed copy of a routes.Table: requests read it without
// locks while SetTable swaps in the next one.
type tableIndex struct {
	version uint64
	routes  map[routeID]routes.Route
}

// NewProxy returns an edge for host names under domain that opens connections with d.
// Until the first SetTable every request gets 404.
func NewProxy(domain string, d Dialer, log *slog.Logger) *Proxy {
	if log == nil {
		log = slog.Default()
	}
	p := &Proxy{domain: domain, dialer: d, log: log}
	p.fwd = newForwarder(log, func(ctx context.Context, r routes.Route) (net.Conn, error) {
		return dialWithTimeout(ctx, p.dialer, r, p.DialTimeout)
	}, func(pr *httputil.ProxyRequest) {
		// The edge is where requests enter the cluster: X-Forwarded-* from the client are
		// not trusted (ReverseProxy dropped them), they are set from this connection, and
		// the other common client-address headers are dropped so an app cannot be fooled
		// by them either.
		pr.Out.Header.Del("Forwarded")
		pr.Out.Header.Del("X-Real-Ip")
		pr.SetXForwarded()
	})
	return p
}

// SetTable replaces the route table. A table older than the current one (lower Version)
// is ignored, so a late, stale update cannot undo a newer one; an equal version replaces
// it. Safe to call while requests are served.
func (p *Proxy) SetTable(t routes.Table) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cur := p.table.Load(); cur != nil && t.Version < cur.version {
		p.log.Debug("ingress: ignoring stale route table", "version", t.Version, "current", cur.version)
		return
	}
	idx := &tableIndex{version: t.Version, routes: make(map[routeID]routes.Route, len(t.Routes))}
	for _, r := range t.Routes {
		idx.routes[routeID{r.Sandbox, r.Port}] = r
	}
	p.table.Store(idx)
}

// TableVersion is the version of the table in use (0 before the first SetTable).
func (p *Proxy) TableVersion() uint64 {
	if t := p.table.Load(); t != nil {
		return t.version
	}
	return 0
}

// lookup finds the route of a sandbox's port: its own, else its sandbox's every-port
// route (Port 0) made specific.
func (p *Proxy) lookup(sandbox string, port uint16) (routes.Route, bool) {
	t := p.table.Load()
	if t == nil {
		return routes.Route{}, false
	}
	if r, ok := t.routes[routeID{sandbox, port}]; ok {
		return r, true
	}
	r, ok := t.routes[routeID{sandbox, 0}]
	r.Port = port
	return r, ok
}

// The headers E2B's SDK sends on every call into a sandbox (its envd), whatever the
// host: routing by them lets one address (E2B_SANDBOX_URL) serve every sandbox without
// wildcard DNS.
const (
	e2bSandboxHeader = "E2b-Sandbox-Id"
	e2bPortHeader    = "E2b-Sandbox-Port"
	// E2BTrafficTokenHeader carries E2B's traffic token (routes.TrafficToken), which
	// opens private ports as the access token does in TokenHeader.
	E2BTrafficTokenHeader = "E2b-Traffic-Access-Token"
)

// target names the sandbox port a request is for: by E2B's headers, else by its host.
// named is false when the request names none (it is for the API, if any).
func (p *Proxy) target(req *http.Request) (port uint16, sandbox string, named, ok bool) {
	if ids := req.Header.Values(e2bSandboxHeader); len(ids) > 0 {
		ports := req.Header.Values(e2bPortHeader)
		if len(ids) != 1 || len(ports) != 1 {
			return 0, "", true, false
		}
		n, ok := parsePort(ports[0])
		return n, strings.ToLower(ids[0]), true, ok
	}
	port, sandbox, ok = routes.ParseHost(req.Host, p.domain)
	return port, sandbox, ok, ok
}

// ServeHTTP routes one request by E2B's sandbox headers or its Host.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	port, sandbox, named, ok := p.target(req)
	if !named && p.API != nil {
		p.API.ServeHTTP(w, req)
		return
	}
	if !ok || !routes.ValidSandbox(sandbox) {
		plainError(w, http.StatusNotFound, "unknown host")
		return
	}
	r, ok := p.lookup(sandbox, port)
	if !ok {
		if len(req.Header.Values(e2bSandboxHeader)) > 0 {
			// E2B's SDK reads 502 as "the sandbox ended" (its proxy's answer for one
			// that is gone); 404 would be a missing file to it.
			plainError(w, http.StatusBadGateway, "no such sandbox port")
			return
		}
		plainError(w, http.StatusNotFound, "no such sandbox port")
		return
	}
	if !r.Running {
		// The sandbox is stopped or its node is down: connecting would only time out.
		plainError(w, http.StatusBadGateway, "sandbox is not running")
		return
	}
	if !r.Public {
		// The access token in ours, or the traffic token (which opens ports only) in E2B's.
		got, want := req.Header.Values(routes.TokenHeader), r.Token
		if len(got) == 0 && len(req.Header.Values(E2BTrafficTokenHeader)) > 0 {
			got, want = req.Header.Values(E2BTrafficTokenHeader), routes.TrafficToken(r.Token)
		}
		if code, msg := checkToken(got, want); code != 0 {
			plainError(w, code, msg)
			return
		}
	}
	p.fwd.serve(w, req.WithContext(withRoute(req.Context(), r)))
}

// checkToken returns 0 when got carries exactly the route's token, else the status and
// reason to answer with.
func checkToken(got []string, want string) (int, string) {
	if len(got) == 0 || got[0] == "" {
		return http.StatusUnauthorized, "access token required (" + routes.TokenHeader + " header)"
	}
	// A route with no token is misconfigured: it must not admit an empty or any token.
	// More than one value is refused so that what is checked is what would be forwarded.
	if want == "" || len(got) != 1 || subtle.ConstantTimeCompare([]byte(got[0]), []byte(want)) != 1 {
		return http.StatusForbidden, "invalid access token"
	}
	return 0, ""
}

// Serve runs the edge on ln until ctx is done (see the package-level Serve). With tlsCfg
// it serves HTTPS (HTTP/2 via ALPN, and HTTP/1.1); without, HTTP/1.1 and cleartext
// HTTP/2 with prior knowledge (h2c).
func (p *Proxy) Serve(ctx context.Context, ln net.Listener, tlsCfg *tls.Config) error {
	return Serve(ctx, ln, p, tlsCfg, p.log)
}
