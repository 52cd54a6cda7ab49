package cluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/hostnet"
)

// agentOf is the agent process of node name (a0, a1, ...).
func agentOf(t *testing.T, name string) *proc {
	t.Helper()
	for i, a := range w.agents {
		if fmt.Sprintf("a%d", i) == name {
			return a
		}
	}
	t.Fatalf("no agent %q", name)
	return nil
}

// egressDropped reads the egress packets the sandbox's policy dropped (policy show).
func egressDropped(t *testing.T, id string) int {
	t.Helper()
	m := regexp.MustCompile(`Egress:\s+\d+ allowed, (\d+) dropped`).FindStringSubmatch(mustFW(t, "policy", "show", id))
	if m == nil {
		t.Fatalf("policy show %s has no egress counters", id)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestMigrate moves a running sandbox to the other node live: its counter carries on
// (no reset), its files and log are there, it has the same ID and token, its web server
// answers at the same ingress host, an address its policy blocks stays blocked with the
// counters going on, inspect shows the migration, and the source node keeps nothing of
// it (no VMM, network namespace, run directory or files).
func TestMigrate(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	agentsListening(t)
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "migrating", "-p", "8000:public", "--insecure-registry", w.registry, image(), "--",
		"sh", "-c", "echo migrate-file > /tmp/f; mkdir -p /tmp/www && echo served-before-and-after > /tmp/www/index.html && httpd -p 8000 -h /tmp/www; "+
			"i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; echo tick $i; sleep 0.2; done"))
	defer mustFW(t, "rm", "-f", id)
	waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	// Through the ingress, and a blocked address.
	e := startEdge(t, strings.TrimSpace(mustFW(t, "token", "create", "--role", "ingress", "--name", "migrate-edge")))
	host := routes.Host(8000, id, ingressDomain)
	if body := e.waitFor(t, host, nil, http.StatusOK, minute); strings.TrimSpace(body) != "served-before-and-after" {
		t.Fatalf("%s before the migration: %q", host, body)
	}
	denyRegistry(t, id)
	dropped := egressDropped(t, id)
	if dropped == 0 {
		t.Fatal("the policy dropped nothing")
	}
	// A port-forward opened before the migration: each connection is its own stream,
	// so the ones after it reach the sandbox where it runs then.
	pfPort := portForward(t, id, 8000)
	if body := getLocal(t, pfPort); body != "served-before-and-after" {
		t.Fatalf("through port-forward before the migration: %q", body)
	}
	count := func() int {
		t.Helper()
		out, _, code := w.cli(t.Context(), nil, "exec", id, "--", "cat", "/tmp/count")
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if code != 0 || err != nil {
			return -1
		}
		return n
	}
	waitFor(t, minute, "the counter", func() bool { return count() > 0 })
	sb := inspect(t, id)
	from, _ := sb["node"].(string)
	d, _ := sb["details"].(map[string]any)
	netns, token := fmt.Sprint(d["netns"]), sb["access_token"]
	src := agentOf(t, from)
	cut := receiveOnly(t, id)
	before := count()

	// Commands sent while it migrates run (on the source before the switch-over, on
	// the target after it) and none fails for it.
	migrated := make(chan string, 1)
	go func() { migrated <- mustFW(t, "migrate", id) }()
	var execFailures []string
	execs := 0
	for ; len(migrated) == 0 && execs < 40; execs++ {
		out, errOut, code := w.cli(t.Context(), nil, "exec", id, "--", "echo", "during")
		if code != 0 || strings.TrimSpace(out) != "during" {
			execFailures = append(execFailures, fmt.Sprintf("exit %d, output %q, %s", code, out, errOut))
		}
	}
	out := <-migrated
	t.Logf("fireworks migrate: %s (%d execs sent meanwhile)", strings.TrimSpace(out), execs)
	if len(execFailures) > 0 {
		t.Errorf("%d of %d execs sent during the migration failed: %v", len(execFailures), execs, execFailures)
	}
	if !strings.Contains(out, "migrated from "+from+" to ") {
		t.Fatalf("migrate printed %q", out)
	}
	sb = inspect(t, id)
	d, _ = sb["details"].(map[string]any)
	if sb["status"] != "running" || sb["node"] == from || d["start_mode"] != "migrated" || sb["access_token"] != token {
		t.Fatalf("after the migration: status %v node %v (was %s) details %v", sb["status"], sb["node"], from, d)
	}
	migs, _ := sb["migrations"].([]any)
	if len(migs) != 1 || !strings.Contains(fmt.Sprint(migs[0]), "moved") {
		t.Errorf("inspect shows the migrations %v", migs)
	}
	after := count()
	if after < before {
		t.Fatalf("the counter reads %d after the migration, %d before: it was reset", after, before)
	}
	waitFor(t, minute, "the counter going on", func() bool { return count() > after })
	t0 := time.Now()
	if body := e.waitFor(t, host, nil, http.StatusOK, minute); strings.TrimSpace(body) != "served-before-and-after" {
		t.Errorf("%s after the migration: %q", host, body)
	}
	t.Logf("the ingress host answered %s after the migration call returned", time.Since(t0).Round(time.Millisecond))
	if body := getLocal(t, pfPort); body != "served-before-and-after" {
		t.Errorf("through the same port-forward after the migration: %q", body)
	}
	if got := statusLine(t, id, w.registry, "/v2/"); got != "" {
		t.Errorf("the registry answered after the migration: the policy did not go with the sandbox: %q", got)
	}
	if n := egressDropped(t, id); n <= dropped {
		t.Errorf("egress dropped %d after the migration and a blocked attempt, %d before: the counters did not carry on", n, dropped)
	}
	if got := strings.TrimSpace(mustFW(t, "exec", id, "--", "cat", "/tmp/f")); got != "migrate-file" {
		t.Errorf("/tmp/f holds %q after the migration", got)
	}
	logs := mustFW(t, "logs", id)
	if !strings.Contains(logs, "tick 1\n") || !strings.Contains(logs, fmt.Sprintf("tick %d\n", after+1)) {
		t.Errorf("the log lacks the ticks from before or after the migration:\n%s", logs)
	}
	cut()
	// The source keeps nothing of it.
	waitFor(t, minute, "the source node to let the sandbox go", func() bool {
		_, errRun := os.Stat(filepath.Join(src.dataDir, "run", id))
		_, errFiles := os.Stat(filepath.Join(src.dataDir, "sandboxes", id))
		_, errNS := os.Stat(filepath.Join("/run/netns", netns))
		return len(w.vmsOf(src, id)) == 0 && os.IsNotExist(errRun) && os.IsNotExist(errFiles) && os.IsNotExist(errNS)
	})
}

