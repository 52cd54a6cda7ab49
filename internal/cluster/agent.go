package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/agent"
	"github.com/fireworks-sandbox/fireworks/internal/agentlink"
	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/pki"
	"github.com/fireworks-sandbox/fireworks/internal/server"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// AgentConfig configures `fireworks agent`.
type AgentConfig struct {
	// Servers are the servers' API addresses (host:port); any one will do.
	Servers   []string
	JoinToken string
	// Listen is the node's internal API (mutual TLS; servers relay attach/logs/exec to it).
	Listen string
	// Advertise is how servers reach Listen (host:port); default Listen. It is also the
	// node's data address: edges open tunnels to sandboxes there.
	Advertise string
	// IngressDomain is the ingress domain (default server.DefaultIngressDomain): requests
	// on Listen whose Host names a sandbox port under it are the ingress's (Envoy).
	IngressDomain string
	Labels        map[string]string
	// DiskMiB is the scratch space offered to sandboxes (default: free space of the data
	// dir's filesystem at registration).
	DiskMiB int
	// Agent is the node's runtime configuration (data dir, node name, limits...).
	Agent agent.Config
	Log   *slog.Logger
}

// RunAgent joins the cluster (first start) and runs the node until ctx ends.
func RunAgent(ctx context.Context, cfg AgentConfig) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	cfg.Agent.Logger = log
	if cfg.Advertise == "" {
		cfg.Advertise = cfg.Listen
	}
	id, err := agentlink.EnsureIdentity(ctx, filepath.Join(cfg.Agent.DataDir, "pki"), cfg.Agent.Node, cfg.JoinToken, cfg.Servers, []string{cfg.Advertise})
	if err != nil {
		return err
	}
	cfg.Agent.Node = id.Node
	link := agentlink.New(id, cfg.Servers, log)
	ag, err := agent.New(ctx, cfg.Agent, link)
	if err != nil {
		return err
	}
	defer ag.Close()

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	// ingress.Serve, unlike a bare http.Server, also ends hijacked CONNECT tunnels and
	// WebSockets at shutdown (after a grace period for in-flight requests).
	revoked := &pki.Revoked{}
	handler := server.NodeHandler(ag, server.NodeOptions{IngressDomain: cfg.IngressDomain, RevokedEdges: revoked}, log)
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := ingress.Serve(ctx, ln, handler, server.NodeTLS(id.CA, id.Cert), log); err != nil {
			log.Error("node API stopped", "err", err)
			cancel()
		}
	}()

	info := ag.Info()
	log.Info("fireworks agent ready", "node", id.Node, "api", ln.Addr().String(), "accel", info.Accel, "servers", cfg.Servers)
	return link.Run(ctx, agentlink.Node{
		Info: func() *pb.Node {
			i := ag.Info()
			disk := int64(cfg.DiskMiB)
			if disk == 0 {
				disk = freeMiB(cfg.Agent.DataDir)
			}
			return &pb.Node{
				DiskMib: disk, Address: cfg.Advertise, Labels: cfg.Labels, Vcpus: int32(i.MaxVCPUs), MemoryMib: int64(i.MaxMemoryMiB),
				Accel: i.Accel, Kernel: i.KernelRelease, Version: server.Version,
			}
		},
		Images:  func() []string { return ag.ImageDigests(ctx) },
		Running: ag.Running,
		Reconcile: func(ctx context.Context, assigned []state.Sandbox) {
			ag.Reconcile(ctx, assigned)
		},
		Warm:            ag.Warm,
		SetPools:        ag.SetPools,
		SetRevokedEdges: revoked.Set,
		Pools: func() []*pb.PoolNodeStatus {
			var out []*pb.PoolNodeStatus
			for _, p := range ag.Pools() {
				out = append(out, server.PoolStatusToPB(id.Node, p))
			}
			return out
		},
	})
}

// freeMiB is the space available to unprivileged writers on dir's filesystem.
func freeMiB(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * int64(st.Bsize) >> 20
}
