// Package devproc runs `fireworks dev`: a cluster of one server and one node in one
// process (see RunDev).
package devproc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/cluster/agentproc"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/leader"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	"github.com/fireworks-sandbox/fireworks/internal/edge/e2bapi"
	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/agentlink"
	"github.com/fireworks-sandbox/fireworks/internal/node/nodeapi"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/shared/peeruid"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// DevConfig configures `fireworks dev`: a cluster of one server and one node in one
// process.
type DevConfig struct {
	DataDir string
	// Listen is the API address (plain HTTP/2; dev has no CA).
	Listen string
	// Agent is the node's configuration; Node defaults to the host name.
	Agent agent.Config
	// Labels are the node's labels (for --constraint), as an agent's --label.
	Labels map[string]string
	// Limits bound what one non-admin token may hold.
	Limits server.Limits
	// IngressListen, if set, runs the built-in ingress there, in-process.
	IngressListen string
	// IngressDomain is the ingress domain (default routes.DefaultDomain).
	IngressDomain string
	// IngressTLS, if set, makes the ingress HTTPS (E2B's SDK speaks only HTTPS).
	IngressTLS *tls.Config
	// E2BAPI serves E2B's REST API on the ingress (see e2bapi), reaching this server's
	// API over its listener as any client does.
	E2BAPI bool
	// XDSListen, if set (a loopback address), serves the route table over xDS there
	// without TLS, for an Envoy run by the same user.
	XDSListen string
	Log       *slog.Logger
	// Ready is called with the API's URL and the dev admin token once the node is up
	// and before the API serves.
	Ready func(apiURL, token string) error
}

// devHeartbeat is how often dev's node beats: in memory, so cheaply; its warm-pool
// configuration arrives with the beats.
const devHeartbeat = time.Second