// receiveOnly opens a TCP connection from sandbox id's guest to a server on another
// host (h0), on which the guest only waits to receive (nc, after a first line); cut,
// called after a migration, checks that the guest was told the connection is gone (a
// reset: nc ends) rather than left waiting.
func receiveOnly(t *testing.T, id string) (cut func()) {
	t.Helper()
	h := w.net.Hosts[0]
	var ln net.Listener
	if err := network.Do("/run/netns/"+h.NS, func() (err error) {
		ln, err = net.Listen("tcp", h.IP+":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte("hello\n"))
		accepted <- c // held open, silent, until the test ends
	}()
	t.Cleanup(func() {
		ln.Close()
		select {
		case c := <-accepted:
			c.Close()
		default:
		}
	})
	port := ln.Addr().(*net.TCPAddr).Port
	// Its own session: it outlives the exec that starts it.
	// nc's input is a FIFO kept open and silent (by a sleep): nc only receives, and the
	// line after it runs as soon as nc ends.
	mustFW(t, "exec", id, "--", "sh", "-c", fmt.Sprintf("setsid sh -c 'mkfifo /tmp/nc.in; sleep 100000 > /tmp/nc.in & nc %s %d < /tmp/nc.in > /tmp/nc.out; echo ended > /tmp/nc.end' </dev/null >/dev/null 2>&1 &", h.IP, port))
	var conn net.Conn
	select {
	case conn = <-accepted:
		accepted <- conn
	case <-time.After(minute):
		t.Fatal("the guest's connection to the test server did not arrive")
	}
	waitFor(t, minute, "the guest to receive the server's line", func() bool {
		out, _, _ := w.cli(t.Context(), nil, "exec", id, "--", "cat", "/tmp/nc.out")
		return strings.Contains(out, "hello")
	})
	return func() {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(300 * time.Millisecond) {
			out, _, code := w.cli(t.Context(), nil, "exec", id, "--", "cat", "/tmp/nc.end")
			if code == 0 && strings.Contains(out, "ended") {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("30 s after the migration, a connection out on which the guest only waits is still open in the guest (no reset)")
				return
			}
		}
	}
}

// denyRegistry applies a policy to sandbox id that blocks the test registry, and checks
// it is in force.
func denyRegistry(t *testing.T, id string) {
	t.Helper()
	regHost, _, _ := net.SplitHostPort(w.registry)
	pol := filepath.Join(t.TempDir(), "policy")
	if err := os.WriteFile(pol, []byte("default allow\ndeny "+regHost+" tcp\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mustFW(t, "policy", "apply", id, pol)
	if got := statusLine(t, id, w.registry, "/v2/"); got != "" {
		t.Fatalf("the registry answered the sandbox its policy blocks: %q", got)
	}
}

// portForward runs `fireworks port-forward id LOCAL:port` for the test and returns the
// local port.
func portForward(t *testing.T, id string, port int) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	local := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	pf := exec.CommandContext(ctx, w.bin, "port-forward", id, fmt.Sprintf("%d:%d", local, port))
	pf.Env = append(os.Environ(), "FIREWORKS_CONFIG="+filepath.Join(w.root, "none.json"), "FIREWORKS_SERVER=https://"+w.serverList(),
		"FIREWORKS_TOKEN="+w.token, "FIREWORKS_CA="+filepath.Join(w.caDir, "ca.pem"))
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = pf.Wait() })
	return local
}

// getLocal GETs / from 127.0.0.1:port, retrying a while ("" if nothing answered).
func getLocal(t *testing.T, port int) string {
	t.Helper()
	for range 100 {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return strings.TrimSpace(string(b))
		}
		time.Sleep(100 * time.Millisecond)
	}
	return ""
}

