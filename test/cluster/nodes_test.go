package cluster

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// An agent (its host) dies: the node is declared down, its sandboxes are lost, and the
// one whose policy says so runs again on another node.
func TestAgentKilledSandboxesReplaced(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	// zone b is a0 and a1; bin-packing puts both on the same node.
	always := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "keeps-running", "--restart", "always", "--constraint", "zone==b",
		"--insecure-registry", w.registry, image(), "--", "sh", "-c", "echo started-on-$(hostname); sleep 600"))
	never := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "runs-once", "--restart", "never", "--constraint", "zone==b",
		"--insecure-registry", w.registry, image(), "--", "sleep", "600"))
	a := waitSandbox(t, always, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	waitSandbox(t, never, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	node := a["node"].(string)
	if n := inspect(t, never)["node"]; n != node {
		t.Fatalf("bin-packing put the two sandboxes on %v and %v", node, n)
	}
	var victim *proc
	for i, p := range w.agents {
		if node == "a"+string(rune('0'+i)) {
			victim = p
		}
	}
	w.stop(victim, true)

	waitFor(t, time.Minute, "node "+node+" declared down", func() bool {
		m, err := w.nodes()
		return err == nil && m[node] == "down"
	})
	lost := waitSandbox(t, never, time.Minute, "lost", func(sb map[string]any) bool { return sb["status"] == "lost" })
	if reason, _ := lost["reason"].(string); !strings.Contains(reason, node) || !strings.Contains(reason, "down") {
		t.Errorf("lost reason %q should name the down node", reason)
	}
	moved := waitSandbox(t, always, 3*minute, "running again elsewhere", func(sb map[string]any) bool {
		return sb["status"] == "running" && sb["node"] != node
	})
	if r, _ := moved["restarts"].(float64); r < 1 {
		t.Errorf("restarts = %v, want at least 1", moved["restarts"])
	}
	if n := moved["node"]; n != "a0" && n != "a1" {
		t.Errorf("re-placed on %v, which is outside the constraint zone==b", n)
	}
	time.Sleep(2 * time.Second)
	if sb := inspect(t, never); sb["status"] != "lost" {
		t.Errorf("restart never: status %v, want it to stay lost", sb["status"])
	}

	// The host comes back: the node registers again and does not run what moved away.
	w.ensureRunning()
	if err := w.waitNodes(3, "ready", 2*minute); err != nil {
		t.Fatal(err)
	}
	// A sandbox placed on the returning node and running proves it has taken its
	// assignments from the server (the stream starts with the whole set), so anything it
	// were to restart by mistake would be starting by now.
	probe := strings.TrimSpace(mustFW(t, "run", "-d", "--constraint", "host=="+node,
		"--insecure-registry", w.registry, image(), "--", "sleep", "600"))
	waitSandbox(t, probe, 2*minute, "running on the returning node", func(sb map[string]any) bool {
		return sb["status"] == "running" && sb["node"] == node
	})
	for _, id := range []string{always, never} {
		if vms := w.vmsOf(victim, id); len(vms) > 0 {
			t.Errorf("the returning node %s runs sandbox %s again, which it lost: %v", node, id, vms)
		}
	}
	if sb := inspect(t, always); sb["node"] != moved["node"] || sb["restarts"] != moved["restarts"] || sb["status"] != "running" {
		t.Errorf("after %s came back, the moved sandbox is on %v (restarts %v, %v), want still on %v (restarts %v)",
			node, sb["node"], sb["restarts"], sb["status"], moved["node"], moved["restarts"])
	}
	if sb := inspect(t, never); sb["status"] != "lost" {
		t.Errorf("after %s came back, the restart-never sandbox is %v, want lost", node, sb["status"])
	}
	mustFW(t, "rm", "-f", always, never, probe)
}

// A full cluster keeps a new sandbox pending with the reason, and places it as soon as
// capacity frees.
func TestFullClusterThenPlaced(t *testing.T) {
	need(t)
	// Each node offers 700 MiB: one 512 MiB sandbox fills it.
	var ids []string
	for range 3 {
		id := strings.TrimSpace(mustFW(t, "run", "-d", "--memory", "512M", "--spread", "--insecure-registry", w.registry, image(), "--", "sleep", "600"))
		ids = append(ids, id)
	}
	for _, id := range ids {
		waitSandbox(t, id, 3*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	}
	extra := strings.TrimSpace(mustFW(t, "run", "-d", "--memory", "512M", "--insecure-registry", w.registry, image(), "--", "sh", "-c", "echo finally; sleep 600"))
	sb := waitSandbox(t, extra, time.Minute, "pending with a reason", func(sb map[string]any) bool {
		r, _ := sb["reason"].(string)
		return sb["status"] == "pending" && strings.Contains(r, "memory")
	})
	t.Logf("pending reason: %v", sb["reason"])
	mustFW(t, "stop", "-t", "0", ids[0])
	waitSandbox(t, extra, 3*minute, "placed and running after capacity freed", func(sb map[string]any) bool { return sb["status"] == "running" })
	// "running" means the command started; its first line may still be on its way.
	var out string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if out = mustFW(t, "logs", extra); strings.TrimSpace(out) == "finally" {
			break
		}
	}
	if strings.TrimSpace(out) != "finally" {
		t.Errorf("logs of the late sandbox: %q", out)
	}
	mustFW(t, append([]string{"rm", "-f", extra}, ids...)...)
}

// Cordoned nodes take nothing new; a drain moves running sandboxes off live (three at
// once here: each keeps counting where it was, with no restart, its log carried along).
func TestCordonAndDrain(t *testing.T) {
	need(t)
	agentsListening(t)
	mustFW(t, "node", "cordon", "a0")
	mustFW(t, "node", "cordon", "a1")
	// Uncordoned whatever happens: the tests after this one share the nodes.
	t.Cleanup(func() {
		for _, n := range []string{"a0", "a1", "a2"} {
			_, _ = w.fw(nil, "node", "uncordon", n)
		}
	})
	var ids []string
	for i := range 3 {
		ids = append(ids, strings.TrimSpace(mustFW(t, "run", "-d", "--name", fmt.Sprintf("drained-%d", i), "--memory", "128",
			"--insecure-registry", w.registry, image(), "--", "sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done")))
	}
	defer mustFW(t, append([]string{"rm", "-f"}, ids...)...)
	// The highest tick in a sandbox's log (its output, read with `logs`).
	lastTick := func(id string) int {
		out, _, code := w.cli(t.Context(), nil, "logs", id)
		if code != 0 {
			return -1
		}
		n := -1
		for _, l := range strings.Split(out, "\n") {
			if v, err := strconv.Atoi(strings.TrimPrefix(l, "tick ")); err == nil && strings.HasPrefix(l, "tick ") {
				n = max(n, v)
			}
		}
		return n
	}
	before := map[string]int{}
	for _, id := range ids {
		sb := waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
		if sb["node"] != "a2" {
			t.Fatalf("with a0 and a1 cordoned, the sandbox went to %v", sb["node"])
		}
		waitFor(t, minute, "the counter", func() bool { return lastTick(id) > 0 })
		before[id] = lastTick(id)
	}
	mustFW(t, "node", "uncordon", "a0")
	mustFW(t, "node", "uncordon", "a1")
	mustFW(t, "node", "drain", "a2")
	defer mustFW(t, "node", "uncordon", "a2")
	for _, id := range ids {
		moved := waitSandbox(t, id, 3*minute, "moved off the drained node", func(sb map[string]any) bool {
			return sb["status"] == "running" && sb["node"] != "a2" && sb["migration"] == nil
		})
		if !hasEvent(moved, "running", "migrated from node a2") || (moved["restarts"] != nil && moved["restarts"] != float64(0)) {
			t.Errorf("%s: the drain did not move it live: restarts %v events %v", id, moved["restarts"], moved["events"])
		}
		// The log went with it, and the count goes on past where it was.
		waitFor(t, minute, "the counter going on after the drain", func() bool { return lastTick(id) > before[id]+3 })
		if vms := w.vmsOf(w.agents[2], id); len(vms) > 0 {
			t.Errorf("the drained node a2 still runs the sandbox's VM: %v", vms)
		}
	}
	// Commands run in the moved sandboxes, through every server (two of them forward to
	// the leader): an exec once hung right after a drain's migrations.
	for _, id := range ids {
		for _, s := range w.servers {
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			out, errOut, code := w.cli(ctx, []string{"FIREWORKS_SERVER=https://" + s.h.IP + ":" + apiPort}, "exec", id, "--", "echo", "moved")
			cancel()
			if code != 0 || strings.TrimSpace(out) != "moved" {
				t.Errorf("exec in %s through server %s after the drain: exit %d, output %q, %s", id, s.h.IP, code, out, errOut)
			}
		}
	}
}

// An agent restarted while its VM runs: the VM is still there afterwards, re-adopted by
// the new agent process, with its output and exec intact.
func TestAgentRestartKeepsVM(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "survivor", "--constraint", "host==a2", "--insecure-registry", w.registry, image(), "--",
		"sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"))
	sb := waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	pid := sb["details"].(map[string]any)["pid"]
	mustFW(t, "exec", id, "--", "sh", "-c", "echo before > /tmp/marker")

	// Execs keep coming while the agent restarts, as users' would: each one runs, at
	// worst after waiting for the new agent (the servers try a node that refuses them
	// again for a while), and none hangs (one did, on Kubernetes: a follower's forward of
	// the stream waited for the client, which waited for it).
	execs := execsThroughout(id)
	w.stop(w.agents[2], false)
	w.ensureRunning()
	if err := w.waitNodes(3, "ready", 2*minute); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "re-adopted", func() bool {
		sb := inspect(t, id)
		d, _ := sb["details"].(map[string]any)
		return sb["status"] == "running" && d["adopted_at"] != nil
	})
	execs.stopAndCheck(t)
	sb = inspect(t, id)
	if got := sb["details"].(map[string]any)["pid"]; got != pid {
		t.Fatalf("VMM pid %v after the agent restart, was %v: the VM was replaced, not kept", got, pid)
	}
	if out := mustFW(t, "exec", id, "--", "cat", "/tmp/marker"); strings.TrimSpace(out) != "before" {
		t.Errorf("exec after the agent restart: %q", out)
	}
	time.Sleep(time.Second)
	logs := mustFW(t, "logs", id)
	n := 0
	for _, l := range strings.Fields(logs) {
		n++
		if l != "tick-"+itoa(n) {
			t.Fatalf("line %d is %q: output lost across the agent restart", n, l)
		}
	}
	mustFW(t, "rm", "-f", id)
}

