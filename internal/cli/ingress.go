package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/edge"
	"github.com/fireworks-sandbox/fireworks/internal/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/peeruid"
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
			certPEM, keyPEM, caPEM, notAfter, err := edge.IssueCert(cmd.Context(), c, name, ttl)
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
		c := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: host, NextProtos: []string{"h2"}}
		if pool != nil {
			c.VerifyConnection = pki.RequirePeer(pki.RoleServer, "") // as in NewClient
		}
		return c
	}}
	tr := &http.Transport{DialTLSContext: fd.DialContext, ForceAttemptHTTP2: true,
		// A server that vanished without closing the connection (host down, partition)
		// is noticed by unanswered pings, so the route stream reconnects elsewhere.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
	return fireworksv1connect.NewIngressServiceClient(&http.Client{Transport: tr}, "https://"+addrs[0],
		connect.WithInterceptors(bearer(cfg.Token, false)), connect.WithReadMaxBytes(64<<20)), nil
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
	serveTLS, err := loadServingTLS(f.tlsCert, f.tlsKey)
	if err != nil {
		return err
	}
	c, err := newIngressClient(g, f.ca)
	if err != nil {
		return err
	}
	return edge.Run(ctx, edge.Config{Client: c, Name: f.name, Domain: f.domain, DefaultDomain: server.DefaultIngressDomain,
		Listen: f.listen, ServeTLS: serveTLS, Log: newLogger(f.logLevel)})
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
	fl.StringVar(&f.xdsListen, "xds-listen", "", "serve the ingress routes over xDS (gRPC, no TLS) on this loopback address, for an Envoy run by the same user; also opens a loopback data listener Envoy forwards to (both refuse other local users)")
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
		// Neither has TLS (dev has no CA), and both carry private ports' access (xDS
		// holds their tokens, the data path reaches them): only the user that runs dev
		// may connect, known by the loopback socket's owner.
		xdsLn, dataLn = peeruid.SameUser(xdsLn, log), peeruid.SameUser(dataLn, log)
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
