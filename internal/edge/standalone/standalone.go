// Package standalone is the standalone ingress edge (`fireworks ingress`): it follows the route
// table the servers stream, keeps a client certificate for the nodes' data addresses
// (renewed at half-life with its ingress token), and serves ingress.Proxy. Server outages
// do not stop it: it keeps serving the last table and reconnects.
package standalone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fireworks-sandbox/fireworks/internal/edge/e2bapi"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
)

// Config is an edge.
type Config struct {
	// Client reaches the servers with the edge's (ingress or admin) token.
	Client fireworksv1connect.IngressServiceClient
	// E2BAPI, if set, reaches the servers for E2B's REST API, which the edge serves for
	// requests that name no sandbox; every call carries its caller's own key.
	E2BAPI *client.Client
	// Name goes in the edge's certificate ("" = the token's name).
	Name string
	// Domain is the ingress domain; "" takes the servers', else DefaultDomain.
	Domain, DefaultDomain string
	// Listen is where the edge serves; ServeTLS, if set, makes it HTTPS.
	Listen   string
	ServeTLS *tls.Config
	Log      *slog.Logger
}

// Run serves the edge until ctx ends. Start-up waits for the servers while none answers
// (edges are started with them, e.g. by one Helm install) and fails fast when refused (a
// bad token, a wrong CA): those are configuration errors. Once running, the edge rides
// out outages.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	// bg is the life of the route stream and the certificate renewals: it ends when this
	// function returns, however it returns.
	bg, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var cert edgeCert
	var next time.Time
	var stream *connect.ServerStreamForClient[pb.RouteTable]
	var first *pb.RouteTable
	for wait := time.Second; ; wait = min(2*wait, 15*time.Second) {
		var err error
		if next, err = cert.renew(bg, cfg.Client, cfg.Name); err == nil {
			stream, first, err = openRoutes(bg, cfg.Client)
		}
		if err == nil {
			break
		}
		if !rpc.NoServerYet(err) {
			return err
		}
		cfg.Log.Warn("ingress: no server answered yet; trying again", "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (gave up: %w)", err, ctx.Err())
		case <-time.After(wait):
		}
	}
	domain := cfg.Domain
	if domain == "" {
		domain = first.GetDomain()
	} else if first.GetDomain() != "" && first.GetDomain() != domain {
		cfg.Log.Warn("ingress: --domain differs from the servers' ingress domain (nodes route Envoy's requests by theirs)", "domain", domain, "servers", first.GetDomain())
	}
	if domain == "" {
		domain = cfg.DefaultDomain
	}
	proxy := ingress.NewProxy(domain, &ingress.TunnelDialer{TLS: cert.tlsConfig(), Timeout: ingress.DefaultDialTimeout,
		VerifyNode: func(node string) func(tls.ConnectionState) error { return pki.RequirePeer(pki.RoleAgent, node) }}, cfg.Log)
	switch {
	case cfg.E2BAPI == nil:
	case !e2bapi.Servable(cfg.Listen, cfg.ServeTLS != nil):
		cfg.Log.Warn("ingress: not serving E2B's API: it takes users' API keys, which need TLS (--tls-cert) off loopback", "listen", cfg.Listen)
	default:
		api := e2bapi.New(e2bapi.Config{Servers: cfg.E2BAPI, Domain: domain, Log: cfg.Log})
		defer api.Close()
		proxy.API = api
	}
	apply := applyTable(proxy, cfg.Log)
	apply(first)

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		stream.Close()
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	wg.Add(2)
	go func() { defer wg.Done(); followRoutes(bg, cfg.Client, stream, apply, cfg.Log) }()
	go func() { defer wg.Done(); cert.keepRenewing(bg, cfg.Client, cfg.Name, next, cfg.Log) }()
	cfg.Log.Info("fireworks ingress ready", "listen", ln.Addr().String(), "domain", domain, "https", cfg.ServeTLS != nil,
		"routes", len(first.GetRoutes()))
	return ingress.Serve(ctx, ln, proxy, cfg.ServeTLS, cfg.Log)
}

// TableFromPB is the inverse of what WatchRoutes sends; routes with a port above 65535
// are dropped (port 0 routes every port of its sandbox).
func TableFromPB(m *pb.RouteTable) routes.Table {
	t := routes.Table{Version: m.GetVersion()}
	for _, r := range m.GetRoutes() {
		if r.GetPort() > 65535 {
			continue
		}
		t.Routes = append(t.Routes, routes.Route{Sandbox: r.GetSandbox(), Port: uint16(r.GetPort()), Public: r.GetPublic(),
			Token: r.GetToken(), Node: r.GetNode(), NodeAddr: r.GetNodeAddress(), Running: r.GetRunning()})
	}
	return t
}

