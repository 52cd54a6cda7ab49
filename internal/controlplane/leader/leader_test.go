package leader

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// clock is a fake clock the tests advance by hand: passes are driven with Pass, so no
// test sleeps or depends on timing.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// gatedStore is a real single-node Store whose leadership the test decides.
//
// It also checks the pass's filter (attention): the tests' passes see every sandbox
// (env.pass), and the pass's every write to a sandbox must be to one attention selects
// as the state stands then, or a pass that sees only those would have missed it.
type gatedStore struct {
	*state.Store
	follower atomic.Bool
	t        *testing.T
	inPass   atomic.Bool
}

func (g *gatedStore) IsLeader() bool { return !g.follower.Load() && g.Store.IsLeader() }

func (g *gatedStore) checkAttention(id, what string) {
	if !g.inPass.Load() {
		return
	}
	if sb, ok := g.Store.LocalSandbox(id); ok && !attention(g.Store.LocalNodes())(&sb) {
		g.t.Errorf("a pass %s sandbox %s, which attention leaves out of the pass's reads: %+v", what, id, sb)
	}
}

func (g *gatedStore) UpdateSandbox(ctx context.Context, id string, u state.Update) (state.Sandbox, error) {
	g.checkAttention(id, "updated")
	return g.Store.UpdateSandbox(ctx, id, u)
}

func (g *gatedStore) PlaceSandboxes(ctx context.Context, plans []state.Plan, cfg scheduler.Config, now time.Time) ([]state.PlanResult, error) {
	for _, p := range plans {
		g.checkAttention(p.SandboxID, "placed")
	}
	return g.Store.PlaceSandboxes(ctx, plans, cfg, now)
}

func (g *gatedStore) ResumeSandbox(ctx context.Context, id, node string, cfg scheduler.Config, now, endAt time.Time) (state.Sandbox, error) {
	g.checkAttention(id, "resumed")
	return g.Store.ResumeSandbox(ctx, id, node, cfg, now, endAt)
}

// everything is the pass's filter in the tests: every sandbox.
func everything([]state.Node) func(*state.Sandbox) bool {
	return func(*state.Sandbox) bool { return true }
}

type env struct {
	t     *testing.T
	ctx   context.Context
	store *gatedStore
	clock *clock
	m     *Manager
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	s, err := state.Open(ctx, state.Options{Dir: t.TempDir(), NodeID: "s1", Logger: quiet()})
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	c := &clock{now: t0}
	g := &gatedStore{Store: s, t: t}
	m := New(g, Config{Now: c.Now}, quiet())
	m.attention = everything
	return &env{t: t, ctx: ctx, store: g, clock: c, m: m}
}

func (e *env) node(id string, vcpus, mem int, labels map[string]string) {
	e.t.Helper()
	if _, err := e.store.RegisterNode(e.ctx, state.Node{ID: id, Address: id + ":1", Labels: labels,
		Capacity: state.Resources{VCPUs: vcpus, MemoryMiB: mem}, UpdatedAt: e.clock.Now()}); err != nil {
		e.t.Fatal(err)
	}
	e.m.Heartbeat(id)
}

// sandbox creates a pending sandbox; creation times follow the clock plus a sequence so
// "oldest first" is well defined.
func (e *env) sandbox(id string, mem int, policy state.RestartPolicy) {
	e.t.Helper()
	sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: mem, Restart: policy}, CreatedAt: e.clock.Now()}
	if err := e.store.CreateSandbox(e.ctx, sb); err != nil {
		e.t.Fatal(err)
	}
	e.clock.Add(time.Millisecond)
}

func (e *env) pass() {
	e.t.Helper()
	e.store.inPass.Store(true)
	defer e.store.inPass.Store(false)
	if err := e.m.Pass(e.ctx); err != nil {
		e.t.Fatalf("pass: %v", err)
	}
}

func (e *env) get(id string) state.Sandbox {
	e.t.Helper()
	sb, err := e.store.GetSandbox(e.ctx, id)
	if err != nil {
		e.t.Fatal(err)
	}
	return sb
}

