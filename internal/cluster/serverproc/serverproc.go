// Package serverproc runs `fireworks server`: the API, the Raft state over mutual TLS,
// the leader's loops, forwarding to the leader and the xDS feed. The CLI only parses
// flags into its config.
package serverproc

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Peer is one server of the cluster: its Raft ID, Raft address and API address.
type Peer struct {
	ID      string
	Raft    string
	API     string
	IsLocal bool
}

// ParsePeers reads "id=raft-host:port[/api-host:port],..." (a DNS name is kept as
// written, for a Kubernetes headless Service). A peer's API address is optional and
// nothing is guessed for it: each server records its own in the replicated state when it
// leads (see recordAPIAddress), which is what the others forward to.
func ParsePeers(s string) ([]Peer, error) {
	var out []Peer
	seen := map[string]bool{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		id, rest, ok := strings.Cut(part, "=")
		if !ok || id == "" || rest == "" {
			return nil, fmt.Errorf("peer %q: want id=host:port[/api-host:port]", part)
		}
		if seen[id] {
			return nil, fmt.Errorf("peer %q listed twice", id)
		}
		seen[id] = true
		raftAddr, apiAddr, _ := strings.Cut(rest, "/")
		if _, _, err := net.SplitHostPort(raftAddr); err != nil {
			return nil, fmt.Errorf("peer %s: Raft address %q: %w", id, raftAddr, err)
		}
		if apiAddr != "" {
			if _, _, err := net.SplitHostPort(apiAddr); err != nil {
				return nil, fmt.Errorf("peer %s: API address %q: %w", id, apiAddr, err)
			}
		}
		out = append(out, Peer{ID: id, Raft: raftAddr, API: apiAddr})
	}
	return out, nil
}

// advertisedAPI is the API address this server gives the others: --advertise-api, else
// the --listen address when it names a host, else the peer list's API address for this
// server, else this server's Raft host with the --listen port.
func advertisedAPI(cfg ServerConfig, self Peer) (string, error) {
	if cfg.AdvertiseAPI != "" {
		if _, _, err := net.SplitHostPort(cfg.AdvertiseAPI); err != nil {
			return "", fmt.Errorf("--advertise-api %q: %w", cfg.AdvertiseAPI, err)
		}
		return cfg.AdvertiseAPI, nil
	}
	host, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return "", fmt.Errorf("--listen %q: %w", cfg.Listen, err)
	}
	if ip := net.ParseIP(host); host != "" && (ip == nil || !ip.IsUnspecified()) {
		return cfg.Listen, nil
	}
	if self.API != "" {
		return self.API, nil
	}
	rhost, _, err := net.SplitHostPort(self.Raft)
	if err != nil {
		return "", fmt.Errorf("this server's Raft address %q: %w", self.Raft, err)
	}
	return net.JoinHostPort(rhost, port), nil
}

// apiMetaKey is where a server's API address is recorded in the replicated state.
func apiMetaKey(id string) string { return "server-api/" + id }

