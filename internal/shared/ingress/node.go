package ingress

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// NodeHandler serves a node's data address: `CONNECT <sandbox>:<port>` opens a raw TCP
// tunnel to a local sandbox's guest port; any other request is reverse proxied to the
// local sandbox named by its Host (`<port>-<sandbox>.<domain>`), for Envoy. Access tokens
// are not checked here (the edge does that); who may use the node at all is Authorize's
// call.
//
// Serve it on a TLS listener with Serve (or any http.Server whose request contexts end at
// shutdown, since tunnels are hijacked connections the server no longer tracks).
type NodeHandler struct {
	// Authorize, when set, vets every request before anything else (typically: the peer
	// certificate belongs to the edge or Envoy); an error is answered with 403. Nil
	// admits everyone.
	Authorize func(*http.Request) error
	// DialTimeout bounds connecting to the guest (DefaultDialTimeout when zero).
	DialTimeout time.Duration

	domain string
	local  Dialer
	log    *slog.Logger
	fwd    *forwarder
}

// NewNodeHandler returns the handler for host names under domain. local connects to a
// sandbox on this node; it is given routes with only Sandbox and Port set.
func NewNodeHandler(domain string, local Dialer, log *slog.Logger) *NodeHandler {
	if log == nil {
		log = slog.Default()
	}
	h := &NodeHandler{domain: domain, local: local, log: log}
	h.fwd = newForwarder(log, func(ctx context.Context, r routes.Route) (net.Conn, error) {
		return dialWithTimeout(ctx, h.local, r, h.DialTimeout)
	}, func(pr *httputil.ProxyRequest) {
		// Callers are authorised peers (the edge, Envoy) that already set X-Forwarded-*
		// for the real client: keep theirs rather than naming the proxy as the client.
		if xff := pr.In.Header.Values("X-Forwarded-For"); len(xff) > 0 {
			for _, k := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
				if v := pr.In.Header.Values(k); len(v) > 0 {
					pr.Out.Header[k] = v
				}
			}
			return
		}
		pr.SetXForwarded()
	})
	return h
}

func (h *NodeHandler) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if h.Authorize != nil {
		if err := h.Authorize(req); err != nil {
			h.log.Warn("ingress node: request refused", "remote", req.RemoteAddr, "method", req.Method, "host", req.Host, "err", err)
			plainError(w, http.StatusForbidden, "forbidden")
			return
		}
	}
	if req.Method == http.MethodConnect {
		h.connect(w, req)
		return
	}
	port, sandbox, ok := routes.ParseHost(req.Host, h.domain)
	if !ok || !routes.ValidSandbox(sandbox) {
		plainError(w, http.StatusNotFound, "unknown host")
		return
	}
	h.fwd.serve(w, req.WithContext(withRoute(req.Context(), routes.Route{Sandbox: sandbox, Port: port})))
}

// connect answers `CONNECT <sandbox>:<port>`: dial the guest, reply 200, splice.
func (h *NodeHandler) connect(w http.ResponseWriter, req *http.Request) {
	target := req.URL.Host
	if target == "" {
		target = req.Host
	}
	r, err := parseConnectTarget(target)
	if err != nil {
		plainError(w, http.StatusBadRequest, err.Error())
		return
	}
	local, err := dialWithTimeout(req.Context(), h.local, r, h.DialTimeout)
	if err != nil {
		h.log.Warn("ingress node: sandbox unreachable", "sandbox", r.Sandbox, "port", r.Port, "err", err)
		plainError(w, http.StatusBadGateway, "sandbox port unreachable")
		return
	}
	h.log.Debug("ingress node: tunnel open", "sandbox", r.Sandbox, "port", r.Port, "remote", req.RemoteAddr)
	if req.ProtoMajor >= 2 {
		streamTunnel(w, req, local)
	} else {
		hijackTunnel(w, req, local, h.log)
	}
	h.log.Debug("ingress node: tunnel closed", "sandbox", r.Sandbox, "port", r.Port, "remote", req.RemoteAddr)
}

