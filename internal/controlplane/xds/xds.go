// Package xds serves the ingress route table (routes.Table) over xDS, so an operator can
// run Envoy in front of the cluster instead of the built-in ingress, and so proxyless gRPC
// clients can reach sandbox ports by name (`xds:///<port>-<sandbox>.<domain>`).
//
// The server is go-control-plane's SotW/delta xDS server over its snapshot cache. Two
// kinds of client want different resources for the same table, and each kind gets its own
// snapshot (the cache's NodeHash groups clients by kind, never by node ID, so every Envoy
// and every gRPC client sees the same configuration):
//
//   - Envoy ("envoy" group, the default): one socket Listener (Config.ListenerName on
//     0.0.0.0:Config.ListenPort) whose HttpConnectionManager gets the RouteConfiguration
//     "fireworks-routes" over RDS; one virtual host per route; one Cluster per node
//     ("node-<name>") pointing at the node's data address, with upstream mutual TLS.
//   - gRPC ("grpc" group, clients whose user agent starts with "gRPC"): for every route an
//     api_listener named after the route's host, with its route configuration inline, and
//     the same per-node clusters without a transport socket (a gRPC client brings its own
//     channel credentials). Envoy rejects api_listeners that arrive over LDS, and gRPC
//     rejects clusters whose TLS settings are file paths, so the two cannot share one
//     snapshot: Envoy asks for every listener and cluster (wildcard).
//
// The snapshots contain the access tokens of private ports (the edge matches them), so
// the xDS endpoint must only be reachable by trusted edge clients.
package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	endpointservice "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	routeservice "github.com/envoyproxy/go-control-plane/envoy/service/route/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// Defaults for Config.
const (
	DefaultListenerName = "fireworks-ingress"
	DefaultListenPort   = 8080
	// RouteConfigName is the RouteConfiguration Envoy's listener asks for over RDS.
	RouteConfigName = "fireworks-routes"
)

// Snapshot groups (cache keys). Every client of one kind gets the same snapshot.
const (
	groupEnvoy = "envoy"
	groupGRPC  = "grpc"
)

// Config says what the Envoy-facing resources look like.
type Config struct {
	// Domain is the ingress domain: routes answer to `<port>-<sandbox>.<Domain>`.
	Domain string
	// ListenerName names Envoy's listener (default DefaultListenerName).
	ListenerName string
	// ListenPort is the port Envoy's listener binds on 0.0.0.0 (default DefaultListenPort).
	ListenPort uint32
	// NodeTLS, when set, makes Envoy speak mutual TLS to the nodes' data addresses.
	NodeTLS *UpstreamTLS
}

// UpstreamTLS names files on Envoy's machine (Envoy reads them, not this process).
type UpstreamTLS struct {
	CertFile string // Envoy's client certificate chain (PEM)
	KeyFile  string // its private key (PEM)
	CAFile   string // CA bundle that node certificates must chain to (PEM)
	// ServerName, if set, is sent as SNI. Node certificates are checked against CAFile
	// only, since one Envoy cluster per node already pins which node is dialled.
	ServerName string
}

// Server feeds route tables to xDS clients. Create it with New, Register it on a
// grpc.Server, push tables with SetTable, and Close it before stopping the grpc.Server.
type Server struct {
	cfg    Config
	log    *slog.Logger
	cache  cachev3.SnapshotCache
	xds    serverv3.Server
	cancel context.CancelFunc

	mu      sync.Mutex // serialises SetTable; guards applied/version
	applied bool
	version uint64
}

// New creates a Server with no table yet: clients that connect before the first SetTable
// wait for it.
func New(cfg Config, log *slog.Logger) *Server {
	if cfg.ListenerName == "" {
		cfg.ListenerName = DefaultListenerName
	}
	if cfg.ListenPort == 0 {
		cfg.ListenPort = DefaultListenPort
	}
	cfg.Domain = strings.TrimSuffix(strings.ToLower(cfg.Domain), ".")
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "xds")
	// ads=false: in ADS mode the cache holds back an answer unless the request names every
	// resource of that type in the snapshot. gRPC clients ask for just the listener of
	// their target, so they would never be answered; without the flag the cache answers
	// with the requested subset (Envoy copes with resources arriving in any order).
	cache := cachev3.NewSnapshotCache(false, clientKind{}, cacheLogger{log})
	// The context ends every open stream on Close: xDS streams live as long as their
	// clients, so without it grpc.Server.GracefulStop would wait for them forever.
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, log: log, cache: cache, cancel: cancel}
	s.xds = serverv3.NewServer(ctx, cache, serverv3.CallbackFuncs{
		StreamRequestFunc: s.onRequest,
	})
	return s
}

