package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// previousRelease is the commit the rolling upgrade starts from: the last one before the
// audit log changed what the servers write (every command carries a stamp, the state a
// log), so the two versions really differ in their state format.
const previousRelease = "f2f0b7a"

// A rolling upgrade, one process at a time, keeps every sandbox running and every
// record: the cluster is rolled back to the previous release (servers, then agents),
// then forward to this one, and after each single restart a sandbox started before keeps
// answering and the state holds what it held. Old and new servers share the cluster
// meanwhile (new commands carry fields the old ignore).
func TestRollingUpgrade(t *testing.T) {
	need(t)
	oldBin, oldInit := buildAt(t, previousRelease)
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "kept-running", "--insecure-registry", w.registry, image(), "--", "sleep", "3600"))
	defer mustFW(t, "rm", "-f", id)
	waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	mustFW(t, "run", "-d", "--name", "kept-pending", "--constraint", "nosuch==x", image(), "--", "true")
	defer mustFW(t, "rm", "-f", "kept-pending")
	user := strings.TrimSpace(mustFW(t, "token", "create", "--name", "kept-through-upgrade"))
	before := psAll(t, false, "")
	tokens := tokenIDs(t)

	check := func(step string) {
		t.Helper()
		if err := w.waitAPI(time.Minute); err != nil {
			t.Fatalf("after %s: %v", step, err)
		}
		if err := w.waitNodes(3, "ready", 2*time.Minute); err != nil {
			t.Fatalf("after %s: %v", step, err)
		}
		after := psAll(t, false, "")
		for k, name := range before {
			if after[k] != name {
				t.Fatalf("after %s: sandbox %s (%s) is gone: %v", step, k, name, after)
			}
		}
		if got := tokenIDs(t); !slices.Equal(got, tokens) {
			t.Fatalf("after %s: tokens %v, want %v", step, got, tokens)
		}
		if _, errOut, code := w.cli(context.Background(), []string{"FIREWORKS_TOKEN=" + user}, "ps"); code != 0 {
			t.Fatalf("after %s: the user's token: %s", step, errOut)
		}
		if out, err := w.fw(nil, "exec", id, "--", "echo", "alive"); err != nil || strings.TrimSpace(out) != "alive" {
			t.Fatalf("after %s: the running sandbox: %q %v", step, out, err)
		}
		sb := inspect(t, id)
		if sb["status"] != "running" {
			t.Fatalf("after %s: the sandbox is %v", step, sb["status"])
		}
	}
	roll := func(p *proc, name, bin, initBin string) {
		t.Helper()
		w.stop(p, false)
		p.bin = bin
		if bin == w.bin {
			p.bin = ""
		}
		if i := slices.Index(p.args, "--init-binary"); i >= 0 {
			p.args[i+1] = initBin
		}
		if err := w.start(p); err != nil {
			t.Fatal(err)
		}
		check(name)
	}
	defer func() { // whatever happens, the world goes on with this version
		for _, p := range append(slices.Clone(w.servers), w.agents...) {
			if p.bin != "" {
				w.stop(p, false)
				p.bin = ""
				if i := slices.Index(p.args, "--init-binary"); i >= 0 {
					p.args[i+1] = w.initBin
				}
			}
		}
		w.ensureRunning()
		_ = w.waitAPI(time.Minute)
		_ = w.waitNodes(3, "ready", 2*time.Minute)
	}()
	for _, v := range []struct{ name, bin, init string }{{"previous release", oldBin, oldInit}, {"this version", w.bin, w.initBin}} {
		for i, s := range w.servers {
			roll(s, fmt.Sprintf("server s%d to %s", i, v.name), v.bin, v.init)
		}
		for i, a := range w.agents {
			roll(a, fmt.Sprintf("agent a%d to %s", i, v.name), v.bin, v.init)
		}
	}
	// The new servers write audit entries again; the old ones' commands are recorded
	// with no actor, and nothing was lost across the versions.
	if out := mustFW(t, "audit", "--target", id, "--limit", "5"); !strings.Contains(out, id) {
		t.Errorf("audit after the upgrade: %q", out)
	}
}

// tokenIDs lists the token IDs the cluster holds, sorted.
func tokenIDs(t *testing.T) []string {
	t.Helper()
	var ids []string
	for _, line := range strings.Split(mustFW(t, "token", "ls"), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 0 {
			ids = append(ids, f[0])
		}
	}
	slices.Sort(ids)
	return ids
}

// buildAt builds fireworks and fireworks-init of commit rev (a git worktree of this
// repository) into a temporary directory.
func buildAt(t *testing.T, rev string) (bin, initBin string) {
	t.Helper()
	repo, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("the upgrade test builds the previous release from this repository's history: git rev-parse: %v", err)
	}
	src := filepath.Join(t.TempDir(), "src")
	if out, err := exec.Command("git", "-C", strings.TrimSpace(string(repo)), "worktree", "add", "--detach", src, rev).CombinedOutput(); err != nil {
		t.Fatalf("check out %s (a shallow clone lacks it: fetch with --unshallow): %v: %s", rev, err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("git", "-C", strings.TrimSpace(string(repo)), "worktree", "remove", "--force", src).Run()
	})
	out := filepath.Join(t.TempDir(), "bin")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	bin, initBin, err = testutil.BuildBinariesIn(src, out)
	if err != nil {
		t.Fatalf("build %s: %v", rev, err)
	}
	return bin, initBin
}
