package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/node/agentlink"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// APIRow is control-plane throughput through the real API: sandbox creates sent by
// Clients concurrent clients (each its own user token and HTTP/2 connection, spread over
// the Servers `fireworks server` processes: a follower forwards to the leader), each
// placed in its commit on one of Nodes simulated nodes (real agent-protocol clients:
// joined, registered, heartbeating, watching their assignments; no VMs).
type APIRow struct {
	Servers   int     `json:"servers"`
	Nodes     int     `json:"nodes"`
	Clients   int     `json:"clients"`
	Creates   int     `json:"creates"`
	PerSecond float64 `json:"creates_per_second"`
	P50Ms     float64 `json:"create_p50_ms"`
	P99Ms     float64 `json:"create_p99_ms"`
	// Placed counts the creates the state holds placed on a simulated node, Forwarded
	// the creates sent to a follower: the row's path, checked.
	Placed    int `json:"placed"`
	Forwarded int `json:"forwarded"`
}

// API throughput goals (issue #19), printed beside the table, never asserted.
const (
	apiGoalPerSecond = 1000
	apiGoalP99Ms     = 50
	apiGoalClients   = 64
)

// BenchAPI starts 3 servers (fireworks, the binary at bin) on loopback under dir and
// nodes simulated nodes, then measures creates at each client count.
func BenchAPI(ctx context.Context, bin, dir string, creates int, clients []int, nodes int, log *slog.Logger) (_ []APIRow, err error) {
	c, err := startAPICluster(ctx, bin, dir, nodes, log)
	if err != nil {
		return nil, err
	}
	defer c.stop()
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, c.logTail())
		}
	}()
	var rows []APIRow
	for _, n := range clients {
		row, err := c.measure(ctx, n, max(creates, 4*n))
		if err != nil {
			return rows, fmt.Errorf("%d clients: %w", n, err)
		}
		rows = append(rows, row)
	}
	return rows, nil
}

type apiCluster struct {
	bin, dir string
	ca       string
	admin    string
	apis     []string // the servers' API addresses
	procs    []*benchProc
	cancel   context.CancelFunc
	links    sync.WaitGroup
	sims     map[string]bool // simulated node names
	log      *slog.Logger
}

// freeLoopbackPorts returns n distinct free ports on 127.0.0.1, held until all are picked.
func freeLoopbackPorts(n int) ([]string, error) {
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	var out []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		held = append(held, ln)
		out = append(out, ln.Addr().String())
	}
	return out, nil
}

