package agent_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/agent/agenttest"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// node is an agent on the test doubles (a driver that runs no VM, networks that touch
// nothing on the host) over a real state store, placing sandboxes on it as the control
// plane would.
type node struct {
	t       *testing.T
	ag      *agent.Agent
	store   *state.Store
	driver  *agenttest.Driver
	nets    *agenttest.Networks
	image   string
	dataDir string
}

func newNode(t *testing.T, pools ...state.Pool) *node {
	t.Helper()
	for _, tool := range []string{"mkfs.erofs", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: run ./scripts/install-deps.sh (the agent builds root and scratch disks with it)", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	store, err := state.Open(ctx, state.Options{Dir: t.TempDir(), NodeID: "test", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	if _, err := store.RegisterNode(ctx, state.Node{ID: "n1", Address: "127.0.0.1:1", UpdatedAt: time.Now(),
		Capacity: state.Resources{VCPUs: 4, MemoryMiB: 4096, DiskMiB: 100000}}); err != nil {
		t.Fatal(err)
	}
	// Short: the guest channel is a unix socket under it.
	dir, err := os.MkdirTemp("/tmp", "fwag")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d, nets := &agenttest.Driver{}, &agenttest.Networks{}
	// An image with a shell script as its command: what runs is the test host's sh.
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "hello"), []byte("hello from the image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := testimage.DirImage(t, root, v1.Config{Env: []string{"PATH=/usr/bin:/bin"}})
	layout := filepath.Join(t.TempDir(), "img")
	testimage.WriteOCILayout(t, layout, img, "latest")
	ref := "oci:" + layout + ":latest"
	for i := range pools {
		if pools[i].Image == "" {
			pools[i].Image = ref
		}
	}
	ag, err := agent.New(ctx, agent.Config{DataDir: filepath.Join(dir, "d"), Node: "n1", Driver: d, Assets: agenttest.Assets, Networks: nets,
		MaxVCPUs: 4, MaxMemoryMiB: 4096, DefaultVCPUs: 1, DefaultMemoryMiB: 256, Pools: pools, Logger: log}, store)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ag.Close() })
	return &node{t: t, ag: ag, store: store, driver: d, nets: nets, image: ref, dataDir: filepath.Join(dir, "d")}
}

// run creates a sandbox of spec, places it on the node, hands the node its assignments
// and waits for the sandbox to end.
func (n *node) run(spec state.SandboxSpec) state.Sandbox {
	n.t.Helper()
	return n.wait(n.start(spec))
}

// start creates a sandbox of spec, places it on the node as the control plane would and
// hands the node its assignments; it returns the sandbox's ID.
func (n *node) start(spec state.SandboxSpec) string {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if spec.Image == "" {
		spec.Image = n.image
	}
	spec.VCPUs, spec.MemoryMiB = 1, 256
	sb := state.Sandbox{ID: state.NewID(), Spec: spec, Status: state.StatusPending, CreatedAt: time.Now()}
	if err := n.store.CreateSandbox(ctx, sb); err != nil {
		n.t.Fatal(err)
	}
	res, err := n.store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: sb.ID, NodeID: "n1"}}, scheduler.Config{}, time.Now())
	if err != nil || len(res) != 1 || res[0].Err != "" {
		n.t.Fatalf("place: %v %+v", err, res)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	return sb.ID
}

// wait waits for sandbox id to end (and stop being live on the node).
func (n *node) wait(id string) state.Sandbox {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		changed := n.store.Changed()
		got, err := n.store.GetSandbox(ctx, id)
		if err != nil {
			n.t.Fatal(err)
		}
		if got.Status.Terminal() {
			select { // recorded just before the sandbox stops being live here
			case <-n.ag.Done(id):
			case <-ctx.Done():
				n.t.Fatalf("sandbox %s is %s but still live on the node", id, got.Status)
			}
			return got
		}
		select {
		case <-changed:
		case <-ctx.Done():
			n.t.Fatalf("sandbox %s still %s (%s)", id, got.Status, got.Reason)
		}
	}
}