// slowLink limits what host h sends to rate (tc tbf on its interface), so that a
// migration from or to it stays in pre-copy long enough to be interrupted; undo lifts it.
func slowLink(t *testing.T, h *hostnet.Host, rate string) (undo func()) {
	t.Helper()
	if err := run("ip", "netns", "exec", h.NS, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb", "latency", "2s"); err != nil {
		t.Fatalf("slow down %s's link (tc, sch_tbf): %v", h.Name, err)
	}
	return func() { _ = run("ip", "netns", "exec", h.NS, "tc", "qdisc", "del", "dev", "eth0", "root") }
}

// migrating starts `fireworks migrate id` in the background and returns once the
// target node has begun to receive it (its run directory is there); done gives the
// command's outcome.
func migrating(t *testing.T, id string, target *proc) (done chan error) {
	t.Helper()
	done = make(chan error, 1)
	go func() {
		out, errOut, code := w.cli(t.Context(), nil, "migrate", id, "--to", filepath.Base(target.dataDir))
		if code != 0 {
			done <- fmt.Errorf("exit %d: %s", code, strings.TrimSpace(errOut))
			return
		}
		done <- fmt.Errorf("migrated: %s", strings.TrimSpace(out))
	}()
	var early error
	waitFor(t, minute, "the target to begin receiving the sandbox", func() bool {
		select {
		case early = <-done:
			return true
		default:
		}
		_, err := os.Stat(filepath.Join(target.dataDir, "run", id))
		return err == nil
	})
	if early != nil {
		t.Fatalf("migrate ended before the target began: %v", early)
	}
	return done
}

// counterOf reads the sandbox's /tmp/count (-1 if it cannot).
func counterOf(t *testing.T, id string) int {
	t.Helper()
	out, errOut, code := w.cli(t.Context(), nil, "exec", id, "--", "cat", "/tmp/count")
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if code != 0 || err != nil {
		if code != 0 && errOut != "" {
			t.Logf("exec in %s: exit %d: %s", id, code, strings.TrimSpace(errOut))
		}
		return -1
	}
	return n
}

// agentsListening restarts any agent a test stopped and waits until every agent's node
// API accepts connections (a node the state still calls ready may be restarting).
func agentsListening(t *testing.T) {
	t.Helper()
	w.ensureRunning()
	for _, a := range w.agents {
		waitFor(t, 2*minute, "agent "+a.dataDir+" listening", func() bool {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(a.h.IP, nodePort), time.Second)
			if err == nil {
				c.Close()
			}
			return err == nil
		})
	}
	if err := w.waitNodes(len(w.agents), "ready", 2*minute); err != nil {
		t.Fatal(err)
	}
}

