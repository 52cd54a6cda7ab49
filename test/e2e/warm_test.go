package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// details returns a sandbox's runtime details from inspect.
func details(t *testing.T, sb map[string]any) map[string]any {
	t.Helper()
	d, _ := sb["details"].(map[string]any)
	if d == nil {
		t.Fatalf("inspect shows no details: %v", sb)
	}
	return d
}

func str(m map[string]any, k string) string { s, _ := m[k].(string); return s }

// fileSum is the sha256 of a file, for checking that a snapshot file never changes.
func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// identityProbe prints what must differ between two VMs restored from one template.
const identityProbe = `echo host=$(hostname); echo id=$FIREWORKS_SANDBOX_ID; echo uuid=$(cat /proc/sys/kernel/random/uuid); echo rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'); echo now=$(date +%s)`

// checkClock fails unless a guest's clock (Unix seconds as printed by the probe) is
// within a few seconds of the host's: restored and pooled VMs must not keep the
// template's time.
func checkClock(t *testing.T, who, guestNow string) {
	t.Helper()
	n, err := strconv.ParseInt(guestNow, 10, 64)
	if err != nil {
		t.Errorf("%s: guest clock %q", who, guestNow)
		return
	}
	if d := time.Now().Unix() - n; d > 10 || d < -10 {
		t.Errorf("%s: guest clock is %d s off the host's", who, d)
	}
}

func probe(t *testing.T, id string) map[string]string {
	t.Helper()
	out := fw(t, 0, "exec", id, "--", "sh", "-c", identityProbe).stdout
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, _ := strings.Cut(l, "=")
		m[k] = v
	}
	for _, k := range []string{"host", "id", "uuid", "rand", "now"} {
		if m[k] == "" {
			t.Fatalf("probe of %s printed no %s:\n%s", id, k, out)
		}
	}
	return m
}

// Two sandboxes restored from one template are different machines: their own IDs,
// hostnames, kernel UUIDs and random bytes, and their own disks. Killing a restored VM
// leaves the template intact for the next start.
func TestTemplateRestoresAreIndependent(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	fw(t, 0, "image", "warm", img)
	a := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "restored-a", img, "--", "sleep", "600").stdout)
	b := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "restored-b", img, "--", "sleep", "600").stdout)
	sa, sb := waitStatus(t, a, "running"), waitStatus(t, b, "running")
	for _, s := range []map[string]any{sa, sb} {
		d := details(t, s)
		if str(d, "start_mode") != "restore" || str(d, "template") == "" {
			t.Fatalf("sandbox %v started %q from template %q; want a restore", s["id"], str(d, "start_mode"), str(d, "template"))
		}
		if !strings.Contains(str(d, "start_phases"), "identity+exec=") {
			t.Errorf("start phases %q do not show the identity step", str(d, "start_phases"))
		}
	}
	if str(details(t, sa), "template") != str(details(t, sb), "template") {
		t.Fatalf("same image and shape restored from different templates")
	}
	pa, pb := probe(t, a), probe(t, b)
	checkClock(t, "restore a", pa["now"])
	checkClock(t, "restore b", pb["now"])
	if pa["host"] != "restored-a" || pb["host"] != "restored-b" {
		t.Errorf("hostnames %q, %q; want the sandbox names", pa["host"], pb["host"])
	}
	if pa["id"] != a || pb["id"] != b {
		t.Errorf("FIREWORKS_SANDBOX_ID %q, %q; want %q, %q", pa["id"], pb["id"], a, b)
	}
	for _, k := range []string{"uuid", "rand"} {
		if pa[k] == pb[k] {
			t.Errorf("both restores produced the same %s %q: the RNG was not reseeded", k, pa[k])
		}
	}
	fw(t, 0, "exec", a, "--", "sh", "-c", "echo from-a > /tmp/written-by-a; dd if=/dev/zero of=/tmp/fill bs=1M count=8 2>/dev/null; sync")
	if r := fw(t, 0, "exec", b, "--", "sh", "-c", "cat /tmp/written-by-a 2>/dev/null || echo absent"); strings.TrimSpace(r.stdout) != "absent" {
		t.Errorf("sandbox b sees a's file: %q", r.stdout)
	}

	// Kill a's VMM outright; the template's memory file must not change, and the next
	// start restores from it and sees none of a's files.
	tmplDir := filepath.Join(world.dataDir, "templates", str(details(t, sa), "template"))
	sums := func() string {
		return fileSum(t, filepath.Join(tmplDir, "mem")) + fileSum(t, filepath.Join(tmplDir, "state")) + fileSum(t, filepath.Join(tmplDir, "scratch.img"))
	}
	before := sums()
	pid, _ := strconv.Atoi(str(details(t, sa), "pid"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill VMM %d: %v", pid, err)
	}
	waitStatus(t, a, "failed")
	fw(t, 0, "stop", b)
	if after := sums(); after != before {
		t.Errorf("template files changed after its restores ran (one writing to its disks) and one was killed")
	}
	r := fw(t, 0, "run", "--name", "restored-c", img, "--", "sh", "-c", "cat /tmp/written-by-a 2>/dev/null || echo absent; "+identityProbe)
	if !strings.HasPrefix(r.stdout, "absent\n") || !strings.Contains(r.stdout, "host=restored-c") {
		t.Errorf("next restore after the kill: %q", r.stdout)
	}
	if d := details(t, inspect(t, "restored-c")); str(d, "start_mode") != "restore" {
		t.Errorf("next start was %q, want a restore", str(d, "start_mode"))
	} else if str(d, "vmm_launched_ahead") != "yes" {
		// Restores since the template was first used keep a VMM launched ahead.
		t.Errorf("restored-c did not use a VMM launched ahead: %v", d)
	}
	// --boot cold still boots a kernel.
	fw(t, 0, "run", "--name", "booted-cold", "--boot", "cold", img, "--", "true")
	if d := details(t, inspect(t, "booted-cold")); str(d, "start_mode") != "cold" || strings.Contains(str(d, "start_phases"), "template") {
		t.Errorf("--boot cold started %q (%s)", str(d, "start_mode"), str(d, "start_phases"))
	}
}

