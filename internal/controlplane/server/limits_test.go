package server

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// allocated runs f and reports the bytes the process allocated meanwhile.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// A gzip body that inflates to 256 MiB, sent to Join (which runs before any credential is
// checked), is refused without the server inflating it into memory; so is a plain body
// beyond rpc.MaxRequestBytes.
func TestRequestBombRefused(t *testing.T) {
	ca, err := pki.CreateCA(t.TempDir(), "test")
	if err != nil {
		t.Fatal(err)
	}
	a := newTestAPI(t, func(s *Server) { s.EnableCluster(ClusterOptions{CA: ca}) })
	var bomb bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&bomb, gzip.BestCompression)
	zero := make([]byte, 1<<20)
	for range 256 {
		_, _ = zw.Write(zero)
	}
	_ = zw.Close()
	post := func(body []byte, gz bool) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, a.url+fireworksv1connect.NodeServiceJoinProcedure, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/proto")
		if gz {
			req.Header.Set("Content-Encoding", "gzip")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("post: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return resp.StatusCode, string(b)
	}
	var code int
	var msg string
	used := allocated(func() { code, msg = post(bomb.Bytes(), true) })
	t.Logf("a %d KiB gzip bomb: HTTP %d %s; %d MiB allocated", bomb.Len()>>10, code, msg, used>>20)
	if code == http.StatusOK || !strings.Contains(msg, "resource_exhausted") || !strings.Contains(msg, "larger than") {
		t.Errorf("the bomb got HTTP %d %s, want resource_exhausted naming the limit", code, msg)
	}
	if used > 64<<20 {
		t.Errorf("the server allocated %d MiB for a %d KiB request", used>>20, bomb.Len()>>10)
	}
	code, msg = post(bytes.Repeat([]byte{0x0a}, rpc.MaxRequestBytes+1), false)
	if code == http.StatusOK || !strings.Contains(msg, "resource_exhausted") {
		t.Errorf("a body of %d bytes got HTTP %d %s", rpc.MaxRequestBytes+1, code, msg)
	}
}

// Oversized spec fields are refused as invalid_argument naming the field; a user token
// cannot hold more sandboxes than the limit (admins can).
func TestSpecLimitsAndQuota(t *testing.T) {
	a := newTestAPI(t, func(s *Server) { s.SetLimits(Limits{SandboxesPerOwner: 2}) })
	ctx := t.Context()
	big := strings.Repeat("x", 300<<10)
	for field, spec := range map[string]*pb.SandboxSpec{
		"env":     {Image: "busybox", Env: []string{"A=" + big}},
		"command": {Image: "busybox", Cmd: []string{big}},
		"image":   {Image: big[:2000]},
	} {
		_, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: spec}))
		wantCode(t, "a spec with a huge "+field, err, connect.CodeInvalidArgument, field)
	}
	for i := range 3 {
		_, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox"}}))
		if i < 2 && err != nil {
			t.Fatalf("create %d: %v", i, err)
		}
		if i == 2 {
			wantCode(t, "a create past the limit", err, connect.CodeResourceExhausted, "holds 2 sandboxes")
		}
	}
	if _, err := a.sandboxes.CreateSandbox(ctx, as(a.admin, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox"}})); err != nil {
		t.Errorf("an admin's create: %v", err)
	}
}

// run --policy is checked as policy apply is, for the ranges every node protects.
func TestCreatePolicyRefusesProtectedForUsers(t *testing.T) {
	a := newTestAPI(t)
	spec := &pb.SandboxSpec{Image: "busybox", Policy: "default allow\nallow 169.254.169.254 tcp 80\n"}
	_, err := a.sandboxes.CreateSandbox(t.Context(), as(a.user, &pb.CreateSandboxRequest{Spec: spec}))
	wantCode(t, "a user's run --policy opening the metadata address", err, connect.CodeInvalidArgument, "only an admin")
	if _, err := a.sandboxes.CreateSandbox(t.Context(), as(a.admin, &pb.CreateSandboxRequest{Spec: spec})); err != nil {
		t.Errorf("an admin's: %v", err)
	}
}

