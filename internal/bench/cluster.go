package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/hostnet"
)

// benchCluster is a server and two agents, each in a network namespace of its own on a
// bridge (hosts of one network, as in the cluster tests), with the bench's image in a
// registry on the bridge address: what the node-to-node series (live migration between
// agents) need. Everything it makes, stop removes.
type benchCluster struct {
	cfg      Config
	root     string
	net      *hostnet.Net
	procs    []*benchProc
	registry *http.Server
	ref      string // the bench image, in the registry
	api      *apiClient
	agents   []string // node names
}

type benchProc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	log    string
}

const (
	benchSubnet   = "10.98.0"
	benchAPIPort  = "7766"
	benchNodePort = "7768"
)

// startCluster builds the cluster under root. The guest kernel must be (or is fetched
// here, in the bench's own namespace) in cfg.DataDir/assets: the agents' namespaces have
// no route to the package mirror.
func startCluster(ctx context.Context, cfg Config, root string, img v1.Image) (_ *benchCluster, err error) {
	c := &benchCluster{cfg: cfg, root: root}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, c.logTail())
			c.stop()
		}
	}()
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("bench cluster dir %s: %w", root, err)
	}
	assetDir := filepath.Join(cfg.DataDir, "assets")
	if err := os.MkdirAll(assetDir, 0o700); err != nil {
		return nil, fmt.Errorf("bench asset dir %s: %w", assetDir, err)
	}
	if _, err := assets.EnsureKernel(ctx, assetDir); err != nil {
		return nil, fmt.Errorf("fetch the guest kernel into %s: %w", assetDir, err)
	}
	if c.net, err = hostnet.Make("fwbbr0", benchSubnet, "fwb", 3); err != nil {
		return nil, err
	}

	ln, err := net.Listen("tcp", c.net.BridgeIP+":0")
	if err != nil {
		return nil, fmt.Errorf("registry listener: %w", err)
	}
	c.registry = &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0))), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = c.registry.Serve(ln) }()
	c.ref = ln.Addr().String() + "/bench:latest"
	r, err := name.ParseReference(c.ref, name.Insecure)
	if err != nil {
		return nil, err
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("push the bench image to %s: %w", c.ref, err)
	}

	// One server (a cluster of one, its CA made at start) and its generated admin token.
	s := c.net.Hosts[0]
	sdata := filepath.Join(root, "server")
	if err := c.start(s, "server.log", "server", "--node-id", "s0", "--data-dir", sdata, "--init-ca",
		"--listen", s.IP+":"+benchAPIPort, "--raft-listen", s.IP+":7767"); err != nil {
		return nil, err
	}
	ccfg := client.Config{Server: "https://" + s.IP + ":" + benchAPIPort, CA: filepath.Join(sdata, "ca", "ca.pem")}
	if err := waitFor(ctx, time.Minute, "the bench cluster's server", func() error {
		b, err := os.ReadFile(filepath.Join(sdata, "admin-token"))
		if err != nil {
			return err
		}
		ccfg.Token = strings.TrimSpace(string(b))
		if c.api, err = newAPIClientFor(ccfg); err != nil {
			return err
		}
		_, err = c.api.system.Info(ctx, connect.NewRequest(&pb.InfoRequest{}))
		return err
	}); err != nil {
		return nil, err
	}
	tr, err := c.api.tokens.CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{Name: "bench-agents", Role: "join", MaxUses: 2}))
	if err != nil {
		return nil, fmt.Errorf("create the agents' join token: %w", err)
	}
	initBin := filepath.Join(filepath.Dir(cfg.Fireworks), "fireworks-init")
	for i, h := range c.net.Hosts[1:] {
		node := fmt.Sprintf("a%d", i)
		data := filepath.Join(root, node)
		if err := os.MkdirAll(data, 0o700); err != nil {
			return nil, err
		}
		if err := os.Symlink(assetDir, filepath.Join(data, "assets")); err != nil {
			return nil, err
		}
		// Room for a 1 GiB sandbox and, while one migrates in, its copy.
		if err := c.start(h, node+".log", "agent", "--server", s.IP+":"+benchAPIPort, "--join-token", tr.Msg.GetSecret(),
			"--data-dir", data, "--node", node, "--listen", h.IP+":"+benchNodePort, "--memory", "3072",
			"--init-binary", initBin); err != nil {
			return nil, err
		}
		c.agents = append(c.agents, node)
	}
	if err := waitFor(ctx, 3*time.Minute, "both bench agents ready", func() error {
		resp, err := c.api.cluster.ListNodes(ctx, connect.NewRequest(&pb.ListNodesRequest{}))
		if err != nil {
			return err
		}
		ready := 0
		for _, n := range resp.Msg.GetNodes() {
			if n.GetStatus() == "ready" {
				ready++
			}
		}
		if ready < len(c.agents) {
			return fmt.Errorf("%d of %d nodes ready", ready, len(c.agents))
		}
		return nil
	}); err != nil {
		return nil, err
	}
	return c, nil
}

// start runs fireworks with args in host h's network namespace (nsenter: only the
// network namespace changes, as on a host whose bpffs and mounts the agent shares).
func (c *benchCluster) start(h *hostnet.Host, logName string, args ...string) error {
	path := filepath.Join(c.root, logName)
	logf, err := os.Create(path)
	if err != nil {
		return err
	}
	if c.cfg.Debug {
		args = append(args, "--log-level", "debug")
	}
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + h.NS, "--", c.cfg.Fireworks}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start fireworks %s in %s: %w", args[0], h.NS, err)
	}
	p := &benchProc{cmd: cmd, exited: make(chan struct{}), log: path}
	go func() { _ = cmd.Wait(); logf.Close(); close(p.exited) }()
	c.procs = append(c.procs, p)
	return nil
}

// stop ends the agents, then the server (SIGTERM), kills any VMM a stopped agent left
// for its next start (the series remove their sandboxes; a failed one may not have), and
// removes the hosts, the bridge and the registry.
func (c *benchCluster) stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		stopGracefully(c.procs[i].cmd, c.procs[i].exited)
	}
	if c.cfg.Debug {
		keep := filepath.Join(c.cfg.DataDir, "cluster-logs")
		if err := os.MkdirAll(keep, 0o700); err == nil {
			for _, p := range c.procs {
				if b, err := os.ReadFile(p.log); err == nil {
					_ = os.WriteFile(filepath.Join(keep, filepath.Base(p.log)), b, 0o600)
				}
			}
		}
	}
	// A stopped agent leaves its VMs to its next start, which never comes.
	_ = exec.Command("pkill", "-9", "-f", "qemu-system-x86_64 .*"+c.root+"/").Run()
	if c.registry != nil {
		_ = c.registry.Close()
	}
	if c.net != nil {
		c.net.Remove()
	}
}

// logTail is the end of each process's log, for an error that needs them.
func (c *benchCluster) logTail() string { return logTails(c.procs, 3000) }

// logTails is the last max bytes of each process's log, headed by its name.
func logTails(procs []*benchProc, max int) string {
	var b strings.Builder
	for _, p := range procs {
		data, _ := os.ReadFile(p.log)
		if len(data) > max {
			data = data[len(data)-max:]
		}
		fmt.Fprintf(&b, "---- %s ----\n%s\n", filepath.Base(p.log), data)
	}
	return b.String()
}

// waitFor retries try every 200 ms until it succeeds, ctx ends or limit passes.
func waitFor(ctx context.Context, limit time.Duration, what string, try func() error) error {
	deadline := time.Now().Add(limit)
	for {
		err := try()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %s: %w", what, limit, err)
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