// poolState is what `pool ls --json` says about one pool on the dev node.
type poolState struct {
	Ready, Target, Filling, Claims int
	Error                          string
}

func poolOf(t *testing.T, img string) (poolState, bool) {
	t.Helper()
	var resp struct {
		Pools []struct {
			Image string `json:"image"`
			Nodes []struct {
				Target  int    `json:"target"`
				Ready   int    `json:"ready"`
				Filling int    `json:"filling"`
				Claims  int    `json:"claims_last_minute"`
				Error   string `json:"error"`
			} `json:"nodes"`
		} `json:"pools"`
	}
	out := fw(t, 0, "pool", "ls", "--json").stdout
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("pool ls --json: %v\n%s", err, out)
	}
	for _, p := range resp.Pools {
		if p.Image == img && len(p.Nodes) > 0 {
			n := p.Nodes[0]
			return poolState{Ready: n.Ready, Target: n.Target, Filling: n.Filling, Claims: n.Claims, Error: n.Error}, true
		}
	}
	return poolState{}, false
}

func waitPool(t *testing.T, img string, ok func(poolState) bool) poolState {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	var st poolState
	for time.Now().Before(deadline) {
		var found bool
		if st, found = poolOf(t, img); found && ok(st) {
			return st
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatalf("pool of %s never reached the wanted state; last %+v\n%s", img, st, fw(t, 0, "pool", "ls").stdout)
	return st
}

// A warm pool keeps restored VMs ready; a start claims one (and becomes its own machine),
// the pool refills with a new VM, grows with the claim rate up to its max, and goes away
// when removed.
func TestWarmPoolClaimAndRefill(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	// A pool whose image cannot be pulled says so, and does not hold up another pool.
	bad := image("no-such-image:latest")
	fw(t, 0, "pool", "set", bad, "--size", "1")
	defer world.cli(context.Background(), nil, "pool", "rm", bad)
	fw(t, 0, "pool", "set", img, "--size", "1", "--max", "2")
	defer world.cli(context.Background(), nil, "pool", "rm", img)
	waitPool(t, img, func(s poolState) bool { return s.Ready == 1 })
	if out := fw(t, 0, "pool", "ls").stdout; !strings.Contains(out, "no-such-image") || !strings.Contains(out, "pull") {
		t.Errorf("pool ls does not show why the bad pool is empty:\n%s", out)
	}
	fw(t, 0, "pool", "rm", bad)
	// The good pool stays full after the bad one goes (no phantom fill).
	time.Sleep(2 * time.Second)
	if st, _ := poolOf(t, img); st.Ready != 1 || st.Filling != 0 {
		t.Errorf("pool after removing the bad one: %+v", st)
	}

	r := fw(t, 0, "run", "--name", "warm-1", img, "--", "sh", "-c", identityProbe)
	if !strings.Contains(r.stdout, "host=warm-1\n") {
		t.Errorf("claimed VM did not take the sandbox's hostname: %q", r.stdout)
	}
	w1 := details(t, inspect(t, "warm-1"))
	if str(w1, "start_mode") != "warm" || !strings.Contains(str(w1, "start_phases"), "identity+exec=") {
		t.Fatalf("first start with a ready pool: mode %q phases %q", str(w1, "start_mode"), str(w1, "start_phases"))
	}
	checkClock(t, "claimed pool VM", field(r.stdout, "now="))
	// The claimed VM is replaced by a new one, and a second claim gets that one.
	waitPool(t, img, func(s poolState) bool { return s.Ready >= 1 })
	r2 := fw(t, 0, "run", "--name", "warm-2", img, "--", "sh", "-c", identityProbe)
	w2 := details(t, inspect(t, "warm-2"))
	if str(w2, "start_mode") != "warm" {
		t.Fatalf("second start after the refill: mode %q", str(w2, "start_mode"))
	}
	if str(w1, "pid") == str(w2, "pid") {
		t.Errorf("both claims got VMM pid %s", str(w1, "pid"))
	}
	if field(r.stdout, "rand=") == field(r2.stdout, "rand=") || field(r.stdout, "uuid=") == field(r2.stdout, "uuid=") {
		t.Errorf("two pool VMs share random numbers:\n%s\n%s", r.stdout, r2.stdout)
	}
	// Two starts within the autoscaler's 10 s burst window (a claim, or a miss while the
	// pool refills: both are demand): it aims for 2 (the max). warm-1 and warm-2 were a
	// refill apart, which a loaded machine can stretch past the window, so one more start
	// follows warm-2 at once.
	fw(t, 0, "run", "--rm", img, "--", "true")
	st := waitPool(t, img, func(s poolState) bool { return s.Target == 2 && s.Ready == 2 })
	if st.Claims < 2 {
		t.Errorf("pool reports %d claims in the last minute, want >= 2", st.Claims)
	}
	// A sandbox running in a claimed warm VM survives a restart of the server: its VM is
	// re-adopted through run/<id>, which links to the pool VM's directory.
	kept := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "warm-kept", img, "--", "sleep", "600").stdout)
	wk := details(t, waitStatus(t, kept, "running"))
	if str(wk, "start_mode") != "warm" {
		t.Fatalf("warm-kept started %q", str(wk, "start_mode"))
	}
	restartDev(t)
	if after := details(t, waitStatus(t, kept, "running")); str(after, "pid") != str(wk, "pid") {
		t.Errorf("warm-kept after the restart: pid %s, was %s (not re-adopted)", str(after, "pid"), str(wk, "pid"))
	}
	if r := fw(t, 0, "exec", kept, "--", "hostname"); strings.TrimSpace(r.stdout) != "warm-kept" {
		t.Errorf("exec after re-adoption: %q", r.stdout)
	}
	fw(t, 0, "rm", "-f", kept)
	// --boot restore skips the pool.
	fw(t, 0, "run", "--name", "not-warm", "--boot", "restore", img, "--", "true")
	if d := details(t, inspect(t, "not-warm")); str(d, "start_mode") != "restore" {
		t.Errorf("--boot restore started %q", str(d, "start_mode"))
	}
	fw(t, 0, "pool", "rm", img)
	if _, found := poolOf(t, img); found {
		t.Errorf("pool still listed after pool rm")
	}
}