// Register adds the aggregated (ADS) and per-type discovery services to g. Envoy is
// normally configured for ADS; gRPC clients always use ADS.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	listenerservice.RegisterListenerDiscoveryServiceServer(g, s.xds)
	routeservice.RegisterRouteDiscoveryServiceServer(g, s.xds)
	clusterservice.RegisterClusterDiscoveryServiceServer(g, s.xds)
	endpointservice.RegisterEndpointDiscoveryServiceServer(g, s.xds)
}

// Close ends the open xDS streams (clients reconnect elsewhere). Call it before
// GracefulStop on the grpc.Server it is registered on.
func (s *Server) Close() {
	s.cancel()
}

// SetTable publishes t to every connected and future client. Tables older than (or as old
// as) the last one published are ignored, so racing callers cannot roll clients back.
func (s *Server) SetTable(ctx context.Context, t routes.Table) error {
	if s.cfg.Domain == "" {
		return errors.New("xds: no ingress domain configured")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.applied && t.Version <= s.version {
		s.log.Debug("ignoring stale route table", "version", t.Version, "current", s.version)
		return nil
	}
	version := strconv.FormatUint(t.Version, 10)
	p, problems := makePlan(s.cfg.Domain, t)
	for _, err := range problems {
		s.log.Warn("route not forwarded", "version", t.Version, "error", err)
	}
	envoy, err := envoySnapshot(s.cfg, version, p)
	if err != nil {
		return fmt.Errorf("xds: envoy resources for table version %d: %w", t.Version, err)
	}
	grpcSnap, err := grpcSnapshot(version, p)
	if err != nil {
		return fmt.Errorf("xds: gRPC resources for table version %d: %w", t.Version, err)
	}
	if err := s.cache.SetSnapshot(ctx, groupEnvoy, envoy); err != nil {
		return fmt.Errorf("xds: publish envoy snapshot %s: %w", version, err)
	}
	if err := s.cache.SetSnapshot(ctx, groupGRPC, grpcSnap); err != nil {
		return fmt.Errorf("xds: publish gRPC snapshot %s: %w", version, err)
	}
	s.applied, s.version = true, t.Version
	s.log.Debug("published route table", "version", t.Version, "routes", len(t.Routes))
	return nil
}

// onRequest logs rejected configuration: a client that NACKs keeps its previous
// configuration, which an operator would otherwise never notice.
func (s *Server) onRequest(_ int64, req *discoverygrpc.DiscoveryRequest) error {
	if d := req.GetErrorDetail(); d != nil {
		s.log.Warn("xDS client rejected configuration",
			"node", req.GetNode().GetId(), "type", req.GetTypeUrl(),
			"kept_version", req.GetVersionInfo(), "error", d.GetMessage())
	}
	return nil
}

// clientKind is the cache's NodeHash: it keys snapshots by the kind of client, so all
// Envoys share one snapshot and all proxyless gRPC clients another, whatever their IDs.
type clientKind struct{}

func (clientKind) ID(node *corev3.Node) string {
	// gRPC sets user_agent_name to "gRPC Go", "gRPC Java", "gRPC C-core"...; Envoy sets
	// "envoy". Anything else is treated like Envoy.
	if strings.HasPrefix(node.GetUserAgentName(), "gRPC") {
		return groupGRPC
	}
	return groupEnvoy
}

// cacheLogger sends go-control-plane's log lines to slog.
type cacheLogger struct{ l *slog.Logger }

func (c cacheLogger) Debugf(format string, args ...any) { c.logf(slog.LevelDebug, format, args) }
func (c cacheLogger) Infof(format string, args ...any)  { c.logf(slog.LevelInfo, format, args) }
func (c cacheLogger) Warnf(format string, args ...any)  { c.logf(slog.LevelWarn, format, args) }
func (c cacheLogger) Errorf(format string, args ...any) { c.logf(slog.LevelError, format, args) }

func (c cacheLogger) logf(level slog.Level, format string, args []any) {
	// The cache logs every watch at debug level: skip the formatting when nobody reads it.
	if c.l.Enabled(context.Background(), level) {
		c.l.Log(context.Background(), level, fmt.Sprintf(format, args...))
	}
}
