package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/pki"
	"github.com/fireworks-sandbox/fireworks/internal/server"
	"github.com/fireworks-sandbox/fireworks/internal/xds"
)

type ingressFlags struct {
	domain, listen, tlsCert, tlsKey, ca, name, logLevel string
}

func newIngressCmd(g *globals) *cobra.Command {
	var f ingressFlags
	cmd := &cobra.Command{
		Use:   "ingress",
		Short: "Run an HTTP edge that routes <port>-<sandbox>.DOMAIN to sandboxes on the cluster's nodes",
		Long: `Run the built-in ingress: an HTTP edge (HTTP/1.1, HTTP/2, WebSocket) for the sandboxes'
published ports, reachable as <port>-<sandbox>.DOMAIN. Private ports need the sandbox's access
token in the Fireworks-Access-Token header.

It follows the route table the servers stream (--server, https://; any server will do) with
an ingress token (` + "`fireworks token create --role ingress`" + `, or an admin token), and reaches
sandboxes through their nodes over mutual TLS with a short-lived certificate it obtains and
renews with that token. If the servers cannot be reached it keeps serving the last table.

With ` + "`fireworks dev`" + ` use ` + "`fireworks dev --ingress-listen ADDR`" + ` instead (the edge runs in-process).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runIngress(cmd.Context(), g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.domain, "domain", "", "ingress domain (default: the servers' --ingress-domain)")
	fl.StringVar(&f.listen, "listen", ":8080", "address to serve on")
	fl.StringVar(&f.tlsCert, "tls-cert", "", "serve HTTPS with this certificate chain (PEM; with --tls-key)")
	fl.StringVar(&f.tlsKey, "tls-key", "", "private key of --tls-cert (PEM)")
	fl.StringVar(&f.ca, "ca", "", "cluster CA certificate (PEM) to trust the servers by (default $FIREWORKS_CA or the CLI config)")
	fl.StringVar(&f.name, "name", "", "name in this edge's certificate (default: the token's name)")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.AddCommand(newIngressCertCmd(g))
	return cmd
}

// newIngressCertCmd writes an ingress certificate to files, for an Envoy fed over xDS (its
// client certificate for the nodes' data addresses) or any other xDS client.
func newIngressCertCmd(g *globals) *cobra.Command {
	var (
		out, name, ca string
		ttl           time.Duration
	)
	cmd := &cobra.Command{
		Use:   "certificate --out DIR",
		Short: "Get an ingress certificate for Envoy or an xDS client: writes DIR/ingress.pem, ingress-key.pem, ca.pem",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out DIR is required")
			}
			c, err := newIngressClient(g, ca)
			if err != nil {
				return err
			}
			certPEM, keyPEM, caPEM, notAfter, err := issueIngressCert(cmd.Context(), c, name, ttl)
			if err != nil {
				return err
			}
			if err := pki.WriteKeyPair(out, "ingress", certPEM, keyPEM); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(out, pki.CACertFile), caPEM, 0o644); err != nil {
				return fmt.Errorf("write cluster CA: %w", err)
			}
			certFile, keyFile := pki.KeyPairFiles(out, "ingress")
			fmt.Fprintf(g.stdout, "%s\n%s\n%s\n", certFile, keyFile, filepath.Join(out, pki.CACertFile))
			fmt.Fprintf(g.stderr, "valid until %s; renew before then\n", notAfter.Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "directory to write the files to")
	cmd.Flags().StringVar(&name, "name", "", "name in the certificate (default: the token's name)")
	cmd.Flags().StringVar(&ca, "ca", "", "cluster CA certificate (PEM) to trust the servers by (default $FIREWORKS_CA or the CLI config)")
	cmd.Flags().DurationVar(&ttl, "ttl", server.DefaultIngressCertTTL, "certificate lifetime (at most 90 days)")
	return cmd
}

// newIngressClient connects to the servers (https only: an edge needs the cluster's CA
// and nodes) with the caller's token.
func newIngressClient(g *globals, caFile string) (fireworksv1connect.IngressServiceClient, error) {
	cfg, err := LoadClientConfig(g.server, g.token)
	if err != nil {
		return nil, err
	}
	if caFile != "" {
		cfg.CA = caFile
	}
	if cfg.Token == "" {
		return nil, errors.New("no token: pass --token (an ingress token from `fireworks token create --role ingress`, or an admin token) or set FIREWORKS_TOKEN")
	}
	scheme, addrs := parseServers(cfg.Server)
	if scheme != "https" {
		return nil, fmt.Errorf("server %s: a standalone ingress needs cluster servers (https://HOST:PORT); with `fireworks dev`, use `fireworks dev --ingress-listen ADDR`", cfg.Server)
	}
	pool, err := caPool(cfg.CA)
	if err != nil {
		return nil, err
	}
	fd := &failoverDialer{addrs: addrs, tlsFor: func(host string) *tls.Config {
		return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: host, NextProtos: []string{"h2"}}
	}}
	tr := &http.Transport{DialTLSContext: fd.DialContext, ForceAttemptHTTP2: true,
		// A server that vanished without closing the connection (host down, partition)
		// is noticed by unanswered pings, so the route stream reconnects elsewhere.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
	return fireworksv1connect.NewIngressServiceClient(&http.Client{Transport: tr}, "https://"+addrs[0],
		connect.WithInterceptors(bearer(cfg.Token, false)), connect.WithReadMaxBytes(64<<20)), nil
}

// issueIngressCert makes a key and has the servers certify it.
func issueIngressCert(ctx context.Context, c fireworksv1connect.IngressServiceClient, name string, ttl time.Duration) (certPEM, keyPEM, caPEM []byte, notAfter time.Time, err error) {
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
	certPEM, keyPEM, caPEM, notAfter, err := issueIngressCert(ctx, c, name, 0)
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
		MinVersion: tls.VersionTLS13,
		RootCAs:    e.roots,
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
		t := server.RouteTableFromPB(m)
		if cur := p.TableVersion(); t.Version <= cur {
			t.Version = cur + 1
		}
		p.SetTable(t)
		log.Debug("ingress: route table applied", "server_version", m.GetVersion(), "routes", len(t.Routes))
	}
}

func loadServingTLS(certFile, keyFile string) (*tls.Config, error) {
	if certFile == "" && keyFile == "" {
		return nil, nil
	}
	if certFile == "" || keyFile == "" {
		return nil, errors.New("--tls-cert and --tls-key go together")
	}
	kp, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load --tls-cert/--tls-key: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{kp}}, nil
}

func runIngress(ctx context.Context, g *globals, f ingressFlags) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := newLogger(f.logLevel)
	serveTLS, err := loadServingTLS(f.tlsCert, f.tlsKey)
	if err != nil {
		return err
	}
	c, err := newIngressClient(g, f.ca)
	if err != nil {
		return err
	}
	// bg is the life of the route stream and the certificate renewals: it ends when this
	// function returns, however it returns.
	bg, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	// Start-up fails fast (bad token, wrong CA, no server): those are configuration
	// errors. Once running, the edge rides out server outages.
	var cert edgeCert
	next, err := cert.renew(bg, c, f.name)
	if err != nil {
		return err
	}
	stream, first, err := openRoutes(bg, c)
	if err != nil {
		return err
	}
	domain := f.domain
	if domain == "" {
		domain = first.GetDomain()
	} else if first.GetDomain() != "" && first.GetDomain() != domain {
		log.Warn("ingress: --domain differs from the servers' ingress domain (nodes route Envoy's requests by theirs)", "domain", domain, "servers", first.GetDomain())
	}
	if domain == "" {
		domain = server.DefaultIngressDomain
	}
	proxy := ingress.NewProxy(domain, &ingress.TunnelDialer{TLS: cert.tlsConfig(), Timeout: ingress.DefaultDialTimeout}, log)
	apply := applyTable(proxy, log)
	apply(first)

	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		stream.Close()
		return fmt.Errorf("listen on %s: %w", f.listen, err)
	}
	wg.Add(2)
	go func() { defer wg.Done(); followRoutes(bg, c, stream, apply, log) }()
	go func() { defer wg.Done(); cert.keepRenewing(bg, c, f.name, next, log) }()
	log.Info("fireworks ingress ready", "listen", ln.Addr().String(), "domain", domain, "https", serveTLS != nil,
		"routes", len(first.GetRoutes()))
	return ingress.Serve(ctx, ln, proxy, serveTLS, log)
}

// envoyNodeTLS names the files `fireworks ingress certificate --out dir` writes, as Envoy
// on its own host reads them.
func envoyNodeTLS(dir string) *xds.UpstreamTLS {
	certFile, keyFile := pki.KeyPairFiles(dir, "ingress")
	return &xds.UpstreamTLS{CertFile: certFile, KeyFile: keyFile, CAFile: filepath.Join(dir, pki.CACertFile)}
}

func registerDevIngressFlags(cmd *cobra.Command, f *devFlags) {
	fl := cmd.Flags()
	fl.StringVar(&f.ingressListen, "ingress-listen", "", "also run the HTTP ingress here, in-process (it reaches sandboxes through this node directly), e.g. 127.0.0.1:8080")
	fl.StringVar(&f.ingressDomain, "ingress-domain", server.DefaultIngressDomain, "ingress domain: sandbox ports answer to <port>-<sandbox>.DOMAIN")
	fl.StringVar(&f.xdsListen, "xds-listen", "", "serve the ingress routes over xDS (gRPC, no TLS) on this loopback address, for Envoy; also opens an unauthenticated loopback data listener Envoy forwards to")
	// Checked before dev does anything (state, assets, the CLI config).
	prev := cmd.PreRunE
	cmd.PreRunE = func(cmd *cobra.Command, args []string) error {
		if f.xdsListen != "" && !isLoopback(f.xdsListen) {
			return fmt.Errorf("--xds-listen %s: dev serves xDS without TLS (its resources hold private ports' access tokens), so only on a loopback address such as 127.0.0.1:18000", f.xdsListen)
		}
		if prev != nil {
			return prev(cmd, args)
		}
		return nil
	}
}

// runDevIngress starts what dev serves besides the API: the built-in ingress
// (--ingress-listen) and the xDS feed (--xds-listen). The returned function stops them
// and waits.
//
// The dev ingress is the same edge as `fireworks ingress`, but in-process: its dialer
// calls this process's agent directly (no node hop, no TLS, no certificate), since dev has
// no cluster CA. xDS is served without TLS, so it is refused on anything but a loopback
// address (the resources hold the access tokens of private ports); Envoy forwards to a
// loopback data listener (the node side of the data path) that dev opens for it, which,
// like any node's, leaves token checks to the edge: local processes can reach published
// ports through it without a token.
func runDevIngress(ctx context.Context, srv *server.Server, f devFlags, log *slog.Logger) (stop func(), err error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	stop = func() { cancel(); wg.Wait() }
	var lns []net.Listener
	fail := func(err error) (func(), error) {
		for _, l := range lns {
			l.Close()
		}
		stop()
		return nil, err
	}
	listen := func(what, addr string) (net.Listener, error) {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen for %s on %s: %w", what, addr, err)
		}
		lns = append(lns, l)
		return l, nil
	}
	var ingLn, xdsLn, dataLn net.Listener
	if f.ingressListen != "" {
		if ingLn, err = listen("the ingress", f.ingressListen); err != nil {
			return fail(err)
		}
	}
	if f.xdsListen != "" {
		if !isLoopback(f.xdsListen) { // also checked at flag parsing
			return fail(fmt.Errorf("--xds-listen %s: dev serves xDS without TLS, so only on a loopback address", f.xdsListen))
		}
		if xdsLn, err = listen("xDS", f.xdsListen); err != nil {
			return fail(err)
		}
		if dataLn, err = listen("the node data path", "127.0.0.1:0"); err != nil {
			return fail(err)
		}
	}
	opts := server.IngressOptions{Domain: f.ingressDomain}
	if dataLn != nil {
		opts.LocalDataAddr = dataLn.Addr().String()
	}
	srv.SetIngress(opts)
	serve := func(what string, run func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(); err != nil {
				log.Error(what+" stopped", "err", err)
			}
		}()
	}
	if ingLn != nil {
		proxy := ingress.NewProxy(srv.IngressDomain(), srv.LocalIngressDialer(), log)
		wg.Add(1)
		go func() { defer wg.Done(); srv.FollowRoutes(ctx, proxy.SetTable) }()
		serve("ingress", func() error { return proxy.Serve(ctx, ingLn, nil) })
		log.Info("dev ingress (in-process, dials this node directly)", "listen", ingLn.Addr().String(), "domain", srv.IngressDomain())
	}
	if xdsLn != nil {
		serve("node data listener", func() error { return ingress.Serve(ctx, dataLn, srv.LocalNodeDataHandler(), nil, log) })
		serve("xDS", func() error { return srv.ServeXDS(ctx, xdsLn, nil, xds.Config{}) })
		log.Info("dev xDS (no TLS, loopback only)", "listen", xdsLn.Addr().String(), "node_data_address", dataLn.Addr().String())
	}
	return stop, nil
}

// isLoopback reports whether addr (host:port) binds only to a loopback address.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
