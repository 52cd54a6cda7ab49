// Package agentproc runs `fireworks agent`: a node that joins the cluster (join token →
// certificate), links to the servers over the node protocol, and serves its internal API
// and data path over mutual TLS. The CLI only parses flags into its config.
package agentproc

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/agentlink"
	"github.com/fireworks-sandbox/fireworks/internal/node/nodeapi"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
	"github.com/fireworks-sandbox/fireworks/internal/shared/version"
)

// AgentConfig configures `fireworks agent`.
type AgentConfig struct {
	// Servers are the servers' API addresses (host:port); any one will do.
	Servers []string
	// Join is what the node joins with on its first start (no certificate yet).
	Join agentlink.JoinWith
	// Listen is the node's internal API (mutual TLS; servers relay attach/logs/exec to it).
	Listen string
	// Advertise is how servers reach Listen (host:port); default Listen. It is also the
	// node's data address: edges open tunnels to sandboxes there.
	Advertise string
	// IngressDomain is the ingress domain (default routes.DefaultDomain): requests
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
	id, err := agentlink.EnsureIdentity(ctx, filepath.Join(cfg.Agent.DataDir, "pki"), cfg.Agent.Node, cfg.Join, cfg.Servers, []string{cfg.Advertise})
	if err != nil {
		return err
	}
	cfg.Agent.Node = id.Node
	cfg.Agent.FetchSaved = savedFetcher(id)
	cfg.Agent.DialMigration = migrationDialer(id)
	cfg.Agent.DialVolume = volumeDialer(id)
	cfg.Agent.FetchVolume = volumeFetcher(id)
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
	handler := nodeapi.Handler(ag, nodeapi.Options{IngressDomain: cfg.IngressDomain, RevokedEdges: revoked}, log)
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := ingress.Serve(ctx, ln, handler, nodeapi.TLS(id.CA, id.Cert), log); err != nil {
			log.Error("node API stopped", "err", err)
			cancel()
		}
	}()

	info := ag.Info()
	log.Info("fireworks agent ready", "node", id.Node, "api", ln.Addr().String(), "accel", info.Accel, "servers", cfg.Servers)
	return link.Run(ctx, NodeOf(ag, id.Node, NodeSetup{Address: cfg.Advertise, Labels: cfg.Labels, DiskMiB: cfg.DiskMiB,
		DataDir: cfg.Agent.DataDir, RevokedEdges: revoked}))
}

// nodePeerTLS is this node's TLS for a dial of node's agent at address: this node's
// certificate, and the peer's checked to be that node's agent (not any agent's at its
// address).
func nodePeerTLS(id *agentlink.Identity, node, address string) (*tls.Config, error) {
	if address == "" {
		return nil, fmt.Errorf("node %s's address is not known", node)
	}
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return nil, fmt.Errorf("node %s's address %q: %w", node, address, err)
	}
	tc := pki.ClientTLS(id.CA, &id.Cert, host, pki.RoleAgent)
	tc.VerifyConnection = pki.RequirePeer(pki.RoleAgent, node)
	return tc, nil
}

// savedFetcher fetches a paused sandbox's saved state from the node that holds it, node
// to node over the cluster's mutual TLS: this node's certificate, and the holder's
// checked to be that node's.
func savedFetcher(id *agentlink.Identity) agent.SavedFetcher {
	return func(ctx context.Context, from state.Saved, sandbox string) (io.ReadCloser, error) {
		return fetchFrom(ctx, id, from.Node, from.Address, nodeapi.SavedPath+sandbox)
	}
}

// volumeFetcher fetches a volume being moved here from the node that holds it, as
// savedFetcher does a saved state.
func volumeFetcher(id *agentlink.Identity) agent.VolumeFetcher {
	return func(ctx context.Context, node, address, volume string) (io.ReadCloser, error) {
		return fetchFrom(ctx, id, node, address, nodeapi.VolumeDataPath+volume)
	}
}

// fetchFrom GETs path from node's agent at address: this node's certificate, and the
// peer's checked to be that node's.
func fetchFrom(ctx context.Context, id *agentlink.Identity, node, address, path string) (io.ReadCloser, error) {
	tc, err := nodePeerTLS(id, node, address)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+address+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		tr.CloseIdleConnections()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		tr.CloseIdleConnections()
		return nil, fmt.Errorf("node %s answered %s: %s", node, resp.Status, strings.TrimSpace(string(b)))
	}
	return closeBoth{resp.Body, tr}, nil
}

type closeBoth struct {
	io.ReadCloser
	tr *http.Transport
}

func (c closeBoth) Close() error {
	err := c.ReadCloser.Close()
	c.tr.CloseIdleConnections()
	return err
}

// NodeSetup is what a node tells the control plane about itself besides what its agent
// knows.
type NodeSetup struct {
	// Address is the node's address for servers and edges (host:port).
	Address string
	Labels  map[string]string
	// DiskMiB is the scratch space offered (0: the data dir's free space at registration).
	DiskMiB int
	DataDir string
	// RevokedEdges, if set, takes the revoked edge certificates the heartbeats carry.
	RevokedEdges *pki.Revoked
}

// NodeOf is the node side of the node protocol for ag, the same in a cluster's agent
// process and in dev's.
func NodeOf(ag *agent.Agent, node string, ns NodeSetup) agentlink.Node {
	n := agentlink.Node{
		Info: func() *pb.Node {
			i := ag.Info()
			disk := int64(ns.DiskMiB)
			if disk == 0 {
				disk = freeMiB(ns.DataDir)
			}
			return &pb.Node{
				DiskMib: disk, Address: ns.Address, Labels: ns.Labels, Vcpus: int32(i.MaxVCPUs), MemoryMib: int64(i.MaxMemoryMiB),
				Accel: i.Accel, Kernel: i.KernelRelease, Version: version.Version,
			}
		},
		Images:       func() []string { return ag.ImageDigests(context.Background()) },
		Running:      ag.Running,
		Reconcile:    ag.Reconcile,
		Warm:         ag.Warm,
		SetPools:     ag.SetPools,
		SetSnapshots: ag.SweepSnapshots,
		Pools:        func() []*pb.PoolNodeStatus { return nodeapi.PoolStatuses(ag) },
	}
	if ns.RevokedEdges != nil {
		n.SetRevokedEdges = ns.RevokedEdges.Set
	}
	return n
}

// freeMiB is the space available to unprivileged writers on dir's filesystem.
func freeMiB(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * int64(st.Bsize) >> 20
}