// RunDev runs `fireworks dev` until ctx ends. It is a one-node cluster, Nomad's -dev:
// the server runs the control plane as any cluster's leader does, and the node is an
// agent like any other, speaking the node protocol to the server and serving its
// internal API, both in memory (see server.ServeNodeProtocol and server.AddLocalNode). A
// start is a placement and a reconcile, as on every cluster; restart policies,
// constraints, cordon and drain and the pending reasons are the cluster's.
func RunDev(ctx context.Context, cfg DevConfig) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	if cfg.XDSListen != "" && !IsLoopback(cfg.XDSListen) {
		return fmt.Errorf("--xds-listen %s: dev serves xDS without TLS, so only on a loopback address", cfg.XDSListen)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir %s: %w", cfg.DataDir, err)
	}
	store, err := state.Open(ctx, state.Options{Dir: filepath.Join(cfg.DataDir, "state"), NodeID: "dev", Logger: log})
	if err != nil {
		return fmt.Errorf("open state store: %w", err)
	}
	defer store.Close()
	// The dev admin token stays the same across restarts so a CLI session and scripts
	// keep working; it is a normal admin token in the state (revocable, listable).
	token, err := server.EnsureAdminToken(ctx, store, filepath.Join(cfg.DataDir, "token"), "dev")
	if err != nil {
		return err
	}
	if cfg.Agent.Node == "" {
		cfg.Agent.Node, _ = os.Hostname()
	}
	node := cfg.Agent.Node
	cfg.Agent.Logger = log
	if err := giveUpUnplaced(ctx, store); err != nil {
		return err
	}

	cp := leader.New(store, leader.Config{}, log)
	srv := server.New(store, log)
	srv.SetLimits(cfg.Limits)
	srv.EnableCluster(server.ClusterOptions{ControlPlane: cp, HeartbeatInterval: devHeartbeat})
	srv.SetIngress(server.IngressOptions{Domain: cfg.IngressDomain})

	var lns []net.Listener
	closeAll := func() {
		for _, l := range lns {
			l.Close()
		}
	}
	listen := func(what, addr string) (net.Listener, error) {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen for %s on %s: %w", what, addr, err)
		}
		lns = append(lns, l)
		return l, nil
	}
	apiLn, err := listen("the API", cfg.Listen)
	if err != nil {
		return err
	}
	// The node's data address, as every node has one: where an edge (Envoy over xDS)
	// reaches its sandboxes' published ports. It has no TLS (dev has no CA) and, like
	// any node's, leaves token checks to the edge: only the user that runs dev may
	// connect, known by the loopback socket's owner.
	dataLn, err := listen("the node data path", "127.0.0.1:0")
	if err != nil {
		closeAll()
		return err
	}
	dataLn = peeruid.SameUser(dataLn, log)
	var ingLn, xdsLn net.Listener
	if cfg.IngressListen != "" {
		if ingLn, err = listen("the ingress", cfg.IngressListen); err != nil {
			closeAll()
			return err
		}
	}
	if cfg.XDSListen != "" {
		if xdsLn, err = listen("xDS", cfg.XDSListen); err != nil {
			closeAll()
			return err
		}
		xdsLn = peeruid.SameUser(xdsLn, log) // no TLS: it holds private ports' tokens
	}

	// Stopping goes in the reverse order of starting: the loops and listeners, then the
	// node's API, then the agent (the link calls into it until it stops), then the state.
	// The edge's E2B API stops first, while all else still runs: its template builds
	// remove the sandboxes and snapshots they made through the servers and the node.
	parent := ctx
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	var edgeAPI atomic.Pointer[e2bapi.API]
	var wg sync.WaitGroup
	var ag *agent.Agent
	waitNode := func() {}
	defer func() {
		cancel()
		closeAll()
		wg.Wait()
		waitNode()
		if ag != nil {
			ag.Close()
		}
	}()
	wg.Add(1)
	go func() { // ends with ctx, which it cancels once the parent's ends
		defer wg.Done()
		select {
		case <-parent.Done():
		case <-ctx.Done():
		}
		if api := edgeAPI.Load(); api != nil {
			api.Close()
		}
		cancel()
	}()
	run := func(what string, fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil && ctx.Err() == nil {
				log.Error(what+" stopped", "err", err)
				cancel()
			}
		}()
	}
	run("control plane", func() error { return cp.Run(ctx) })

	// The node: an agent linked to this server in memory. Its recovery (at New) reads
	// its assignments through the link, so the node protocol serves first.
	link := agentlink.NewInProcess(node, srv.ServeNodeProtocol(ctx, node), log)
	if ag, err = agent.New(ctx, cfg.Agent, link); err != nil {
		return err
	}
	waitNode = srv.AddLocalNode(ctx, node, nodeapi.APIHandler(ag, log))
	run("node link", func() error {
		return link.Run(ctx, agentproc.NodeOf(ag, node, agentproc.NodeSetup{Address: dataLn.Addr().String(), DataDir: cfg.Agent.DataDir, Labels: cfg.Labels}))
	})
	run("node data listener", func() error {
		return ingress.Serve(ctx, dataLn, nodeapi.DataHandler(ag, srv.IngressDomain(), log), nil, log)
	})
	if ingLn != nil {
		// The same edge as `fireworks ingress`, in-process: it dials this node directly.
		proxy := ingress.NewProxy(srv.IngressDomain(), nodeapi.Dialer(ag), log)
		if cfg.E2BAPI && !e2bapi.Servable(cfg.IngressListen, cfg.IngressTLS != nil) {
			log.Warn("dev ingress: not serving E2B's API: it takes API keys, which need TLS (--ingress-tls-cert) off loopback", "listen", cfg.IngressListen)
		} else if cfg.E2BAPI {
			servers, err := client.New(client.Config{Server: "http://" + apiLn.Addr().String()})
			if err != nil {
				return err
			}
			api := e2bapi.New(e2bapi.Config{Servers: servers, Domain: srv.IngressDomain(), Log: log, BuildDir: filepath.Join(cfg.DataDir, "e2b-builds")})
			edgeAPI.Store(api)
			proxy.API = api
		}
		wg.Add(1)
		go func() { defer wg.Done(); srv.FollowRoutes(ctx, proxy.SetTable) }()
		run("ingress", func() error { return proxy.Serve(ctx, ingLn, cfg.IngressTLS) })
		log.Info("dev ingress (in-process, dials this node directly)", "listen", ingLn.Addr().String(), "domain", srv.IngressDomain())
	}
	if xdsLn != nil {
		run("xDS", func() error { return srv.ServeXDS(ctx, xdsLn, nil, xds.Config{}) })
		log.Info("dev xDS (no TLS, loopback only)", "listen", xdsLn.Addr().String(), "node_data_address", dataLn.Addr().String())
	}

	// dev is ready when its node is (registered over the node protocol: milliseconds, in
	// memory): the first `fireworks info` or `run` after "ready" finds it.
	if err := waitRegistered(ctx, store, node); err != nil {
		return err
	}
	apiURL := "http://" + apiLn.Addr().String()
	if cfg.Ready != nil {
		if err := cfg.Ready(apiURL, token); err != nil {
			return err
		}
	}
	info := ag.Info()
	log.Info("fireworks dev ready", "api", apiURL, "node", node, "accel", info.Accel, "kernel", info.KernelRelease, "data_dir", cfg.DataDir)
	return srv.Serve(ctx, apiLn)
}

// waitRegistered waits (up to a minute) until node is registered and ready.
func waitRegistered(ctx context.Context, store *state.Store, node string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		changed := store.Changed()
		if n, err := store.GetNode(state.WithStaleReads(ctx), node); err == nil && n.Status == state.NodeReady {
			return nil
		}
		select {
		case <-changed:
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("dev's node %s did not register with its server: %w", node, ctx.Err())
		}
	}
}

// giveUpUnplaced ends sandboxes that a dev before the control plane ran started (they
// have no node): their VMs are swept by the agent's recovery like any VM it does not
// adopt, and nothing would ever report on them again.
func giveUpUnplaced(ctx context.Context, store *state.Store) error {
	sbs, err := store.ListSandboxes(ctx)
	if err != nil {
		return err
	}
	for _, sb := range sbs {
		if sb.Node != "" || (sb.Status != state.StatusStarting && sb.Status != state.StatusRunning) {
			continue
		}
		lost := state.StatusLost
		_, err := store.UpdateSandbox(ctx, sb.ID, state.Update{Status: &lost, Time: time.Now(),
			Reason: "started by an older fireworks dev, which ran sandboxes outside the control plane; its VM was stopped at the upgrade"})
		if err != nil && !errors.Is(err, state.ErrInvalidTransition) {
			return fmt.Errorf("end sandbox %s of an older dev: %w", sb.ID, err)
		}
	}
	return nil
}

// IsLoopback reports whether addr (host:port) binds only to a loopback address.
func IsLoopback(addr string) bool {
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
