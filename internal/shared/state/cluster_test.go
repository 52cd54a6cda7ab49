package state

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"
)

func TestNodesLifecycle(t *testing.T) {
	f := newFSM(quietLogger(t))
	reg := func(n Node) any {
		return applyAll(f, [][]byte{mustCmd(t, cmdUpsertNode, upsertNodeCmd{Node: n})})[0]
	}
	n1 := Node{ID: "n1", Address: "10.0.0.1:7767", Capacity: Resources{VCPUs: 4, MemoryMiB: 8192}, Labels: map[string]string{"zone": "a"}, UpdatedAt: t0}
	got, ok := reg(n1).(Node)
	if !ok || got.Status != NodeReady || !got.RegisteredAt.Equal(t0) {
		t.Fatalf("register: %#v", got)
	}
	if err, _ := reg(Node{ID: "", UpdatedAt: t0}).(error); !errors.Is(err, ErrInvalid) {
		t.Errorf("node without ID: %v", err)
	}
	if err, _ := reg(Node{ID: "x"}).(error); !errors.Is(err, ErrInvalid) {
		t.Errorf("node without time: %v", err)
	}

	// Drain implies cordon; both survive a re-registration (an operator set them), and a
	// re-registration brings a down node back to ready.
	upd := func(u NodeUpdate) any {
		return applyAll(f, [][]byte{mustCmd(t, cmdUpdateNode, updateNodeCmd{ID: "n1", Update: u})})[0]
	}
	if n, _ := upd(NodeUpdate{Draining: ptr(true), Time: t0.Add(time.Second)}).(Node); !n.Draining || !n.Cordoned {
		t.Fatalf("drain: %#v", n)
	}
	if n, _ := upd(NodeUpdate{Status: ptr(NodeDown), StatusReason: ptr("missed heartbeats"), Time: t0.Add(2 * time.Second)}).(Node); n.Status != NodeDown {
		t.Fatalf("down: %#v", n)
	}
	if err, _ := upd(NodeUpdate{Status: ptr(NodeStatus("sideways")), Time: t0}).(error); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown status: %v", err)
	}
	n1.UpdatedAt = t0.Add(3 * time.Second)
	n1.Address = "10.0.0.9:7767"
	got = reg(n1).(Node)
	if got.Status != NodeReady || !got.Draining || !got.Cordoned || !got.RegisteredAt.Equal(t0) || got.Address != "10.0.0.9:7767" {
		t.Fatalf("re-register: %#v", got)
	}

	// A node with a live sandbox cannot be forgotten.
	sb := Sandbox{ID: "s1", Spec: SandboxSpec{Image: "x"}, CreatedAt: t0}
	applyAll(f, [][]byte{
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb}),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "s1", Update: Update{Node: ptr("n1"), Status: ptr(StatusStarting), Time: t0}}),
	})
	res := applyAll(f, [][]byte{mustCmd(t, cmdDeleteNode, deleteNodeCmd{ID: "n1"})})
	if err, _ := res[0].(error); !errors.Is(err, ErrInvalid) {
		t.Fatalf("delete node with live sandbox: %v", res[0])
	}
	applyAll(f, [][]byte{mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "s1", Update: Update{Status: ptr(StatusLost), Time: t0}})})
	res = applyAll(f, [][]byte{mustCmd(t, cmdDeleteNode, deleteNodeCmd{ID: "n1"}), mustCmd(t, cmdDeleteNode, deleteNodeCmd{ID: "n1"})})
	if res[0] != nil {
		t.Fatalf("delete node: %v", res[0])
	}
	if err, _ := res[1].(error); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete twice: %v", res[1])
	}
}

func TestTokens(t *testing.T) {
	f := newFSM(quietLogger(t))
	tok := Token{ID: "t1", Name: "ci", Role: RoleUser, SecretHash: "h", CreatedAt: t0}
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdCreateToken, createTokenCmd{tok}),
		mustCmd(t, cmdCreateToken, createTokenCmd{tok}),
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "t2", Role: "root", SecretHash: "h", CreatedAt: t0}}),
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "t3", Role: RoleAdmin, CreatedAt: t0}}),
	})
	if res[0] != nil || !errors.Is(res[1].(error), ErrExists) || !errors.Is(res[2].(error), ErrInvalid) || !errors.Is(res[3].(error), ErrInvalid) {
		t.Fatalf("create results: %v", res)
	}
	if got, err := f.getToken("t1"); err != nil || got != tok {
		t.Fatalf("get: %#v %v", got, err)
	}
	res = applyAll(f, [][]byte{mustCmd(t, cmdDeleteToken, deleteTokenCmd{ID: "t1"}), mustCmd(t, cmdDeleteToken, deleteTokenCmd{ID: "t1"})})
	if res[0] != nil || !errors.Is(res[1].(error), ErrNotFound) {
		t.Fatalf("revoke results: %v", res)
	}
	exp := Token{ExpiresAt: t0}
	if exp.ValidAt(t0) || !exp.ValidAt(t0.Add(-time.Second)) || !(Token{}).ValidAt(t0) {
		t.Error("ValidAt")
	}
}