func (e *env) getNode(id string) state.Node {
	e.t.Helper()
	n, err := e.store.GetNode(e.ctx, id)
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

// report plays the node's part: status changes as an agent reports them.
func (e *env) report(id string, st state.Status, code int) {
	e.t.Helper()
	u := state.Update{Status: &st, Time: e.clock.Now()}
	if st.Terminal() {
		u.ExitCode = &code
		u.Reason = "command ended"
	}
	if _, err := e.store.UpdateSandbox(e.ctx, id, u); err != nil {
		e.t.Fatalf("report %s %s: %v", id, st, err)
	}
}

// run reports a placed sandbox starting and running on its node.
func (e *env) run(id string) {
	e.t.Helper()
	e.report(id, state.StatusStarting, 0)
	e.report(id, state.StatusRunning, 0)
}

func hasEvent(sb state.Sandbox, st state.Status, reasonPart string) bool {
	for _, ev := range sb.Events {
		if ev.Status == st && strings.Contains(ev.Reason, reasonPart) {
			return true
		}
	}
	return false
}

// used sums what live sandboxes reserve per node.
func (e *env) used() map[string]int {
	e.t.Helper()
	sbs, err := e.store.ListSandboxes(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[string]int{}
	for _, sb := range sbs {
		if sb.Node != "" && !sb.Status.Terminal() {
			out[sb.Node] += sb.Spec.Reserved().MemoryMiB
		}
	}
	return out
}

func TestPlacesPendingSandboxesOldestFirst(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 4, 1024, nil)
	e.node("n2", 4, 1024, nil)
	for _, id := range []string{"sb-a", "sb-b", "sb-c", "sb-d", "sb-e"} {
		e.sandbox(id, 512, state.RestartNever)
	}
	e.pass()
	placed := map[string]string{}
	for _, id := range []string{"sb-a", "sb-b", "sb-c", "sb-d"} {
		sb := e.get(id)
		if sb.Node == "" || sb.Status != state.StatusPending || !hasEvent(sb, state.StatusPending, "placed on node "+sb.Node) {
			t.Fatalf("%s not placed: node %q events %+v", id, sb.Node, sb.Events)
		}
		placed[id] = sb.Node
	}
	// Bin-packing fills n1 first; the youngest does not fit anywhere.
	if placed["sb-a"] != "n1" || placed["sb-b"] != "n1" || placed["sb-c"] != "n2" {
		t.Errorf("placement = %v", placed)
	}
	if sb := e.get("sb-e"); sb.Node != "" || !strings.Contains(sb.Reason, "no node fits") {
		t.Errorf("youngest: node %q reason %q", sb.Node, sb.Reason)
	}
	for n, mem := range e.used() {
		if mem > 1024 {
			t.Errorf("node %s overcommitted: %d MiB", n, mem)
		}
	}
}

func TestNoFitReasonThenPlacedWhenCapacityFrees(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 2, 1024, nil)
	e.sandbox("big-1", 768, state.RestartNever)
	e.sandbox("big-2", 768, state.RestartNever)
	e.pass()
	if sb := e.get("big-1"); sb.Node != "n1" {
		t.Fatalf("big-1 on %q", sb.Node)
	}
	sb := e.get("big-2")
	want := "no node fits: 1 node lacks memory (need 768 MiB, most free 256 MiB)"
	if sb.Node != "" || sb.Status != state.StatusPending || !strings.Contains(sb.Reason, want) {
		t.Fatalf("big-2: node %q status %s reason %q", sb.Node, sb.Status, sb.Reason)
	}
	// Another pass with nothing changed writes nothing: same reason, no new event.
	before := e.get("big-2")
	e.clock.Add(time.Second)
	e.pass()
	if after := e.get("big-2"); after.Reason != before.Reason || len(after.Events) != len(before.Events) {
		t.Fatalf("idle pass changed big-2: %+v", after)
	}
	e.run("big-1")
	e.report("big-1", state.StatusExited, 0)
	e.pass()
	if sb := e.get("big-2"); sb.Node != "n1" || sb.Reason != "placed on node n1" {
		t.Fatalf("big-2 after capacity freed: node %q reason %q", sb.Node, sb.Reason)
	}
}

