package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMigrateInPlace: in `fireworks dev` (one node) a live migration moves the sandbox
// into a fresh VMM on the same node, by the same path as between nodes: its counter
// goes on from where it was, its files, server, policy, counters and log are there, a
// `logs -f` follower and an attached `run` go on across it, the old VMM and its network
// are gone, and inspect records the migration.
func TestMigrateInPlace(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "migrate-here", "--policy", writePolicy(t, "deny 203.0.113.0/24\n"), img, "--", "sh", "-c",
		"echo kept > /tmp/f; mkdir -p /tmp/www && echo served > /tmp/www/index.html && httpd -p 8000 -h /tmp/www && "+
			"i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; echo tick $i; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", id) })
	waitStatus(t, id, "running")
	count := func() int {
		t.Helper()
		r := world.cli(context.Background(), nil, "exec", id, "--", "cat", "/tmp/count")
		n, err := strconv.Atoi(strings.TrimSpace(r.stdout))
		if err != nil {
			return -1
		}
		return n
	}
	deadline := time.Now().Add(time.Minute)
	for count() < 3 {
		if time.Now().After(deadline) {
			t.Fatal("the counter did not get going")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A blocked attempt counts as dropped.
	fw(t, 0, "exec", id, "--", "sh", "-c", "nc -w 1 203.0.113.7 80 </dev/null; true")
	dropped := counters(t, id)["egress_dropped"]
	if dropped == 0 {
		t.Fatal("the policy dropped nothing")
	}
	sb := inspect(t, id)
	node, oldPID, oldNetns := str(sb, "node"), str(details(t, sb), "pid"), str(details(t, sb), "netns")
	before := count()
	// A follower of its output, and an attached run of another sandbox, go on across it.
	fctx, stopFollow := context.WithCancel(context.Background())
	defer stopFollow()
	followed := make(chan result, 1)
	go func() { followed <- world.cli(fctx, nil, "logs", "-f", id) }()
	attached := make(chan result, 1)
	go func() {
		attached <- world.cli(context.Background(), nil, "run", "--name", "migrate-attached", img, "--", "sh", "-c",
			"i=0; while [ $i -lt 80 ]; do i=$((i+1)); echo line $i; sleep 0.1; done")
	}()
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", "migrate-attached") })
	for deadline := time.Now().Add(time.Minute); !strings.Contains(world.cli(context.Background(), nil, "logs", "migrate-attached").stdout, "line 5\n"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the attached run did not get going")
		}
	}
	if out := fw(t, 0, "migrate", "migrate-attached").stdout; !strings.Contains(out, "migrated") {
		t.Fatalf("migrate of the attached run's sandbox: %q", out)
	}
	ar := <-attached
	var want strings.Builder
	for i := 1; i <= 80; i++ {
		fmt.Fprintf(&want, "line %d\n", i)
	}
	if ar.code != 0 || ar.stdout != want.String() {
		t.Errorf("the attached run across a migration: exit %d, output %d bytes (want each line once, %d bytes), ends %q, stderr %q",
			ar.code, len(ar.stdout), want.Len(), tail(ar.stdout, 40), ar.stderr)
	}

	out := fw(t, 0, "migrate", id).stdout
	t.Logf("fireworks migrate: %s", strings.TrimSpace(out))
	if !strings.Contains(out, fmt.Sprintf("migrated from %s to %s", node, node)) {
		t.Fatalf("migrate printed %q", out)
	}
	sb = inspect(t, id)
	d := details(t, sb)
	if str(sb, "status") != "running" || str(d, "start_mode") != "migrated" || str(d, "pid") == oldPID || str(d, "netns") == oldNetns {
		t.Fatalf("after the migration: status %v details %v (pid was %s, netns %s)", sb["status"], d, oldPID, oldNetns)
	}
	if migs, _ := sb["migrations"].([]any); len(migs) != 1 || !strings.Contains(fmt.Sprint(migs[0]), "moved") {
		t.Errorf("inspect shows the migrations %v", sb["migrations"])
	}
	after := count()
	if after < before {
		t.Fatalf("the counter reads %d after the migration, %d before: it was reset", after, before)
	}
	for deadline := time.Now().Add(time.Minute); count() <= after; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the counter stopped after the migration")
		}
	}
	if got := strings.TrimSpace(fw(t, 0, "exec", id, "--", "cat", "/tmp/f").stdout); got != "kept" {
		t.Errorf("/tmp/f holds %q", got)
	}
	if got := strings.TrimSpace(fw(t, 0, "exec", id, "--", "wget", "-qO-", "http://127.0.0.1:8000/").stdout); got != "served" {
		t.Errorf("the web server answers %q after the migration", got)
	}
	fw(t, 0, "exec", id, "--", "sh", "-c", "nc -w 1 203.0.113.7 80 </dev/null; true")
	if n := counters(t, id)["egress_dropped"]; n <= dropped {
		t.Errorf("egress dropped %d after a blocked attempt past the migration, %d before: the policy or its counters did not carry on", n, dropped)
	}
	stopFollow()
	fr := <-followed
	if !strings.Contains(fr.stdout, fmt.Sprintf("tick %d\n", after+1)) || strings.Count(fr.stdout, fmt.Sprintf("tick %d\n", before)) != 1 {
		t.Errorf("logs -f across the migration: saw tick %d %d times, tick %d %v", before, strings.Count(fr.stdout, fmt.Sprintf("tick %d\n", before)),
			after+1, strings.Contains(fr.stdout, fmt.Sprintf("tick %d\n", after+1)))
	}
	logs := fw(t, 0, "logs", id).stdout
	if !strings.Contains(logs, "tick 1\n") || !strings.Contains(logs, fmt.Sprintf("tick %d\n", after+1)) {
		t.Errorf("the log lacks ticks from before or after the migration")
	}
	// Commands sent while it migrates run, before or after the switch-over, and none
	// fails for it.
	migrating := make(chan result, 1)
	go func() { migrating <- world.cli(context.Background(), nil, "migrate", "migrate-here") }()
	var execs []result
	for len(migrating) == 0 && len(execs) < 40 {
		execs = append(execs, world.cli(context.Background(), nil, "exec", id, "--", "echo", "during"))
	}
	if r := <-migrating; r.code != 0 {
		t.Fatalf("the second migration: exit %d, %s", r.code, r.stderr)
	}
	for i, r := range execs {
		if r.code != 0 || strings.TrimSpace(r.stdout) != "during" {
			t.Errorf("exec %d of %d sent during a migration: exit %d, output %q, %s", i+1, len(execs), r.code, r.stdout, r.stderr)
		}
	}
	// A stop during a migration: whichever comes first, the sandbox ends, stopped (its
	// command gets the signal: no kill after the grace period), and nothing of it runs
	// on, the migration's target VMM included.
	go func() { migrating <- world.cli(context.Background(), nil, "migrate", "migrate-here") }()
	var mid string
	for deadline := time.Now().Add(30 * time.Second); mid == ""; time.Sleep(20 * time.Millisecond) {
		if m, ok := inspect(t, id)["migration"].(map[string]any); ok {
			mid = str(m, "id")
		}
		if time.Now().After(deadline) {
			t.Fatal("the third migration did not start")
		}
	}
	fw(t, 0, "stop", id)
	<-migrating
	sb = inspect(t, id)
	if st := str(sb, "status"); st != "exited" || sb["exit_code"] != float64(143) {
		t.Errorf("a sandbox stopped during its migration is %s, exit code %v (want 143: ended by the stop's SIGTERM)", st, sb["exit_code"])
	}
	target := "m-" + mid[:12]
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		vmms, _ := exec.Command("pgrep", "-f", "guest=("+id+"|"+target+") ").Output()
		_, dirErr := os.Stat(filepath.Join(world.dataDir, "run", target))
		if len(vmms) == 0 && os.IsNotExist(dirErr) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30 s after a stop during its migration, VMMs of the sandbox run (%q) or the target's run directory is there (%v)", vmms, dirErr)
		}
	}
	// The old VMM and its network are gone.
	if _, err := os.Stat(filepath.Join("/proc", oldPID)); err == nil {
		t.Errorf("the old VMM (pid %s) still runs", oldPID)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", oldNetns)); err == nil {
		t.Errorf("the old network namespace %s is still there", oldNetns)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