// Nodes and tokens live through a snapshot and a reopen of the real store.
func TestStoreNodesAndTokensSurviveSnapshot(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	opts := Options{Dir: dir, NodeID: "n1", TrailingLogs: 1}
	s := openStore(t, opts)
	n, err := s.RegisterNode(ctx, Node{ID: "agent-1", Address: "a:1", Capacity: Resources{VCPUs: 2, MemoryMiB: 1024, DiskMiB: 10000}, Images: []string{"sha256:aa"}, UpdatedAt: t0})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateToken(ctx, Token{ID: "tok", Role: RoleAdmin, SecretHash: "x", CreatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if err := s.raft.Snapshot().Error(); err != nil {
		t.Fatalf("force snapshot: %v", err)
	}
	cordoned, err := s.UpdateNode(ctx, "agent-1", NodeUpdate{Cordoned: ptr(true), Time: t0.Add(time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateToken(ctx, Token{ID: "join", Role: RoleJoin, SecretHash: "y", CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	wantTokens, _ := s.ListTokens(ctx)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, opts)
	nodes, err := s.ListNodes(ctx)
	if err != nil || len(nodes) != 1 || !reflect.DeepEqual(nodes[0], cordoned) || !cordoned.Cordoned || nodes[0].RegisteredAt != n.RegisteredAt {
		t.Fatalf("nodes after reopen: %#v %v\nwant %#v", nodes, err, cordoned)
	}
	toks, err := s.ListTokens(ctx)
	if err != nil || !reflect.DeepEqual(toks, wantTokens) || len(toks) != 2 {
		t.Fatalf("tokens after reopen: %#v %v", toks, err)
	}
	if _, err := s.GetNode(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown node: %v", err)
	}
}

func TestRestartAndStopRequest(t *testing.T) {
	f := newFSM(quietLogger(t))
	upd := func(u Update) any {
		return applyAll(f, [][]byte{mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "s1", Update: u})})[0]
	}
	applyAll(f, [][]byte{mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "s1", Spec: SandboxSpec{Image: "x", Restart: RestartAlways}, CreatedAt: t0}})})
	upd(Update{Status: ptr(StatusStarting), Node: ptr("n1"), Time: t0.Add(time.Second)})
	upd(Update{Status: ptr(StatusRunning), Runtime: map[string]string{"pid": "1"}, Time: t0.Add(2 * time.Second)})
	upd(Update{Status: ptr(StatusLost), Reason: "node n1 down", Time: t0.Add(3 * time.Second)})

	if err, _ := upd(Update{Restart: true, Time: t0.Add(4 * time.Second)}).(error); !errors.Is(err, ErrInvalid) {
		t.Fatalf("restart without status pending: %v", err)
	}
	got, ok := upd(Update{Restart: true, Status: ptr(StatusPending), Reason: "restarting: node n1 down", Time: t0.Add(4 * time.Second)}).(Sandbox)
	if !ok || got.Status != StatusPending || got.Restarts != 1 || got.Node != "" || got.Runtime != nil || !got.StartedAt.IsZero() {
		t.Fatalf("after restart: %#v", got)
	}
	if last := got.Events[len(got.Events)-1]; last.Status != StatusPending || last.Reason != "restarting: node n1 down" {
		t.Errorf("restart event: %#v", last)
	}
	// A user's stop wins over the restart policy.
	grace := 5 * time.Second
	got = upd(Update{StopGrace: &grace, Time: t0.Add(5 * time.Second)}).(Sandbox)
	if !got.StopRequestedAt.Equal(t0.Add(5*time.Second)) || got.StopGrace != grace {
		t.Fatalf("stop request: %#v", got)
	}
	upd(Update{Status: ptr(StatusFailed), Time: t0.Add(6 * time.Second)})
	if err, _ := upd(Update{Restart: true, Status: ptr(StatusPending), Time: t0.Add(7 * time.Second)}).(error); !errors.Is(err, ErrInvalidTransition) {
		t.Fatalf("restart after a user stop: %v", err)
	}
	for _, p := range []string{"", "never", "on-failure", "always"} {
		if _, err := ParseRestartPolicy(p); err != nil {
			t.Errorf("policy %q: %v", p, err)
		}
	}
	if _, err := ParseRestartPolicy("sometimes"); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad policy: %v", err)
	}
}

