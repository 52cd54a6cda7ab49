package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Ingress certificate lifetimes: short by default, so that revoking the token that got
// one ends the edge's access soon (there is no revocation list); longer on request for
// an Envoy whose certificate files an operator renews.
const (
	DefaultIngressCertTTL = 24 * time.Hour
	MaxIngressCertTTL     = 90 * 24 * time.Hour
)

// IngressOptions configure the route feed.
type IngressOptions struct {
	// Domain is the ingress domain (default routes.DefaultDomain).
	Domain string
}

// SetIngress configures the route feed. Call before serving.
func (s *Server) SetIngress(o IngressOptions) {
	if o.Domain == "" {
		o.Domain = routes.DefaultDomain
	}
	s.ingress = o
}

// IngressDomain is the configured ingress domain.
func (s *Server) IngressDomain() string {
	if s.ingress.Domain == "" {
		return routes.DefaultDomain
	}
	return s.ingress.Domain
}

// routeFeed is the route table derived from this server's copy of the state, with a
// version that grows with every change of the table (not of the state: a heartbeat or a
// log line does not make edges reload).
type routeFeed struct {
	mu    sync.Mutex
	table routes.Table
}

// RouteTable is the current route table. Its Routes must not be modified.
//
// The version is this server's: it starts at the current time in microseconds and grows
// by at least one per change, so it also grows across a restart or a change of leader as
// long as the servers' clocks agree to within the time between two changes. Edges do not
// depend on that (see cli's ingress, which orders tables by stream), xDS clients compare
// versions only for equality.
func (s *Server) RouteTable() routes.Table {
	// Only the sandboxes that publish ports are copied: this runs on every change while
	// an edge follows the table.
	rs := buildRoutes(s.store.LocalSandboxesWhere(func(sb *state.Sandbox) bool { return len(sb.Spec.Ports) > 0 }), s.store.LocalNodes())
	f := &s.routes
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.table.Version != 0 && slices.Equal(rs, f.table.Routes) {
		return f.table
	}
	f.table = routes.Table{Version: max(f.table.Version+1, uint64(s.now().UnixMicro())), Routes: rs}
	return f.table
}

// buildRoutes derives the routes of every sandbox that publishes ports and still exists.
// A sandbox that is not running (yet, or any more) or whose node is down keeps its routes
// with Running false, so an edge answers 502 at once; a removed one has none (404).
func buildRoutes(sbs []state.Sandbox, nodes []state.Node) []routes.Route {
	byID := make(map[string]state.Node, len(nodes))
	for _, n := range nodes {
		byID[n.ID] = n
	}
	var out []routes.Route
	for _, sb := range sbs {
		if len(sb.Spec.Ports) == 0 {
			continue
		}
		var addr string
		up := false
		if n, ok := byID[sb.Node]; ok {
			addr, up = n.Address, n.Status == state.NodeReady
		}
		for _, p := range sb.Spec.Ports {
			// An every-port entry is the route of port 0 (routes.Route).
			r := routes.Route{Sandbox: sb.ID, Port: p.Port, Public: p.Public, Node: sb.Node, NodeAddr: addr,
				Running: up && sb.Status == state.StatusRunning}
			if !p.Public {
				// Only private ports need it; public ones do not spread it further.
				r.Token = sb.AccessToken
			}
			out = append(out, r)
		}
	}
	return routes.Table{Routes: out}.Sorted()
}

