package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A start on this node is a list of named steps (firecracker-go-sdk's handler lists are
// the model): each does one thing, records its phases in start_phases (inspect's
// "how long each start phase took"), and returns why the start failed, if it did. What
// the steps share is a startRun.
var startSteps = []struct {
	name string
	run  func(a *Agent, r *startRun) error
}{
	{"pull", (*Agent).pullStep},         // phase pull
	{"rootdisk", (*Agent).rootDiskStep}, // phase rootdisk
	// warm (a pool VM) | slot (a VMM launched ahead) | restore (a template) | cold,
	// each falling back to the next: phases template|template_build|template_failed,
	// restore_failed, net, vmm, guest.
	{"vm", (*Agent).acquireVMStep},
	// identity+exec for a snapshot's guest, setup then exec for a boot.
	{"command", (*Agent).commandStep},
}

// startRun is one start of a sandbox on this node, as its steps carry it.
type startRun struct {
	s       *sandbox
	sb      state.Sandbox
	ctx     context.Context
	ph      *phases
	cleanup cleanupStack

	img              *image.Image // pull
	proc             process
	rootDisk, rootFS string // rootdisk
	key              templateKey
	h                *vmHandle // vm
	how              string    // how the VM started: warm, restore or cold
	fallback         string    // why a snapshot start fell back to a cold boot
	restoredFrom     *template // the template a restore used
	rt               map[string]string
	main             *client.Session  // command
	starting         chan struct{}    // closed once "starting" is reported
	saved            *savedRecord     // a resume's (see resumeSteps)
	fetched          bool             // its saved state came from another node
	scratchFrom      string           // a start from a filesystem snapshot: its disk
	migration        *state.Migration // a live migration's target: the migration
	flows            []network.Flow   // and the guest's connections it brought (cut)
	startEnds        func()           // the start no longer holds back background work
}

// run is the whole life of one sandbox on this node: its start's steps, then its
// supervision until it ends.
func (a *Agent) run(s *sandbox, sb state.Sandbox) {
	defer s.log.Close()
	// While a start is in flight, the network keeper holds back (see keepSpares).
	startEnds := sync.OnceFunc(a.net.StartBegins())
	readyOnce := sync.OnceFunc(func() {
		close(s.ready)
		startEnds()
	})
	defer readyOnce()
	// Reports go to the control plane while the start goes on (each is a state commit,
	// and on a cluster a round trip to the leader), in order: each waits for the one
	// before. Only a start's end waits for them.
	r := &startRun{s: s, sb: sb, ctx: s.ctx, ph: newPhases(), starting: make(chan struct{}), startEnds: startEnds}
	if s.incoming != nil {
		// A live migration's target: the sandbox runs (on its source) all along.
		r.migration = &s.incoming.mig
		close(r.starting)
	} else {
		go func() { // done before run returns (below)
			defer close(r.starting)
			a.update(sb.ID, state.Update{Status: status(state.StatusStarting), Node: &a.cfg.Node, Accel: &a.vms.accel.Accel})
		}()
	}
	defer func() { <-r.starting }()

	// A restarted sandbox starts from a clean run directory (and drops the warm VM
	// directory an earlier run claimed).
	if err := a.removeRunDir(filepath.Base(s.dir)); err != nil {
		a.log.Warn("remove the previous run's directory", "sandbox", sb.ID, "err", err)
	}
	failed := false
	if in := s.incoming; in != nil && in.vmName != "" {
		// A migration's target within this node that fails leaves no run directory
		// (after its VM is gone: the cleanup below runs first).
		defer func() {
			if failed {
				if err := a.removeRunDir(in.vmName); err != nil {
					a.log.Warn("remove the run directory of a failed migration's target", "sandbox", sb.ID, "dir", in.vmName, "err", err)
				}
			}
		}()
	}
	defer r.cleanup.run(a.log)
	steps := startSteps
	switch {
	case r.migration != nil:
		r.saved, r.fetched = &s.incoming.hdr.Record, true
		steps = migrateSteps
	case sb.Saved != nil:
		// Its own save first: a fork, or a start from a snapshot, paused since.
		steps = resumeSteps
	case sb.Spec.ForkOf != "" && sb.Restarts == 0, a.memorySnapshot(sb):
		// A fork restarted (--restart) runs its command afresh, as any restart does: its
		// source's save may have gone on since.
		steps = forkSteps
	}
	for _, step := range steps {
		if err := step.run(a, r); err != nil {
			<-r.starting
			a.log.Info("start failed", "sandbox", sb.ID, "step", step.name, "err", err)
			failed = true
			a.fail(s, err.Error())
			return
		}
	}

	s.mu.Lock()
	s.guest, s.main, s.proc = r.h.guest, r.main, r.proc
	s.mu.Unlock()
	if sb.Spec.Group != nil {
		// A resume or a fork has a new network: its group's members reach it at its new
		// address (its guest knows them by their group addresses, which stay).
		a.refreshGroup(sb.Spec.Group)
	}
	if err := writeAdoptRecord(s.dir, adoptRecord{Sandbox: sb, Proc: r.proc, Main: r.main.ID(), RootFS: r.rootFS}); err != nil {
		a.log.Warn("cannot record what re-adoption needs; this sandbox will not survive an agent restart", "sandbox", sb.ID, "err", err)
	}
	readyOnce()
	r.rt["start_phases"] = r.ph.String()
	s.mu.Lock()
	u := s.started
	s.mu.Unlock()
	u.Status = status(state.StatusRunning)
	// The command's output is pumped to the log while "running" is reported (a start's
	// first byte does not wait for a commit); supervise waits for the report before it
	// records the end.
	reported := make(chan struct{})
	go func() { // supervise waits for it
		defer close(reported)
		<-r.starting
		a.updateRun(s, u)
	}()
	if dir := a.savedFor(sb); r.saved != nil && strings.HasPrefix(dir, filepath.Join(a.sandboxRoot(), sb.ID)+"/") {
		// Running: its own saved state (a resume's), or the copy of its source's it
		// fetched (a fork's), has served (the running report lets it go in the state
		// too). A source's or a snapshot's stays for others.
		go func() {
			<-reported
			if err := os.RemoveAll(dir); err != nil {
				a.log.Warn("remove a saved state that has served", "sandbox", sb.ID, "err", err)
			}
		}()
	}
	switch {
	case sb.IsSidecar() && r.saved == nil && r.migration == nil:
		a.wg.Add(1)
		go func() { // ends with the sandbox's run (r.ctx)
			defer a.wg.Done()
			a.probeSidecar(r.ctx, s, sb)
		}()
	case sb.IsSidecar():
		// Resumed or moved: it was ready, and carries on where it was.
		s.markGroupReady()
	}
	if r.restoredFrom != nil {
		// Keep a VMM launched ahead for this template's next restore; asked for only now,
		// so that launching it does not compete with this start for the CPUs.
		a.slots.want(r.restoredFrom, r.rootDisk, sb.Spec.VCPUs, sb.Spec.MemoryMiB)
	}

	a.supervise(r.ctx, s, sb, r.h.vm, r.main, reported)
}

// pullStep makes sure the image is on the node (as its owner: a user's pull is guarded
// and charged to the user's share) and works out the command.
func (a *Agent) pullStep(r *startRun) error {
	spec := r.sb.Spec
	pullCtx, cancel := context.WithTimeout(r.ctx, a.cfg.PullTimeout)
	img, err := a.images.Ensure(pullCtx, spec.Image, a.PullOptions(spec.InsecureRegistries, spec.PullPrivate, r.sb.Owner))
	cancel()
	if err != nil {
		return fmt.Errorf("pull image %s: %v", spec.Image, err)
	}
	digest := img.Digest
	r.s.mu.Lock()
	r.s.started.ImageDigest = &digest // in use from here on: a token's share lets others go
	r.s.mu.Unlock()
	select { // the image disk may be over budget now
	case a.pruneWake <- struct{}{}:
	default:
	}
	if r.proc, err = resolveProcess(spec, img.Config); err != nil {
		return err
	}
	r.img = img
	r.ph.mark("pull")
	return nil
}

// rootDiskStep builds the image's read-only root disk (once per image digest), within
// the owner's share for a user's image.
func (a *Agent) rootDiskStep(r *startRun) error {
	spec, digest := r.sb.Spec, r.img.Digest
	var err error
	if spec.PullPrivate {
		r.rootDisk, r.rootFS, err = a.images.RootDisk(r.ctx, r.img)
	} else {
		r.rootDisk, r.rootFS, err = a.userRootDisk(r.ctx, r.sb.Owner, r.img)
	}
	if err != nil {
		return fmt.Errorf("build root disk for %s: %v", spec.Image, err)
	}
	if !spec.PullPrivate {
		// The image now counts with its root disk (a few compressed bytes can unpack to
		// gigabytes): the token's other images make room, or the start fails and the
		// image goes.
		if err := a.FitImages(r.ctx, r.sb.Owner, digest); err != nil {
			// Nothing runs from it now: let it go at once, or the token stays over its
			// share (and every start of it fails) until the periodic pass.
			r.s.mu.Lock()
			r.s.started.ImageDigest = nil
			r.s.mu.Unlock()
			_ = a.FitImages(r.ctx, r.sb.Owner, digest)
			return fmt.Errorf("root disk of %s (%s): %v", spec.Image, digest, err)
		}
	}
	r.ph.mark("rootdisk")
	return nil
}

// acquireVMStep gets the sandbox a running VM whose guest answered, trying in order: a
// warm pool's VM (boot auto), a VMM launched ahead for the template, a restore from the
// template (built now if there is none), a cold boot. A snapshot path that fails falls
// back to the next and says why (start_fallback); only a cold boot that fails fails the
// start.
func (a *Agent) acquireVMStep(r *startRun) error {
	s, sb := r.s, r.sb
	mode, _ := state.ParseBootMode(string(sb.Spec.Boot))
	withNet := sb.Spec.Network != state.NetworkNone
	if sb.Spec.Snapshot != "" {
		// Its own files on the image: a boot with the snapshot's disk (a template's
		// guest has the template's disk mounted already).
		from, err := a.snapshotScratch(sb.Spec.Snapshot, r.img.Digest)
		if err != nil {
			return err
		}
		mode, r.scratchFrom = state.BootCold, from
	}
	r.key = a.vms.templateKeyFor(r.img.Digest, r.rootDisk, r.rootFS, sb.Spec.VCPUs, sb.Spec.MemoryMiB, withNet)
	if mode == state.BootAuto {
		if pv := a.pools.claim(r.key.hash()); pv != nil {
			r.h, r.how = a.adoptPoolVM(s, pv, &r.cleanup), "warm"
		}
	}
	if r.h != nil && r.h.net != nil {
		// The warm VM's network let nothing through while it waited: now it gets this
		// sandbox's policy (validated by the control plane; a failure ends the start).
		if err := r.h.net.Open(policyOf(sb.Spec)); err != nil {
			return fmt.Errorf("network policy: %v", err)
		}
	}
	if r.h == nil {
		h, tmpl, err := a.restoreOrBoot(r, mode, withNet)
		if err != nil {
			return err
		}
		a.takeVM(r, h, r.how)
		if r.how == "restore" {
			r.restoredFrom = tmpl
		}
	}
	if len(sb.Spec.Volumes) > 0 && r.h.vols == nil {
		// A VM made ahead (warm, or launched for a restore) had no sandbox yet: its
		// guest mounts nothing until the identity below, so the server can start now.
		if r.h.net == nil {
			return errors.New("volumes need the sandbox's network (they are served on it)")
		}
		v, err := a.vms.serveVolumes(r.ctx, s.dir, filepath.Join("/run/netns", r.h.net.Namespace()), volumesOf(sb.ID, sb.Spec))
		if err != nil {
			return fmt.Errorf("serve the sandbox's volumes: %v", err)
		}
		r.h.vols = v // stopped after the VM by ownVM's cleanup
		r.ph.mark("volumes")
	}
	info := r.h.vm.Info()
	r.rt = map[string]string{
		"pid": strconv.Itoa(info.PID), "run_dir": s.dir, "console_log": info.ConsoleLog,
		"qemu_cmdline": info.CmdlineFile, "vcpus": strconv.Itoa(sb.Spec.VCPUs),
		"memory_mib": strconv.Itoa(sb.Spec.MemoryMiB), "root_fs": r.rootFS,
		"kernel": a.vms.kernel.Release, "init_version": a.vms.initrd.Version, "start_mode": r.how,
	}
	if r.how != "cold" {
		r.rt["template"] = r.key.hash()
	}
	if r.fallback != "" {
		r.rt["start_fallback"] = r.fallback
	}
	if r.h.ahead {
		r.rt["vmm_launched_ahead"] = "yes"
	}
	if r.h.net != nil {
		r.rt["netns"], r.rt["address"] = r.h.net.Namespace(), r.h.net.Address().String()
	}
	s.mu.Lock()
	s.started.Runtime = r.rt
	s.mu.Unlock()
	if r.how == "cold" {
		// A boot takes seconds and may hang: show where its console log is right away.
		<-r.starting
		a.update(sb.ID, state.Update{Runtime: r.rt})
	}
	return nil
}

// restoreOrBoot is acquireVMStep without a warm VM: a slot, a restore or a boot. It
// returns the template it restored from (or tried to).
func (a *Agent) restoreOrBoot(r *startRun, mode state.BootMode, withNet bool) (*vmHandle, *template, error) {
	s, sb, ctx := r.s, r.sb, r.ctx
	// A placed sandbox always fits: end warm VMs that hold its capacity.
	a.pools.makeRoom()
	in := vmInput{id: sb.ID, dir: s.dir, rootDisk: r.rootDisk, vcpus: sb.Spec.VCPUs, mem: sb.Spec.MemoryMiB, net: withNet, policy: policyOf(sb.Spec),
		scratchFrom: r.scratchFrom, volumes: volumesOf(sb.ID, sb.Spec)}
	r.how = "cold"
	var tmpl *template
	if mode != state.BootCold {
		t, built, err := a.templates.get(ctx, r.key, sb.Spec.Image, r.rootDisk, prefetchFor(r.img.Config))
		switch {
		case err == nil:
			tmpl, in.tmpl, r.how = t, t, "restore"
			if built {
				r.ph.mark("template_build")
			} else {
				r.ph.mark("template")
			}
		case ctx.Err() != nil:
			return nil, nil, fmt.Errorf("stopped while waiting for the template snapshot: %v", err)
		default:
			// A start never fails for want of a snapshot: boot instead, and say so.
			r.fallback = err.Error()
			a.log.Warn("no template snapshot; booting", "sandbox", sb.ID, "err", err)
			r.ph.mark("template_failed")
		}
	}
	var h *vmHandle
	var err error
	if sl := a.slots.take(tmpl); sl != nil {
		h, err = a.useSlot(ctx, s, sl)
		if err != nil && ctx.Err() == nil && !errors.As(err, new(volumeError)) {
			// The launched-ahead VMM failed (it may have died while idle): that says
			// nothing about the template yet, so restore afresh.
			a.log.Warn("restore in a VMM launched ahead failed; restoring afresh", "sandbox", sb.ID, "err", err)
			h, err = a.vms.startVM(ctx, in)
		}
	} else {
		h, err = a.vms.startVM(ctx, in)
	}
	if tmpl != nil {
		a.templates.release(tmpl) // the VMM has mapped the files (or failed)
		if err != nil && ctx.Err() == nil && !errors.As(err, new(volumeError)) {
			// A template that does not restore (damaged files, a QEMU that cannot load
			// it) is dropped, so the next start builds a new one; this start boots
			// instead of failing.
			a.templates.invalidate(tmpl, err)
			r.fallback = "restore failed: " + err.Error()
			a.log.Warn("restore from template failed; booting", "sandbox", sb.ID, "err", err)
			r.ph.mark("restore_failed")
			in.tmpl, r.how = nil, "cold"
			h, err = a.vms.startVM(ctx, in)
		}
	}
	return h, tmpl, err
}

// commandStep makes the guest this sandbox (hostname, environment, clock, entropy; for a
// boot also its root, scratch and network) and starts the command.
func (a *Agent) commandStep(r *startRun) error {
	sb, guest := r.sb, r.h.guest
	hostname := sb.Name
	if n := groupHostname(sb); n != "" {
		hostname = n
	}
	if hostname == "" || len(hostname) > 63 {
		hostname = sb.ID[:12]
	}
	hosts := groupHosts(sb.Spec.Group, sb.ID)
	if sb.Spec.Group != nil {
		// Its group's members that run already reach it, and it them, before its
		// command starts.
		a.refreshGroup(sb.Spec.Group)
	}
	baseEnv := []string{"FIREWORKS_SANDBOX_ID=" + sb.ID}
	execReq := proto.ExecRequest{
		Argv: r.proc.Argv, Env: r.proc.Env, Dir: r.proc.Dir, CreateDir: true, User: r.proc.User, NonRoot: r.proc.NonRoot, // Docker creates a missing WORKDIR
		TTY: sb.Spec.TTY, Stdin: sb.Spec.Stdin, Rows: 24, Cols: 80,
	}
	setupCtx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	defer cancel()
	// A group's main starts its command once its sidecars are ready: the guest is set up
	// first, then it waits (not bounded by the setup's time).
	waitGroup := func() error { return nil }
	if sb.IsGroupMain() {
		waitGroup = func() error {
			// Waiting is not starting: the node's background work need not hold back.
			r.startEnds()
			err := a.waitSidecars(r.ctx, sb)
			r.ph.mark("sidecars")
			if err != nil {
				return fmt.Errorf("the group's sidecars: %w", err)
			}
			cancel()
			setupCtx, cancel = context.WithTimeout(r.ctx, 30*time.Second)
			return nil
		}
	}
	var err error
	vols := guestVolumes(sb.Spec.Volumes)
	envdCfg := envdFor(sb, r.proc)
	switch {
	case r.how != "cold" && (len(vols) > 0 || sb.IsGroupMain()):
		// Its volumes are mounted (its sidecars ready) before the command starts:
		// identity first, then exec.
		err = guest.Identity(setupCtx, proto.Identity{Hostname: hostname, Env: baseEnv, TimeUnixNano: time.Now().UnixNano(), Entropy: entropy(), Volumes: vols, Hosts: hosts, Envd: envdCfg})
		r.ph.mark("identity")
		if err == nil {
			if err = waitGroup(); err != nil {
				return err
			}
			r.main, err = guest.Exec(setupCtx, execReq)
			r.ph.mark("exec")
		}
	case r.how != "cold":
		// The template's guest has its root mounted already: it only needs to become
		// this sandbox, and the command follows in the same breath.
		r.main, err = guest.IdentityAndExec(setupCtx, proto.Identity{Hostname: hostname, Env: baseEnv, TimeUnixNano: time.Now().UnixNano(), Entropy: entropy(), Hosts: hosts, Envd: envdCfg}, execReq)
		r.ph.mark("identity+exec")
	default:
		setup := proto.Setup{
			Hostname: hostname, RootDevice: "/dev/vda", RootFSType: r.rootFS, ScratchDevice: "/dev/vdb",
			TimeUnixNano: time.Now().UnixNano(), Entropy: entropy(), Env: baseEnv, Volumes: vols, Hosts: hosts, Envd: envdCfg,
		}
		if sb.Spec.Network != state.NetworkNone {
			setup.Net, setup.Nameservers = guestNet(), a.cfg.Nameservers
		}
		err = guest.Setup(setupCtx, setup)
		r.ph.mark("setup")
		if err == nil {
			if err = waitGroup(); err != nil {
				return err
			}
			// The same bound on starting the command as a restore's: an image can make its
			// start hang in the guest, and the sandbox must then fail, not stay starting.
			execCtx, cancelExec := context.WithTimeout(r.ctx, 30*time.Second)
			r.main, err = guest.Exec(execCtx, execReq)
			cancelExec()
			r.ph.mark("exec")
		}
	}
	if err != nil {
		var gerr *client.GuestError
		if errors.As(err, &gerr) && (gerr.Op == proto.OpSetup || gerr.Op == proto.OpIdentity) {
			return fmt.Errorf("set up the guest (%s start): %v", r.how, err)
		}
		return fmt.Errorf("start %q in the guest: %v", r.proc.Argv[0], err)
	}
	return nil
}

// takeVM makes the VM a start step launched the run's: its launch's phases are timed,
// it ends with the run (or the start's failure), how names the way it started.
func (a *Agent) takeVM(r *startRun, h *vmHandle, how string) {
	if h.netTime > 0 {
		r.ph.add("net", h.netTime)
	}
	r.ph.add("vmm", h.vmmTime)
	r.ph.add("guest", h.guestT)
	r.ph.last = time.Now()
	a.ownVM(r.s, h, &r.cleanup)
	r.h, r.how = h, how
}

// envdFor is what the guest's envd (E2B's in-sandbox API, see internal/guest/envd) serves
// sb with: for the holder of its access token, with its main process's user and
// environment, on its network; nil without one.
func envdFor(sb state.Sandbox, main process) *proto.Envd {
	if sb.AccessToken == "" || sb.Spec.Network == state.NetworkNone {
		return nil
	}
	// The main process's working directory is its commands' too, if the image or the
	// spec set one (E2B's template working directory); else the user's home, as E2B's.
	dir := main.Dir
	if dir == "/" {
		dir = ""
	}
	return &proto.Envd{Token: sb.AccessToken, User: main.User, Env: main.Env, Dir: dir, NonRoot: main.NonRoot}
}