// parseConnectTarget parses `<sandbox>:<port>` strictly: a contract sandbox ID and a
// decimal port 1-65535 without sign or leading zeros.
func parseConnectTarget(target string) (routes.Route, error) {
	sandbox, ps, err := net.SplitHostPort(target)
	if err != nil {
		return routes.Route{}, fmt.Errorf("bad CONNECT target %q: %w", target, err)
	}
	if !routes.ValidSandbox(sandbox) {
		return routes.Route{}, fmt.Errorf("bad CONNECT target %q: not a sandbox ID", target)
	}
	port, ok := parsePort(ps)
	if !ok {
		return routes.Route{}, fmt.Errorf("bad CONNECT target %q: bad port", target)
	}
	return routes.Route{Sandbox: sandbox, Port: port}, nil
}

func parsePort(s string) (uint16, bool) {
	if s == "" || s[0] < '1' || s[0] > '9' {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, false
	}
	return uint16(n), true
}

// hijackTunnel runs an HTTP/1.1 CONNECT tunnel: take over the connection, send 200, and
// splice until both directions are done.
func hijackTunnel(w http.ResponseWriter, req *http.Request, local net.Conn, log *slog.Logger) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		local.Close()
		log.Error("ingress node: cannot take over connection for CONNECT", "err", err)
		plainError(w, http.StatusInternalServerError, "cannot open tunnel")
		return
	}
	if _, err := io.WriteString(conn, "HTTP/1.1 200 OK\r\n\r\n"); err != nil {
		conn.Close()
		local.Close()
		return
	}
	// brw.Reader may already hold bytes the client sent right after its request. Only
	// those are taken from it: it reads through the server's connection reader, which
	// cancels the request context when it sees EOF, and a client's half-close must not
	// tear the tunnel down.
	var client io.Reader = conn
	if n := brw.Reader.Buffered(); n > 0 {
		pre, _ := brw.Reader.Peek(n)
		client = io.MultiReader(bytes.NewReader(bytes.Clone(pre)), conn)
	}
	splice(req.Context(), conn, client, local)
}

// splice copies a→b and b→a until both directions end. An EOF in one direction is passed
// on as a half-close (CloseWrite) so the other keeps flowing; an error, or ctx ending,
// closes both connections. aR reads a (it may front a with buffered bytes).
func splice(ctx context.Context, a net.Conn, aR io.Reader, b net.Conn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	defer closeBoth()
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()

	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := pipe(b, aR); err != nil {
			closeBoth()
		}
	}()
	if err := pipe(a, b); err != nil {
		closeBoth()
	}
	<-done
}

// pipe copies src to dst, then half-closes dst.
func pipe(dst net.Conn, src io.Reader) error {
	if _, err := io.Copy(dst, src); err != nil {
		return err
	}
	return closeWrite(dst)
}

func closeWrite(c net.Conn) error {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return errors.New("connection cannot half-close")
	}
	return cw.CloseWrite()
}

// streamTunnel runs a CONNECT tunnel over an HTTP/2 stream (as Envoy's TCP tunnelling
// sends): the request body is the client's bytes, the response body the guest's.
func streamTunnel(w http.ResponseWriter, req *http.Request, local net.Conn) {
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		local.Close()
		return
	}
	var once sync.Once
	abort := func() {
		once.Do(func() {
			local.Close()
			req.Body.Close() // unblocks a pending body read
		})
	}
	defer local.Close()
	stop := context.AfterFunc(req.Context(), abort)
	defer stop()

	done := make(chan struct{})
	go func() {
		defer close(done)
		_, err := io.Copy(local, req.Body)
		if err == nil {
			err = closeWrite(local)
		}
		if err != nil {
			abort()
		}
	}()
	_, _ = io.Copy(flushWriter{w, rc}, local)
	// The guest finished sending (or the stream broke). An HTTP/2 handler can end its
	// response only by returning, which also ends the request side, so a guest's
	// half-close ends the whole tunnel here; waiting for the client instead could wait
	// forever on a client that itself waits for the guest's EOF.
	abort()
	<-done
}

// flushWriter sends every write at once: tunnel bytes must not sit in a buffer.
type flushWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err != nil {
		return n, err
	}
	return n, f.rc.Flush()
}