func itoa(n int) string { return strconv.Itoa(n) }

// execLoad runs `fireworks exec` into one sandbox again and again until stopped.
type execLoad struct {
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	results []execResult
}

type execResult struct {
	at   time.Time
	took time.Duration
	code int
	out  string
}

// execHangAfter is how long one exec may take before it counts as hung: an agent's
// graceful restart (detach, adopt) takes a few seconds, a dial that nobody answers 5.
const execHangAfter = 45 * time.Second

// execsThroughout starts three users' worth of execs into sandbox id, one after another
// each, until stopAndCheck.
func execsThroughout(id string) *execLoad {
	l := &execLoad{stop: make(chan struct{}), done: make(chan struct{})}
	var wg sync.WaitGroup
	wg.Add(3)
	for range 3 {
		go func() { // ends at stopAndCheck
			defer wg.Done()
			l.run(id)
		}()
	}
	go func() { wg.Wait(); close(l.done) }()
	return l
}

func (l *execLoad) run(id string) {
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), execHangAfter+15*time.Second)
		start := time.Now()
		out, errOut, code := w.cli(ctx, nil, "exec", id, "--", "cat", "/tmp/marker")
		cancel()
		l.mu.Lock()
		l.results = append(l.results, execResult{at: start, took: time.Since(start), code: code, out: strings.TrimSpace(out) + " " + strings.TrimSpace(errOut)})
		l.mu.Unlock()
		time.Sleep(200 * time.Millisecond)
	}
}