func startAPICluster(ctx context.Context, bin, dir string, nodes int, log *slog.Logger) (_ *apiCluster, err error) {
	c := &apiCluster{bin: bin, dir: dir, ca: filepath.Join(dir, "ca"), sims: map[string]bool{}, log: log}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, c.logTail())
			c.stop()
		}
	}()
	if out, err := exec.CommandContext(ctx, bin, "ca", "create", c.ca).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("fireworks ca create: %w: %s", err, out)
	}
	secret := make([]byte, 40)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	c.admin = "fwk_" + hex.EncodeToString(secret[:8]) + "_" + hex.EncodeToString(secret[8:])
	ports, err := freeLoopbackPorts(6)
	if err != nil {
		return nil, err
	}
	var peers []string
	for i := range 3 {
		c.apis = append(c.apis, ports[2*i])
		peers = append(peers, fmt.Sprintf("s%d=%s/%s", i, ports[2*i+1], ports[2*i]))
	}
	for i := range 3 {
		path := filepath.Join(dir, fmt.Sprintf("s%d.log", i))
		logf, err := os.Create(path)
		if err != nil {
			return nil, err
		}
		args := []string{"server", "--node-id", fmt.Sprintf("s%d", i), "--data-dir", filepath.Join(dir, fmt.Sprintf("s%d", i)),
			"--listen", ports[2*i], "--raft-listen", ports[2*i+1], "--peers", strings.Join(peers, ","), "--ca-dir", c.ca,
			"--bootstrap-token", c.admin, "--log-level", "warn",
			// Each client is one user whose sandboxes never end (the nodes are simulated):
			// per-token bounds far above the run's, so the quota checks run and pass.
			"--max-sandboxes-per-token", "1000000", "--max-vcpus-per-token", "1000000", "--max-memory-per-token", "1000000000",
			"--max-spec-bytes-per-token", "1000000000"}
		if os.Getenv("FIREWORKS_BENCH_PPROF") != "" {
			// For finding what limits it: `go tool pprof http://127.0.0.1:6060/debug/pprof/profile`.
			args = append(args, "--pprof-listen", fmt.Sprintf("127.0.0.1:%d", 6060+i))
		}
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			logf.Close()
			return nil, fmt.Errorf("start server s%d: %w", i, err)
		}
		p := &benchProc{cmd: cmd, exited: make(chan struct{}), log: path}
		go func() { _ = cmd.Wait(); logf.Close(); close(p.exited) }()
		c.procs = append(c.procs, p)
	}
	admin, err := c.client(c.admin, 0)
	if err != nil {
		return nil, err
	}
	if err := waitFor(ctx, time.Minute, "the bench's three servers", func() error {
		_, err := c.leader(ctx)
		return err
	}); err != nil {
		return nil, err
	}

	// The simulated nodes join with a join token, as agents do, and keep a session.
	jt, err := admin.Tokens.CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{Name: "bench-nodes", Role: "join", MaxUses: int32(nodes)}))
	if err != nil {
		return nil, fmt.Errorf("create the nodes' join token: %w", err)
	}
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c.cancel = cancel
	quiet := slog.New(slog.DiscardHandler)
	for i := range nodes {
		name := fmt.Sprintf("sim%03d", i)
		id, err := agentlink.EnsureIdentity(ctx, filepath.Join(dir, "nodes", name), name, agentlink.JoinWith{Token: jt.Msg.GetSecret()}, c.apis, []string{"127.0.0.1"})
		if err != nil {
			return nil, fmt.Errorf("join simulated node %s: %w", name, err)
		}
		c.sims[name] = true
		link := agentlink.New(id, c.apis, quiet)
		node := agentlink.Node{
			Info: func() *pb.Node {
				return &pb.Node{Address: "127.0.0.1:1", Vcpus: 32, MemoryMib: 128 << 10, DiskMib: 1 << 20, Accel: "sim"}
			},
			Images:    func() []string { return nil },
			Running:   func() []string { return nil },
			Reconcile: func(context.Context, []state.Sandbox) {},
		}
		c.links.Add(1)
		go func() { defer c.links.Done(); _ = link.Run(lctx, node) }()
	}
	if err := waitFor(ctx, 2*time.Minute, fmt.Sprintf("%d simulated nodes ready", nodes), func() error {
		resp, err := admin.Cluster.ListNodes(ctx, connect.NewRequest(&pb.ListNodesRequest{}))
		if err != nil {
			return err
		}
		ready := 0
		for _, n := range resp.Msg.GetNodes() {
			if n.GetStatus() == "ready" {
				ready++
			}
		}
		if ready < nodes {
			return fmt.Errorf("%d of %d ready", ready, nodes)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	return c, nil
}

// client is a client of server i (mod 3) with token, on a connection of its own.
func (c *apiCluster) client(token string, i int) (*client.Client, error) {
	return client.New(client.Config{Server: "https://" + c.apis[i%len(c.apis)], CA: filepath.Join(c.ca, "ca.pem"), Token: token})
}

// leader is the index of the server that leads now.
func (c *apiCluster) leader(ctx context.Context) (int, error) {
	admin, err := c.client(c.admin, 0)
	if err != nil {
		return 0, err
	}
	resp, err := admin.System.Info(ctx, connect.NewRequest(&pb.InfoRequest{}))
	if err != nil {
		return 0, err
	}
	// A cluster server's info names the leader: "... (leader s1)".
	var i int
	if k := strings.Index(resp.Msg.GetNode(), "leader s"); k < 0 {
		return 0, fmt.Errorf("no leader in the servers' info %q", resp.Msg.GetNode())
	} else if _, err := fmt.Sscanf(resp.Msg.GetNode()[k:], "leader s%d", &i); err != nil || i < 0 || i >= len(c.apis) {
		return 0, fmt.Errorf("no leader in the servers' info %q", resp.Msg.GetNode())
	}
	return i, nil
}

// measure sends creates from n clients, each with a user token of its own.
func (c *apiCluster) measure(ctx context.Context, n, creates int) (APIRow, error) {
	admin, err := c.client(c.admin, 0)
	if err != nil {
		return APIRow{}, err
	}
	lead, err := c.leader(ctx)
	if err != nil {
		return APIRow{}, err
	}
	clients := make([]*client.Client, n)
	for i := range n {
		tr, err := admin.Tokens.CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{Name: fmt.Sprintf("bench-%d-%d", n, i)}))
		if err != nil {
			return APIRow{}, fmt.Errorf("create a user token: %w", err)
		}
		if clients[i], err = c.client(tr.Msg.GetSecret(), i); err != nil {
			return APIRow{}, err
		}
		// Connected before the clock starts: the row measures creates, not handshakes.
		if _, err := clients[i].System.Info(ctx, connect.NewRequest(&pb.InfoRequest{})); err != nil {
			return APIRow{}, err
		}
	}
	c.log.Info("measuring creates through the API", "clients", n, "creates", creates)
	lat := make([]float64, creates)
	ids := make([]string, creates)
	var next, forwarded atomic.Int64
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	start := time.Now()
	for ci := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= creates {
					return
				}
				t0 := time.Now()
				resp, err := clients[ci].Sandboxes.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{
					Spec: &pb.SandboxSpec{Image: "bench.invalid/sim:1", Cmd: []string{"true"}}}))
				lat[i] = ms(time.Since(t0))
				if err != nil {
					mu.Lock()
					if len(errs) < 5 {
						errs = append(errs, err)
					}
					mu.Unlock()
					continue
				}
				ids[i] = resp.Msg.GetSandbox().GetId()
				if ci%len(c.apis) != lead {
					forwarded.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if len(errs) > 0 {
		return APIRow{}, fmt.Errorf("creates failed: %w", errors.Join(errs...))
	}
	// The path, checked: every create is in the state, placed on a simulated node (those
	// the create could not place at once, the leader's next pass places).
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	placed := 0
	for deadline := time.Now().Add(15 * time.Second); ; {
		list, err := admin.Sandboxes.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{All: true}))
		if err != nil {
			return APIRow{}, err
		}
		placed = 0
		for _, sb := range list.Msg.GetSandboxes() {
			if want[sb.GetId()] && c.sims[sb.GetNode()] {
				placed++
			}
		}
		if placed == creates || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	s := summarize(lat)
	return APIRow{Servers: len(c.apis), Nodes: len(c.sims), Clients: n, Creates: creates, PerSecond: float64(creates) / el.Seconds(),
		P50Ms: s.P50, P99Ms: s.P99, Placed: placed, Forwarded: int(forwarded.Load())}, nil
}

func (c *apiCluster) stop() {
	if c.cancel != nil {
		c.cancel()
		c.links.Wait()
	}
	for _, p := range c.procs {
		stopGracefully(p.cmd, p.exited)
	}
}

func (c *apiCluster) logTail() string { return logTails(c.procs, 2000) }