// IssueCert makes a key and has the servers certify it for an edge called name (ttl 0:
// the servers' default).
func IssueCert(ctx context.Context, c fireworksv1connect.IngressServiceClient, name string, ttl time.Duration) (certPEM, keyPEM, caPEM []byte, notAfter time.Time, err error) {
	csr, keyPEM, err := pki.NewCSR(name)
	if err != nil {
		return nil, nil, nil, time.Time{}, err
	}
	req := &pb.IssueIngressCertificateRequest{Csr: csr, Name: name}
	if ttl > 0 {
		req.Ttl = durationpb.New(ttl)
	}
	resp, err := c.IssueIngressCertificate(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, nil, nil, time.Time{}, fmt.Errorf("get an ingress certificate: %w", err)
	}
	return resp.Msg.GetCertPem(), keyPEM, resp.Msg.GetCaPem(), resp.Msg.GetNotAfter().AsTime(), nil
}

// edgeCert is the edge's current certificate for the nodes, renewed in the background.
type edgeCert struct {
	cert atomic.Pointer[tls.Certificate]
	// roots trusts node certificates: the cluster CA the servers returned with the first
	// certificate (over a connection verified against the configured CA). The cluster CA
	// does not change while the edge runs.
	roots *x509.CertPool
}

// renew gets a new certificate and returns when it should be renewed next (halfway to
// its expiry).
func (e *edgeCert) renew(ctx context.Context, c fireworksv1connect.IngressServiceClient, name string) (time.Time, error) {
	certPEM, keyPEM, caPEM, notAfter, err := IssueCert(ctx, c, name, 0)
	if err != nil {
		return time.Time{}, err
	}
	kp, err := pki.KeyPair(certPEM, keyPEM)
	if err != nil {
		return time.Time{}, fmt.Errorf("ingress certificate from the servers: %w", err)
	}
	if e.roots == nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return time.Time{}, errors.New("ingress certificate from the servers: no cluster CA in the answer")
		}
		e.roots = pool
	}
	e.cert.Store(&kp)
	return time.Now().Add(time.Until(notAfter) / 2), nil
}

// tlsConfig is the client configuration for nodes' data addresses (call after the first
// renew). The certificate is read per handshake, so a renewal applies to the next tunnel.
func (e *edgeCert) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		RootCAs:          e.roots,
		VerifyConnection: pki.RequirePeer(pki.RoleAgent, ""), // a node's data address
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return e.cert.Load(), nil
		},
	}
}

// keepRenewing renews the certificate at each half-life until ctx ends; failures are
// retried every minute (the current certificate stays in use until it expires).
func (e *edgeCert) keepRenewing(ctx context.Context, c fireworksv1connect.IngressServiceClient, name string, next time.Time, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(next)):
		}
		n, err := e.renew(ctx, c, name)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Error("ingress: renewing the edge certificate failed; retrying in a minute", "err", err)
			next = time.Now().Add(time.Minute)
			continue
		}
		log.Info("ingress: edge certificate renewed")
		next = n
	}
}

// openRoutes starts a route stream and waits for its first table.
func openRoutes(ctx context.Context, c fireworksv1connect.IngressServiceClient) (*connect.ServerStreamForClient[pb.RouteTable], *pb.RouteTable, error) {
	stream, err := c.WatchRoutes(ctx, connect.NewRequest(&pb.WatchRoutesRequest{}))
	if err != nil {
		return nil, nil, fmt.Errorf("watch routes: %w", err)
	}
	if !stream.Receive() {
		err := stream.Err()
		stream.Close()
		if err == nil {
			err = errors.New("stream ended before the first table")
		}
		return nil, nil, fmt.Errorf("watch routes: %w", err)
	}
	return stream, stream.Msg(), nil
}

// followRoutes applies every table of stream, and reconnects (with backoff) whenever it
// ends, until ctx ends. The proxy keeps serving the last table meanwhile.
func followRoutes(ctx context.Context, c fireworksv1connect.IngressServiceClient, stream *connect.ServerStreamForClient[pb.RouteTable], apply func(*pb.RouteTable), log *slog.Logger) {
	const maxBackoff = 10 * time.Second
	backoff := 500 * time.Millisecond
	for {
		if stream != nil {
			for stream.Receive() {
				apply(stream.Msg())
				backoff = 500 * time.Millisecond
			}
			err := stream.Err()
			stream.Close()
			if ctx.Err() != nil {
				return
			}
			log.Warn("ingress: route stream ended; serving the last table while reconnecting", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
		var (
			first *pb.RouteTable
			err   error
		)
		stream, first, err = openRoutes(ctx, c)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("ingress: cannot reach the route feed; serving the last table", "err", err, "retry_in", backoff)
			}
			continue
		}
		log.Info("ingress: route stream reconnected", "version", first.GetVersion(), "routes", len(first.GetRoutes()))
		apply(first)
	}
}

// applyTable returns the function that hands the servers' tables to p. Tables are
// ordered by stream, not by the servers' versions: within one stream versions grow, and
// a new stream (after a reconnect, maybe to another server whose count is lower) is the
// newest word, so its tables are renumbered above what p has.
func applyTable(p *ingress.Proxy, log *slog.Logger) func(*pb.RouteTable) {
	return func(m *pb.RouteTable) {
		t := TableFromPB(m)
		if cur := p.TableVersion(); t.Version <= cur {
			t.Version = cur + 1
		}
		p.SetTable(t)
		log.Debug("ingress: route table applied", "server_version", m.GetVersion(), "routes", len(t.Routes))
	}
}