// stopAndCheck ends the load and fails t if an exec hung or if none ran after the
// restart.
func (l *execLoad) stopAndCheck(t *testing.T) {
	t.Helper()
	close(l.stop)
	<-l.done
	var hung, failed, ok int
	for _, r := range l.results {
		switch {
		case r.took > execHangAfter || r.code < 0:
			hung++
			t.Errorf("an exec started at %s took %s (exit %d): %s", r.at.Format("15:04:05.000"), r.took.Round(time.Millisecond), r.code, r.out)
		case r.code != 0 || r.out != "before ":
			failed++
			t.Errorf("an exec started at %s failed in %s (exit %d): %s", r.at.Format("15:04:05.000"), r.took.Round(time.Millisecond), r.code, r.out)
		default:
			ok++
		}
	}
	t.Logf("execs during the restart: %d ran, %d failed, %d hung", ok, failed, hung)
	if ok == 0 {
		t.Error("no exec ran during the restart")
	}
}

// hasEvent reports whether the sandbox's events hold one with status and a reason
// containing reason.
func hasEvent(sb map[string]any, status, reason string) bool {
	evs, _ := sb["events"].([]any)
	for _, e := range evs {
		m, _ := e.(map[string]any)
		if r, _ := m["reason"].(string); m["status"] == status && strings.Contains(r, reason) {
			return true
		}
	}
	return false
}
