package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// A layer that tries to write outside its root is refused with a clear error, the sandbox
// fails, and nothing lands outside the extraction root.
func TestHostileLayerRejected(t *testing.T) {
	need(t)
	r := world.cli(context.Background(), nil, "run", image("hostile:latest"), "--", "true")
	if r.code != 125 || !strings.Contains(r.stderr, "hostile:latest") {
		t.Fatalf("hostile image: exit %d stderr %q; want 125 naming the image", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "hostile layer") || !strings.Contains(r.stderr, "climbs out of the root") {
		t.Errorf("error should say the layer was refused for climbing out of its root: %q", r.stderr)
	}
	if left := hostileLeftovers(); len(left) > 0 {
		t.Errorf("hostile layer left files behind: %v", left)
	}
}

// Killing the VMM process is noticed and reported as a failure with the reason.
func TestKilledVMMReportedFailed(t *testing.T) {
	need(t)
	id := strings.TrimSpace(fw(t, 0, "run", "-d", image("busybox:latest"), "--", "sleep", "600").stdout)
	sb := waitStatus(t, id, "running")
	details, _ := sb["details"].(map[string]any)
	pid, err := strconv.Atoi(details["pid"].(string))
	if err != nil || pid <= 0 {
		t.Fatalf("inspect shows no VMM pid: %v", details)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill VMM %d: %v", pid, err)
	}
	sb = waitStatus(t, id, "failed")
	if reason, _ := sb["reason"].(string); !strings.Contains(reason, "VMM") || !strings.Contains(reason, "killed") {
		t.Errorf("reason %q should say the VMM was killed", reason)
	}
}

// Restarting `fireworks dev` loses nothing: finished sandboxes keep status and logs, and a
// sandbox whose VM was running is accounted for (marked lost with a reason, its VMM gone).
func TestStateSurvivesServerRestart(t *testing.T) {
	need(t)
	fw(t, 7, "run", "--name", "before-restart", image("busybox:latest"), "--", "sh", "-c", "echo kept-output; echo kept-err >&2; exit 7")
	_ = world.cli(context.Background(), nil, "run", "--name", "before-restart", image("busybox:latest"), "--", "true")
	// A sandbox that counts while the server restarts: its VM is re-adopted, nothing it
	// printed is lost, and it still answers exec and stop afterwards.
	running := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "running-at-restart", image("busybox:latest"), "--",
		"sh", "-c", "i=0; trap 'echo stopping; exit 5' TERM; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done").stdout)
	sb := waitStatus(t, running, "running")
	pid := sb["details"].(map[string]any)["pid"]
	fw(t, 0, "exec", running, "--", "sh", "-c", "echo before > /tmp/marker")

	world.stopDev()
	if err := world.startDev(); err != nil {
		world.dumpDevLog()
		t.Fatalf("restart fireworks dev: %v", err)
	}

	done := inspect(t, "before-restart")
	if done["status"] != "exited" || done["exit_code"] != float64(7) {
		t.Errorf("finished sandbox after restart: status %v exit %v", done["status"], done["exit_code"])
	}
	r := fw(t, 0, "logs", "before-restart")
	if strings.TrimSpace(r.stdout) != "kept-output" || strings.TrimSpace(r.stderr) != "kept-err" {
		t.Errorf("logs after restart: %q / %q", r.stdout, r.stderr)
	}
	adopted := inspect(t, running)
	if adopted["status"] != "running" || adopted["details"].(map[string]any)["pid"] != pid {
		t.Fatalf("sandbox running at restart: status %v pid %v (was %v); want the same VM re-adopted, reason %v",
			adopted["status"], adopted["details"].(map[string]any)["pid"], pid, adopted["reason"])
	}
	if r := fw(t, 0, "exec", running, "--", "cat", "/tmp/marker"); strings.TrimSpace(r.stdout) != "before" {
		t.Errorf("exec after re-adoption: %q", r.stdout)
	}
	// A restart stopped while it takes the VM back leaves the VM for the next start
	// (as a rolling update that replaces an agent twice in a row would). The VMM is
	// frozen (SIGSTOP) so that the adoption is surely under way, and cannot finish,
	// when the stop comes.
	vmmPID, err := strconv.Atoi(fmt.Sprint(pid))
	if err != nil {
		t.Fatalf("VMM pid %v: %v", pid, err)
	}
	if err := syscall.Kill(vmmPID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	world.stopDev()
	err = world.startDevUntil(`msg="taking back a running sandbox"`)
	_ = syscall.Kill(vmmPID, syscall.SIGCONT)
	if err != nil {
		world.dumpDevLog()
		t.Fatalf("a start stopped while it takes the VM back: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(world.root, "dev.log")); !strings.Contains(string(b), "stopped while taking back this node's sandboxes") {
		world.dumpDevLog()
		t.Fatal("the start stopped during the adoption did not say it left the VMs for the next one")
	}
	if err := world.startDev(); err != nil {
		world.dumpDevLog()
		t.Fatalf("restart fireworks dev: %v", err)
	}
	if again := inspect(t, running); again["status"] != "running" || again["details"].(map[string]any)["pid"] != pid {
		t.Fatalf("after a restart stopped during the adoption: status %v pid %v (was %v), reason %v",
			again["status"], again["details"].(map[string]any)["pid"], pid, again["reason"])
	}
	if r := fw(t, 0, "exec", running, "--", "cat", "/tmp/marker"); strings.TrimSpace(r.stdout) != "before" {
		t.Errorf("exec after the second re-adoption: %q", r.stdout)
	}
	time.Sleep(time.Second)
	fw(t, 0, "stop", running)
	final := waitStatus(t, running, "exited")
	if final["exit_code"] != float64(5) {
		t.Errorf("exit code after re-adoption = %v, want 5 (from its TERM trap)", final["exit_code"])
	}
	// The ticks are consecutive: nothing printed during the restart was lost.
	logs := fw(t, 0, "logs", running).stdout
	lines := strings.Fields(logs)
	n := 0
	for _, l := range lines {
		if strings.HasPrefix(l, "tick-") {
			n++
			if l != fmt.Sprintf("tick-%d", n) {
				t.Fatalf("tick %d is %q: output lost across the restart\n%s", n, l, logs)
			}
		}
	}
	if n < 5 || !strings.Contains(logs, "stopping") {
		t.Errorf("logs after re-adoption: %d ticks, stopping=%v", n, strings.Contains(logs, "stopping"))
	}
	// And the restarted server runs new sandboxes.
	if r := fw(t, 0, "run", image("busybox:latest"), "--", "echo", "after-restart"); strings.TrimSpace(r.stdout) != "after-restart" {
		t.Errorf("run after restart: %q", r.stdout)
	}
}

// A stop while the sandbox is still starting ends the start: the sandbox is exited with
// the reason, its command never runs, and the start's work in flight (here the image
// pull) is abandoned. The start is held at a known step (a layer download the test
// releases only afterwards), so the stop always lands while it is starting, however fast
// this machine boots or restores.
func TestStopDuringStart(t *testing.T) {
	need(t)
	gate := make(chan struct{})
	var held, abandoned atomic.Int32
	host := testimage.ServeWrapped(t, map[string]v1.Image{
		// A layer of its own, so no earlier pull has it cached.
		"gated:latest": testimage.WithLayers(t, testimage.Busybox(t),
			testimage.Layer(t, testimage.Entry{Name: "gate", Body: fmt.Sprint(time.Now().UnixNano())})),
	}, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				held.Add(1)
				select {
				case <-gate:
				case <-r.Context().Done():
					abandoned.Add(1) // the client gave the download up
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	})
	defer func() {
		select {
		case <-gate:
		default:
			close(gate)
		}
	}()
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--insecure-registry", host, host+"/gated:latest", "--", "sh", "-c", "echo I-RAN; sleep 600").stdout)
	waitFor(t, time.Minute, "the start to reach the held download", func() bool { return held.Load() > 0 })
	if st := inspect(t, id)["status"]; st != "starting" {
		t.Fatalf("sandbox %s is %v while its image download is held, want starting", id, st)
	}
	fw(t, 0, "stop", "-t", "1s", id)
	sb := inspect(t, id)
	if sb["status"] != "exited" || !strings.Contains(fmt.Sprint(sb["reason"]), "while starting") {
		t.Errorf("stopped during start: status %v reason %v", sb["status"], sb["reason"])
	}
	waitFor(t, time.Minute, "the held download to be abandoned by the stopped start", func() bool { return abandoned.Load() > 0 })
	close(gate)
	// The start is over: nothing is left to run the command, now or later.
	if sb := inspect(t, id); sb["status"] != "exited" {
		t.Errorf("after the download was released: status %v", sb["status"])
	}
	if r := fw(t, 0, "logs", id); strings.Contains(r.stdout, "I-RAN") {
		t.Errorf("the command ran after the sandbox was stopped: %q", r.stdout)
	}
}

// waitFor polls cond until it holds, failing the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out after %s waiting for %s", d, what)
}

// A registry that accepts connections and never answers does not wedge a sandbox:
// `rm -f` during the pull ends it.
func TestRemoveDuringHungPull(t *testing.T) {
	need(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // accept and say nothing
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()
	host := ln.Addr().String()
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--insecure-registry", host, host+"/never:latest", "--", "true").stdout)
	waitStatus(t, id, "starting")
	fw(t, 0, "rm", "-f", id)
	if r := world.cli(context.Background(), nil, "inspect", id); r.code == 0 {
		t.Errorf("sandbox %s still exists after rm -f: %s", id, r.stdout)
	}
}
