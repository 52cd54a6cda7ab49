package cli

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/fireworks-sandbox/fireworks/internal/cluster/agentproc"
	"github.com/fireworks-sandbox/fireworks/internal/cluster/serverproc"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/kubejoin"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/leader"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pprofserve"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func newServerCmd(g *globals) *cobra.Command {
	var (
		cfg                   serverproc.ServerConfig
		peers, logLevel, sans string
		heartbeatTTL          time.Duration
		envoyPort             uint32
		envoyTLSDir           string
		joinTok, ingressTok   string
		controllerTok         string
		nodeScale             nodeScaleFlags
		kubeJoinSA            string
		allowJoinTokens       bool
		pprofListen           string
	)
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a control-plane server (API, Raft-replicated state, scheduler) of a cluster",
		Long: `Run one server of a Fireworks cluster. Give every server the same --peers list
(id=raft-host:port[/api-host:port], comma-separated; DNS names are fine) and the same
cluster CA (--ca-dir; create it once with ` + "`fireworks ca create DIR`" + `). Agents join with a
join token from ` + "`fireworks token create --role join`" + `.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			log := newLogger(logLevel)
			cfg.Log = log
			if pprofListen != "" {
				if err := pprofserve.Start(ctx, pprofListen, log); err != nil {
					return err
				}
			}
			var err error
			if cfg.Peers, err = serverproc.ParsePeers(peers); err != nil {
				return err
			}
			for _, s := range strings.Split(sans, ",") {
				if s = strings.TrimSpace(s); s != "" {
					cfg.SANs = append(cfg.SANs, s)
				}
			}
			for _, bt := range []serverproc.BootstrapToken{
				{Name: "node-pool", Role: state.RoleJoin, Token: joinTok},
				{Name: "edge", Role: state.RoleIngress, Token: ingressTok},
				{Name: "kubernetes-controller", Role: state.RoleAdmin, Token: controllerTok},
			} {
				if bt.Token != "" {
					cfg.BootstrapTokens = append(cfg.BootstrapTokens, bt)
				}
			}
			if err := nodeScale.check(); err != nil {
				return err
			}
			if kubeJoinSA != "" {
				kc, err := kubeClient(nodeScale.kubeconfig)
				if err != nil {
					return fmt.Errorf("--kube-join-service-account: %w", err)
				}
				if cfg.KubeJoin, err = kubejoin.New(kc, kubeJoinSA); err != nil {
					return fmt.Errorf("--kube-join-service-account: %w", err)
				}
				cfg.NoJoinTokens = !allowJoinTokens
			}
			cfg.ControlPlane = func(store *state.Store, log *slog.Logger) serverproc.ControlPlane {
				m := leader.New(store, leader.Config{HeartbeatTTL: heartbeatTTL}, log)
				// Validated by check above: an error here is not expected.
				if a, err := nodeScale.autoscaler(store, scheduler.Config{}, log); err != nil {
					log.Error("node autoscaler not started", "err", err)
				} else if a != nil {
					m.SetNodeScaler(a)
				}
				return m
			}
			cfg.HeartbeatInterval = heartbeatTTL / 3
			cfg.XDS = xds.Config{ListenPort: envoyPort}
			if envoyTLSDir != "" {
				cfg.XDS.NodeTLS = envoyNodeTLS(envoyTLSDir)
			}
			return serverproc.RunServer(ctx, cfg)
		},
	}
	host, _ := os.Hostname()
	fl := cmd.Flags()
	fl.StringVar(&cfg.NodeID, "node-id", envOr("FIREWORKS_NODE_ID", host), "this server's ID in the peer list ($FIREWORKS_NODE_ID)")
	fl.StringVar(&cfg.DataDir, "data-dir", envOr("FIREWORKS_DATA_DIR", "/var/lib/fireworks-server"), "state directory")
	fl.StringVar(&cfg.Listen, "listen", ":7766", "API address (TLS)")
	fl.StringVar(&cfg.RaftListen, "raft-listen", ":7767", "Raft address (mutual TLS between servers)")
	fl.StringVar(&cfg.AdvertiseAPI, "advertise-api", os.Getenv("FIREWORKS_ADVERTISE_API"), "API address the other servers reach this one at ($FIREWORKS_ADVERTISE_API; default: --listen when it names a host, else this server's Raft host with the --listen port)")
	fl.StringVar(&peers, "peers", os.Getenv("FIREWORKS_PEERS"), "all servers: id=host:raft-port[/host:api-port],... ($FIREWORKS_PEERS; empty = a cluster of one)")
	fl.StringVar(&cfg.CADir, "ca-dir", os.Getenv("FIREWORKS_CA_DIR"), "cluster CA directory, the same on every server (default DATA/ca)")
	fl.BoolVar(&cfg.InitCA, "init-ca", false, "create the cluster CA if --ca-dir has none")
	fl.StringVar(&sans, "san", "", "extra names/addresses for this server's certificate, comma-separated")
	fl.StringVar(&cfg.BootstrapToken, "bootstrap-token", os.Getenv("FIREWORKS_BOOTSTRAP_TOKEN"), "an admin API token (fwk_...) to create at bootstrap ($FIREWORKS_BOOTSTRAP_TOKEN); default: one is generated into DATA/admin-token")
	fl.StringVar(&joinTok, "bootstrap-join-token", os.Getenv("FIREWORKS_BOOTSTRAP_JOIN_TOKEN"), "a join token (fwj1_..., naming the cluster CA's fingerprint) to create at bootstrap, for a node pool: it never expires and joins any number of hosts ($FIREWORKS_BOOTSTRAP_JOIN_TOKEN)")
	fl.StringVar(&ingressTok, "bootstrap-ingress-token", os.Getenv("FIREWORKS_BOOTSTRAP_INGRESS_TOKEN"), "an ingress token (fwk_...) to create at bootstrap, for the edges ($FIREWORKS_BOOTSTRAP_INGRESS_TOKEN)")
	fl.StringVar(&controllerTok, "bootstrap-controller-token", os.Getenv("FIREWORKS_BOOTSTRAP_CONTROLLER_TOKEN"), "an admin token (fwk_...) named kubernetes-controller to create at bootstrap, for the Kubernetes controller: it sets warm pools, which are cluster-wide ($FIREWORKS_BOOTSTRAP_CONTROLLER_TOKEN)")
	fl.DurationVar(&heartbeatTTL, "heartbeat-ttl", 15*time.Second, "a node silent this long is declared down (agents beat every third of it)")
	fl.StringVar(&cfg.IngressDomain, "ingress-domain", routes.DefaultDomain, "ingress domain: sandbox ports answer to <port>-<sandbox>.DOMAIN (same on servers, agents and edges)")
	fl.StringVar(&cfg.XDSListen, "xds-listen", "", "serve the ingress routes over xDS (gRPC) here, for Envoy; mutual TLS: clients need an ingress certificate (from 'fireworks ingress certificate')")
	fl.Uint32Var(&envoyPort, "xds-envoy-port", xds.DefaultListenPort, "port of the listener Envoy gets over xDS")
	fl.StringVar(&envoyTLSDir, "xds-envoy-tls-dir", "/etc/fireworks/ingress", "directory on Envoy's host with the files 'fireworks ingress certificate --out' writes (Envoy's client certificate for the nodes); empty: Envoy speaks plain HTTP to nodes (which refuse it)")
	fl.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	fl.DurationVar(&cfg.MaxStale, "max-stale", serverproc.DefaultMaxStale, "serve --stale reads only while this server heard from the leader within this long (a token revoked meanwhile reads here until then)")
	fl.StringVar(&kubeJoinSA, "kube-join-service-account", "", "admit agents that join with a projected token of this Kubernetes ServiceAccount (namespace/name; the agent DaemonSet's), checked with the API server (TokenReview): each joins only as the node its pod runs on")
	fl.BoolVar(&allowJoinTokens, "allow-join-tokens", false, "with --kube-join-service-account: admit agents by join token too (hosts outside Kubernetes; a join token may name any node, so it gets around the binding to Kubernetes nodes)")
	fl.StringVar(&pprofListen, "pprof-listen", "", "serve Go runtime profiles (net/http/pprof) on this loopback address, e.g. 127.0.0.1:6060")
	registerLimitFlags(fl, &cfg.Limits)
	nodeScale.register(fl)
	return cmd
}

// registerLimitFlags adds the per-token limits a server enforces.
func registerLimitFlags(fl *pflag.FlagSet, l *server.Limits) {
	*l = server.DefaultLimits()
	fl.IntVar(&l.SandboxesPerOwner, "max-sandboxes-per-token", l.SandboxesPerOwner, "sandboxes (exited ones included) one user token may hold; 0 = unlimited (admin tokens are never limited)")
	fl.IntVar(&l.VCPUsPerOwner, "max-vcpus-per-token", l.VCPUsPerOwner, "vCPUs of the sandboxes one user token runs at once; 0 = unlimited")
	fl.IntVar(&l.MemoryMiBPerOwner, "max-memory-per-token", l.MemoryMiBPerOwner, "memory (MiB) of the sandboxes one user token runs at once; 0 = unlimited")
	fl.IntVar(&l.DiskMiBPerOwner, "max-disk-per-token", l.DiskMiBPerOwner, "scratch disk (MiB) the sandboxes one user token runs at once reserve on nodes; 0 = unlimited")
	fl.IntVar(&l.SavedMiBPerOwner, "max-saved-per-token", l.SavedMiBPerOwner, "disk (MiB) one user token's snapshots and paused sandboxes take on nodes together; past it pause, fork and snapshot create are refused; 0 = unlimited")
	fl.IntVar(&l.WaitsPerOwner, "max-waits-per-token", l.WaitsPerOwner, "calls of one user token that wait at once for sandboxes to be placed, start or stop (an attached run, an exec on a starting sandbox); 0 = unlimited")
	fl.IntVar(&l.SpecBytesPerOwner, "max-spec-bytes-per-token", l.SpecBytesPerOwner, "bytes of all of one user token's sandbox specs (commands, environments, policies), exited sandboxes included; 0 = unlimited")
}

// parseLabels reads --label key=value[,key=value...].
func parseLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--label %q: want key=value", kv)
		}
		out[k] = v
	}
	return out, nil
}

func newAgentCmd(g *globals) *cobra.Command {
	var (
		cfg                                   agentproc.AgentConfig
		servers, labels, logLevel, accel, ini string
		pprofListen                           string
		warm                                  warmFlags
		netf                                  nodeNetFlags
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run a node agent: join a cluster and run the sandboxes placed on this host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			log := newLogger(logLevel)
			if pprofListen != "" {
				if err := pprofserve.Start(ctx, pprofListen, log); err != nil {
					return err
				}
			}
			cfg.Log = log
			for _, s := range strings.Split(servers, ",") {
				if s = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(s), "https://")); s != "" {
					cfg.Servers = append(cfg.Servers, s)
				}
			}
			if len(cfg.Servers) == 0 {
				return fmt.Errorf("no servers: pass --server host:port[,host:port...] or set FIREWORKS_SERVER")
			}
			var err error
			if cfg.Labels, err = parseLabels(labels); err != nil {
				return err
			}
			a, err := accelFlag(accel)
			if err != nil {
				return err
			}
			initBin, err := findInitBinary(ini)
			if err != nil {
				return err
			}
			cfg.Agent.Accel, cfg.Agent.InitBinary = a, initBin
			if p := cfg.Agent.CgroupParent; p != "" && (!filepath.IsAbs(p) || filepath.Clean(p) != p) {
				return fmt.Errorf("--cgroup-parent %q: want an absolute, clean path from the top of the cgroup hierarchy (e.g. /fireworks)", p)
			}
			netf.apply(&cfg.Agent)
			if err := warm.apply(&cfg.Agent); err != nil {
				return err
			}
			return agentproc.RunAgent(ctx, cfg)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&servers, "server", os.Getenv("FIREWORKS_SERVER"), "servers' API addresses, comma-separated ($FIREWORKS_SERVER)")
	fl.StringVar(&cfg.Join.Token, "join-token", os.Getenv("FIREWORKS_JOIN_TOKEN"), "join token for the first start ($FIREWORKS_JOIN_TOKEN)")
	fl.StringVar(&cfg.Join.KubeTokenFile, "kube-token-file", os.Getenv("FIREWORKS_KUBE_TOKEN_FILE"), "instead of a join token: a file with the agent pod's projected ServiceAccount token (audience "+kubejoin.Audience+"), for servers run with --kube-join-service-account; the node joins as the Kubernetes node its pod runs on (--node must be that name) ($FIREWORKS_KUBE_TOKEN_FILE)")
	fl.StringVar(&cfg.Join.CAFile, "join-ca-file", os.Getenv("FIREWORKS_JOIN_CA_FILE"), "with --kube-token-file: the cluster CA's certificate (PEM) the servers must chain to ($FIREWORKS_JOIN_CA_FILE)")
	fl.StringVar(&cfg.Agent.DataDir, "data-dir", envOr("FIREWORKS_DATA_DIR", "/var/lib/fireworks-agent"), "node data directory")
	fl.StringVar(&cfg.Agent.Node, "node", "", "node name (default: hostname; fixed by the node certificate once joined)")
	fl.StringVar(&cfg.Listen, "listen", ":7768", "internal node API (mutual TLS)")
	fl.StringVar(&cfg.Advertise, "advertise", "", "host:port servers and ingress edges reach the node API at (default --listen)")
	fl.StringVar(&cfg.IngressDomain, "ingress-domain", routes.DefaultDomain, "ingress domain (as on the servers): requests for <port>-<sandbox>.DOMAIN on --listen go to the sandbox (Envoy's data path)")
	fl.StringVar(&labels, "label", "", "node labels key=value, comma-separated (for --constraint)")
	fl.IntVar(&cfg.Agent.MaxVCPUs, "cpus", 0, "vCPUs offered to sandboxes (default: the host's cores)")
	fl.IntVar(&cfg.DiskMiB, "disk", 0, "scratch disk space offered to sandboxes, MiB (default: free space of --data-dir)")
	fl.IntVar(&cfg.Agent.MaxMemoryMiB, "memory", 0, "memory offered to sandboxes, MiB (default: 75% of the host's)")
	fl.StringVar(&accel, "accel", "auto", "accelerator: auto, kvm or tcg")
	fl.StringVar(&ini, "init-binary", "", "guest init binary")
	fl.StringVar(&cfg.Agent.CgroupParent, "cgroup-parent", "", "cgroup directory for the VMs and volume servers, from the top of the hierarchy (e.g. /fireworks); default: under the agent's own cgroup. Set it when the agent runs in a container, so they outlive the container (with --cgroup-root)")
	fl.StringVar(&cfg.Agent.CgroupRoot, "cgroup-root", "/sys/fs/cgroup", "where the host's cgroup filesystem is mounted (an agent in a pod mounts the host's elsewhere: its own /sys/fs/cgroup shows only its container's)")
	fl.StringVar(&pprofListen, "pprof-listen", "", "serve Go runtime profiles (net/http/pprof) on this loopback address, e.g. 127.0.0.1:6060")
	fl.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	warm.register(fl)
	netf.register(fl)
	return cmd
}

func newNodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "List and manage the cluster's nodes"}
	ls := &cobra.Command{
		Use: "ls", Short: "List nodes with their status and load", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Cluster.ListNodes(cmd.Context(), connect.NewRequest(&pb.ListNodesRequest{}))
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			// Reserved of schedulable (the capacity after overcommit: vCPUs 4x by default),
			// with the physical capacity when the two differ.
			fmt.Fprintln(tw, "NODE\tSTATUS\tSCHEDULING\tSANDBOXES\tVCPUS\tMEMORY\tACCEL\tADDRESS")
			for _, n := range resp.Msg.GetNodes() {
				sched := "eligible"
				switch {
				case n.GetDraining():
					sched = "draining"
				case n.GetParked():
					sched = "parked (autoscaler)"
				case n.GetCordoned():
					sched = "cordoned"
				}
				status := n.GetStatus()
				if n.GetStatus() != "ready" && n.GetStatusReason() != "" {
					status += " (" + n.GetStatusReason() + ")"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s MiB\t%s\t%s\n", n.GetId(), status, sched, n.GetSandboxes(),
					usedOf(int64(n.GetUsedVcpus()), int64(n.GetSchedulableVcpus()), int64(n.GetVcpus())),
					usedOf(n.GetUsedMemoryMib(), n.GetSchedulableMemoryMib(), n.GetMemoryMib()), n.GetAccel(), n.GetAddress())
			}
			return tw.Flush()
		},
	}
	type nodeCall func(context.Context, *connect.Request[pb.NodeActionRequest]) (*connect.Response[pb.NodeActionResponse], error)
	action := func(use, short string, call func(*client.Client) nodeCall) *cobra.Command {
		return &cobra.Command{
			Use: use + " NODE", Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := g.client()
				if err != nil {
					return err
				}
				r, err := call(c)(cmd.Context(), connect.NewRequest(&pb.NodeActionRequest{Node: args[0]}))
				if err != nil {
					return err
				}
				n := r.Msg.GetNode()
				if use == "rm" {
					fmt.Fprintf(g.stdout, "%s: removed; its certificate is refused from now on\n", args[0])
					return nil
				}
				fmt.Fprintf(g.stdout, "%s: status %s, cordoned %v, draining %v\n", n.GetId(), n.GetStatus(), n.GetCordoned(), n.GetDraining())
				if use == "drain" || use == "cordon" {
					warnNoOtherNode(cmd.Context(), g, c, n.GetId(), use)
				}
				return nil
			},
		}
	}
	cmd.AddCommand(ls,
		action("cordon", "Stop placing new sandboxes on a node", func(c *client.Client) nodeCall { return c.Cluster.CordonNode }),
		action("uncordon", "Let a node take sandboxes again", func(c *client.Client) nodeCall { return c.Cluster.UncordonNode }),
		action("drain", "Cordon a node and move its sandboxes elsewhere: live (migrated), else stopped and placed again if their --restart allows; the rest stay, saying why (`uncordon` ends the drain)", func(c *client.Client) nodeCall { return c.Cluster.DrainNode }),
		action("rm", "Remove a node: its certificate is refused from now on, its sandboxes are lost (placed again per --restart), its name is free to join again", func(c *client.Client) nodeCall { return c.Cluster.RemoveNode }),
	)
	return cmd
}

func newCACmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "Manage the cluster CA"}
	create := &cobra.Command{
		Use:   "create DIR",
		Short: "Create a cluster CA in DIR (ca.pem, ca-key.pem) to give every server (--ca-dir)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := pki.CreateCA(args[0], "fireworks")
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stdout, "created %s (fingerprint %s)\n", filepath.Join(args[0], pki.CACertFile), ca.Fingerprint())
			return nil
		},
	}
	cmd.AddCommand(create)
	return cmd
}

// warnNoOtherNode says, after a drain or cordon, when no other node takes sandboxes
// (`fireworks dev` has one node): what is drained, and anything new, waits.
func warnNoOtherNode(ctx context.Context, g *globals, c *client.Client, node, use string) {
	resp, err := c.Cluster.ListNodes(ctx, connect.NewRequest(&pb.ListNodesRequest{}))
	if err != nil {
		return
	}
	for _, n := range resp.Msg.GetNodes() {
		if n.GetId() != node && n.GetStatus() == "ready" && !n.GetCordoned() && !n.GetDraining() {
			return
		}
	}
	what := "new sandboxes wait, pending,"
	if use == "drain" {
		what = "none of its sandboxes can move live; those whose --restart allows it are stopped and wait, pending, with new ones,"
	}
	fmt.Fprintf(g.stderr, "fireworks: no other node takes sandboxes: %s until `fireworks node uncordon %s`\n", what, node)
}

// usedOf shows what sandboxes reserve of what the scheduler may place on a node, and the
// node's own capacity when overcommit makes that differ ("5/8 (2 x4)").
func usedOf(used, schedulable, capacity int64) string {
	if schedulable == 0 { // a server from before schedulable was reported
		schedulable = capacity
	}
	out := fmt.Sprintf("%d/%d", used, schedulable)
	if schedulable != capacity && capacity > 0 {
		out += fmt.Sprintf(" (%d x%g)", capacity, float64(schedulable)/float64(capacity))
	}
	return out
}