// A user token's calls that wait for a sandbox to start are bounded (each holds a
// goroutine and a stream here); one past the limit is refused at once, an admin's is not
// counted, and a call that stopped waiting frees its place.
func TestWaitingCallsPerToken(t *testing.T) {
	a := newTestAPI(t, func(s *Server) { s.SetLimits(Limits{WaitsPerOwner: 2}) })
	ctx := t.Context()
	// No node: the sandbox stays pending, and a policy set on it waits for it to start.
	created, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox"}}))
	if err != nil {
		t.Fatal(err)
	}
	id := created.Msg.GetSandbox().GetId()
	setPolicy := func(ctx context.Context, token string) error {
		_, err := a.sandboxes.SetPolicy(ctx, as(token, &pb.SetPolicyRequest{Sandbox: id, Policy: "deny 192.0.2.0/24\n"}))
		return err
	}
	wctx, cancel := context.WithCancel(ctx)
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- setPolicy(wctx, a.user) }()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		a.srv.waitMu.Lock()
		n := a.srv.waiting[""]
		for _, c := range a.srv.waiting {
			n = max(n, c)
		}
		a.srv.waitMu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the two calls are not waiting (%d)", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	wantCode(t, "a third waiting call", setPolicy(ctx, a.user), connect.CodeResourceExhausted, "--max-waits-per-token")
	// An admin's wait is not counted: it waits (until its deadline) instead of being refused.
	actx, acancel := context.WithTimeout(ctx, 300*time.Millisecond)
	if err := setPolicy(actx, a.admin); connect.CodeOf(err) == connect.CodeResourceExhausted {
		t.Errorf("an admin's waiting call was refused: %v", err)
	}
	acancel()
	cancel()
	for range 2 {
		<-errs
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		a.srv.waitMu.Lock()
		n := len(a.srv.waiting)
		a.srv.waitMu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ended calls still counted as waiting")
		}
		time.Sleep(10 * time.Millisecond)
	}
	actx, acancel = context.WithTimeout(ctx, 300*time.Millisecond)
	defer acancel()
	if err := setPolicy(actx, a.user); connect.CodeOf(err) == connect.CodeResourceExhausted {
		t.Errorf("a call after the others ended was refused: %v", err)
	}
}

// A user sees its sandbox without what names or locates its node (the node's name, the
// VMM's pid, paths and addresses on the node); an admin sees all of it.
func TestUsersDoNotLearnTheNodes(t *testing.T) {
	a := newTestAPI(t)
	ctx := t.Context()
	if _, err := a.store.RegisterNode(ctx, state.Node{ID: "secret-node-7", Address: "10.9.8.7:1", UpdatedAt: time.Now(),
		Capacity: state.Resources{VCPUs: 4, MemoryMiB: 4096, DiskMiB: 100000}}); err != nil {
		t.Fatal(err)
	}
	created, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox"}}))
	if err != nil {
		t.Fatal(err)
	}
	id := created.Msg.GetSandbox().GetId()
	if res, err := a.store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: id, NodeID: "secret-node-7"}}, scheduler.Config{}, time.Now()); err != nil || res[0].Err != "" {
		t.Fatalf("place: %v %+v", err, res)
	}
	if _, err := a.store.UpdateSandbox(ctx, id, state.Update{Time: time.Now(), Runtime: map[string]string{
		"pid": "4242", "run_dir": "/var/lib/fireworks/run/" + id, "console_log": "/var/lib/x/console.log", "address": "10.201.0.6", "start_mode": "cold"}}); err != nil {
		t.Fatal(err)
	}
	got, err := a.sandboxes.GetSandbox(ctx, as(a.user, &pb.GetSandboxRequest{Sandbox: id}))
	if err != nil {
		t.Fatal(err)
	}
	text := protojson.Format(got.Msg)
	for _, leak := range []string{"secret-node-7", "4242", "/var/lib", "10.201.0.6"} {
		if strings.Contains(text, leak) {
			t.Errorf("a user's view of its sandbox shows %q:\n%s", leak, text)
		}
	}
	if got.Msg.GetSandbox().GetDetails()["start_mode"] != "cold" {
		t.Errorf("a user's view lost the details it may see: %v", got.Msg.GetSandbox().GetDetails())
	}
	list, err := a.sandboxes.ListSandboxes(ctx, as(a.user, &pb.ListSandboxesRequest{All: true}))
	if err != nil || strings.Contains(protojson.Format(list.Msg), "secret-node-7") {
		t.Errorf("a user's list shows the node: %v", err)
	}
	admin, err := a.sandboxes.GetSandbox(ctx, as(a.admin, &pb.GetSandboxRequest{Sandbox: id}))
	if err != nil || admin.Msg.GetSandbox().GetNode() != "secret-node-7" || admin.Msg.GetSandbox().GetDetails()["pid"] != "4242" {
		t.Errorf("an admin's view: %v %v", admin.Msg.GetSandbox(), err)
	}
}

