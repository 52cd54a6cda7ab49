package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Fork: two running copies of a running sandbox, each a new machine (its own ID,
// hostname, kernel UUIDs and random bytes) whose counting loop carries on from the value
// it had at the fork; its files are there, and what one writes the others do not see.
// The source goes on.
func TestFork(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	src := strings.TrimSpace(fw(t, 0, "run", "-d", "-u", "0", "--name", "fork-source", img, "--", "sh", "-c",
		"mkdir -p /data && echo seed > /data/f && i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", src) })
	waitStatus(t, src, "running")
	count := func(id string) int {
		t.Helper()
		r := world.cli(context.Background(), nil, "exec", id, "--", "cat", "/tmp/count")
		n, err := strconv.Atoi(strings.TrimSpace(r.stdout))
		if err != nil {
			return -1
		}
		return n
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
		kib := sharedKiB(t, pid, "/flat/mem")
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
}

// sharedKiB sums Shared_Clean and Shared_Dirty of process pid's mappings of files whose
// path ends in suffix: pages of them that another process maps too.
func sharedKiB(t *testing.T, pid int, suffix string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	total, in := 0, false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			in = len(f) >= 6 && strings.HasSuffix(f[5], suffix)
			continue
		}
		if in && len(f) >= 2 && (f[0] == "Shared_Clean:" || f[0] == "Shared_Dirty:") {
			n, _ := strconv.Atoi(f[1])
			total += n
		}
	}
	return total
}