// A report pinned to an earlier run (restart count) or another node is refused.
func TestStaleReportsRefused(t *testing.T) {
	f := newFSM(quietLogger(t))
	upd := func(u Update) any {
		return applyAll(f, [][]byte{mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "s1", Update: u})})[0]
	}
	applyAll(f, [][]byte{mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "s1", Spec: SandboxSpec{Image: "x"}, CreatedAt: t0}})})
	upd(Update{Status: ptr(StatusStarting), Node: ptr("n1"), Time: t0})
	upd(Update{Restart: true, Status: ptr(StatusPending), Time: t0.Add(time.Second)})
	upd(Update{Node: ptr("n1"), Time: t0.Add(2 * time.Second)})
	if err, _ := upd(Update{Status: ptr(StatusStarting), IfNode: ptr("n1"), IfRestarts: ptr(0), Time: t0.Add(3 * time.Second)}).(error); !errors.Is(err, ErrStaleReport) {
		t.Fatalf("report from run 0 on run 1: %v", err)
	}
	if err, _ := upd(Update{Status: ptr(StatusStarting), IfNode: ptr("n2"), IfRestarts: ptr(1), Time: t0.Add(3 * time.Second)}).(error); !errors.Is(err, ErrStaleReport) {
		t.Fatalf("report from another node: %v", err)
	}
	if sb, ok := upd(Update{Status: ptr(StatusStarting), IfNode: ptr("n1"), IfRestarts: ptr(1), Time: t0.Add(3 * time.Second)}).(Sandbox); !ok || sb.Status != StatusStarting {
		t.Fatalf("current report refused")
	}
}

// A join is recorded with a join token's use or with another proof the server checked
// (Via), never both or neither; one by proof spends nothing and takes the node's name.
func TestRecordJoinVia(t *testing.T) {
	s := openStore(t, Options{Dir: t.TempDir()})
	ctx := context.Background()
	now := time.Now()
	for _, bad := range []JoinRecord{
		{Node: "n1", Serial: "a1", Time: now, NotAfter: now.Add(time.Hour)},
		{Node: "n1", Serial: "a1", Time: now, NotAfter: now.Add(time.Hour), Token: "t", Via: "kubernetes"},
	} {
		if err := s.RecordJoin(ctx, bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("RecordJoin(%+v) = %v, want ErrInvalid", bad, err)
		}
	}
	if s.HasLiveCerts("n1", now) {
		t.Fatal("a refused join took the name")
	}
	if err := s.RecordJoin(ctx, JoinRecord{Node: "n1", Serial: "a1", Time: now, NotAfter: now.Add(time.Hour), Via: "kubernetes"}); err != nil {
		t.Fatal(err)
	}
	if !s.HasLiveCerts("n1", now) {
		t.Error("a join by Kubernetes token did not take the node's name")
	}
	// The node proven again (a join whose answer was lost, a wiped data directory): its
	// new certificate replaces the old, which is revoked.
	if err := s.RecordJoin(ctx, JoinRecord{Node: "n1", Serial: "a2", Time: now, NotAfter: now.Add(time.Hour), Via: "kubernetes"}); err != nil {
		t.Fatalf("n1 proven again: %v", err)
	}
	if !s.CertRevoked("a1", "n1") || s.CertRevoked("a2", "n1") {
		t.Errorf("after n1 joined again: a1 revoked %v (want true), a2 revoked %v (want false)", s.CertRevoked("a1", "n1"), s.CertRevoked("a2", "n1"))
	}
	// A join token proves no node: a name with a live certificate is not its, however
	// the join got past the server's own check (two racing): the state decides.
	if err := s.CreateToken(ctx, Token{ID: "jt", Name: "j", Role: RoleJoin, SecretHash: "h", MaxUses: 5, CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordJoin(ctx, JoinRecord{Node: "n1", Serial: "a3", Time: now, NotAfter: now.Add(time.Hour), Token: "jt"}); !errors.Is(err, ErrExists) {
		t.Errorf("a join token's join of n1: %v, want ErrExists", err)
	}
}
