package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// Fork: two running copies of a running sandbox, each a new machine (its own ID,
// hostname, kernel UUIDs and random bytes) whose counting loop carries on from the value
// it had at the fork; its files are there, and what one writes the others do not see.
// The source goes on.
func TestFork(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	src := strings.TrimSpace(fw(t, 0, "run", "-d", "-u", "0", "--name", "fork-source", img, "--", "sh", "-c",
		"mkdir -p /data && echo seed > /data/f && i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", src) })
	waitStatus(t, src, "running")
	count := func(id string) int {
		t.Helper()
		// The loop rewrites the file (truncate, then write): an empty read is tried again.
		for range 20 {
			r := world.cli(context.Background(), nil, "exec", id, "--", "cat", "/tmp/count")
			if n, err := strconv.Atoi(strings.TrimSpace(r.stdout)); err == nil {
				return n
			}
			time.Sleep(20 * time.Millisecond)
		}
		return -1
	}
	deadline := time.Now().Add(time.Minute)
	for count(src) < 5 {
		if time.Now().After(deadline) {
			t.Fatal("the source's counter did not get going")
		}
		time.Sleep(200 * time.Millisecond)
	}
	before := count(src)
	forks := strings.Fields(fw(t, 0, "fork", "fork-source", "--count", "2").stdout)
	if len(forks) != 2 {
		t.Fatalf("fork printed %v", forks)
	}
	for _, f := range forks {
		t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", f) })
	}
	seen := map[string]string{}
	for _, f := range append([]string{src}, forks...) {
		sb := inspect(t, f)
		if sb["status"] != "running" {
			t.Fatalf("%s is %v (%v)", f, sb["status"], sb["reason"])
		}
		if f != src {
			if d := details(t, sb); str(d, "start_mode") != "fork" {
				t.Errorf("fork %s started by %q", f, str(d, "start_mode"))
			}
		}
		// The loop carries on from where it was at the fork (a fresh run counts from 1).
		if n := count(f); n < before {
			t.Errorf("%s: counter %d, below %d at the fork", f, n, before)
		}
		if got := strings.TrimSpace(fw(t, 0, "exec", f, "--", "cat", "/data/f").stdout); got != "seed" {
			t.Errorf("%s: /data/f holds %q", f, got)
		}
		p := probe(t, f)
		checkClock(t, f, p["now"])
		for _, k := range []string{"host", "id", "uuid", "rand"} {
			if other, ok := seen[k+"="+p[k]]; ok {
				t.Errorf("%s and %s share %s %q", f, other, k, p[k])
			}
			seen[k+"="+p[k]] = f
		}
		if p["id"] != f {
			t.Errorf("%s says it is sandbox %q", f, p["id"])
		}
	}
	// The forks share the saved memory: pages of one file, mapped copy-on-write by each.
	for _, f := range forks {
		pid, _ := strconv.Atoi(str(details(t, inspect(t, f)), "pid"))
		if pid <= 0 {
			t.Fatalf("fork %s: no VMM pid in inspect", f)
		}
		kib := testutil.SharedKiB(t, pid, func(p string) bool { return strings.HasSuffix(p, "/flat/mem") })
		t.Logf("fork %s shares %d KiB of the flattened save", f, kib)
		if kib < 1024 {
			t.Errorf("fork %s shares %d KiB of the saved memory with its sibling; want its pages shared", f, kib)
		}
	}
	// They diverge: a file one writes is not in another.
	fw(t, 0, "exec", "-u", "0", forks[0], "--", "sh", "-c", "echo mine > /data/only-here && sync")
	if r := world.cli(context.Background(), nil, "exec", forks[1], "--", "cat", "/data/only-here"); r.code == 0 {
		t.Error("a file written in one fork is in another")
	}
	t.Run("snapshot with memory", func(t *testing.T) { testMemorySnapshot(t, src, count) })
	t.Run("a Debian image", testForkDebian)
}

