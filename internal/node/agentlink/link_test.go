package agentlink_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/leader"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	"github.com/fireworks-sandbox/fireworks/internal/node/agentlink"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// fakeNode records what the link hands the node side. It is a test double of the agent
// (named so): the link, the server's node protocol, the control plane and the Raft state
// on the other side are the real ones.
type fakeNode struct {
	mu       sync.Mutex
	assigned [][]state.Sandbox
	pools    [][]state.Pool
	changed  chan struct{}
}

func (f *fakeNode) node() agentlink.Node {
	return agentlink.Node{
		Info: func() *pb.Node {
			return &pb.Node{Vcpus: 4, MemoryMib: 4096, DiskMib: 1000, Address: "127.0.0.1:1", Accel: "tcg"}
		},
		Images:  func() []string { return []string{"sha256:aa"} },
		Running: func() []string { return nil },
		Reconcile: func(_ context.Context, sbs []state.Sandbox) {
			f.mu.Lock()
			f.assigned = append(f.assigned, sbs)
			f.mu.Unlock()
			f.poke()
		},
		SetPools: func(p []state.Pool) {
			f.mu.Lock()
			f.pools = append(f.pools, p)
			f.mu.Unlock()
			f.poke()
		},
	}
}

func (f *fakeNode) poke() {
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

// waitFor polls cond (under the node's lock) until it holds or the test's patience ends.
func (f *fakeNode) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		f.mu.Lock()
		ok := cond()
		f.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-f.changed:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestLinkInProcess runs the node protocol end to end in one process, as `fireworks dev`
// does: registration, heartbeats carrying the pool configuration, a placement delivered
// as an assignment, progress reports committed, and reports the server must refuse.
func TestLinkInProcess(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	store, err := state.Open(ctx, state.Options{Dir: t.TempDir(), NodeID: "test", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	cp := leader.New(store, leader.Config{Interval: 100 * time.Millisecond}, log)
	srv := server.New(store, log)
	srv.EnableCluster(server.ClusterOptions{ControlPlane: cp, HeartbeatInterval: 100 * time.Millisecond})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Add(2)
	go func() { defer wg.Done(); _ = cp.Run(ctx) }()

	link := agentlink.NewInProcess("n1", srv.ServeNodeProtocol(ctx, "n1"), log)
	fn := &fakeNode{changed: make(chan struct{}, 1)}
	go func() { defer wg.Done(); _ = link.Run(ctx, fn.node()) }()

	// Registered with what the node says it offers.
	var n state.Node
	fn.waitFor(t, "registration", func() bool {
		n, err = store.GetNode(ctx, "n1")
		return err == nil && n.Status == state.NodeReady
	})
	if n.Capacity.VCPUs != 4 || n.Capacity.MemoryMiB != 4096 || n.Address != "127.0.0.1:1" || !slices.Equal(n.Images, []string{"sha256:aa"}) {
		t.Fatalf("registered node %+v", n)
	}

	// The pool configuration reaches the node with the heartbeats.
	if _, err := store.SetPool(ctx, state.Pool{Image: "img", Size: 2, UpdatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	fn.waitFor(t, "the pool configuration", func() bool {
		return len(fn.pools) > 0 && len(fn.pools[len(fn.pools)-1]) == 1 && fn.pools[len(fn.pools)-1][0].Size == 2
	})

	// A sandbox created is placed on the node and delivered to it.
	sb := state.Sandbox{ID: state.NewID(), Spec: state.SandboxSpec{Image: "img", VCPUs: 1, MemoryMiB: 256},
		Status: state.StatusPending, CreatedAt: time.Now()}
	if err := store.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	cp.Notify()
	fn.waitFor(t, "the assignment", func() bool {
		return len(fn.assigned) > 0 && slices.ContainsFunc(fn.assigned[len(fn.assigned)-1], func(a state.Sandbox) bool { return a.ID == sb.ID && a.Node == "n1" })
	})
	if got, err := link.GetSandbox(ctx, sb.ID); err != nil || got.Node != "n1" {
		t.Fatalf("link's copy of the assignment: %+v, %v", got, err)
	}

	// Progress is committed to the state.
	starting := state.StatusStarting
	if _, err := link.UpdateSandbox(ctx, sb.ID, state.Update{Status: &starting}); err != nil {
		t.Fatal(err)
	}
	if got, _ := store.GetSandbox(ctx, sb.ID); got.Status != state.StatusStarting {
		t.Fatalf("status after the report: %s", got.Status)
	}

	// What a node may not do is refused at once, not retried: making a sandbox pending,
	// and reporting on a sandbox that is not its own.
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	defer rcancel()
	pending := state.StatusPending
	if _, err := link.UpdateSandbox(rctx, sb.ID, state.Update{Status: &pending}); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("report making a sandbox pending: %v, want invalid argument", err)
	}
	if _, err := store.UpdateNode(ctx, "n1", state.NodeUpdate{Cordoned: ptr(true), Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	other := state.Sandbox{ID: state.NewID(), Spec: state.SandboxSpec{Image: "img"}, Status: state.StatusPending, CreatedAt: time.Now()}
	if err := store.CreateSandbox(ctx, other); err != nil {
		t.Fatal(err)
	}
	if _, err := link.UpdateSandbox(rctx, other.ID, state.Update{Status: &starting}); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("report on a sandbox not placed on the node: %v, want permission denied", err)
	}
	if rctx.Err() != nil {
		t.Error("a refused report was retried until the deadline")
	}
}

func ptr[T any](v T) *T { return &v }

// stalledServer is a test double of the servers' node protocol: it registers the node and
// takes its heartbeats, but its assignment stream never says anything (a server on the
// way lost its upstream and did not close it).
type stalledServer struct {
	fireworksv1connect.UnimplementedNodeServiceHandler
	registers atomic.Int32
	// endStream ends the assignment stream at once instead (a server that died while
	// the others still take heartbeats).
	endStream bool
}

func (s *stalledServer) Register(context.Context, *connect.Request[pb.RegisterRequest]) (*connect.Response[pb.RegisterResponse], error) {
	s.registers.Add(1)
	return connect.NewResponse(&pb.RegisterResponse{HeartbeatInterval: durationpb.New(50 * time.Millisecond)}), nil
}

func (s *stalledServer) Heartbeat(context.Context, *connect.Request[pb.HeartbeatRequest]) (*connect.Response[pb.HeartbeatResponse], error) {
	return connect.NewResponse(&pb.HeartbeatResponse{}), nil
}

func (s *stalledServer) WatchAssignments(ctx context.Context, _ *connect.Request[pb.WatchAssignmentsRequest], _ *connect.ServerStream[pb.Assignments]) error {
	if s.endStream {
		return connect.NewError(connect.CodeUnavailable, errors.New("gone"))
	}
	<-ctx.Done()
	return nil
}

// A node whose assignment stream stays silent past its limit, though its heartbeats go
// through, starts its session over (the leader refreshes the stream every
// rpc.AssignmentsRefresh): a stuck stream must not leave it deaf to its assignments.
func TestSilentAssignmentsReconnect(t *testing.T) {
	for _, srv := range []*stalledServer{{}, {endStream: true}} {
		t.Run(fmt.Sprintf("endStream=%v", srv.endStream), func(t *testing.T) { testReconnect(t, srv) })
	}
}

// testReconnect: a session whose assignment stream is silent (or ends) while its
// heartbeats go through starts over.
func testReconnect(t *testing.T, srv *stalledServer) {
	mux := http.NewServeMux()
	mux.Handle(fireworksv1connect.NewNodeServiceHandler(srv))
	hs := httptest.NewServer(mux)
	defer hs.Close()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", hs.Listener.Addr().String())
	}}
	link := agentlink.NewInProcess("n1", tr, slog.New(slog.DiscardHandler))
	link.SilentLimit = 300 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = link.Run(ctx, (&fakeNode{changed: make(chan struct{}, 1)}).node()) }()
	deadline := time.Now().Add(10 * time.Second)
	for srv.registers.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	if n := srv.registers.Load(); n < 2 {
		t.Fatalf("a silent assignment stream kept the session: %d registrations in 10 s", n)
	}
}