func TestNodeDownLosesAndReplacesPerPolicy(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	e.sandbox("never", 256, state.RestartNever)
	e.sandbox("onfail", 256, state.RestartOnFailure)
	e.sandbox("always", 256, state.RestartAlways)
	e.sandbox("stopped", 256, state.RestartAlways)
	e.sandbox("unstarted", 256, state.RestartNever)
	e.pass()
	for _, id := range []string{"never", "onfail", "always", "stopped"} {
		e.run(id)
	}
	grace := time.Second
	if _, err := e.store.UpdateSandbox(e.ctx, "stopped", state.Update{StopGrace: &grace, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.node("n2", 8, 4096, nil)

	// n2 keeps beating, n1 falls silent: nothing happens within the TTL...
	e.clock.Add(10 * time.Second)
	e.m.Heartbeat("n2")
	e.pass()
	if n := e.getNode("n1"); n.Status != state.NodeReady {
		t.Fatalf("n1 down within its TTL: %+v", n)
	}
	// ...and past it n1 is down.
	e.clock.Add(6 * time.Second)
	e.m.Heartbeat("n2")
	e.pass()
	if n := e.getNode("n1"); n.Status != state.NodeDown || n.StatusReason != "missed heartbeats for 15s" {
		t.Fatalf("n1 = %s %q", n.Status, n.StatusReason)
	}
	if n := e.getNode("n2"); n.Status != state.NodeReady {
		t.Fatalf("n2 = %s", n.Status)
	}
	lostReason := "node n1 is down (missed heartbeats for 15s)"
	for _, id := range []string{"never", "stopped"} {
		sb := e.get(id)
		if sb.Status != state.StatusLost || sb.Reason != lostReason || sb.Restarts != 0 {
			t.Errorf("%s: %s %q restarts %d", id, sb.Status, sb.Reason, sb.Restarts)
		}
	}
	// Restart policies act on the next passes (after the restart backoff).
	e.clock.Add(2 * time.Second)
	e.m.Heartbeat("n2")
	e.pass()
	for _, id := range []string{"onfail", "always", "unstarted"} {
		sb := e.get(id)
		if sb.Status != state.StatusPending || sb.Node != "n2" || sb.Restarts != 1 {
			t.Errorf("%s: %s on %q restarts %d events %+v", id, sb.Status, sb.Node, sb.Restarts, sb.Events)
		}
	}
	for _, id := range []string{"onfail", "always"} {
		if sb := e.get(id); !hasEvent(sb, state.StatusLost, lostReason) {
			t.Errorf("%s has no lost event: %+v", id, sb.Events)
		}
	}
	if sb := e.get("never"); sb.Status != state.StatusLost {
		t.Errorf("never-policy sandbox left lost state: %s", sb.Status)
	}
	// The node comes back: ready again, but what moved away stays moved.
	e.node("n1", 8, 4096, nil)
	e.pass()
	if n := e.getNode("n1"); n.Status != state.NodeReady {
		t.Errorf("re-registered n1 = %s", n.Status)
	}
	if sb := e.get("always"); sb.Node != "n2" {
		t.Errorf("always moved back to %q", sb.Node)
	}
}

// A leader that marked a node down but failed (or lost leadership) before declaring its
// sandboxes lost must not leave them "running" there: the next pass finishes the job.
func TestSandboxesOnAlreadyDownNodeAreLost(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	e.sandbox("always", 256, state.RestartAlways)
	e.sandbox("stop-me", 256, state.RestartNever)
	e.pass()
	e.run("always")
	grace := time.Second
	if _, err := e.store.UpdateSandbox(e.ctx, "stop-me", state.Update{StopGrace: &grace, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	down, why := state.NodeDown, "missed heartbeats for 15s"
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Status: &down, StatusReason: &why, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.node("n2", 8, 4096, nil)
	e.pass()
	e.clock.Add(2 * time.Second)
	e.m.Heartbeat("n2")
	e.pass()
	if sb := e.get("always"); !hasEvent(sb, state.StatusLost, "node n1 is down") || sb.Node != "n2" {
		t.Errorf("always: %s on %q events %+v", sb.Status, sb.Node, sb.Events)
	}
	// Placed, never started, and stopped by its user: it ends instead of waiting forever.
	if sb := e.get("stop-me"); !sb.Status.Terminal() {
		t.Errorf("stop-me: %s on %q", sb.Status, sb.Node)
	}
}

func TestRestartPoliciesOnExit(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	cases := []struct {
		id      string
		policy  state.RestartPolicy
		status  state.Status
		code    int
		restart bool
	}{
		{"always-0", state.RestartAlways, state.StatusExited, 0, true},
		{"always-failed", state.RestartAlways, state.StatusFailed, 1, true},
		{"onfail-0", state.RestartOnFailure, state.StatusExited, 0, false},
		{"onfail-1", state.RestartOnFailure, state.StatusExited, 1, true},
		{"onfail-failed", state.RestartOnFailure, state.StatusFailed, 0, true},
		{"never-1", state.RestartNever, state.StatusExited, 1, false},
		{"default-failed", "", state.StatusFailed, 0, false},
	}
	for _, c := range cases {
		e.sandbox(c.id, 256, c.policy)
	}
	e.pass()
	for _, c := range cases {
		e.run(c.id)
		e.report(c.id, c.status, c.code)
	}
	e.clock.Add(2 * time.Second)
	e.m.Heartbeat("n1")
	e.pass()
	for _, c := range cases {
		sb := e.get(c.id)
		if got := sb.Restarts == 1 && sb.Status == state.StatusPending && sb.Node == "n1"; got != c.restart {
			t.Errorf("%s: restarted=%v want %v (%s restarts %d node %q)", c.id, got, c.restart, sb.Status, sb.Restarts, sb.Node)
		}
	}
}

func TestRestartBackoffAndLimit(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	e.sandbox("crash", 256, state.RestartAlways)
	e.pass()
	restarts := 0
	for i := range 10 {
		e.run("crash")
		e.report("crash", state.StatusFailed, 1)
		e.pass()
		if e.get("crash").Restarts != restarts {
			t.Fatalf("round %d: restarted with no backoff", i)
		}
		e.clock.Add(2 * time.Minute) // past any backoff, well inside the window overall
		e.m.Heartbeat("n1")
		e.pass()
		sb := e.get("crash")
		if sb.Status.Terminal() {
			break
		}
		restarts++
		if sb.Restarts != restarts || sb.Node != "n1" {
			t.Fatalf("round %d: restarts %d node %q", i, sb.Restarts, sb.Node)
		}
	}
	if restarts != 5 {
		t.Fatalf("restarted %d times, want the limit of 5", restarts)
	}
	// Given up for good: a later pass, outside the window, does not resume the loop.
	e.clock.Add(time.Hour)
	e.m.Heartbeat("n1")
	e.pass()
	sb := e.get("crash")
	if sb.Status != state.StatusFailed || sb.Restarts != 5 {
		t.Fatalf("after giving up: %s restarts %d", sb.Status, sb.Restarts)
	}
	if !strings.Contains(sb.Runtime["restart"], "5 restarts") {
		t.Errorf("giving up is not explained: runtime %v", sb.Runtime)
	}
}

// A drain migrates running sandboxes live (two at a time per node); one whose migration
// failed is stopped and placed again only if its restart policy allows it, and
// otherwise stays, saying why; a stopping one is left to end.
func TestDrainMovesSandboxes(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	e.sandbox("web", 256, state.RestartNever)
	e.sandbox("job", 256, state.RestartOnFailure)
	e.sandbox("third", 256, state.RestartNever)
	e.sandbox("stopping", 256, state.RestartNever)
	e.pass()
	for _, id := range []string{"web", "job", "third", "stopping"} {
		e.run(id)
	}
	grace := time.Second
	if _, err := e.store.UpdateSandbox(e.ctx, "stopping", state.Update{StopGrace: &grace, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.node("n2", 8, 4096, nil)
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Draining: ptr(true), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass()
	migrating := 0
	for _, id := range []string{"web", "job", "third"} {
		sb := e.get(id)
		if sb.Status != state.StatusRunning || sb.Node != "n1" || sb.Restarts != 0 {
			t.Fatalf("%s was not left running while it migrates: %s on %q", id, sb.Status, sb.Node)
		}
		if sb.Migration != nil {
			if sb.Migration.To != "n2" {
				t.Errorf("%s migrates to %q", id, sb.Migration.To)
			}
			migrating++
		}
	}
	if migrating != maxDrainMigrations {
		t.Fatalf("%d live migrations at once off the draining node, want %d", migrating, maxDrainMigrations)
	}
	// Both fail: the one whose policy allows it is placed again, the other stays.
	for _, id := range []string{"web", "job"} {
		sb := e.get(id)
		if sb.Migration == nil {
			t.Fatalf("%s is not migrating (the order changed?)", id)
		}
		if _, err := e.store.UpdateSandbox(e.ctx, id, state.Update{EndMigration: sb.Migration.ID, Reason: "the target failed", Time: e.clock.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	e.pass()
	if sb := e.get("job"); sb.Node != "n2" || sb.Status != state.StatusPending || sb.Restarts != 1 || !hasEvent(sb, state.StatusPending, "drained from node n1") {
		t.Errorf("job (on-failure) after its migration failed: %s on %q restarts %d events %+v", sb.Status, sb.Node, sb.Restarts, sb.Events)
	}
	if sb := e.get("web"); sb.Node != "n1" || sb.Status != state.StatusRunning || !strings.Contains(sb.Runtime["drain"], "stays on draining node n1") {
		t.Errorf("web (never) after its migration failed: %s on %q details %v", sb.Status, sb.Node, sb.Runtime)
	}
	if sb := e.get("third"); sb.Migration == nil {
		t.Errorf("the third sandbox did not start migrating once there was room")
	}
	// A sandbox its user is stopping is left to finish stopping where it is.
	if sb := e.get("stopping"); sb.Node != "n1" || sb.Status != state.StatusRunning || sb.Migration != nil {
		t.Errorf("stopping: %s on %q", sb.Status, sb.Node)
	}
	// The drain ends (uncordon): what stayed takes back its word.
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Draining: ptr(false), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass()
	if sb := e.get("web"); sb.Runtime["drain"] != "" {
		t.Errorf("web still says why it stays on a node no longer draining: %v", sb.Runtime)
	}
}

func TestCordonedNodeGetsNothingNew(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Cordoned: ptr(true), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.sandbox("sb", 256, state.RestartNever)
	e.pass()
	if sb := e.get("sb"); sb.Node != "" || !strings.Contains(sb.Reason, "1 node cordoned") {
		t.Fatalf("sb: node %q reason %q", sb.Node, sb.Reason)
	}
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Cordoned: ptr(false), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass()
	if sb := e.get("sb"); sb.Node != "n1" {
		t.Fatalf("after uncordon: node %q reason %q", sb.Node, sb.Reason)
	}
}

func TestConstraintsSteerPlacement(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, map[string]string{"zone": "a"})
	e.node("n2", 8, 4096, map[string]string{"zone": "b"})
	sb := state.Sandbox{ID: "zb", Spec: state.SandboxSpec{Image: "alpine", Constraints: []string{"zone==b"}}, CreatedAt: e.clock.Now()}
	bad := state.Sandbox{ID: "bad", Spec: state.SandboxSpec{Image: "alpine", Constraints: []string{"=="}}, CreatedAt: e.clock.Now()}
	for _, s := range []state.Sandbox{sb, bad} {
		if err := e.store.CreateSandbox(e.ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	e.pass()
	if got := e.get("zb"); got.Node != "n2" {
		t.Errorf("zone==b placed on %q", got.Node)
	}
	if got := e.get("bad"); got.Node != "" || !strings.Contains(got.Reason, "constraint") {
		t.Errorf("unparsable constraint: node %q reason %q", got.Node, got.Reason)
	}
}

func TestNothingHappensWhileNotLeader(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	e.sandbox("sb", 256, state.RestartNever)
	e.store.follower.Store(true)
	e.clock.Add(time.Minute)
	e.pass()
	if sb := e.get("sb"); sb.Node != "" || sb.Reason == "placed on node n1" {
		t.Fatalf("a follower placed: %+v", sb)
	}
	if n := e.getNode("n1"); n.Status != state.NodeReady {
		t.Fatalf("a follower declared n1 %s", n.Status)
	}
	// Becoming leader grants every node a full TTL from then, whatever the old beats say.
	e.store.follower.Store(false)
	e.pass()
	if n := e.getNode("n1"); n.Status != state.NodeReady {
		t.Fatalf("new leader declared n1 down without grace: %s %q", n.Status, n.StatusReason)
	}
	if sb := e.get("sb"); sb.Node != "n1" {
		t.Fatalf("leader did not place: node %q", sb.Node)
	}
	e.clock.Add(16 * time.Second)
	e.pass()
	if n := e.getNode("n1"); n.Status != state.NodeDown {
		t.Fatalf("silent n1 after the grace: %s", n.Status)
	}
}

// The same inputs (state and clock) give the same state, event for event.
func TestDeterministic(t *testing.T) {
	scenario := func() string {
		e := newEnv(t)
		e.node("n1", 4, 2048, nil)
		e.node("n2", 4, 2048, map[string]string{"ssd": "1"})
		for _, p := range []state.RestartPolicy{state.RestartAlways, state.RestartNever, state.RestartOnFailure, state.RestartAlways} {
			e.sandbox("sb-"+string(p)+e.clock.Now().Format("05.000"), 768, p)
		}
		e.pass()
		sbs, _ := e.store.ListSandboxes(e.ctx)
		for _, sb := range sbs {
			if sb.Node == "n1" {
				e.run(sb.ID)
			}
		}
		e.clock.Add(20 * time.Second)
		e.m.Heartbeat("n2")
		e.pass()
		e.clock.Add(2 * time.Second)
		e.m.Heartbeat("n2")
		e.pass()
		sbs, _ = e.store.ListSandboxes(e.ctx)
		nodes, _ := e.store.ListNodes(e.ctx)
		b, _ := json.Marshal(struct {
			S []state.Sandbox
			N []state.Node
		}{sbs, nodes})
		return string(b)
	}
	if a, b := scenario(), scenario(); a != b {
		t.Fatalf("two runs differ:\n%s\n%s", a, b)
	}
}

func TestRunPassesOnNotifyAndStops(t *testing.T) {
	e := newEnv(t)
	e.m.cfg.Interval = time.Hour // only Notify can trigger the second pass
	e.node("n1", 8, 4096, nil)
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- e.m.Run(ctx) }()
	e.sandbox("sb", 256, state.RestartNever)
	e.m.Notify()
	for deadline := time.Now().Add(30 * time.Second); e.get("sb").Node == ""; {
		if time.Now().After(deadline) {
			t.Fatal("sb never placed after Notify")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run returned %v", err)
	}
}

func ptr[T any](v T) *T { return &v }

// A create places its sandbox in the same commit when it fits at once and nothing older
// waits; otherwise (an older sandbox waits, no node fits, the plan no longer fits at
// commit) the sandbox stays pending for a pass, first come first placed.
func TestChooseAtCreate(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 2, 1024, nil)
	create := func(id string, mem int) state.Sandbox {
		e.t.Helper()
		sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: mem}, Status: state.StatusPending, CreatedAt: e.clock.Now()}
		node, cfg := e.m.Choose(sb)
		if err := e.store.CreateAndPlace(e.ctx, sb, state.Quota{}, node, cfg); err != nil {
			e.t.Fatal(err)
		}
		e.clock.Add(time.Millisecond)
		return e.get(id)
	}
	if sb := create("a", 512); sb.Node != "n1" || sb.Status != state.StatusPending || sb.Reason != "placed on node n1" {
		t.Fatalf("a sandbox that fits: node %q status %s (%s)", sb.Node, sb.Status, sb.Reason)
	}
	if sb := create("big", 4096); sb.Node != "" {
		t.Fatalf("a sandbox no node fits was placed on %q", sb.Node)
	}
	// "big" waits: a newer sandbox that would fit is not placed ahead of it.
	if sb := create("b", 128); sb.Node != "" {
		t.Fatalf("placed on %q ahead of an older waiting sandbox", sb.Node)
	}
	// Once a pass found no node for "big", it no longer holds later creates back (the
	// pass places past it too).
	e.pass()
	if b, big := e.get("b"), e.get("big"); b.Node != "n1" || big.Node != "" || !strings.Contains(big.Reason, "no node fits") {
		t.Fatalf("after a pass: b on %q, big on %q (%s)", b.Node, big.Node, big.Reason)
	}
	if sb := create("d", 128); sb.Node != "n1" {
		t.Fatalf("held back by a sandbox no node fits: node %q (%s)", sb.Node, sb.Reason)
	}
	// A plan the state machine finds no longer fits leaves the sandbox pending.
	sb := state.Sandbox{ID: "c", Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: 900}, Status: state.StatusPending, CreatedAt: e.clock.Now()}
	if err := e.store.CreateAndPlace(e.ctx, sb, state.Quota{}, "n1", scheduler.Config{}); err != nil {
		t.Fatal(err)
	}
	if got := e.get("c"); got.Node != "" || got.Status != state.StatusPending {
		t.Fatalf("a plan that does not fit was applied: node %q status %s", got.Node, got.Status)
	}
}

// A sandbox a call paused for its save (a fork, a snapshot) is resumed by a pass once no
// call holds it: the server that made the call went down before it resumed it.
func TestResumeOrphanedPauses(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 2, 1024, nil)
	sb := state.Sandbox{ID: "src", Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: 256}, Status: state.StatusPending, CreatedAt: e.clock.Now()}
	if err := e.store.CreateAndPlace(e.ctx, sb, state.Quota{}, "n1", scheduler.Config{}); err != nil {
		t.Fatal(err)
	}
	for _, st := range []state.Status{state.StatusStarting, state.StatusRunning} {
		if _, err := e.store.UpdateSandbox(e.ctx, "src", state.Update{Status: &st, Time: e.clock.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	release := e.m.Hold("src")
	if _, err := e.store.UpdateSandbox(e.ctx, "src", state.Update{RequestPause: true, PauseFor: "fork", Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	paused := state.StatusPaused
	if _, err := e.store.UpdateSandbox(e.ctx, "src", state.Update{Status: &paused, Saved: &state.Saved{Node: "n1", Bytes: 1 << 20, At: e.clock.Now()}, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass()
	if got := e.get("src"); got.Status != state.StatusPaused || got.PausedFor != "fork" {
		t.Fatalf("a pause a call holds: %s (paused for %q)", got.Status, got.PausedFor)
	}
	release() // the call is gone without resuming it
	e.pass()
	if got := e.get("src"); got.Status != state.StatusPending || got.Node != "n1" || got.PausedFor != "" || got.Resumes != 1 {
		t.Fatalf("an orphaned pause: %s on %q (paused for %q, resumes %d)", got.Status, got.Node, got.PausedFor, got.Resumes)
	}
}

// A sandbox whose volumes are on a draining node stays there, whatever its restart
// policy: no other node could run it. Its details say why.
// A sandbox with volumes goes to its volumes' node while that has room (though
// another has more), to another node when it has none (which relays the volume traffic),
// and a drain of the volumes' node migrates it away live like any other.
func TestVolumeSandboxesPreferTheirNodeAndDrainLive(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 2, 1024, nil)
	e.node("n2", 8, 4096, nil)
	if _, err := e.store.PutVolume(e.ctx, state.Volume{ID: "0123456789abcdef", Name: "data", Node: "n1", SizeMiB: 64, CreatedAt: e.clock.Now()}, 0); err != nil {
		t.Fatal(err)
	}
	mk := func(id string, mem int) {
		t.Helper()
		sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: mem, Restart: state.RestartAlways,
			Volumes: []state.VolumeMount{{Volume: "0123456789abcdef", Path: "/data"}}, VolumeNode: "n1"}, CreatedAt: e.clock.Now()}
		if err := e.store.CreateSandbox(e.ctx, sb); err != nil {
			t.Fatal(err)
		}
	}
	mk("vol", 768)
	e.pass()
	if got := e.get("vol"); got.Node != "n1" {
		t.Fatalf("the volume's sandbox was placed on %q, not on the volume's node (which has room)", got.Node)
	}
	e.run("vol")
	mk("vol2", 768)
	e.pass()
	if got := e.get("vol2"); got.Node != "n2" {
		t.Fatalf("a volume's sandbox with no room on the volume's node was placed on %q, want n2", got.Node)
	}
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Draining: ptr(true), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass()
	got := e.get("vol")
	if got.Node != "n1" || got.Status != state.StatusRunning || got.Migration == nil || got.Migration.To != "n2" || got.Restarts != 0 {
		t.Fatalf("the volume's sandbox on its draining node: %s on %q migration %v restarts %d details %v (want a live migration to n2)", got.Status, got.Node, got.Migration, got.Restarts, got.Runtime)
	}
	if on := got.VolumesOn(); on != "n1" {
		t.Fatalf("while it migrates, its volumes are served by %q, want n1", on)
	}
}

// group creates a pending group: main "g...0" with sidecars named after their restart
// policies' order (s1, s2, ...), 128 MiB each.
func (e *env) group(main string, policies ...state.RestartPolicy) []string {
	e.t.Helper()
	g := &state.Group{Main: main}
	var members []state.Sandbox
	ids := []string{main}
	for i := 0; i <= len(policies); i++ {
		id, name, pol := main, state.MainMemberName, state.RestartPolicy("")
		if i > 0 {
			id, name, pol = main[:15]+fmt.Sprint(i), fmt.Sprintf("s%d", i), policies[i-1]
			ids = append(ids, id)
		}
		sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: 128, Restart: pol, Group: g}, CreatedAt: e.clock.Now()}
		g.Members = append(g.Members, state.GroupMember{Name: name, ID: id, Reserved: sb.Spec.Reserved()})
		members = append(members, sb)
	}
	if err := e.store.CreateGroup(e.ctx, members, state.Quota{}, "", scheduler.Config{}); err != nil {
		e.t.Fatal(err)
	}
	e.clock.Add(time.Millisecond)
	return ids
}

// A group is placed by the pass as one unit; a sidecar restarted per its policy goes
// back beside its main; one that ends for good stops the main, saying which and why.
func TestGroupPlacementAndSidecarEnds(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 4, 300, nil)
	e.node("n2", 4, 1000, nil)
	ids := e.group("g000000000000000", state.RestartOnFailure, state.RestartNever)
	e.pass()
	for _, id := range ids {
		if sb := e.get(id); sb.Node != "n2" {
			t.Fatalf("member %s placed on %q, want all on n2 (n1 has room for two of three)", id, sb.Node)
		}
		e.run(id)
	}
	// s1 (on-failure) fails: restarted, and placed beside its main again.
	e.report(ids[1], state.StatusExited, 1)
	e.clock.Add(5 * time.Second)
	e.m.Heartbeat("n1")
	e.m.Heartbeat("n2")
	e.pass()
	if sb := e.get(ids[1]); sb.Status != state.StatusPending || sb.Node != "n2" {
		t.Errorf("the restarted sidecar is %s on %q, want pending on n2", sb.Status, sb.Node)
	}
	if sb := e.get(ids[0]); !sb.StopRequestedAt.IsZero() {
		t.Errorf("a sidecar that restarts stopped its group: %v", sb.Runtime)
	}
	// A sidecar that completes (exit 0, policy never) leaves its group running.
	done := e.group("j000000000000000", state.RestartNever)
	e.pass()
	for _, id := range done {
		e.run(id)
	}
	e.report(done[1], state.StatusExited, 0)
	e.clock.Add(5 * time.Second)
	e.m.Heartbeat("n1")
	e.m.Heartbeat("n2")
	e.pass()
	if sb := e.get(done[0]); !sb.StopRequestedAt.IsZero() {
		t.Errorf("a sidecar that completed stopped its group: %v", sb.Runtime)
	}
	// s2 (never) exits: the group is stopped, naming it.
	e.report(ids[2], state.StatusExited, 4)
	e.clock.Add(5 * time.Second)
	e.m.Heartbeat("n1")
	e.m.Heartbeat("n2")
	e.pass()
	main := e.get(ids[0])
	if main.StopRequestedAt.IsZero() || !strings.Contains(main.Runtime["group"], `sidecar "s2"`) || !strings.Contains(main.Runtime["group"], "exit code 4") {
		t.Errorf("after its never-restarting sidecar exited 4 the main has stop %v, details %v", main.StopRequestedAt, main.Runtime)
	}
	// Its node reports the stop as any: the end is the group's failure, with the reason.
	e.report(ids[0], state.StatusExited, 143)
	if main = e.get(ids[0]); main.Status != state.StatusFailed || !strings.Contains(main.Reason, `sidecar "s2"`) {
		t.Errorf("the main stopped for its sidecar ended %s: %q", main.Status, main.Reason)
	}
	if sc := e.get(ids[1]); !strings.Contains(sc.Reason+sc.StopReason, "main ended") {
		t.Errorf("the other sidecar, stopped with its main: %s %q (stop reason %q)", sc.Status, sc.Reason, sc.StopReason)
	}
}

// A drain moves a sandbox group as one: its sidecar, then its main, live, to one node;
// a group whose move fails comes back whole to the draining node and stays, saying why.
func TestDrainMovesGroups(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	ok := e.group("h000000000000000", state.RestartAlways)
	bad := e.group("k000000000000000", state.RestartNever)
	e.pass()
	for _, id := range append(append([]string{}, ok...), bad...) {
		e.run(id)
	}
	e.node("n2", 8, 4096, nil)
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Draining: ptr(true), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	migrating := func(id string) *state.Migration {
		t.Helper()
		return e.get(id).Migration
	}
	commit := func(id string) {
		t.Helper()
		m := migrating(id)
		if m == nil {
			t.Fatalf("%s is not migrating", id)
		}
		if _, err := e.store.UpdateSandbox(e.ctx, id, state.Update{CommitMigration: m.ID, MigrationBy: m.To, Time: e.clock.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	e.pass()
	// One member of each group moves at a time, the sidecar first.
	for _, g := range [][]string{ok, bad} {
		if m := migrating(g[1]); m == nil || m.To != "n2" {
			t.Fatalf("the sidecar %s does not migrate to n2 first: %+v", g[1], m)
		}
		if m := migrating(g[0]); m != nil {
			t.Fatalf("the main %s migrates with its sidecar: %+v", g[0], m)
		}
		commit(g[1])
	}
	e.pass()
	commit(ok[0])
	m := migrating(bad[0])
	if m == nil {
		t.Fatal("the second group's main does not migrate after its sidecar")
	}
	if _, err := e.store.UpdateSandbox(e.ctx, bad[0], state.Update{EndMigration: m.ID, Reason: "the target failed", Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, id := range ok {
		if sb := e.get(id); sb.Node != "n2" || sb.Status != state.StatusRunning {
			t.Errorf("member %s of the moved group: %s on %q", id, sb.Status, sb.Node)
		}
	}
	e.pass()
	// The failed group's sidecar comes back to its main.
	if m := migrating(bad[1]); m == nil || m.To != "n1" {
		t.Fatalf("the failed group's moved sidecar is not moving back: %+v", m)
	}
	commit(bad[1])
	e.pass()
	e.pass()
	for _, id := range bad {
		sb := e.get(id)
		if sb.Node != "n1" || sb.Migration != nil || !strings.Contains(sb.Runtime["drain"], "could not move live") {
			t.Errorf("member %s of the group that could not move: on %q migration %+v details %v", id, sb.Node, sb.Migration, sb.Runtime)
		}
	}
}

// A sandbox's lifetime ends it (stop, or pause when asked), not before; moving its end
// and a resume (which counts the lifetime again) are honoured.
func TestLifetimesEnd(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 4, 4096, nil)
	mk := func(id, onEnd string) {
		sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: 256, KeepAlive: true, Lifetime: 10 * time.Second, OnEnd: onEnd},
			Status: state.StatusPending, CreatedAt: e.clock.Now()}
		if err := e.store.CreateAndPlace(e.ctx, sb, state.Quota{}, "n1", scheduler.Config{}); err != nil {
			t.Fatal(err)
		}
		e.run(id)
	}
	mk("stop", "")
	mk("pause", state.LifetimePause)
	mk("moved", "")
	later := e.clock.Now().Add(time.Minute)
	if _, err := e.store.UpdateSandbox(e.ctx, "moved", state.Update{EndAt: &later, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(9 * time.Second)
	e.pass()
	for _, id := range []string{"stop", "pause", "moved"} {
		if got := e.get(id); !got.StopRequestedAt.IsZero() || !got.PauseRequestedAt.IsZero() {
			t.Fatalf("%s ended before its lifetime: %+v", id, got)
		}
	}
	e.clock.Add(2 * time.Second)
	e.pass()
	if got := e.get("stop"); got.StopRequestedAt.IsZero() || got.StopReason != "its lifetime ended" {
		t.Errorf("a sandbox past its lifetime is not stopped: stop at %v, reason %q", got.StopRequestedAt, got.StopReason)
	}
	if got := e.get("pause"); got.PauseRequestedAt.IsZero() || !got.StopRequestedAt.IsZero() {
		t.Errorf("a sandbox to pause at its end: pause at %v, stop at %v", got.PauseRequestedAt, got.StopRequestedAt)
	}
	if got := e.get("moved"); !got.StopRequestedAt.IsZero() {
		t.Errorf("a sandbox whose end was moved later was stopped")
	}
	// The node saves the paused one; a resume counts its lifetime from then.
	paused := state.StatusPaused
	if _, err := e.store.UpdateSandbox(e.ctx, "pause", state.Update{Status: &paused, Saved: &state.Saved{Node: "n1", At: e.clock.Now()}, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(time.Hour)
	e.pass()
	if got := e.get("pause"); got.Status != state.StatusPaused || !got.StopRequestedAt.IsZero() {
		t.Fatalf("a paused sandbox past its end: %s, stop at %v", got.Status, got.StopRequestedAt)
	}
	sb, err := e.store.ResumeSandbox(e.ctx, "pause", "", scheduler.Config{}, e.clock.Now(), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if want := e.clock.Now().Add(10 * time.Second); !sb.EndAt.Equal(want) {
		t.Errorf("resumed: ends at %v, want %v (its lifetime from the resume)", sb.EndAt, want)
	}
}

// A pause for a call's save (a fork's, a snapshot's) does not restart the lifetime the way
// a user's resume does: E2B's fork leaves its source's end as it was.
func TestResumeAfterASaveKeepsTheLifetime(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 2, 2048, nil)
	sb := state.Sandbox{ID: "src", Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: 256, KeepAlive: true, Lifetime: time.Minute},
		Status: state.StatusPending, CreatedAt: e.clock.Now()}
	if err := e.store.CreateAndPlace(e.ctx, sb, state.Quota{}, "n1", scheduler.Config{}); err != nil {
		t.Fatal(err)
	}
	e.run("src")
	end := e.get("src").EndAt
	e.clock.Add(30 * time.Second)
	if _, err := e.store.UpdateSandbox(e.ctx, "src", state.Update{RequestPause: true, PauseFor: "fork", Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	paused := state.StatusPaused
	if _, err := e.store.UpdateSandbox(e.ctx, "src", state.Update{Status: &paused, Saved: &state.Saved{Node: "n1", At: e.clock.Now()}, Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	got, err := e.store.ResumeSandbox(e.ctx, "src", "", scheduler.Config{}, e.clock.Now(), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if !got.EndAt.Equal(end) {
		t.Errorf("after a save's resume the lifetime ends at %v, want %v as before", got.EndAt, end)
	}
}