// recordAPIAddress writes this server's API address into the replicated state whenever
// it leads and the record differs, until ctx ends: followers learn where to forward from
// the leader itself, not from a guess.
func recordAPIAddress(ctx context.Context, store *state.Store, id, addr string, log *slog.Logger) {
	t := time.NewTicker(200 * time.Millisecond) // a new leader's address must be known at once
	defer t.Stop()
	for {
		if store.IsLeader() {
			if cur, err := store.LocalMeta(apiMetaKey(id)); err != nil || string(cur) != addr {
				if err := store.PutMeta(ctx, apiMetaKey(id), []byte(addr)); err != nil && ctx.Err() == nil {
					log.Warn("record this server's API address", "addr", addr, "err", err)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ServerConfig configures `fireworks server`.
type ServerConfig struct {
	NodeID  string
	DataDir string
	// Listen is the API address (TLS; users with tokens, agents with certificates).
	Listen string
	// AdvertiseAPI is the API address the other servers reach this one at (default: see
	// advertisedAPI).
	AdvertiseAPI string
	// RaftListen is the Raft address (mutual TLS between servers).
	RaftListen string
	// Peers lists every server, this one included; empty means a cluster of one.
	Peers []Peer
	// CADir holds ca.pem and ca-key.pem, the same on every server. A missing CA is
	// created only when InitCA is set (or for a cluster of one).
	CADir  string
	InitCA bool
	// SANs are extra names and addresses for this server's certificate.
	SANs []string
	// BootstrapToken, when set, is an API token (fwk_...) the leader makes sure exists as
	// an admin token, so operators hold a credential from the first start. Without it, a
	// generated admin token is written to DataDir/admin-token by the server that creates it.
	BootstrapToken string
	// BootstrapTokens are more tokens the leader makes sure exist, each with its role: an
	// installer (the Helm chart) generates them once, so the agents of a node pool join,
	// edges follow routes and the Kubernetes controller acts with no operator step between.
	BootstrapTokens []BootstrapToken
	// ControlPlane builds the leader's loops over the open store; nil runs none.
	ControlPlane func(store *state.Store, log *slog.Logger) ControlPlane
	// HeartbeatInterval is how often agents beat (a third of the control plane's TTL).
	HeartbeatInterval time.Duration
	// IngressDomain is the ingress domain (default routes.DefaultDomain).
	IngressDomain string
	// XDSListen, when set, serves the route table over xDS there (gRPC, mutual TLS: only
	// ingress and server certificates from the cluster CA).
	XDSListen string
	// XDS shapes the Envoy resources (listener port, Envoy's upstream TLS files); its
	// Domain defaults to IngressDomain.
	XDS xds.Config
	// MaxStale bounds how long after its last contact with the leader a follower serves
	// stale reads (default DefaultMaxStale).
	MaxStale time.Duration
	// Limits bound what one non-admin token may hold (zero: unlimited).
	Limits server.Limits
	// KubeJoin, when set, admits agents by Kubernetes ServiceAccount token
	// (kubejoin.Reviewer), each only as the node its pod runs on.
	KubeJoin server.NodeProver
	// NoJoinTokens refuses joins by join token (see server.ClusterOptions).
	NoJoinTokens bool
	Log          *slog.Logger
	// Ready, if set, is called once the API serves.
	Ready func(apiAddr string)
}

// BootstrapToken is a token an installer hands every server (see
// ServerConfig.BootstrapTokens). A join token made this way never expires and joins any
// number of hosts: it stands for a node pool, whose nodes come and go; revoke it with
// `fireworks token rm` to stop joins.
type BootstrapToken struct {
	Name  string
	Role  state.Role
	Token string
}

// parse reads the token in its role's format: a join token (fwj1_...) carries the
// cluster CA's fingerprint, which RunServer checks against the CA; the others are API
// tokens (fwk_...).
func (bt BootstrapToken) parse() (id, secret string, err error) {
	if bt.Role == state.RoleJoin {
		jt, err := pki.ParseJoinToken(bt.Token)
		if err != nil {
			return "", "", fmt.Errorf("bootstrap join token %q: %w", bt.Name, err)
		}
		return jt.ID, jt.Secret, nil
	}
	id, secret, err = auth.Parse(bt.Token)
	if err != nil {
		return "", "", fmt.Errorf("bootstrap %s token %q: %w", bt.Role, bt.Name, err)
	}
	return id, secret, nil
}

// ControlPlane is the leader's loops as the server runs them.
type ControlPlane interface {
	server.ControlPlane
	Run(ctx context.Context) error
}

// RunServer runs a cluster server until ctx ends.
func RunServer(ctx context.Context, cfg ServerConfig) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	if cfg.NodeID == "" {
		return errors.New("server needs a node ID")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir %s: %w", cfg.DataDir, err)
	}
	if cfg.CADir == "" {
		cfg.CADir = filepath.Join(cfg.DataDir, "ca")
	}
	peers := cfg.Peers
	var self *Peer
	for i := range peers {
		if peers[i].ID == cfg.NodeID {
			peers[i].IsLocal = true
			self = &peers[i]
		}
	}
	if len(peers) == 0 {
		peers = []Peer{{ID: cfg.NodeID, Raft: cfg.RaftListen, API: cfg.Listen, IsLocal: true}}
		self = &peers[0]
	}
	if self == nil {
		return fmt.Errorf("this server (%s) is not in the peer list", cfg.NodeID)
	}
	if cfg.MaxStale <= 0 {
		cfg.MaxStale = DefaultMaxStale
	}
	if cfg.BootstrapToken != "" {
		if _, _, err := auth.Parse(cfg.BootstrapToken); err != nil {
			return fmt.Errorf("--bootstrap-token: %w (e.g. fwk_$(openssl rand -hex 8)_$(openssl rand -hex 32); or leave it out to have one generated into %s)", err, filepath.Join(cfg.DataDir, "admin-token"))
		}
	}
	seenIDs := map[string]string{}
	if id, _, err := auth.Parse(cfg.BootstrapToken); err == nil {
		seenIDs[id] = "admin"
	}
	for _, bt := range cfg.BootstrapTokens {
		if bt.Role != state.RoleJoin && bt.Role != state.RoleIngress && bt.Role != state.RoleUser && bt.Role != state.RoleAdmin {
			return fmt.Errorf("bootstrap token %q: unknown role %q", bt.Name, bt.Role)
		}
		id, _, err := bt.parse()
		if err != nil {
			return err
		}
		if other, dup := seenIDs[id]; dup {
			return fmt.Errorf("bootstrap %s token %q has the same ID as the %s one: each needs its own", bt.Role, bt.Name, other)
		}
		seenIDs[id] = string(bt.Role)
	}
	myAPI, err := advertisedAPI(cfg, *self)
	if err != nil {
		return err
	}
	self.API = myAPI

	var ca *pki.CA
	if cfg.InitCA || len(peers) == 1 {
		ca, err = pki.LoadOrCreateCA(cfg.CADir, "fireworks")
	} else {
		ca, err = pki.LoadCA(cfg.CADir)
		if err != nil {
			err = fmt.Errorf("%w (every server needs the same cluster CA: create one with `fireworks ca create DIR` and give it to each server with --ca-dir)", err)
		}
	}
	if err != nil {
		return err
	}
	// A join token names the CA its agents will trust; one made for another CA would let
	// agents join that no server here could answer.
	for _, bt := range cfg.BootstrapTokens {
		if bt.Role != state.RoleJoin {
			continue
		}
		if jt, _ := pki.ParseJoinToken(bt.Token); jt.CAFingerprint != ca.Fingerprint() {
			return fmt.Errorf("bootstrap join token %q names CA %s, but this cluster's CA (%s) is %s", bt.Name, jt.CAFingerprint, cfg.CADir, ca.Fingerprint())
		}
	}
	cert, err := issueServerCert(ca, cfg.NodeID, *self, cfg.SANs)
	if err != nil {
		return err
	}

	trans, err := pki.NewRaftTransport(cfg.RaftListen, self.Raft, ca, cert, state.HCLogger(log, "raft-transport"))
	if err != nil {
		return fmt.Errorf("raft transport on %s: %w", cfg.RaftListen, err)
	}
	var statePeers []state.Peer
	for _, p := range peers {
		statePeers = append(statePeers, state.Peer{ID: p.ID, Address: p.Raft})
	}
	store, err := state.Open(ctx, state.Options{Dir: filepath.Join(cfg.DataDir, "state"), NodeID: cfg.NodeID,
		Logger: log, Transport: trans, Peers: statePeers, LeaderTimeout: 2 * time.Minute})
	if err != nil {
		return err
	}
	defer store.Close()

	var cp ControlPlane
	if cfg.ControlPlane != nil {
		cp = cfg.ControlPlane(store, log)
	}
	configured := map[string]string{}
	_, myPort, _ := net.SplitHostPort(self.API)
	for _, p := range peers {
		configured[p.ID] = p.API
		if p.API == "" {
			// Until it records its own, a server is guessed to serve the API on its Raft
			// host with this server's API port (true of every server run alike, as on
			// Kubernetes). A wrong guess costs a failed dial, or a refusal to forward to
			// itself: never a loop (see forwardToLeader).
			if h, _, err := net.SplitHostPort(p.Raft); err == nil {
				configured[p.ID] = net.JoinHostPort(h, myPort)
			}
		}
	}
	// apiOf is a server's API address: as it recorded it when it led, else as the peer
	// list gives (or the guess above).
	apiOf := func(id string) string {
		if v, err := store.LocalMeta(apiMetaKey(id)); err == nil && len(v) > 0 {
			return string(v)
		}
		return configured[id]
	}
	srv := server.New(store, log)
	srv.SetLimits(cfg.Limits)
	opts := server.ClusterOptions{
		CA: ca,
		AgentClientTLS: func(host, node string) *tls.Config {
			c := pki.ClientTLS(ca, &cert, host, pki.RoleAgent)
			c.VerifyConnection = pki.RequirePeer(pki.RoleAgent, node) // that node's, not any agent's at its address
			return c
		},
		LeaderAPI:         apiOf,
		HeartbeatInterval: cfg.HeartbeatInterval,
		KubeJoin:          cfg.KubeJoin,
		NoJoinTokens:      cfg.NoJoinTokens,
	}
	if cp != nil {
		opts.ControlPlane = cp
	}
	srv.EnableCluster(opts)
	srv.SetIngress(server.IngressOptions{Domain: cfg.IngressDomain})

	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	if cp != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := cp.Run(ctx); err != nil && ctx.Err() == nil {
				log.Error("control plane stopped", "err", err)
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		ensureBootstrapToken(ctx, store, cfg, log)
	}()
	go func() {
		defer wg.Done()
		recordAPIAddress(ctx, store, cfg.NodeID, self.API, log)
	}()
	if cfg.XDSListen != "" {
		xln, err := net.Listen("tcp", cfg.XDSListen)
		if err != nil {
			return fmt.Errorf("listen for xDS on %s: %w", cfg.XDSListen, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ServeXDS(ctx, xln, srv.XDSTLS(ca, cert), cfg.XDS); err != nil {
				log.Error("xDS stopped", "err", err)
				cancel()
			}
		}()
	}

	tlsCfg := pki.ServerTLS(ca, cert, false)
	tlsCfg.NextProtos = []string{"h2", "http/1.1"}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	handler := withHealth(store, rpc.BoundBody(forwardToLeader(store, srv.Handler(), srv.PreAuthenticate, *self, apiOf, cfg.MaxStale, ca, cert, log)))
	// IdleTimeout: a connection that sends nothing for a while is closed (streams keep
	// theirs alive); ReadHeaderTimeout bounds a request's start.
	hs := &http.Server{Handler: handler, TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(tls.NewListener(ln, tlsCfg)) }()
	log.Info("fireworks server ready", "node", cfg.NodeID, "api", ln.Addr().String(), "raft", self.Raft, "peers", len(peers), "ca", ca.Fingerprint())
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr().String())
	}
	select {
	case <-ctx.Done():
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		_ = hs.Shutdown(sctx)
		return nil
	case err := <-errc:
		return fmt.Errorf("serve API on %s: %w", cfg.Listen, err)
	}
}

// issueServerCert gives this server a certificate for every name it is reached by.
func issueServerCert(ca *pki.CA, id string, self Peer, extra []string) (tls.Certificate, error) {
	names := map[string]bool{"localhost": true, id: true}
	ips := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	add := func(hostport string) {
		h := hostport
		if hh, _, err := net.SplitHostPort(hostport); err == nil {
			h = hh
		}
		if ip := net.ParseIP(h); ip != nil {
			if !ip.IsUnspecified() {
				ips = append(ips, ip)
			}
		} else if h != "" {
			names[h] = true
		}
	}
	add(self.Raft)
	add(self.API)
	for _, s := range extra {
		add(s)
	}
	if hn, err := os.Hostname(); err == nil {
		names[hn] = true
	}
	var dns []string
	for n := range names {
		dns = append(dns, n)
	}
	certPEM, keyPEM, err := ca.Issue(pki.IssueRequest{CommonName: id, Role: pki.RoleServer, DNSNames: dns, IPs: ips})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue this server's certificate: %w", err)
	}
	return pki.KeyPair(certPEM, keyPEM)
}

// ensureBootstrapToken makes sure an admin credential exists once this server leads.
func ensureBootstrapToken(ctx context.Context, store *state.Store, cfg ServerConfig, log *slog.Logger) {
	for ctx.Err() == nil {
		if store.IsLeader() {
			err := bootstrapToken(ctx, store, cfg, log)
			if err == nil {
				return
			}
			log.Warn("bootstrap admin token", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func bootstrapToken(ctx context.Context, store *state.Store, cfg ServerConfig, log *slog.Logger) error {
	for _, bt := range cfg.BootstrapTokens {
		if err := ensureToken(ctx, store, bt); err != nil {
			return err
		}
	}
	if cfg.BootstrapToken != "" {
		return ensureToken(ctx, store, BootstrapToken{Name: "bootstrap", Role: state.RoleAdmin, Token: cfg.BootstrapToken})
	}
	toks, err := store.ListTokens(ctx)
	if err != nil {
		return err
	}
	for _, t := range toks {
		if t.Role == state.RoleAdmin {
			return nil
		}
	}
	path := filepath.Join(cfg.DataDir, "admin-token")
	if _, err := server.EnsureAdminToken(ctx, store, path, "bootstrap"); err != nil {
		return err
	}
	log.Info("created the first admin token", "file", path)
	return nil
}

// withHealth answers the probes of an orchestrator (Kubernetes) without a token:
// GET /healthz is 200 while the process serves; GET /readyz is 200 once this server knows
// a leader, so it can answer (or forward) API calls, and 503 before. They say nothing
// else: no peer, address or term leaves the server through them.
func withHealth(store *state.Store, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			switch r.URL.Path {
			case "/healthz":
				_, _ = io.WriteString(w, "ok\n")
				return
			case "/readyz":
				if id, _ := store.Leader(); id == "" {
					http.Error(w, "no leader", http.StatusServiceUnavailable)
					return
				}
				_, _ = io.WriteString(w, "ok\n")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// ensureToken creates bt unless a token with its ID exists or ever existed. One that
// exists with another secret or role is an error, never overwritten: it may be a token
// someone made since. The state remembers every bootstrap token it made, so one revoked
// (`fireworks token rm`) stays revoked, whatever the installer still hands the servers
// at their next start.
func ensureToken(ctx context.Context, store *state.Store, bt BootstrapToken) error {
	id, secret, err := bt.parse()
	if err != nil {
		return err
	}
	if rec, err := store.GetToken(ctx, id); err == nil {
		if !auth.Verify(rec, secret, time.Now()) || rec.Role != bt.Role {
			return fmt.Errorf("bootstrap %s token %q: a different token with ID %s exists", bt.Role, bt.Name, id)
		}
		// (Made by a server from before the record was kept: record it now.)
		if _, err := store.GetMeta(ctx, bootstrapMetaKey(id)); errors.Is(err, state.ErrNotFound) {
			return store.PutMeta(ctx, bootstrapMetaKey(id), []byte(bt.Role))
		}
		return nil
	}
	made := bootstrapMetaKey(id)
	if _, err := store.GetMeta(ctx, made); err == nil {
		return nil // made once and revoked since: not made again
	} else if !errors.Is(err, state.ErrNotFound) {
		return err
	}
	if err := store.CreateToken(ctx, state.Token{ID: id, Name: bt.Name, Role: bt.Role,
		SecretHash: auth.HashSecret(secret), CreatedAt: time.Now(), CreatedBy: "bootstrap"}); err != nil {
		return err
	}
	return store.PutMeta(ctx, made, []byte(bt.Role))
}

// bootstrapMetaKey records in the state that the bootstrap token id was made.
func bootstrapMetaKey(id string) string { return "bootstrap-token/" + id }

// forwardedHeader marks a request one server forwarded to another (its value is the
// forwarding server's ID). A request that carries it is never forwarded again: a server
// that is not the leader (any more) answers it "unavailable", and the client retries.
// Without it a server that takes itself, or a server that takes it, for the leader
// would pass the request around for good.
const forwardedHeader = "Fireworks-Forwarded-By"

// DefaultMaxStale bounds how long a follower cut off from the leader serves stale reads
// (and so how long a token revoked meanwhile still reads there).
const DefaultMaxStale = 30 * time.Second

// forwardToLeader sends every user API call that reaches a follower to the leader, so
// writes are committed there and reads are linearizable; agents' node protocol calls are
// answered locally (with a leader hint) because their identity is their TLS certificate.
//
// During an election there is no leader to forward to: the call waits for one (up to
// leaderWait). A unary call whose forward fails before it reached the leader (the old
// leader is dead, the dial fails) is tried again with the next leader; its body is small
// (rpc.BoundBody) and kept for that. Streaming calls are forwarded once. A request is
// forwarded at most once (forwardedHeader) and never to this server's own address.
func forwardToLeader(store *state.Store, local http.Handler, preauth func(http.ResponseWriter, *http.Request) server.PreAuth, self Peer, apiOf func(id string) string, maxStale time.Duration, ca *pki.CA, cert tls.Certificate, log *slog.Logger) http.Handler {
	nodePrefix := "/" + fireworksv1connect.NodeServiceName + "/"
	const leaderWait = 20 * time.Second
	var mu sync.Mutex
	transports := map[string]*http.Transport{}
	transportFor := func(addr string) *http.Transport {
		mu.Lock()
		defer mu.Unlock()
		if t, ok := transports[addr]; ok {
			return t
		}
		host, _, _ := net.SplitHostPort(addr)
		tcfg := pki.ClientTLS(ca, &cert, host, pki.RoleServer) // only a server may get a user's call
		tcfg.NextProtos = []string{"h2"}
		t := &http.Transport{TLSClientConfig: tcfg, ForceAttemptHTTP2: true,
			DialContext: (&net.Dialer{Timeout: 3 * time.Second}).DialContext,
			// A leader that vanished without closing the connection (host down, partition)
			// is noticed by unanswered pings, so calls forwarded to it end instead of hanging.
			HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
		transports[addr] = t
		return t
	}
	// leaderAddr waits for a leader whose API address is known; "" with isSelf means
	// this server now leads.
	leaderAddr := func(ctx context.Context, avoid string) (addr string, isSelf bool, err error) {
		deadline := time.Now().Add(leaderWait)
		why := "no leader elected"
		for {
			if store.IsLeader() {
				return "", true, nil
			}
			if id, _ := store.Leader(); id != "" {
				switch a := apiOf(id); {
				case id == self.ID || a == self.API:
					// Raft names this server while it does not lead (it is stepping
					// down), or the leader's record names this server's address: never
					// forward to itself.
					why = fmt.Sprintf("the leader %s has this server's own API address %s", id, self.API)
				case a == "":
					why = fmt.Sprintf("the leader %s has not recorded its API address yet", id)
				case a != avoid:
					return a, false, nil
				}
			}
			if time.Now().After(deadline) {
				return "", false, fmt.Errorf("%s within %s", why, leaderWait)
			}
			select {
			case <-ctx.Done():
				return "", false, ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A stale read is served here only while this server hears from the leader: a
		// follower cut off from it would go on answering, with tokens revoked since
		// still honoured. Past the bound the read goes to the leader like any other.
		if store.IsLeader() || strings.HasPrefix(r.URL.Path, nodePrefix) || server.StaleRead(r) && store.HeardFromLeader(maxStale) {
			local.ServeHTTP(w, r)
			return
		}
		if by := r.Header.Get(forwardedHeader); by != "" {
			id, _ := store.Leader()
			log.Warn("a forwarded request reached a server that is not the leader", "from", by, "leader", id, "path", r.URL.Path)
			http.Error(w, fmt.Sprintf("server %s forwarded this request to %s, which is not the leader (leader: %q); retry", by, self.ID, id), http.StatusServiceUnavailable)
			return
		}
		pa := preauth(w, r)
		if pa == server.PreAuthRefused {
			return
		}
		// A body is buffered (to retry with the next leader) only for a token this server
		// knows; anything else is streamed through once.
		unary := !rpc.IsStream(r) && pa == server.PreAuthKnown
		var body []byte
		if unary {
			b, err := io.ReadAll(r.Body) // bounded by rpc.BoundBody
			if err != nil {
				var tooBig *http.MaxBytesError
				if errors.As(err, &tooBig) {
					http.Error(w, fmt.Sprintf("request larger than %d bytes", rpc.MaxRequestBytes), http.StatusRequestEntityTooLarge)
					return
				}
				http.Error(w, "read request: "+err.Error(), http.StatusBadRequest)
				return
			}
			body = b
		}
		avoid := ""
		for attempt := 0; ; attempt++ {
			addr, isSelf, err := leaderAddr(r.Context(), avoid)
			if err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			if unary {
				r.Body = io.NopCloser(bytes.NewReader(body))
			}
			if isSelf {
				local.ServeHTTP(w, r)
				return
			}
			var dialFailed bool
			target := &url.URL{Scheme: "https", Host: addr}
			p := &httputil.ReverseProxy{
				Rewrite: func(pr *httputil.ProxyRequest) {
					pr.SetURL(target)
					pr.Out.Host = pr.In.Host
					pr.Out.Header.Set(forwardedHeader, self.ID)
				},
				Transport:     transportFor(addr),
				FlushInterval: -1, // stream attach/exec/logs as they come
				ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
					var op *net.OpError
					if unary && errors.As(err, &op) && op.Op == "dial" && attempt < 5 {
						dialFailed = true // nothing reached the leader: try the next one
						return
					}
					log.Warn("forward to leader", "leader", addr, "err", err)
					http.Error(w, "the leader ("+addr+") is unreachable: "+err.Error(), http.StatusBadGateway)
				},
			}
			rpc.EndWithResponse(p).ServeHTTP(w, r)
			if !dialFailed {
				return
			}
			avoid = addr
		}
	})
}
