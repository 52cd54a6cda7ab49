package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/fireworks-sandbox/fireworks/internal/cluster/devproc"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	"github.com/fireworks-sandbox/fireworks/internal/edge/standalone"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

type ingressFlags struct {
	domain, listen, tlsCert, tlsKey, ca, name, logLevel string
	noE2BAPI                                            bool
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
	fl.BoolVar(&f.noE2BAPI, "no-e2b-api", false, "do not serve E2B's REST API (requests for hosts that name no sandbox get 404)")
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
			servers, err := newIngressClient(g, ca)
			if err != nil {
				return err
			}
			c := servers.Ingress
			certPEM, keyPEM, caPEM, notAfter, err := standalone.IssueCert(cmd.Context(), c, name, ttl)
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
func newIngressClient(g *globals, caFile string) (*client.Client, error) {
	cfg, err := client.LoadConfig(g.server, g.token)
	if err != nil {
		return nil, err
	}
	if caFile != "" {
		cfg.CA = caFile
	}
	if cfg.Token == "" {
		return nil, errors.New("no token: pass --token (an ingress token from `fireworks token create --role ingress`, or an admin token) or set FIREWORKS_TOKEN")
	}
	c, err := client.New(cfg)
	if err != nil {
		return nil, err
	}
	if c.Scheme != "https" {
		return nil, fmt.Errorf("server %s: a standalone ingress needs cluster servers (https://HOST:PORT); with `fireworks dev`, use `fireworks dev --ingress-listen ADDR`", cfg.Server)
	}
	return c, nil
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
	var api *client.Client
	if !f.noE2BAPI {
		api = c
	}
	return standalone.Run(ctx, standalone.Config{Client: c.Ingress, E2BAPI: api, Name: f.name, Domain: f.domain, DefaultDomain: routes.DefaultDomain,
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
	fl.StringVar(&f.ingressDomain, "ingress-domain", routes.DefaultDomain, "ingress domain: sandbox ports answer to <port>-<sandbox>.DOMAIN")
	fl.StringVar(&f.ingressTLSCert, "ingress-tls-cert", "", "serve the ingress over HTTPS with this certificate chain (PEM; with --ingress-tls-key): E2B's SDK speaks only HTTPS")
	fl.StringVar(&f.ingressTLSKey, "ingress-tls-key", "", "private key of --ingress-tls-cert (PEM)")
	fl.BoolVar(&f.noE2BAPI, "no-e2b-api", false, "do not serve E2B's REST API on the ingress (requests for hosts that name no sandbox get 404)")
	fl.StringVar(&f.xdsListen, "xds-listen", "", "serve the ingress routes over xDS (gRPC, no TLS) on this loopback address, for an Envoy run by the same user; also opens a loopback data listener Envoy forwards to (both refuse other local users)")
	// Checked before dev does anything (state, assets, the CLI config).
	prev := cmd.PreRunE
	cmd.PreRunE = func(cmd *cobra.Command, args []string) error {
		if f.xdsListen != "" && !devproc.IsLoopback(f.xdsListen) {
			return fmt.Errorf("--xds-listen %s: dev serves xDS without TLS (its resources hold private ports' access tokens), so only on a loopback address such as 127.0.0.1:18000", f.xdsListen)
		}
		if prev != nil {
			return prev(cmd, args)
		}
		return nil
	}
}