// FollowRoutes calls fn with the route table now and after every change until ctx ends.
// fn runs on the caller's goroutine.
func (s *Server) FollowRoutes(ctx context.Context, fn func(routes.Table)) {
	var last uint64
	for {
		changed := s.store.Changed()
		if t := s.RouteTable(); t.Version != last {
			fn(t)
			last = t.Version
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// ingressServicePrefix is the HTTP path prefix of IngressService: the only calls an
// ingress token may make.
var ingressServicePrefix = "/" + fireworksv1connect.IngressServiceName + "/"

// requireEdge admits admin and ingress tokens: the route table holds the access tokens of
// every private port, so a user token must never read it.
func requireEdge(ctx context.Context, what string) (auth.Identity, error) {
	id, err := caller(ctx)
	if err != nil {
		return id, err
	}
	if id.Role != state.RoleAdmin && id.Role != state.RoleIngress {
		return id, connect.NewError(connect.CodePermissionDenied,
			fmt.Errorf("%s needs an ingress or admin token (`fireworks token create --role ingress`); token %s has role %s", what, id.TokenID, id.Role))
	}
	return id, nil
}

type ingressService struct{ s *Server }

func routeTableToPB(t routes.Table, domain string) *pb.RouteTable {
	out := &pb.RouteTable{Version: t.Version, Domain: domain, Routes: make([]*pb.IngressRoute, 0, len(t.Routes))}
	for _, r := range t.Routes {
		out.Routes = append(out.Routes, &pb.IngressRoute{Sandbox: r.Sandbox, Port: uint32(r.Port), Public: r.Public,
			Token: r.Token, Node: r.Node, NodeAddress: r.NodeAddr, Running: r.Running})
	}
	return out
}

// WatchRoutes streams the route table. In a cluster the call runs on the leader (followers
// forward user calls), whose state has every committed change; when this server stops
// leading, the stream ends with "unavailable" and the edge reconnects to the new leader.
func (h *ingressService) WatchRoutes(ctx context.Context, _ *connect.Request[pb.WatchRoutesRequest], stream *connect.ServerStream[pb.RouteTable]) error {
	if _, err := requireEdge(ctx, "watching the route table"); err != nil {
		return err
	}
	var sent uint64
	for {
		changed := h.s.store.Changed()
		if h.s.cluster.CA != nil && !h.s.store.IsLeader() {
			return connect.NewError(connect.CodeUnavailable, errors.New("this server stopped leading; reconnect to follow the new leader"))
		}
		if t := h.s.RouteTable(); t.Version != sent {
			if err := stream.Send(routeTableToPB(t, h.s.IngressDomain())); err != nil {
				return err
			}
			sent = t.Version
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-time.After(5 * time.Second):
			// Leadership can end without a state change; look again now and then.
		}
	}
}

func (h *ingressService) IssueIngressCertificate(ctx context.Context, req *connect.Request[pb.IssueIngressCertificateRequest]) (*connect.Response[pb.IssueIngressCertificateResponse], error) {
	who, err := requireEdge(ctx, "getting an ingress certificate")
	if err != nil {
		return nil, err
	}
	ca := h.s.cluster.CA
	if ca == nil || !ca.CanIssue() {
		return nil, connect.NewError(connect.CodeFailedPrecondition,
			errors.New("this server has no cluster CA to sign with (`fireworks dev` runs its ingress in-process with --ingress-listen, no certificate needed)"))
	}
	name := req.Msg.GetName()
	if name != "" {
		if err := validNodeName(name); err != nil {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("ingress certificate name: %w", err))
		}
	} else if name = who.Name; validNodeName(name) != nil {
		// Token names are free text; the certificate needs a plain one.
		name = "ingress-" + who.TokenID
	}
	ttl := DefaultIngressCertTTL
	if d := req.Msg.GetTtl(); d != nil {
		ttl = d.AsDuration()
	}
	if ttl <= 0 || ttl > MaxIngressCertTTL {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("ingress certificate TTL %s: want more than 0 and at most %s", ttl, MaxIngressCertTTL))
	}
	// Never past the token's own expiry: an expired token's certificates must not live on.
	if tok, err := h.s.store.LocalToken(who.TokenID); err == nil && !tok.ExpiresAt.IsZero() {
		// Whole seconds, one short: a certificate's NotAfter is kept to the second.
		if left := time.Until(tok.ExpiresAt).Truncate(time.Second) - time.Second; left < ttl {
			ttl = left
		}
		if ttl <= 0 {
			return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("the token has expired"))
		}
	}
	certPEM, err := ca.SignCSR(req.Msg.GetCsr(), pki.IssueRequest{CommonName: name, Role: pki.RoleIngress, TTL: ttl})
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("sign ingress certificate: %w", err))
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	// Recorded before it is handed out: revoking the token revokes the certificate.
	if err := h.s.store.RecordEdgeCert(ctx, state.IssuedCert{Serial: cert.SerialNumber.Text(16), Token: who.TokenID, Name: name,
		NotAfter: cert.NotAfter}, time.Now()); err != nil {
		return nil, toConnectError(err)
	}
	h.s.log.Info("ingress certificate issued", "name", name, "token", who.TokenID, "serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	return connect.NewResponse(&pb.IssueIngressCertificateResponse{CertPem: certPEM, CaPem: ca.CertPEM(),
		NotAfter: timestamppb.New(cert.NotAfter)}), nil
}

func parseCertPEM(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("issued certificate is not PEM")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse issued certificate: %w", err)
	}
	return c, nil
}

// --- xDS ---

// XDSTLS is the listener configuration of a cluster server's xDS endpoint: the xDS
// resources hold the access tokens of private ports, so only edges (ingress
// certificates) and servers may connect.
//
// An edge certificate revoked with its token is refused at the handshake; ServeXDS also
// ends the streams of one revoked while connected.
func (s *Server) XDSTLS(ca *pki.CA, cert tls.Certificate) *tls.Config {
	cfg := pki.ServerTLS(ca, cert, true)
	role := pki.VerifyPeerRole(ca, x509.ExtKeyUsageClientAuth, pki.RoleIngress, pki.RoleServer)
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := role(cs); err != nil {
			return err
		}
		if serial := cs.PeerCertificates[0].SerialNumber.Text(16); s.store.EdgeCertRevoked(serial) {
			return fmt.Errorf("edge certificate %s was revoked with its token", serial)
		}
		return nil
	}
	return cfg
}

