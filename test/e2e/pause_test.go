package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Pause and resume with real VMs, from the outside: a counting loop carries on where it
// was (it is not restarted), files written before every pause are there after three
// cycles, the guest clock is the host's after each resume, a listening server answers
// again, the network policy is in force again, the sandbox holds no VM while paused, and a
// paused sandbox survives a restart of dev (server and agent). A damaged saved state is
// refused with a clear error and loses nothing else.
func TestPauseResume(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	policy := filepath.Join(t.TempDir(), "policy")
	if err := os.WriteFile(policy, []byte("deny 203.0.113.0/24\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "pausable", "--policy", policy, img, "--", "sh", "-c",
		"mkdir -p /tmp/www && echo served > /tmp/www/index.html && httpd -p 8000 -h /tmp/www && "+
			"i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; echo tick $i; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", id) })
	waitStatus(t, id, "running")
	count := func() int {
		t.Helper()
		// The loop rewrites the file (truncate, then write): a read in between sees it
		// empty, so an empty read is tried again.
		var out string
		for range 20 {
			if out = strings.TrimSpace(fw(t, 0, "exec", id, "--", "cat", "/tmp/count").stdout); out != "" {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		n, err := strconv.Atoi(out)
		if err != nil {
			t.Fatalf("counter %q", out)
		}
		return n
	}
	deadline := time.Now().Add(time.Minute)
	for {
		r := world.cli(context.Background(), nil, "exec", id, "--", "cat", "/tmp/count")
		if n, err := strconv.Atoi(strings.TrimSpace(r.stdout)); err == nil && n >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the counter did not get going: %q %q", r.stdout, r.stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A follower of its output goes on across a pause: it sees the ticks after the
	// resume, none twice.
	fctx, stopFollow := context.WithCancel(context.Background())
	defer stopFollow()
	followed := make(chan result, 1)
	go func() { followed <- world.cli(fctx, nil, "logs", "-f", id) }()
	var vmPID string
	for cycle := range 3 {
		// Something on the disk, and the memory's idea of the count, before the pause.
		fw(t, 0, "exec", "-u", "0", id, "--", "sh", "-c", fmt.Sprintf("mkdir -p /data && echo cycle-%d > /data/f%d && sync", cycle, cycle))
		before := count()
		vmPID = str(details(t, inspect(t, id)), "pid")
		var execEnded chan result
		if cycle == 2 {
			// An exec under way ends at the pause and says why; its process does not
			// run on after the resume.
			execEnded = make(chan result, 1)
			go func() { execEnded <- world.cli(context.Background(), nil, "exec", id, "--", "sleep", "313") }()
			deadline := time.Now().Add(time.Minute)
			for !strings.Contains(fw(t, 0, "exec", id, "--", "ps").stdout, "sleep 313") {
				if time.Now().After(deadline) {
					t.Fatal("the exec's sleep did not start")
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		fw(t, 0, "pause", id)
		if execEnded != nil {
			if r := <-execEnded; r.code == 0 || !strings.Contains(r.stderr, "pause") {
				t.Errorf("an exec under way at the pause: exit %d, %q", r.code, r.stderr)
			}
		}
		sb := inspect(t, id)
		saved, _ := sb["saved"].(map[string]any)
		if sb["status"] != "paused" || saved == nil || saved["bytes"] == nil {
			t.Fatalf("cycle %d: after pause: status %v saved %v", cycle, sb["status"], saved)
		}
		// Paused, it holds no VM: its QEMU is gone (inspect shows none), and exec says
		// why it cannot run.
		if d := details(t, sb); str(d, "pid") != "" || str(d, "netns") != "" {
			t.Errorf("cycle %d: inspect of the paused sandbox shows pid %q, netns %q of a VM that ended", cycle, str(d, "pid"), str(d, "netns"))
		}
		if _, err := os.Stat("/proc/" + vmPID); err == nil && vmPID != "" {
			if b, _ := os.ReadFile("/proc/" + vmPID + "/cmdline"); strings.Contains(string(b), id) {
				t.Errorf("cycle %d: the paused sandbox's VMM (pid %s) still runs", cycle, vmPID)
			}
		}
		if r := world.cli(context.Background(), nil, "exec", id, "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "paused") {
			t.Errorf("cycle %d: exec on a paused sandbox: exit %d, %q", cycle, r.code, r.stderr)
		}
		if cycle == 1 {
			// Paused sandboxes survive dev's restart (its server and its agent).
			restartDev(t)
			if st := inspect(t, id)["status"]; st != "paused" {
				t.Fatalf("after dev restarted: %v", st)
			}
		} else {
			time.Sleep(time.Second) // the guest clock must not lag by the pause
		}
		fw(t, 0, "resume", id)
		sb = waitStatus(t, id, "running")
		if d := details(t, sb); str(d, "start_mode") != "resume" {
			t.Errorf("cycle %d: resumed with start mode %q", cycle, str(d, "start_mode"))
		}
		// The same loop: it goes on from where it was (a restart counts from 1).
		if after := count(); after < before {
			t.Fatalf("cycle %d: the counter went from %d to %d: the process was restarted, not resumed", cycle, before, after)
		}
		for c := 0; c <= cycle; c++ {
			if got := strings.TrimSpace(fw(t, 0, "exec", id, "--", "cat", fmt.Sprintf("/data/f%d", c)).stdout); got != fmt.Sprintf("cycle-%d", c) {
				t.Errorf("cycle %d: /data/f%d holds %q", cycle, c, got)
			}
		}
		checkClock(t, fmt.Sprintf("cycle %d", cycle), strings.TrimSpace(fw(t, 0, "exec", id, "--", "date", "+%s").stdout))
		if execEnded != nil && strings.Contains(fw(t, 0, "exec", id, "--", "ps").stdout, "sleep 313") {
			t.Error("the exec ended by the pause runs on after the resume")
		}
		if cycle == 0 {
			// Two more pauses: the follower goes on across each.
			for range 2 {
				fw(t, 0, "pause", id)
				fw(t, 0, "resume", id)
				waitStatus(t, id, "running")
			}
			after := count()
			time.Sleep(time.Second)
			stopFollow()
			out := (<-followed).stdout
			last, sawAfter := 0, false
			for _, l := range strings.Split(out, "\n") {
				n, err := strconv.Atoi(strings.TrimPrefix(l, "tick "))
				if err != nil {
					continue
				}
				if n <= last {
					t.Errorf("logs -f across the pause: tick %d after %d (repeated or restarted)", n, last)
				}
				last, sawAfter = n, sawAfter || n > after
			}
			if !sawAfter {
				t.Errorf("logs -f ended at the pause: its last tick is %d, the resumed loop is past %d", last, after)
			}
		}
		// The server that listened before still answers (it was never restarted).
		if got := strings.TrimSpace(fw(t, 0, "exec", id, "--", "wget", "-qO-", "http://127.0.0.1:8000/").stdout); got != "served" {
			t.Errorf("cycle %d: the listening server answers %q", cycle, got)
		}
	}
	// The policy is in force again, on a network made for the resumed VM.
	if r := world.cli(context.Background(), nil, "exec", id, "--", "wget", "-T", "3", "-qO-", "http://203.0.113.7/"); r.code == 0 {
		t.Error("a denied address answered after the resume")
	}
	if out := fw(t, 0, "policy", "show", id).stdout; !strings.Contains(out, "203.0.113.0/24") {
		t.Errorf("policy show after the resume:\n%s", out)
	}
	// The output log goes on across the cycles: ticks only ever grow.
	last := 0
	for _, l := range strings.Split(fw(t, 0, "logs", id).stdout, "\n") {
		n, err := strconv.Atoi(strings.TrimPrefix(l, "tick "))
		if err != nil {
			continue
		}
		if n <= last {
			t.Fatalf("the log's ticks went from %d to %d: output restarted or repeated", last, n)
		}
		last = n
	}

	// A damaged saved state: the resume fails and says so; nothing else is lost.
	fw(t, 0, "pause", id)
	state := filepath.Join(world.dataDir, "sandboxes", id, "saved", "state")
	if err := os.Truncate(state, 4096); err != nil {
		t.Fatal(err)
	}
	r := world.cli(context.Background(), nil, "resume", id)
	if r.code == 0 || !strings.Contains(r.stderr, "restore the saved VM") {
		t.Errorf("resume of a damaged save: exit %d, %q", r.code, r.stderr)
	}
	if sb := inspect(t, id); sb["status"] != "failed" {
		t.Errorf("after a damaged resume: %v (%v)", sb["status"], sb["reason"])
	}
	// Another sandbox is unaffected, and a paused one is stopped cleanly.
	// A pause asked while the sandbox is still starting waits for it to run.
	other := strings.TrimSpace(fw(t, 0, "run", "-d", img, "--", "sleep", "600").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", other) })
	fw(t, 0, "pause", other)
	if sb := inspect(t, other); sb["status"] != "paused" {
		t.Errorf("paused while starting: %v (%v)", sb["status"], sb["reason"])
	}
	fw(t, 0, "stop", other)
	if sb := inspect(t, other); sb["status"] != "exited" || sb["saved"] != nil {
		t.Errorf("stopped while paused: %v, saved %v", sb["status"], sb["saved"])
	}
	if _, err := os.Stat(filepath.Join(world.dataDir, "sandboxes", other, "saved")); !os.IsNotExist(err) {
		// The node lets it go when it next hears of the sandbox; give it a moment.
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if _, err := os.Stat(filepath.Join(world.dataDir, "sandboxes", other, "saved")); os.IsNotExist(err) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := os.Stat(filepath.Join(world.dataDir, "sandboxes", other, "saved")); !os.IsNotExist(err) {
			t.Errorf("the saved state of a sandbox stopped while paused is still on disk")
		}
	}
}