// testForkDebian: what users bring — a fork of a sandbox of a debootstrapped Debian
// image carries on its bash loop, on Debian's files.
func testForkDebian(t *testing.T) {
	ref := debianImage(t)
	src := strings.TrimSpace(fw(t, 0, "run", "-d", ref, "--", "bash", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", src) })
	waitStatus(t, src, "running")
	count := func(id string) int {
		n, _ := strconv.Atoi(strings.TrimSpace(world.cli(context.Background(), nil, "exec", id, "--", "cat", "/tmp/count").stdout))
		return n
	}
	deadline := time.Now().Add(time.Minute)
	for count(src) < 3 {
		if time.Now().After(deadline) {
			t.Fatal("the Debian source's counter did not get going")
		}
		time.Sleep(200 * time.Millisecond)
	}
	before := count(src)
	forks := strings.Fields(fw(t, 0, "fork", src).stdout)
	if len(forks) != 1 {
		t.Fatalf("fork printed %v", forks)
	}
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", forks[0]) })
	if n := count(forks[0]); n < before {
		t.Errorf("the Debian fork counts %d, below %d at the fork", n, before)
	}
	if got := strings.TrimSpace(fw(t, 0, "exec", forks[0], "--", "cut", "-d.", "-f1", "/etc/debian_version").stdout); got != "12" {
		t.Errorf("the Debian fork's /etc/debian_version: %q", got)
	}
}

// testMemorySnapshot: a snapshot with memory of running sandbox src (whose loop counts
// in /tmp/count) starts sandboxes that carry on from the saved instant, each a machine of
// its own; src goes on; a snapshot damaged on the node is refused with a clear error,
// and nothing else is lost.
func testMemorySnapshot(t *testing.T, src string, count func(string) int) {
	before := count(src)
	out := fw(t, 0, "snapshot", "create", src, "mem-snap", "--memory").stdout
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "snapshot", "rm", "mem-snap") })
	if !strings.HasPrefix(out, "mem-snap") {
		t.Errorf("snapshot create printed %q", out)
	}
	if sb := inspect(t, src); sb["status"] != "running" {
		t.Fatalf("the source is %v after a snapshot with memory (%v)", sb["status"], sb["reason"])
	}
	ls := fw(t, 0, "snapshot", "ls").stdout
	if !strings.Contains(ls, "mem-snap") || !strings.Contains(ls, "memory (") {
		t.Errorf("snapshot ls does not show a snapshot with memory:\n%s", ls)
	}
	// An IMAGE is not given (the snapshot names it), nor a command without "--".
	for _, args := range [][]string{{"oci:/nowhere", "--", "true"}, {"true"}} {
		if r := world.cli(context.Background(), nil, append([]string{"run", "-d", "--snapshot", "mem-snap"}, args...)...); r.code == 0 || !strings.Contains(r.stderr, "give no IMAGE") {
			t.Errorf("run --snapshot mem-snap %v: exit %d, %q", args, r.code, r.stderr)
		}
	}
	// A command cannot be given: the snapshot's processes carry on.
	if r := world.cli(context.Background(), nil, "run", "-d", "--snapshot", "mem-snap", "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "carry on") {
		t.Errorf("run --snapshot of a snapshot with memory with a command: exit %d, %q", r.code, r.stderr)
	}
	seen := map[string]string{}
	for i := range 2 {
		args := []string{"run", "-d", "--snapshot", "mem-snap"}
		if i == 0 {
			args = append(args, "--restart", "on-failure") // its restarts need the snapshot
		}
		id := strings.TrimSpace(fw(t, 0, args...).stdout)
		t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", id) })
		sb := waitStatus(t, id, "running")
		if d := details(t, sb); str(d, "start_mode") != "snapshot" {
			t.Errorf("start %d from the snapshot started by %q", i, str(d, "start_mode"))
		}
		if n := count(id); n < before {
			t.Errorf("%s: counter %d, below %d when the snapshot was taken", id, n, before)
		}
		if got := strings.TrimSpace(fw(t, 0, "exec", id, "--", "cat", "/data/f").stdout); got != "seed" {
			t.Errorf("%s: /data/f holds %q", id, got)
		}
		p := probe(t, id)
		checkClock(t, id, p["now"])
		for _, k := range []string{"host", "uuid", "rand"} {
			if other, ok := seen[k+"="+p[k]]; ok {
				t.Errorf("%s and %s share %s %q", id, other, k, p[k])
			}
			seen[k+"="+p[k]] = id
		}
		if p["id"] != id {
			t.Errorf("%s says it is sandbox %q", id, p["id"])
		}
	}
	if n := count(src); n < before {
		t.Errorf("the source counts %d after the snapshot, %d before", n, before)
	}
	if r := world.cli(context.Background(), nil, "snapshot", "rm", "mem-snap"); r.code == 0 || !strings.Contains(r.stderr, "needed by sandbox") {
		t.Errorf("snapshot rm while a sandbox's restarts need it: exit %d, %q", r.code, r.stderr)
	}
	// Damaged on the node: a start is refused saying why; the snapshot's record, the
	// source and the sandboxes started from it are untouched.
	fw(t, 0, "snapshot", "create", src, "mem-damaged", "--memory")
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "snapshot", "rm", "mem-damaged") })
	states, _ := filepath.Glob(filepath.Join(world.dataDir, "snapshots", "*", "flat", "state"))
	damaged := ""
	for _, st := range states {
		fi, _ := os.Stat(st)
		if damaged == "" || fi.ModTime().After(mustStat(t, damaged).ModTime()) {
			damaged = st
		}
	}
	if damaged == "" {
		t.Fatal("no snapshot with memory under the data dir")
	}
	data, err := os.ReadFile(damaged)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(damaged, data[:len(data)/3], 0o400); err != nil {
		t.Fatal(err)
	}
	r := world.cli(context.Background(), nil, "run", "--snapshot", "mem-damaged")
	if r.code == 0 {
		t.Fatalf("a damaged snapshot started: %s", r.stdout)
	}
	t.Logf("start from the damaged snapshot: %s", r.stderr)
	if !strings.Contains(r.stderr, "restore") && !strings.Contains(r.stderr, "snapshot") {
		t.Errorf("the refusal does not say what failed: %q", r.stderr)
	}
	if n := count(src); n < before {
		t.Errorf("the source counts %d after a damaged snapshot was tried", n)
	}
	if !strings.Contains(fw(t, 0, "snapshot", "ls").stdout, "mem-snap") {
		t.Error("the good snapshot went with the damaged one")
	}
}

func mustStat(t *testing.T, p string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}
