package e2e

import (
	"context"
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
	// They diverge: a file one writes is not in another.
	fw(t, 0, "exec", "-u", "0", forks[0], "--", "sh", "-c", "echo mine > /data/only-here && sync")
	if r := world.cli(context.Background(), nil, "exec", forks[1], "--", "cat", "/data/only-here"); r.code == 0 {
		t.Error("a file written in one fork is in another")
	}
}