// `stop` of a sandbox waiting to be restarted ends its restart policy, as docker stop does.
func TestStopEndsTheRestartPolicy(t *testing.T) {
	a := newTestAPI(t)
	ctx := t.Context()
	created, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox", Restart: "always"}}))
	if err != nil {
		t.Fatal(err)
	}
	id := created.Msg.GetSandbox().GetId()
	exited, code := state.StatusExited, 0
	if _, err := a.store.UpdateSandbox(ctx, id, state.Update{Status: &exited, ExitCode: &code, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.sandboxes.StopSandbox(ctx, as(a.user, &pb.StopSandboxRequest{Sandbox: id})); err != nil {
		t.Fatal(err)
	}
	sb, err := a.store.GetSandbox(ctx, id)
	if err != nil || sb.StopRequestedAt.IsZero() {
		t.Fatalf("after stop: %+v %v", sb, err)
	}
	pending := state.StatusPending
	if _, err := a.store.UpdateSandbox(ctx, id, state.Update{Restart: true, Status: &pending, Time: time.Now()}); err == nil {
		t.Error("restarted after a stop")
	}
}

// A user token whose snapshots and paused sandboxes take its bound (--max-saved-per-token)
// can keep no more: pause and snapshot create are refused before anything is saved,
// saying which bound; an admin's are not bounded.
func TestSavedStatePerToken(t *testing.T) {
	a := newTestAPI(t, func(s *Server) { s.SetLimits(Limits{SavedMiBPerOwner: 1}) })
	ctx := t.Context()
	user := a.userID(t)
	if _, err := a.store.PutSnapshot(ctx, state.Snapshot{ID: state.NewID(), Name: "big", Owner: user, Node: "n1", Sandbox: "x",
		Image: "busybox", Bytes: 2 << 20, CreatedAt: time.Now()}, 0); err != nil {
		t.Fatal(err)
	}
	r, err := a.sandboxes.CreateSandbox(ctx, as(a.user, &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox"}}))
	if err != nil {
		t.Fatal(err)
	}
	id := r.Msg.GetSandbox().GetId()
	_, err = a.sandboxes.PauseSandbox(ctx, as(a.user, &pb.PauseSandboxRequest{Sandbox: id}))
	wantCode(t, "a pause past the token's saved bound", err, connect.CodeResourceExhausted, "--max-saved-per-token")
	if sb, err := a.store.GetSandbox(ctx, id); err != nil || !sb.PauseRequestedAt.IsZero() {
		t.Errorf("the refused pause was requested anyway: %v", err)
	}
	_, err = a.sandboxes.CreateSnapshot(ctx, as(a.user, &pb.CreateSnapshotRequest{Sandbox: id, Name: "more"}))
	wantCode(t, "a snapshot past the token's saved bound", err, connect.CodeResourceExhausted, "--max-saved-per-token")
	// Saves under way count: of two concurrent calls under the bound, the second waits
	// for none and is refused while the first holds its likely size.
	other := auth.Identity{TokenID: "fresh-token", Role: state.RoleUser}
	release, err := a.srv.savedRoom(ctx, other, 256<<20)
	if err != nil {
		t.Fatalf("a first save under the bound: %v", err)
	}
	if _, err := a.srv.savedRoom(ctx, other, 256<<20); err == nil {
		t.Error("a second save passed while the first held the token's bound")
	}
	release()
	if r2, err := a.srv.savedRoom(ctx, other, 256<<20); err != nil {
		t.Errorf("a save after the first let go: %v", err)
	} else {
		r2()
	}
	// An admin's are not bounded.
	admins, err := a.srv.store.ListTokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range admins {
		if tk.Role == state.RoleAdmin {
			if _, err := a.srv.savedRoom(ctx, auth.Identity{TokenID: tk.ID, Role: tk.Role}, 1<<40); err != nil {
				t.Errorf("an admin's saved states are bounded: %v", err)
			}
		}
	}
}

// What a user reads about a sandbox names no node, node address or node path.
func TestHideNodes(t *testing.T) {
	sb := state.Sandbox{Node: "n7", Spec: state.SandboxSpec{ForkNode: "n9", ForkAddress: "10.1.2.3:7768"}}
	in := "fetch the saved state from node n9: Get https://10.1.2.3:7768/fireworks.node/saved/x: EOF; " +
		"restore device state from /var/lib/fireworks/snapshots/0123456789abcdef/flat/state: bad; on node n7"
	out := hideNodes(sb, in)
	for _, leak := range []string{"n9", "n7", "10.1.2.3", "/var/lib/fireworks"} {
		if strings.Contains(out, leak) {
			t.Errorf("%q left in %q", leak, out)
		}
	}
	if !strings.Contains(out, "restore device state from <node data>/snapshots/") {
		t.Errorf("the path's kind went too: %q", out)
	}
}

// A migration's errors name its nodes every way a node's error does: as "node X", as a
// quoted name (a certificate check), by address with and without its port.
func TestHideNodesOfMigrations(t *testing.T) {
	sb := state.Sandbox{Node: "node-a", Migrations: []state.Migration{{From: "node-a", To: "node-b", ToAddress: "node-b.internal.example:7768"}}}
	in := `live migration failed: dial tcp: lookup node-b.internal.example on 127.0.0.53:53: no such host; ` +
		`tls: peer is "node-b", want "node-c"; the target node node-b could not take it`
	out := hideNodes(sb, in)
	for _, leak := range []string{"node-b", "internal.example"} {
		if strings.Contains(out, leak) {
			t.Errorf("%q left in %q", leak, out)
		}
	}
}