// waitFor polls cond (background work of the node's: launches ahead, refills).
func (n *node) waitFor(what string, cond func() bool) {
	n.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			n.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func phases(sb state.Sandbox) []string {
	var out []string
	for _, f := range strings.Fields(sb.Runtime["start_phases"]) {
		name, _, _ := strings.Cut(f, "=")
		out = append(out, name)
	}
	return out
}

// TestStartPaths runs the agent's start paths on the test double: a cold boot, a
// template built and restored, each fallback to a cold boot with its reason, and the
// failures a start reports.
func TestStartPaths(t *testing.T) {
	n := newNode(t)
	sh := []string{"sh", "-c", "echo started"}

	sb := n.run(state.SandboxSpec{Cmd: sh, Boot: state.BootCold})
	if sb.Status != state.StatusExited || sb.ExitCode != 0 || sb.Runtime["start_mode"] != "cold" || n.driver.Boots.Load() != 1 {
		t.Fatalf("cold boot: %s %d (%s) mode %q, %d boots", sb.Status, sb.ExitCode, sb.Reason, sb.Runtime["start_mode"], n.driver.Boots.Load())
	}
	if got := phases(sb); !equal(got, "pull", "rootdisk", "net", "vmm", "guest", "setup", "exec") {
		t.Errorf("cold boot phases %v", got)
	}

	// The first start of the image builds its template, then restores from it.
	sb = n.run(state.SandboxSpec{Cmd: sh})
	if sb.Status != state.StatusExited || sb.Runtime["start_mode"] != "restore" || n.driver.Snapshots.Load() != 1 || n.driver.Restores.Load() != 1 {
		t.Fatalf("restore: %s (%s) mode %q, %d snapshots, %d restores", sb.Status, sb.Reason, sb.Runtime["start_mode"], n.driver.Snapshots.Load(), n.driver.Restores.Load())
	}
	if got := phases(sb); !equal(got, "pull", "rootdisk", "template_build", "net", "vmm", "guest", "identity+exec") {
		t.Errorf("first restore phases %v", got)
	}
	// A restore asks for a VMM launched ahead for the next one, which takes it.
	n.waitFor("a VMM launched ahead", func() bool { return n.driver.Prestarts.Load() == 1 })
	if sb = n.run(state.SandboxSpec{Cmd: sh}); n.driver.Snapshots.Load() != 1 || sb.Runtime["vmm_launched_ahead"] != "yes" ||
		!equal(phases(sb), "pull", "rootdisk", "template", "vmm", "guest", "identity+exec") {
		t.Errorf("second restore: %d snapshots (want the template kept), launched ahead %q, phases %v", n.driver.Snapshots.Load(), sb.Runtime["vmm_launched_ahead"], phases(sb))
	}
	// A VMM launched ahead that fails is no reason to give the template up: restore afresh.
	n.waitFor("another VMM launched ahead", func() bool { return n.driver.Prestarts.Load() == 2 })
	n.driver.FailAhead = errors.New("injected failure of a VMM launched ahead")
	sb = n.run(state.SandboxSpec{Cmd: sh})
	n.driver.FailAhead = nil
	if sb.Status != state.StatusExited || sb.Runtime["start_mode"] != "restore" || sb.Runtime["vmm_launched_ahead"] != "" || n.driver.Snapshots.Load() != 1 {
		t.Errorf("failed slot: %s (%s) mode %q ahead %q, %d snapshots", sb.Status, sb.Reason, sb.Runtime["start_mode"], sb.Runtime["vmm_launched_ahead"], n.driver.Snapshots.Load())
	}

	// A restore that fails drops the template and boots instead, saying why.
	n.driver.FailRestore = errors.New("injected restore failure")
	sb = n.run(state.SandboxSpec{Cmd: sh})
	n.driver.FailRestore = nil
	if sb.Status != state.StatusExited || sb.Runtime["start_mode"] != "cold" || !strings.Contains(sb.Runtime["start_fallback"], "restore failed: ") ||
		!strings.Contains(sb.Runtime["start_fallback"], "injected restore failure") {
		t.Fatalf("failed restore: %s mode %q fallback %q", sb.Status, sb.Runtime["start_mode"], sb.Runtime["start_fallback"])
	}
	if sb = n.run(state.SandboxSpec{Cmd: sh}); sb.Runtime["start_mode"] != "restore" || n.driver.Snapshots.Load() != 2 {
		t.Errorf("after a failed restore: mode %q, %d snapshots (want a new template)", sb.Runtime["start_mode"], n.driver.Snapshots.Load())
	}

	// --boot restore and a template that cannot be built: the start boots, saying why.
	other := filepath.Join(t.TempDir(), "other")
	testimage.WriteOCILayout(t, other, testimage.DirImage(t, t.TempDir(), v1.Config{}), "latest")
	n.driver.FailSnapshot = errors.New("injected snapshot failure")
	sb = n.run(state.SandboxSpec{Image: "oci:" + other + ":latest", Cmd: sh, Boot: state.BootRestore})
	n.driver.FailSnapshot = nil
	if sb.Status != state.StatusExited || sb.Runtime["start_mode"] != "cold" || !strings.Contains(sb.Runtime["start_fallback"], "injected snapshot failure") {
		t.Fatalf("failed template build: %s (%s) mode %q fallback %q", sb.Status, sb.Reason, sb.Runtime["start_mode"], sb.Runtime["start_fallback"])
	}

	// Failures a start reports, with their reasons.
	n.driver.FailBoot = errors.New("injected boot failure")
	sb = n.run(state.SandboxSpec{Cmd: sh, Boot: state.BootCold})
	n.driver.FailBoot = nil
	if sb.Status != state.StatusFailed || !strings.Contains(sb.Reason, "injected boot failure") {
		t.Errorf("failed boot: %s (%s)", sb.Status, sb.Reason)
	}
	sb = n.run(state.SandboxSpec{Image: "oci:/nonexistent-layout", Cmd: sh})
	if sb.Status != state.StatusFailed || !strings.Contains(sb.Reason, "pull image oci:/nonexistent-layout") {
		t.Errorf("missing image: %s (%s)", sb.Status, sb.Reason)
	}
	sb = n.run(state.SandboxSpec{Cmd: []string{"no-such-command-here"}})
	if sb.Status != state.StatusExited || sb.ExitCode != 127 || !strings.Contains(sb.Reason, "not found") {
		t.Errorf("command not found: %s %d (%s)", sb.Status, sb.ExitCode, sb.Reason)
	}
	sb = n.run(state.SandboxSpec{Cmd: []string{"sh", "-c", "exit 3"}})
	if sb.Status != state.StatusExited || sb.ExitCode != 3 {
		t.Errorf("exit 3: %s %d (%s)", sb.Status, sb.ExitCode, sb.Reason)
	}
	if live := n.ag.Running(); len(live) != 0 {
		t.Errorf("sandboxes still live after they ended: %v", live)
	}
	// --network none: no network at all (and so no VMM launched ahead, which has one).
	sb = n.run(state.SandboxSpec{Cmd: sh, Network: state.NetworkNone, Boot: state.BootCold})
	if sb.Status != state.StatusExited || sb.Runtime["netns"] != "" || sb.Runtime["address"] != "" {
		t.Errorf("--network none: %s (%s), netns %q address %q", sb.Status, sb.Reason, sb.Runtime["netns"], sb.Runtime["address"])
	}
	// Every sandbox's network went with it; what is left is the VMMs' launched ahead.
	for _, nt := range n.nets.Live() {
		if !strings.HasPrefix(filepath.Base(nt.RunDir), "s-") {
			t.Errorf("network of %s left after its sandbox ended", nt.RunDir)
		}
	}
}

// TestWarmPool: a pool fills with a VM whose network lets nothing through; a start of
// the pool's image and shape claims it (start mode warm), its network opens with the
// sandbox's policy, and the pool fills again. Starts that may not take a warm VM (another
// boot mode, another network) restore instead. When the agent closes, no network is left.
func TestWarmPool(t *testing.T) {
	n := newNode(t, state.Pool{Size: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ready := func(want int) {
		t.Helper()
		n.waitFor(fmt.Sprintf("%d ready pool VM", want), func() bool {
			ps := n.ag.Pools()
			return len(ps) == 1 && ps[0].Ready == want && ps[0].Filling == 0
		})
	}
	ready(1)
	var warmNet *agenttest.Net
	for _, nt := range n.nets.Live() {
		if strings.HasPrefix(filepath.Base(nt.RunDir), "w-") {
			warmNet = nt
		}
	}
	if warmNet == nil {
		t.Fatalf("no network for the pool VM: %d live networks", len(n.nets.Live()))
	}
	if closed, _, _ := warmNet.State(); !closed {
		t.Fatal("a pool VM's network is open before a sandbox claimed it")
	}
	restores := n.driver.Restores.Load()

	policy := "deny 203.0.113.0/24\n"
	id := n.start(state.SandboxSpec{Cmd: []string{"sleep", "60"}, Policy: policy})
	var sb state.Sandbox
	n.waitFor("the sandbox running", func() bool {
		var err error
		sb, err = n.store.GetSandbox(ctx, id)
		return err == nil && sb.Status == state.StatusRunning
	})
	if sb.Runtime["start_mode"] != "warm" || !equal(phases(sb), "pull", "rootdisk", "identity+exec") {
		t.Errorf("start from a pool: mode %q, phases %v", sb.Runtime["start_mode"], phases(sb))
	}
	if closed, pol, opens := warmNet.State(); closed || pol != policy || opens != 1 || sb.Runtime["netns"] != warmNet.Namespace() {
		t.Errorf("claimed VM's network: closed %v, policy %q, opened %d times, sandbox's netns %q (want %q)", closed, pol, opens, sb.Runtime["netns"], warmNet.Namespace())
	}
	if st, err := n.ag.NetStats(id); err != nil || st.Policy != policy {
		t.Errorf("NetStats: %+v %v", st, err)
	}
	// The claim is refilled (a restore from the pool's template).
	ready(1)
	if got := n.driver.Restores.Load(); got != restores+1 {
		t.Errorf("refill: %d restores, want %d", got, restores+1)
	}

	// Neither --boot restore nor another network takes the warm VM.
	for _, spec := range []state.SandboxSpec{{Cmd: []string{"true"}, Boot: state.BootRestore}, {Cmd: []string{"true"}, Network: state.NetworkNone}} {
		if sb := n.run(spec); sb.Status != state.StatusExited || sb.Runtime["start_mode"] != "restore" {
			t.Errorf("boot %q network %q: %s (%s) mode %q", spec.Boot, spec.Network, sb.Status, sb.Reason, sb.Runtime["start_mode"])
		}
	}
	if ps := n.ag.Pools(); ps[0].Ready != 1 {
		t.Errorf("pool VMs taken by starts that may not take them: %d ready", ps[0].Ready)
	}

	// The image goes: the ready VM restored from its template goes with the template,
	// and the pool fills again from the image pulled again (a new template).
	var stale *agenttest.Net
	for _, nt := range n.nets.Live() {
		if closed, _, _ := nt.State(); closed && strings.HasPrefix(filepath.Base(nt.RunDir), "w-") {
			stale = nt
		}
	}
	if stale == nil {
		t.Fatal("no ready pool VM's network")
	}
	snaps := n.driver.Snapshots.Load()
	if _, err := n.ag.RemoveImage(ctx, n.image); err != nil {
		t.Fatal(err)
	}
	n.waitFor("the stale pool VM ended", func() bool { return n.nets.Of(filepath.Base(stale.RunDir)) == nil })
	ready(1)
	if n.driver.Snapshots.Load() != snaps+1 {
		t.Errorf("the pool refilled without a new template (%d snapshots, want %d)", n.driver.Snapshots.Load(), snaps+1)
	}

	grace := time.Duration(0)
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{StopGrace: &grace, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.wait(id)
	if err := n.ag.Close(); err != nil {
		t.Fatal(err)
	}
	for _, nt := range n.nets.Live() {
		t.Errorf("network of %s left after the agent closed", nt.RunDir)
	}
}

func equal(got []string, want ...string) bool {
	return strings.Join(got, " ") == strings.Join(want, " ")
}

// TestCapacityAndStop: a running sandbox counts against the node and shows as live; a
// stop request in its assignment ends it with SIGTERM's code, and the capacity frees.
func TestCapacityAndStop(t *testing.T) {
	n := newNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id := n.start(state.SandboxSpec{Cmd: []string{"sleep", "60"}, Boot: state.BootCold})
	n.waitFor("the sandbox running", func() bool {
		sb, err := n.store.GetSandbox(ctx, id)
		return err == nil && sb.Status == state.StatusRunning
	})
	if live := n.ag.Running(); len(live) != 1 || live[0] != id || n.ag.Info().Running != 1 {
		t.Fatalf("running: live %v, Info.Running %d", live, n.ag.Info().Running)
	}
	grace := time.Second
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{StopGrace: &grace, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	if sb := n.wait(id); sb.Status != state.StatusExited || !strings.Contains(sb.Reason, "stopped by request") {
		t.Errorf("stopped sandbox: %s %d (%s)", sb.Status, sb.ExitCode, sb.Reason)
	}
	if live := n.ag.Running(); len(live) != 0 || n.ag.Info().Running != 0 {
		t.Errorf("after the stop: live %v, Info.Running %d", live, n.ag.Info().Running)
	}
}

// A sandbox drained off the node and placed on it again (a one-node cluster's drain) runs
// again: its earlier run ends (and its files go) before the new run starts, whether the
// node saw it leave first or only learns of the new placement.
func TestPlacedAgainWhileItsEarlierRunEnds(t *testing.T) {
	n := newNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	running := func(id string, restarts int) {
		t.Helper()
		n.waitFor(fmt.Sprintf("run %d of %s running", restarts, id), func() bool {
			sb, err := n.store.GetSandbox(ctx, id)
			return err == nil && sb.Status == state.StatusRunning && sb.Restarts == restarts
		})
	}
	drainAndPlace := func(id string, seeLeave bool) {
		t.Helper()
		pending := state.StatusPending
		if _, err := n.store.UpdateSandbox(ctx, id, state.Update{Restart: true, Status: &pending, Reason: "drained", Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if seeLeave {
			n.ag.Reconcile(ctx, n.store.LocalSandboxes())
		}
		if res, err := n.store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: id, NodeID: "n1"}}, scheduler.Config{}, time.Now()); err != nil || res[0].Err != "" {
			t.Fatalf("place again: %v %+v", err, res)
		}
		n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	}
	for _, seeLeave := range []bool{true, false} {
		id := n.start(state.SandboxSpec{Cmd: []string{"sleep", "60"}, Boot: state.BootCold})
		running(id, 0)
		drainAndPlace(id, seeLeave)
		running(id, 1)
		if live := n.ag.Running(); len(live) != 1 || live[0] != id {
			t.Fatalf("live after the new run started: %v", live)
		}
		grace := time.Duration(0)
		if _, err := n.store.UpdateSandbox(ctx, id, state.Update{StopGrace: &grace, Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
		n.ag.Reconcile(ctx, n.store.LocalSandboxes())
		n.wait(id)
	}
}

// Removing an image takes its template snapshots with it and says so, and counts the
// sandboxes still running from it (they keep their open root disk).
func TestRemoveImageSaysWhatWent(t *testing.T) {
	n := newNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if sb := n.run(state.SandboxSpec{Cmd: []string{"true"}}); sb.Runtime["start_mode"] != "restore" || len(n.ag.Templates()) != 1 {
		t.Fatalf("first start: mode %q, %d templates", sb.Runtime["start_mode"], len(n.ag.Templates()))
	}
	id := n.start(state.SandboxSpec{Cmd: []string{"sleep", "60"}})
	n.waitFor("the sandbox running", func() bool {
		sb, err := n.store.GetSandbox(ctx, id)
		return err == nil && sb.Status == state.StatusRunning
	})
	got, err := n.ag.RemoveImage(ctx, n.image)
	if err != nil || got.TemplatesDropped != 1 || got.SandboxesUsing != 1 {
		t.Fatalf("RemoveImage = %+v, %v; want 1 template dropped, 1 sandbox using it", got, err)
	}
	if ts := n.ag.Templates(); len(ts) != 0 {
		t.Errorf("templates left after their image went: %+v", ts)
	}
	if _, err := n.ag.RemoveImage(ctx, n.image); err == nil {
		t.Error("removing it again: want not found")
	}
}

// TestPauseResume on the test doubles: a pause saves the VM (its guest, processes and
// sessions kept, as a real save keeps memory), moves the scratch disk into the saved
// state, lets the network go and reports paused; the sandbox is no longer live and holds
// no capacity. A resume restores it as a new run: the same main process carries on (its
// output goes on in the same log), with a network of its policy whose counters go on, and
// the saved state is let go. A pause the driver refuses changes nothing and says why.
func TestPauseResume(t *testing.T) {
	n := newNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	count := filepath.Join(t.TempDir(), "count")
	policy := "deny 203.0.113.0/24\n"
	// The process runs on the test host (see agenttest): it counts into a file and prints.
	id := n.start(state.SandboxSpec{Cmd: []string{"sh", "-c", fmt.Sprintf("i=0; while true; do i=$((i+1)); echo $i > %s; echo tick $i; sleep 0.01; done", count)},
		Policy: policy, Boot: state.BootCold})
	get := func() state.Sandbox {
		sb, err := n.store.GetSandbox(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return sb
	}
	n.waitFor("the sandbox running", func() bool { return get().Status == state.StatusRunning })
	pid := func() string { b, _ := os.ReadFile(count); return strings.TrimSpace(string(b)) }
	n.waitFor("the counter", func() bool { return pid() != "" })

	// Past the node's budget for saved states: refused before anything is saved; the
	// sandbox runs on, and the reason is on it.
	n.ag.SetSavedDiskMiB(1)
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{RequestPause: true, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.waitFor("the refused pause reported", func() bool { return get().PauseRequestedAt.IsZero() })
	if sb := get(); sb.Status != state.StatusRunning || !strings.Contains(sb.Runtime["pause_refused"], "--saved-disk-mib") || n.driver.Saves.Load() != 0 {
		t.Fatalf("a pause past the budget: %s, %q, %d saves", sb.Status, sb.Runtime["pause_refused"], n.driver.Saves.Load())
	}
	n.ag.SetSavedDiskMiB(65536)

	// The driver refuses: nothing changes, and the reason is on the sandbox.
	n.driver.FailSave = errors.New("injected save failure")
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{RequestPause: true, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.waitFor("the failed pause reported", func() bool { return get().Status != state.StatusRunning })
	if sb := get(); sb.Status != state.StatusFailed || !strings.Contains(sb.Reason, "injected save failure") {
		t.Fatalf("a save that failed after the guest let go: %s (%s)", sb.Status, sb.Reason)
	}
	n.wait(id)
	n.driver.FailSave = nil

	id = n.start(state.SandboxSpec{Cmd: []string{"sh", "-c", fmt.Sprintf("i=0; while true; do i=$((i+1)); echo $i > %s; echo tick $i; sleep 0.01; done", count)},
		Policy: policy, Boot: state.BootCold})
	n.waitFor("the sandbox running", func() bool { return get().Status == state.StatusRunning })
	n.waitFor("ticks in the log", func() bool { return strings.Contains(logOf(t, n, id), "tick 3\n") })
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{RequestPause: true, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.waitFor("the sandbox paused", func() bool { return get().Status == state.StatusPaused })
	sb := get()
	if sb.Saved == nil || sb.Saved.Node != "n1" || sb.Saved.Bytes <= 0 || n.driver.Saves.Load() != 2 {
		t.Fatalf("paused: saved %+v, %d saves", sb.Saved, n.driver.Saves.Load())
	}
	select {
	case <-n.ag.Done(id):
	case <-ctx.Done():
		t.Fatal("a paused sandbox is still live on the node")
	}
	if len(n.ag.Running()) != 0 || n.ag.Info().Running != 0 {
		t.Errorf("paused but counted as running: %v", n.ag.Running())
	}
	for _, nt := range n.nets.Live() {
		if filepath.Base(nt.RunDir) == id {
			t.Errorf("the paused sandbox's network is still there")
		}
	}
	// Nothing in the state holds its CPU or memory now.
	snap := state.SchedulerSnapshot(nil, []*state.Sandbox{&sb})
	if len(snap.Allocations) != 1 || snap.Allocations[0].VCPUs != 0 || snap.Allocations[0].MemoryMiB != 0 {
		t.Errorf("a paused sandbox's allocation: %+v", snap.Allocations)
	}

	restores := n.driver.Restores.Load()
	if _, err := n.store.ResumeSandbox(ctx, id, "", scheduler.Config{}, time.Now(), time.Time{}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.waitFor("the sandbox running again", func() bool { return get().Status == state.StatusRunning })
	sb = get()
	if sb.Resumes != 1 || sb.Saved != nil || sb.Runtime["start_mode"] != "resume" || !equal(phases(sb), "image", "net", "vmm", "guest", "reattach") ||
		n.driver.Restores.Load() != restores+1 {
		t.Errorf("resumed: %d resumes, saved %+v, mode %q, phases %v", sb.Resumes, sb.Saved, sb.Runtime["start_mode"], phases(sb))
	}
	// The same process: its output goes on in the log, its counter keeps counting.
	before := logOf(t, n, id)
	n.waitFor("more ticks after the resume", func() bool { return len(logOf(t, n, id)) > len(before)+20 })
	if st, err := n.ag.NetStats(id); err != nil || st.Policy != policy {
		t.Errorf("network after the resume: %+v %v", st, err)
	}
	n.waitFor("the saved state let go", func() bool {
		_, err := os.Stat(filepath.Join(n.dataDir, "sandboxes", id, "saved"))
		return os.IsNotExist(err)
	})

	// Paused again, then stopped while paused: over.
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{RequestPause: true, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.waitFor("paused again", func() bool { return get().Status == state.StatusPaused })
	if got := get().Saved; got == nil {
		t.Fatal("second pause: no saved state")
	}
	st, code := state.StatusExited, 143
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{Status: &st, ExitCode: &code, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	if _, err := os.Stat(filepath.Join(n.dataDir, "sandboxes", id, "saved")); !os.IsNotExist(err) {
		t.Errorf("the saved state of a sandbox stopped while paused is still there: %v", err)
	}
}

func logOf(t *testing.T, n *node, id string) string {
	t.Helper()
	b, _ := os.ReadFile(n.ag.LogPath(id))
	return string(b)
}

// A sandbox that ended and was run again (a restart policy) is stopped by a stop request
// of its new run: what the node noted for the earlier run does not swallow it.
func TestStopAfterRestart(t *testing.T) {
	n := newNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The first run exits at once, the second sleeps (the commands run on the test host).
	mark := filepath.Join(t.TempDir(), "ran-once")
	id := n.start(state.SandboxSpec{Cmd: []string{"sh", "-c", "if [ -e " + mark + " ]; then exec sleep 60; fi; touch " + mark + "; exit 3"}, Boot: state.BootCold})
	n.wait(id)
	n.ag.Reconcile(ctx, n.store.LocalSandboxes()) // the node sees it over
	pending := state.StatusPending
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{Restart: true, Status: &pending, Reason: "restarting", Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if res, err := n.store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: id, NodeID: "n1"}}, scheduler.Config{}, time.Now()); err != nil || res[0].Err != "" {
		t.Fatalf("place again: %v %+v", err, res)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	n.waitFor("the second run running", func() bool {
		sb, err := n.store.GetSandbox(ctx, id)
		return err == nil && sb.Restarts == 1 && sb.Status == state.StatusRunning
	})
	grace := time.Duration(0)
	if _, err := n.store.UpdateSandbox(ctx, id, state.Update{StopGrace: &grace, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n.ag.Reconcile(ctx, n.store.LocalSandboxes())
	if sb := n.wait(id); sb.Status != state.StatusExited || !strings.Contains(sb.Reason, "stopped by request") {
		t.Errorf("the restarted run after a stop: %s %d (%s)", sb.Status, sb.ExitCode, sb.Reason)
	}
}
