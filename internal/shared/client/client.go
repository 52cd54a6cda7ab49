// Package client is how programs talk to the Fireworks API: the CLI's configuration file,
// a client for every service with the token, failover between servers and per-call
// deadlines, and the attach/exec session (stdin pump, resizes, signals, output and exit).
// The CLI and the bench both use it.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// Config is where the CLI finds the server and its token. `fireworks dev` writes it.
type Config struct {
	Server string `json:"server"`
	Token  string `json:"token"`
	// CA is the cluster CA certificate file (PEM) to trust for https:// servers.
	CA string `json:"ca,omitempty"`
	// Stale asks for reads from the contacted server's own state (not saved).
	Stale bool `json:"-"`
	// RequestTimeout bounds each unary call that has no deadline of its own (not saved;
	// 0 = DefaultRequestTimeout).
	RequestTimeout time.Duration `json:"-"`
}

// DefaultRequestTimeout bounds a unary API call: a server that accepts the connection
// but never answers (a wedged follower, a lost leader) must not hang the CLI.
const DefaultRequestTimeout = 2 * time.Minute

// DefaultServer is the address `fireworks dev` listens on by default.
const DefaultServer = "http://127.0.0.1:7766"

// ConfigPath is the CLI config file: $FIREWORKS_CONFIG, else $XDG_CONFIG_HOME/fireworks/config.json.
func ConfigPath() string {
	if p := os.Getenv("FIREWORKS_CONFIG"); p != "" {
		return p
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		dir = "/etc"
	}
	return filepath.Join(dir, "fireworks", "config.json")
}

// ReadConfig reads a config file as `fireworks dev` writes it (no defaults, no
// environment).
func ReadConfig(path string) (Config, error) {
	var cfg Config
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read CLI config %s: %w", path, err)
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return cfg, fmt.Errorf("parse CLI config %s: %w", path, err)
	}
	return cfg, nil
}

// LoadConfig reads the config file, then lets the environment and flags override it.
func LoadConfig(flagServer, flagToken string) (Config, error) {
	cfg := Config{Server: DefaultServer}
	switch c, err := ReadConfig(ConfigPath()); {
	case err == nil:
		cfg = c
		if cfg.Server == "" {
			cfg.Server = DefaultServer
		}
	case !errors.Is(err, os.ErrNotExist):
		return cfg, err
	}
	if v := os.Getenv("FIREWORKS_SERVER"); v != "" {
		cfg.Server = v
	}
	if v := os.Getenv("FIREWORKS_TOKEN"); v != "" {
		cfg.Token = v
	}
	if v := os.Getenv("FIREWORKS_CA"); v != "" {
		cfg.CA = v
	}
	if flagServer != "" {
		cfg.Server = flagServer
	}
	if flagToken != "" {
		cfg.Token = flagToken
	}
	return cfg, nil
}

// SaveConfig writes the config file readable by its owner only (it holds a token).
func SaveConfig(cfg Config) error {
	p := ConfigPath()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("create CLI config directory: %w", err)
	}
	data, _ := json.MarshalIndent(cfg, "", "  ")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("write CLI config %s: %w", p, err)
	}
	return os.Rename(tmp, p)
}

// Client bundles the API clients.
type Client struct {
	Sandboxes fireworksv1connect.SandboxServiceClient
	Images    fireworksv1connect.ImageServiceClient
	Volumes   fireworksv1connect.VolumeServiceClient
	Templates fireworksv1connect.TemplateServiceClient
	System    fireworksv1connect.SystemServiceClient
	Tokens    fireworksv1connect.TokenServiceClient
	Cluster   fireworksv1connect.ClusterServiceClient
	Ingress   fireworksv1connect.IngressServiceClient
	Server    string
	// Scheme is the servers' scheme: https for cluster servers, http for `fireworks dev`.
	Scheme string

	hc      *http.Client
	base    string
	timeout time.Duration
	stale   bool
}

// New connects (lazily) to the server. HTTP/2 without TLS carries the bidirectional
// attach and exec streams. cfg.Server may list several servers separated by commas; each
// new connection goes to the first that accepts, starting with the last one that did, so
// the CLI keeps working when a server (or the leader) goes away.
func New(cfg Config) (*Client, error) {
	scheme, addrs := parseServers(cfg.Server)
	fd := &failoverDialer{addrs: addrs}
	var tr *http.Transport
	if scheme == "https" {
		// Cluster servers: TLS with the cluster CA, each server checked under its own name.
		pool, err := caPool(cfg.CA)
		if err != nil {
			return nil, err
		}
		fd.tlsFor = func(host string) *tls.Config {
			c := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: host, NextProtos: []string{"h2"}}
			if pool != nil {
				// The cluster CA also signs agents' certificates: tokens go to a server's
				// only, never to an agent at (or claiming) a server's address.
				c.VerifyConnection = pki.RequirePeer(pki.RoleServer, "")
			}
			return c
		}
		tr = &http.Transport{DialTLSContext: fd.DialContext, ForceAttemptHTTP2: true,
			// A server that vanished without closing the connection (host down, partition)
			// is noticed by unanswered pings, so long streams (an edge's route feed)
			// reconnect elsewhere.
			HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
	} else {
		var protocols http.Protocols
		protocols.SetUnencryptedHTTP2(true)
		tr = &http.Transport{Protocols: &protocols, DialContext: fd.DialContext}
	}
	hc := &http.Client{Transport: tr}
	base := scheme + "://" + addrs[0]
	timeout := cfg.RequestTimeout
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	c := &Client{Server: strings.Join(addrs, ","), Scheme: scheme, hc: hc, base: base, timeout: timeout, stale: cfg.Stale}
	return c.WithToken(cfg.Token), nil
}