// A template is keyed by everything it depends on: a changed init makes a new one, and
// templates past the disk budget are collected (least recently used first).
func TestTemplateRebuiltWhenInitChanges(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	fw(t, 0, "run", "--name", "init-v1", img, "--", "true")
	d1 := details(t, inspect(t, "init-v1"))
	k1 := str(d1, "template")
	if k1 == "" {
		t.Fatalf("no template for init-v1: %v", d1)
	}
	// Same init binary plus trailing bytes: it runs the same, but it is another init.
	changed := filepath.Join(world.root, "fireworks-init-changed")
	data, err := os.ReadFile(world.initBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(changed, append(data, []byte("\x00changed")...), 0o755); err != nil {
		t.Fatal(err)
	}
	restartDev(t, "--init-binary", changed, "--template-disk-mib", "1")
	defer restartDev(t)

	fw(t, 0, "run", "--name", "init-v2", img, "--", "true")
	d2 := details(t, inspect(t, "init-v2"))
	if str(d2, "init_version") == str(d1, "init_version") {
		t.Fatalf("the changed init kept version %s", str(d1, "init_version"))
	}
	if k2 := str(d2, "template"); k2 == "" || k2 == k1 || !strings.Contains(str(d2, "start_phases"), "template_build") {
		t.Fatalf("after the init changed: template %q (was %q), phases %q; want a new one built", k2, k1, str(d2, "start_phases"))
	}
	// Templates the node can no longer use (the old init's) are removed at start-up.
	if _, err := os.Stat(filepath.Join(world.dataDir, "templates", k1)); !os.IsNotExist(err) {
		t.Errorf("template %s of the old init still on disk (%v)", k1, err)
	}
	// Another shape makes another template; with a 1 MiB budget only the newest is kept,
	// the least recently used goes.
	k2 := str(d2, "template")
	fw(t, 0, "run", "--name", "other-shape", "--memory", "300M", img, "--", "true")
	k3 := str(details(t, inspect(t, "other-shape")), "template")
	if k3 == "" || k3 == k2 {
		t.Fatalf("a 300 MiB sandbox used template %q (the 256 MiB one is %q)", k3, k2)
	}
	if _, err := os.Stat(filepath.Join(world.dataDir, "templates", k2)); !os.IsNotExist(err) {
		t.Errorf("template %s still on disk over the budget (%v)", k2, err)
	}
	out := fw(t, 0, "image", "templates").stdout // shows keys' first 12 characters
	if strings.Contains(out, k2[:12]) || !strings.Contains(out, k3[:12]) {
		t.Errorf("image templates after collection:\n%s", out)
	}
}

// restartDev restarts the shared dev server with extra flags (none: the defaults).
func restartDev(t *testing.T, extra ...string) {
	t.Helper()
	world.stopDev()
	if err := world.startDevWith(extra...); err != nil {
		world.dumpDevLog()
		t.Fatalf("restart fireworks dev %v: %v", extra, err)
	}
}

// A damaged template does not fail starts: the start that finds it boots instead (and
// says why), and the next one builds a new template.
func TestDamagedTemplateFallsBack(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	fw(t, 0, "run", "--name", "before-damage", img, "--", "true")
	key := str(details(t, inspect(t, "before-damage")), "template")
	if key == "" {
		t.Fatal("no template used")
	}
	// Keep the first bytes (a valid stream header) and cut the rest.
	if err := os.Truncate(filepath.Join(world.dataDir, "templates", key, "state"), 64); err != nil {
		t.Fatal(err)
	}
	r := fw(t, 0, "run", "--name", "after-damage", "--boot", "restore", img, "--", "echo", "still-runs")
	if strings.TrimSpace(r.stdout) != "still-runs" {
		t.Errorf("output %q", r.stdout)
	}
	d := details(t, inspect(t, "after-damage"))
	if str(d, "start_mode") != "cold" || !strings.Contains(str(d, "start_fallback"), "restore failed") {
		t.Errorf("start from a damaged template: mode %q fallback %q", str(d, "start_mode"), str(d, "start_fallback"))
	}
	fw(t, 0, "run", "--name", "rebuilt", img, "--", "true")
	d = details(t, inspect(t, "rebuilt"))
	if str(d, "start_mode") != "restore" || !strings.Contains(str(d, "start_phases"), "template_build") {
		t.Errorf("start after the damage: mode %q phases %q; want a rebuilt template", str(d, "start_mode"), str(d, "start_phases"))
	}
}
