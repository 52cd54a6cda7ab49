package server

import (
	"context"
	"errors"
	"log/slog"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// testAPI is a server without a local node (as a cluster server is) over a real state
// store, served on loopback, with an admin and a user token.
type testAPI struct {
	srv         *Server
	store       *state.Store
	images      fireworksv1connect.ImageServiceClient
	sandboxes   fireworksv1connect.SandboxServiceClient
	cluster     fireworksv1connect.ClusterServiceClient
	admin, user string
	url         string
}

func newTestAPI(t testing.TB, setup ...func(*Server)) *testAPI {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	store, err := state.Open(ctx, state.Options{Dir: t.TempDir(), NodeID: "test", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	a := &testAPI{srv: New(store, log), store: store}
	for _, r := range []state.Role{state.RoleAdmin, state.RoleUser} {
		secret, rec := auth.New(r, string(r), "", time.Now(), 0)
		if err := store.CreateToken(ctx, rec); err != nil {
			t.Fatal(err)
		}
		if r == state.RoleAdmin {
			a.admin = secret
		} else {
			a.user = secret
		}
	}
	for _, f := range setup {
		f(a.srv)
	}
	hs := httptest.NewServer(a.srv.Handler())
	t.Cleanup(hs.Close)
	a.url = hs.URL
	a.images = fireworksv1connect.NewImageServiceClient(hs.Client(), hs.URL)
	a.sandboxes = fireworksv1connect.NewSandboxServiceClient(hs.Client(), hs.URL)
	a.cluster = fireworksv1connect.NewClusterServiceClient(hs.Client(), hs.URL)
	return a
}

// userID is the ID of a.user's token (what records its resources' owner).
func (a *testAPI) userID(t testing.TB) string {
	t.Helper()
	toks, err := a.store.ListTokens(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range toks {
		if tk.Role == state.RoleUser {
			return tk.ID
		}
	}
	t.Fatal("the test API has no user token")
	return ""
}

func as[T any](token string, msg *T) *connect.Request[T] {
	r := connect.NewRequest(msg)
	r.Header().Set("Authorization", "Bearer "+token)
	return r
}

func wantCode(t *testing.T, what string, err error, code connect.Code, text string) {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != code || !strings.Contains(ce.Message(), text) {
		t.Errorf("%s: got %v, want %v containing %q", what, err, code, text)
	}
}

func TestPoolAPI(t *testing.T) {
	a := newTestAPI(t)
	ctx := context.Background()

	set := func(token string, p *pb.Pool) (*pb.Pool, error) {
		r, err := a.images.SetPool(ctx, as(token, &pb.SetPoolRequest{Pool: p}))
		if err != nil {
			return nil, err
		}
		return r.Msg.GetPool(), nil
	}
	_, err := set(a.user, &pb.Pool{Image: "reg/app:1", Size: 2})
	wantCode(t, "user sets a pool", err, connect.CodePermissionDenied, "admin")

	got, err := set(a.admin, &pb.Pool{Image: "reg/app:1", Size: 2, Vcpus: 2, MemoryMib: 512})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetSize() != 2 || got.GetMax() != 2 || got.GetVcpus() != 2 || got.GetMemoryMib() != 512 || got.GetUpdatedAt() == nil {
		t.Errorf("SetPool answered %v", got)
	}
	if _, err := set(a.admin, &pb.Pool{Image: "reg/other:1", Size: 1, Max: 3}); err != nil {
		t.Fatal(err)
	}
	// A manager changes only the pools it manages; an operator may take any over.
	_, err = set(a.admin, &pb.Pool{Image: "reg/app:1", Size: 5, ManagedBy: "agent-sandbox"})
	wantCode(t, "a manager changes an operator's pool", err, connect.CodeFailedPrecondition, "an operator's")
	if got, err := set(a.admin, &pb.Pool{Image: "reg/managed:1", Size: 1, ManagedBy: "agent-sandbox"}); err != nil || got.GetManagedBy() != "agent-sandbox" {
		t.Fatalf("a managed pool: %v, %v", got, err)
	}
	_, err = set(a.admin, &pb.Pool{Image: "reg/managed:1", Size: 2, ManagedBy: "someone-else"})
	wantCode(t, "another manager changes a managed pool", err, connect.CodeFailedPrecondition, "managed by agent-sandbox")
	if got, err := set(a.admin, &pb.Pool{Image: "reg/managed:1", Size: 2}); err != nil || got.GetManagedBy() != "" {
		t.Fatalf("an operator taking a managed pool over: %v, %v", got, err)
	}
	if _, err := a.images.DeletePool(ctx, as(a.admin, &pb.DeletePoolRequest{Image: "reg/managed:1"})); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		pool *pb.Pool
		text string
	}{
		{&pb.Pool{Size: 1}, "image"},
		{&pb.Pool{Image: "x", Size: 65}, "size 65"},
		{&pb.Pool{Image: "x", Size: 3, Max: 2}, "max 2"},
		{&pb.Pool{Image: "x", Size: 1, Vcpus: -1}, "negative"},
		{&pb.Pool{Image: "x", Size: 1, MemoryMib: 64}, "memory"},
	} {
		_, err := set(a.admin, tc.pool)
		wantCode(t, "SetPool("+tc.pool.String()+")", err, connect.CodeInvalidArgument, tc.text)
	}

	// Users may not look (pools are cluster configuration); the list is sorted by image.
	_, err = a.images.ListPools(ctx, as(a.user, &pb.ListPoolsRequest{}))
	wantCode(t, "a user's ListPools", err, connect.CodePermissionDenied, "admin")
	ls, err := a.images.ListPools(ctx, as(a.admin, &pb.ListPoolsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	var imgs []string
	for _, p := range ls.Msg.GetPools() {
		imgs = append(imgs, p.GetImage())
	}
	if !slices.Equal(imgs, []string{"reg/app:1", "reg/other:1"}) {
		t.Errorf("ListPools images = %v", imgs)
	}

	_, err = a.images.DeletePool(ctx, as(a.user, &pb.DeletePoolRequest{Image: "reg/app:1"}))
	wantCode(t, "user deletes a pool", err, connect.CodePermissionDenied, "admin")
	if _, err := a.images.DeletePool(ctx, as(a.admin, &pb.DeletePoolRequest{Image: "reg/app:1"})); err != nil {
		t.Fatal(err)
	}
	_, err = a.images.DeletePool(ctx, as(a.admin, &pb.DeletePoolRequest{Image: "reg/app:1"}))
	wantCode(t, "deleting a missing pool", err, connect.CodeNotFound, "reg/app:1")
	// Size 0 removes too.
	if got, err := set(a.admin, &pb.Pool{Image: "reg/other:1"}); err != nil || got.GetSize() != 0 {
		t.Fatalf("set size 0: %v %v", got, err)
	}
	if ls, _ := a.images.ListPools(ctx, as(a.admin, &pb.ListPoolsRequest{})); len(ls.Msg.GetPools()) != 0 {
		t.Errorf("pools left: %v", ls.Msg.GetPools())
	}
}

// Template calls go to the nodes: with none ready they say so; a build names one node
// when several are ready.
func TestTemplatesGoToNodes(t *testing.T) {
	a := newTestAPI(t)
	ctx := context.Background()
	_, err := a.images.WarmImage(ctx, as(a.user, &pb.WarmImageRequest{Ref: "reg/app:1"}))
	wantCode(t, "a user's WarmImage", err, connect.CodePermissionDenied, "admin")
	_, err = a.images.WarmImage(ctx, as(a.admin, &pb.WarmImageRequest{Ref: "reg/app:1"}))
	wantCode(t, "WarmImage without nodes", err, connect.CodeFailedPrecondition, "no node is ready")
	_, err = a.images.ListTemplates(ctx, as(a.user, &pb.ListTemplatesRequest{}))
	wantCode(t, "a user's ListTemplates", err, connect.CodePermissionDenied, "admin")
	_, err = a.images.ListTemplates(ctx, as(a.admin, &pb.ListTemplatesRequest{}))
	wantCode(t, "ListTemplates without nodes", err, connect.CodeFailedPrecondition, "no node is ready")
	_, err = a.images.WarmImage(ctx, as(a.admin, &pb.WarmImageRequest{}))
	wantCode(t, "WarmImage without ref", err, connect.CodeInvalidArgument, "no image")
	_, err = a.images.WarmImage(ctx, as(a.user, &pb.WarmImageRequest{Ref: "oci:/etc"}))
	wantCode(t, "user warms a server path", err, connect.CodePermissionDenied, "admin")

	for _, n := range []string{"n1", "n2"} {
		if _, err := a.store.RegisterNode(ctx, state.Node{ID: n, Address: "127.0.0.1:1", Capacity: state.Resources{VCPUs: 2, MemoryMiB: 1024}, UpdatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	_, err = a.images.WarmImage(ctx, as(a.admin, &pb.WarmImageRequest{Ref: "reg/app:1"}))
	wantCode(t, "WarmImage with two nodes ready", err, connect.CodeInvalidArgument, "--node (ready: n1, n2)")
	_, err = a.images.WarmImage(ctx, as(a.admin, &pb.WarmImageRequest{Ref: "reg/app:1", Node: "n9"}))
	wantCode(t, "WarmImage on an unknown node", err, connect.CodeNotFound, `no node "n9"`)
}

func TestCreateSandboxBootMode(t *testing.T) {
	a := newTestAPI(t)
	ctx := context.Background()
	create := func(boot string) (*pb.Sandbox, error) {
		r, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "reg/app:1", Boot: boot}}))
		if err != nil {
			return nil, err
		}
		return r.Msg.GetSandbox(), nil
	}
	_, err := create("warm")
	wantCode(t, "boot warm", err, connect.CodeInvalidArgument, `boot mode "warm"`)
	for boot, want := range map[string]string{"": "auto", "auto": "auto", "restore": "restore", "cold": "cold"} {
		sb, err := create(boot)
		if err != nil {
			t.Fatalf("boot %q: %v", boot, err)
		}
		got, err := a.sandboxes.GetSandbox(ctx, as(a.user, &pb.GetSandboxRequest{Sandbox: sb.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		if b := got.Msg.GetSandbox().GetSpec().GetBoot(); b != want {
			t.Errorf("boot %q stored as %q, want %q", boot, b, want)
		}
	}
}

// Heartbeats carry locality (written to the state only when it changes) and pool
// reports (kept in memory, shown by ListPools when a node does not answer at once).
func TestHeartbeatWarmAndPools(t *testing.T) {
	a := newTestAPI(t)
	ctx := context.Background()
	for _, id := range []string{"n1", "n2"} {
		if _, err := a.store.RegisterNode(ctx, state.Node{ID: id, Address: id + ":1", Capacity: state.Resources{VCPUs: 2, MemoryMiB: 2048}, UpdatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.images.SetPool(ctx, as(a.admin, &pb.SetPoolRequest{Pool: &pb.Pool{Image: "reg/app:1", Size: 2, Max: 4}})); err != nil {
		t.Fatal(err)
	}
	ns := &nodeService{a.srv}
	beat := func(node string, m *pb.HeartbeatRequest) *pb.HeartbeatResponse {
		t.Helper()
		resp, err := ns.Heartbeat(context.WithValue(ctx, agentKey{}, node), connect.NewRequest(m))
		if err != nil {
			t.Fatalf("heartbeat of %s: %v", node, err)
		}
		return resp.Msg
	}
	n1Pools := []*pb.PoolNodeStatus{{Node: "someone-else", Image: "reg/app:1", Digest: "sha256:d1", Target: 3, Ready: 2, Filling: 1, ClaimsLastMinute: 7}}
	beat("n1", &pb.HeartbeatRequest{Warm: []string{"sha256:d1", "reg/app:1", "reg/app:1"}, WarmChanged: true, Pools: n1Pools})
	beat("n2", &pb.HeartbeatRequest{Pools: []*pb.PoolNodeStatus{{Image: "reg/app:1", Error: "pull failed:\nno such host"}, {Image: "reg/unconfigured:1", Ready: 1, Local: true, Size: 1, Max: 3}, {Image: "reg/removed:1", Ready: 1}}})

	n1, err := a.store.GetNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(n1.Warm, []string{"reg/app:1", "sha256:d1"}) {
		t.Errorf("n1 warm = %v, want sorted without duplicates", n1.Warm)
	}
	// Unchanged (flag not set): no write.
	beat("n1", &pb.HeartbeatRequest{Warm: nil, WarmChanged: false, Pools: n1Pools})
	if n, _ := a.store.GetNode(ctx, "n1"); !n.UpdatedAt.Equal(n1.UpdatedAt) || len(n.Warm) != 2 {
		t.Errorf("a heartbeat without changes wrote the node: %+v", n)
	}

	ls, err := a.images.ListPools(ctx, as(a.admin, &pb.ListPoolsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	pools := ls.Msg.GetPools()
	// A pool only a node's own configuration (--warm-pool) has is listed after the
	// cluster-wide ones, with the size the node gives it.
	if len(pools) != 2 || pools[1].GetImage() != "reg/unconfigured:1" || pools[1].GetSize() != 1 || pools[1].GetMax() != 3 ||
		len(pools[1].GetNodes()) != 1 || pools[1].GetNodes()[0].GetReady() != 1 {
		t.Fatalf("ListPools = %v", pools)
	}
	nodes := pools[0].GetNodes()
	if len(nodes) != 2 || nodes[0].GetNode() != "n1" || nodes[1].GetNode() != "n2" {
		t.Fatalf("pool nodes = %v", nodes)
	}
	if n := nodes[0]; n.GetReady() != 2 || n.GetFilling() != 1 || n.GetTarget() != 3 || n.GetClaimsLastMinute() != 7 || n.GetDigest() != "sha256:d1" {
		t.Errorf("n1's report = %v", n)
	}
	if !strings.Contains(nodes[1].GetError(), "no such host") {
		t.Errorf("n2's report = %v", nodes[1])
	}

	// A node that is down does not count.
	down, why := state.NodeDown, "missed heartbeats"
	if _, err := a.store.UpdateNode(ctx, "n2", state.NodeUpdate{Status: &down, StatusReason: &why, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	ls, _ = a.images.ListPools(ctx, as(a.admin, &pb.ListPoolsRequest{}))
	if nodes := ls.Msg.GetPools()[0].GetNodes(); len(nodes) != 1 || nodes[0].GetNode() != "n1" {
		t.Errorf("with n2 down: %v", nodes)
	}
	// Each heartbeat's report replaces the last: a node without pools reports none.
	beat("n1", &pb.HeartbeatRequest{})
	ls, _ = a.images.ListPools(ctx, as(a.admin, &pb.ListPoolsRequest{}))
	if nodes := ls.Msg.GetPools()[0].GetNodes(); len(nodes) != 0 {
		t.Errorf("after an empty report: %v", nodes)
	}
}