// WithToken is c acting with another token, over the same connections: an edge that
// serves a REST API calls the servers with each request's own key (E2B's X-API-Key).
func (c *Client) WithToken(token string) *Client {
	hc, base := c.hc, c.base
	opts := []connect.ClientOption{connect.WithInterceptors(bearer(token, c.stale), deadline(c.timeout)), connect.WithReadMaxBytes(64 << 20)}
	return &Client{
		Sandboxes: fireworksv1connect.NewSandboxServiceClient(hc, base, opts...),
		Images:    fireworksv1connect.NewImageServiceClient(hc, base, opts...),
		Volumes:   fireworksv1connect.NewVolumeServiceClient(hc, base, opts...),
		Templates: fireworksv1connect.NewTemplateServiceClient(hc, base, opts...),
		System:    fireworksv1connect.NewSystemServiceClient(hc, base, opts...),
		Tokens:    fireworksv1connect.NewTokenServiceClient(hc, base, opts...),
		Cluster:   fireworksv1connect.NewClusterServiceClient(hc, base, opts...),
		Ingress:   fireworksv1connect.NewIngressServiceClient(hc, base, opts...),
		Server:    c.Server,
		Scheme:    c.Scheme,
		hc:        hc, base: base, timeout: c.timeout, stale: c.stale,
	}
}

// caPool loads the cluster CA to trust; without one, the system roots are used.
func caPool(file string) (*x509.CertPool, error) {
	if file == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read cluster CA %s: %w", file, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("cluster CA %s holds no PEM certificate", file)
	}
	return pool, nil
}

// parseServers splits "http://a:1,b:2" into the scheme (of the first entry, default http)
// and host:port addresses.
func parseServers(s string) (scheme string, addrs []string) {
	scheme = "http"
	for i, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if sch, rest, ok := strings.Cut(part, "://"); ok {
			if i == 0 {
				scheme = sch
			}
			part = rest
		}
		addrs = append(addrs, strings.TrimSuffix(part, "/"))
	}
	if len(addrs) == 0 {
		addrs = []string{strings.TrimPrefix(DefaultServer, "http://")}
	}
	return scheme, addrs
}

// failoverDialer dials the servers in turn, starting from the last one that answered.
type failoverDialer struct {
	// tlsFor, when set, makes DialContext dial TLS with the server's own name.
	tlsFor func(host string) *tls.Config
	addrs  []string
	mu     sync.Mutex
	next   int
}

func (d *failoverDialer) DialContext(ctx context.Context, network, _ string) (net.Conn, error) {
	d.mu.Lock()
	start := d.next
	d.mu.Unlock()
	var errs []error
	for i := range d.addrs {
		idx := (start + i) % len(d.addrs)
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		var conn net.Conn
		var err error
		if d.tlsFor != nil {
			host, _, _ := net.SplitHostPort(d.addrs[idx])
			conn, err = (&tls.Dialer{Config: d.tlsFor(host)}).DialContext(dctx, network, d.addrs[idx])
		} else {
			conn, err = (&net.Dialer{}).DialContext(dctx, network, d.addrs[idx])
		}
		cancel()
		if err == nil {
			d.mu.Lock()
			d.next = idx
			d.mu.Unlock()
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("no Fireworks server answered (%s): %w", strings.Join(d.addrs, ", "), errors.Join(errs...))
}

// deadline gives every unary call without a deadline of its own one of d (plus the grace
// of a stop, which the server waits out before answering).
type deadline time.Duration

func (d deadline) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if _, ok := ctx.Deadline(); !ok {
			t := time.Duration(d)
			if g, ok := req.Any().(interface{ GetGrace() *durationpb.Duration }); ok && g.GetGrace() != nil {
				t += g.GetGrace().AsDuration()
			}
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, t)
			defer cancel()
		}
		return next(ctx, req)
	}
}

func (d deadline) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next // streams (attach, exec, logs -f) last as long as the user wants
}

func (d deadline) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

type bearerInterceptor struct {
	token string
	stale bool
}

func bearer(token string, stale bool) connect.Interceptor { return bearerInterceptor{token, stale} }

func (b bearerInterceptor) set(h http.Header) {
	h.Set("Authorization", "Bearer "+b.token)
	if b.stale {
		h.Set("Fireworks-Stale", "1")
	}
}

func (b bearerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		b.set(req.Header())
		return next(ctx, req)
	}
}

func (b bearerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		b.set(conn.RequestHeader())
		return conn
	}
}

func (b bearerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