// runCounter runs a sandbox counting in /tmp/count and returns it with its node's
// agent and another node's.
func runCounter(t *testing.T) (id string, src, dst *proc) {
	t.Helper()
	agentsListening(t)
	id = strings.TrimSpace(mustFW(t, "run", "-d", image(), "--", "sh", "-c", counterCmd))
	sb := waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	waitFor(t, minute, "the counter", func() bool { return counterOf(t, id) > 0 })
	node, _ := sb["node"].(string)
	src = agentOf(t, node)
	for i, a := range w.agents {
		if fmt.Sprintf("a%d", i) != node {
			return id, src, a
		}
	}
	t.Fatal("one node only")
	return
}

const counterCmd = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"

// TestMigrateTargetDies: the target node dies (its agent and VMMs) during the
// pre-copy; the migration fails, and the sandbox runs on on its source, its counter
// going on from where it was, with one VMM.
func TestMigrateTargetDies(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id, src, dst := runCounter(t)
	defer mustFW(t, "rm", "-f", id)
	before := counterOf(t, id)
	defer slowLink(t, src.h, "16mbit")()
	done := migrating(t, id, dst)
	w.stop(dst, true)
	err := <-done
	if err == nil || strings.HasPrefix(err.Error(), "migrated") || !strings.Contains(err.Error(), "runs on where it was") {
		t.Fatalf("migrate to a node that died: %v", err)
	}
	t.Logf("fireworks migrate: %v", err)
	sb := waitSandbox(t, id, minute, "running on its source", func(sb map[string]any) bool {
		return sb["status"] == "running" && sb["node"] == filepath.Base(src.dataDir)
	})
	if migs, _ := sb["migrations"].([]any); len(migs) != 1 || !strings.Contains(fmt.Sprint(migs[0]), "failed") {
		t.Errorf("inspect shows the migrations %v", migs)
	}
	waitFor(t, minute, "the counter going on", func() bool { return counterOf(t, id) > before })
	if vms := w.vmsOf(src, id); len(vms) != 1 {
		t.Errorf("the source runs %d VMMs of the sandbox", len(vms))
	}
}

// TestMigrateSourceAgentDies: the source's agent is killed (its VMMs run on) during the
// pre-copy; the target never runs the sandbox, and once the agent is back it runs on
// on its source: never two copies.
func TestMigrateSourceAgentDies(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	id, src, dst := runCounter(t)
	defer mustFW(t, "rm", "-f", id)
	fast := slowLink(t, src.h, "16mbit")
	defer fast()
	done := migrating(t, id, dst)
	// The agent alone (its process group), as a crash of it: the VMMs live on.
	_ = syscall.Kill(-src.cmd.Process.Pid, syscall.SIGKILL)
	<-src.exited
	src.cmd = nil
	// Back at once, as a supervisor restarts a crashed agent: a node silent for the
	// heartbeat TTL (6 s here) is declared down and its sandboxes lost, which is not
	// this test's case. (Waiting for the target to give up first raced that TTL, and
	// lost under load in CI.)
	if err := w.start(src); err != nil {
		t.Fatal(err)
	}
	waitFor(t, minute, "the target to give the sandbox up", func() bool { return len(w.vmsOf(dst, id)) == 0 })
	err := <-done
	t.Logf("fireworks migrate: %v", err)
	if err == nil || strings.HasPrefix(err.Error(), "migrated") {
		t.Fatalf("a migration whose source's agent died: %v", err)
	}
	sb := waitSandbox(t, id, 2*minute, "running on its source", func(sb map[string]any) bool {
		migs, _ := sb["migrations"].([]any)
		return sb["status"] == "running" && sb["node"] == filepath.Base(src.dataDir) && len(migs) == 1
	})
	t.Logf("migrations: %v", sb["migrations"])
	before := counterOf(t, id)
	waitFor(t, minute, "the counter going on", func() bool { return counterOf(t, id) > before })
	if n, m := len(w.vmsOf(src, id)), len(w.vmsOf(dst, id)); n != 1 || m != 0 {
		t.Errorf("VMMs of the sandbox: %d on the source, %d on the target; want exactly one, on the source", n, m)
	}
	// The VMM the agent took back still had the dead agent's disk mirror in it: the
	// next migration (the link fast again) clears it and moves the sandbox.
	fast()
	if out, errOut, code := w.cli(t.Context(), nil, "migrate", id, "--to", filepath.Base(dst.dataDir)); code != 0 || !strings.Contains(out, "migrated") {
		t.Errorf("a migration after the one its source's agent died in: exit %d, %q, %s", code, out, errOut)
	}
}