// xdsPeerSerial is the serial of the edge certificate an xDS call came with, "" without
// TLS (dev's loopback feed).
func xdsPeerSerial(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ""
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return ""
	}
	return pki.PeerSerial(&ti.State)
}

// errRevokedEdge answers an xDS call made with a revoked edge certificate.
var errRevokedEdge = status.Error(codes.PermissionDenied, "the edge certificate of this connection was revoked with its token")

// xdsUnaryRevocation refuses unary xDS calls (Fetch*) made with a revoked edge certificate
// over a connection opened before the revocation (the handshake refuses new ones).
func (s *Server) xdsUnaryRevocation(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if serial := xdsPeerSerial(ctx); serial != "" && s.store.EdgeCertRevoked(serial) {
		return nil, errRevokedEdge
	}
	return handler(ctx, req)
}

// xdsRevocation refuses a stream opened with a revoked edge certificate, and ends one
// once its certificate is revoked (the stream carries the access tokens of private
// ports, and Envoy keeps it open for days).
func (s *Server) xdsRevocation(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	serial := xdsPeerSerial(ss.Context())
	if serial == "" {
		return handler(srv, ss)
	}
	if s.store.EdgeCertRevoked(serial) {
		return errRevokedEdge
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	done := make(chan struct{})
	defer close(done)
	go func() { // ends with the stream (done)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if s.store.EdgeCertRevoked(serial) {
					s.log.Info("xds: ending the stream of a revoked edge certificate", "serial", serial)
					cancel()
					return
				}
			}
		}
	}()
	return handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
}

// ctxStream is a server stream that ends with ctx: its context is ctx, and a receive or
// send once ctx is done fails. (go-control-plane ends a stream only when a receive fails,
// so a receive waiting for the client's next request must give up when ctx ends.)
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c *ctxStream) Context() context.Context { return c.ctx }

func (c *ctxStream) SendMsg(m any) error {
	if err := c.ctx.Err(); err != nil {
		return errRevokedEdge
	}
	return c.ServerStream.SendMsg(m)
}

func (c *ctxStream) RecvMsg(m any) error {
	errc := make(chan error, 1)
	// Ends when the message arrives or the stream does: once the handler returns, gRPC
	// ends the stream and the receive with it.
	go func() { errc <- c.ServerStream.RecvMsg(m) }()
	select {
	case err := <-errc:
		return err
	case <-c.ctx.Done():
		if err := c.ServerStream.Context().Err(); err != nil {
			return status.FromContextError(err).Err() // the stream itself ended
		}
		return errRevokedEdge
	}
}

// ServeXDS serves the route table over xDS (gRPC) on ln until ctx ends, fed from this
// server's copy of the state (any server can serve Envoy; a follower lags the leader by
// its replication delay). tlsCfg nil serves without TLS (`fireworks dev` on loopback).
func (s *Server) ServeXDS(ctx context.Context, ln net.Listener, tlsCfg *tls.Config, cfg xds.Config) error {
	if cfg.Domain == "" {
		cfg.Domain = s.IngressDomain()
	}
	x := xds.New(cfg, s.log)
	opts := []grpc.ServerOption{grpc.StreamInterceptor(s.xdsRevocation), grpc.UnaryInterceptor(s.xdsUnaryRevocation)}
	if tlsCfg != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	g := grpc.NewServer(opts...)
	x.Register(g)

	fctx, stopFeed := context.WithCancel(ctx)
	fed := make(chan struct{})
	go func() {
		defer close(fed)
		s.FollowRoutes(fctx, func(t routes.Table) {
			if err := x.SetTable(fctx, t); err != nil && fctx.Err() == nil {
				s.log.Error("xds: publish route table", "version", t.Version, "err", err)
			}
		})
	}()
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(ln) }()
	s.log.Info("xds serving routes", "addr", ln.Addr().String(), "tls", tlsCfg != nil, "domain", cfg.Domain)

	var err error
	select {
	case <-ctx.Done():
		x.Close() // ends the streams, so GracefulStop does not wait on them
		g.GracefulStop()
		<-errc
	case err = <-errc:
		x.Close()
		g.Stop()
		err = fmt.Errorf("serve xDS on %s: %w", ln.Addr(), err)
	}
	stopFeed()
	<-fed
	return err
}

// edgeOnly answers a call an ingress token may not make, in the caller's protocol.
func edgeOnly(w http.ResponseWriter, r *http.Request) {
	rpc.Refuse(w, r, connect.CodePermissionDenied, http.StatusForbidden, "an ingress token may only watch routes and get an ingress certificate")
}
