// Package ingress is the built-in HTTP edge and the node side of its data path.
//
// A request for `<port>-<sandbox>.<domain>` reaches the edge (Proxy), which looks the
// route up in the table the servers stream to it, checks the sandbox's access token for
// private ports, and forwards the request over a raw TCP tunnel to the sandbox's guest
// port. The tunnel is opened through the sandbox's node (TunnelDialer): a mutual-TLS
// connection to the node's data address carrying `CONNECT <sandbox>:<port>`, which the
// node (NodeHandler) splices onto a local connection to the guest. The node also reverse
// proxies ordinary HTTP requests by Host, for Envoy, which cannot speak the tunnel.
//
// Because the edge owns the HTTP hop to the sandbox, it chooses the protocol: HTTP/1.1 by
// default (what almost every app in a sandbox speaks, and what WebSocket upgrades need),
// and cleartext HTTP/2 with prior knowledge for gRPC, which cannot work over HTTP/1.1.
package ingress

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
)

// Dialer opens a TCP connection to a sandbox's guest port.
type Dialer interface {
	DialSandbox(ctx context.Context, r routes.Route) (net.Conn, error)
}

// DefaultDialTimeout bounds opening a connection to a sandbox, so an unreachable node or
// guest turns into a prompt 502 instead of a hung request.
const DefaultDialTimeout = 5 * time.Second

// routeKey carries the route a request was admitted for from ServeHTTP to the transport's
// dial function (http.Transport keeps context values when it dials).
type routeKey struct{}

func withRoute(ctx context.Context, r routes.Route) context.Context {
	return context.WithValue(ctx, routeKey{}, r)
}

func routeFrom(ctx context.Context) (routes.Route, bool) {
	r, ok := ctx.Value(routeKey{}).(routes.Route)
	return r, ok
}

// forwarder reverse proxies a request (whose context carries its route) to the sandbox.
// It keeps two transports because the choice of protocol is per request: gRPC needs
// HTTP/2, WebSocket upgrades need HTTP/1.1.
type forwarder struct {
	h1, h2c http.Handler
	log     *slog.Logger
}

// newForwarder builds the reverse proxies. dial opens the connection for a route;
// rewrite finishes the outbound request after the target is set (headers).
func newForwarder(log *slog.Logger, dial func(context.Context, routes.Route) (net.Conn, error), rewrite func(*httputil.ProxyRequest)) *forwarder {
	dialCtx := func(ctx context.Context, _, addr string) (net.Conn, error) {
		r, ok := routeFrom(ctx)
		if !ok {
			// Only reachable if a request bypassed ServeHTTP; refuse rather than guess.
			return nil, fmt.Errorf("dial %s: no route in request context", addr)
		}
		return dial(ctx, r)
	}
	newTransport := func(p http.Protocols) *http.Transport {
		return &http.Transport{
			// No Proxy: the environment's HTTP proxy must never see sandbox traffic.
			DialContext:         dialCtx,
			Protocols:           &p,
			MaxIdleConnsPerHost: 32,
			IdleConnTimeout:     90 * time.Second,
			// A proxy passes Accept-Encoding through; transparent gzip would alter bodies.
			DisableCompression: true,
			// The backend may take long to answer (long polling); no response timeout.
		}
	}
	var p1, p2 http.Protocols
	p1.SetHTTP1(true)
	p2.SetUnencryptedHTTP2(true)

	f := &forwarder{log: log}
	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	mk := func(tr *http.Transport) http.Handler {
		return rpc.EndWithResponse(&httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				r, _ := routeFrom(pr.In.Context())
				pr.SetURL(&url.URL{Scheme: "http", Host: poolHost(r)})
				// The app in the sandbox sees the host name it was called by, as it
				// would behind any other ingress.
				pr.Out.Host = pr.In.Host
				// The token authorises the caller at the edge; the app must never see it.
				pr.Out.Header.Del(routes.TokenHeader)
				pr.Out.Header.Del(E2BTrafficTokenHeader)
				rewrite(pr)
			},
			Transport:    tr,
			ErrorHandler: f.proxyError,
			ErrorLog:     errLog,
		})
	}
	f.h1 = mk(newTransport(p1))
	f.h2c = mk(newTransport(p2))
	return f
}

// serve forwards req, whose context must carry its route.
func (f *forwarder) serve(w http.ResponseWriter, req *http.Request) {
	if isGRPC(req) {
		f.h2c.ServeHTTP(w, req)
		return
	}
	f.h1.ServeHTTP(w, req)
}

func (f *forwarder) proxyError(w http.ResponseWriter, req *http.Request, err error) {
	r, _ := routeFrom(req.Context())
	if req.Context().Err() != nil {
		// The client went away; nobody reads the answer.
		f.log.Debug("ingress: client gone", "route", r.String(), "err", err)
	} else {
		f.log.Warn("ingress: sandbox unreachable", "route", r.String(), "method", req.Method, "err", err)
	}
	plainError(w, http.StatusBadGateway, "sandbox port unreachable")
}

// poolHost is the outbound URL host for a route. http.Transport pools connections by it,
// so it names the sandbox port and (hashed) the node: after a sandbox moves, requests
// stop reusing tunnels to its old node.
func poolHost(r routes.Route) string {
	h := fnv.New64a()
	h.Write([]byte(r.NodeAddr))
	return strconv.Itoa(int(r.Port)) + "-" + r.Sandbox + "." + strconv.FormatUint(h.Sum64(), 16) + ".route.invalid"
}

// isGRPC reports whether req is gRPC (application/grpc or application/grpc+codec).
// gRPC-Web (application/grpc-web…) is deliberately not: it is made for HTTP/1.1.
func isGRPC(req *http.Request) bool {
	mt, _, err := mime.ParseMediaType(req.Header.Get("Content-Type"))
	if err != nil {
		return false
	}
	return mt == "application/grpc" || strings.HasPrefix(mt, "application/grpc+")
}

// plainError answers with a short plain-text reason. Never used after the response
// started.
func plainError(w http.ResponseWriter, code int, msg string) {
	h := w.Header()
	h.Del("Content-Length")
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintln(w, msg)
}

// dialWithTimeout bounds d.DialSandbox by timeout (DefaultDialTimeout when <= 0).
func dialWithTimeout(ctx context.Context, d Dialer, r routes.Route, timeout time.Duration) (net.Conn, error) {
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := d.DialSandbox(ctx, r)
	if err != nil {
		return nil, fmt.Errorf("dial sandbox %s port %d: %w", r.Sandbox, r.Port, err)
	}
	if c == nil {
		return nil, fmt.Errorf("dial sandbox %s port %d: %w", r.Sandbox, r.Port, errors.New("dialer returned no connection"))
	}
	return c, nil
}
