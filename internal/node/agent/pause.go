package agent

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Pause and resume. A pause saves the whole VM (vmm.Saver: RAM and device state in one
// file) with its scratch disk into sandboxes/<id>/saved/ and ends the VMM; the sandbox
// then holds no CPU or RAM here, only that disk. A resume is a run of the sandbox whose
// steps restore that VM instead of making a new one: the guest carries on where it was,
// its processes, files and memory as they were; the agent sets its clock to the host's,
// reseeds its entropy, and reattaches to the main process (which the guest held for it,
// see proto.OpDetach), whose output goes on into the same log.
//
// The guest keeps its address (every guest has the same one behind its network's address
// translation), so its listening servers answer at the same ingress host after a resume;
// the network itself is made again (connections through it are cut) with the sandbox's
// policy, and its counters go on from where they were.

// savedRecordFile, in sandboxes/<id>/saved/, is what a resume needs besides the VM's files.
const savedRecordFile = "saved.json"

type savedRecord struct {
	Sandbox     state.Sandbox `json:"sandbox"` // as it was started
	Proc        process       `json:"proc"`
	Main        uint32        `json:"main_session"`
	RootFS      string        `json:"root_fs"`
	ImageDigest string        `json:"image_digest"`
	// RootDisk identifies the root disk file the guest ran on (inode, size, mtime): the
	// saved guest has its filesystem's blocks cached, so only that very file will do.
	RootDisk string `json:"root_disk"`
	// RootDiskHash hashes the root disk's content past its first 4 KiB (an erofs
	// superblock holds its build time): another node's disk of the same image is the
	// same disk to the saved guest exactly when this matches.
	RootDiskHash string    `json:"root_disk_hash,omitempty"`
	VCPUs        int       `json:"vcpus"`
	MemoryMiB    int       `json:"memory_mib"`
	Net          NetStats  `json:"net"` // counters at the pause, carried over the resume
	At           time.Time `json:"at"`
	// Ran is how long the sandbox had run when it was paused (--timeout counts it).
	Ran time.Duration `json:"ran,omitempty"`
}

func (a *Agent) savedDir(id string) string { return filepath.Join(a.sandboxRoot(), id, "saved") }

// fetchedSource is where a fork placed away from its source's node keeps the source's
// saved state it fetched (its own copy, gone once it runs or with it).
func (a *Agent) fetchedSource(id string) string { return filepath.Join(a.sandboxRoot(), id, "source") }

// maxSavedRecord bounds saved.json as read (it may have come from another node).
const maxSavedRecord = 64 << 10

func readSavedRecord(dir string) (savedRecord, error) {
	var r savedRecord
	f, err := os.Open(filepath.Join(dir, savedRecordFile))
	if err != nil {
		return r, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSavedRecord+1))
	if err != nil {
		return r, err
	}
	if len(b) > maxSavedRecord {
		return r, fmt.Errorf("%s is larger than %d bytes", savedRecordFile, maxSavedRecord)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("parse %s: %w", savedRecordFile, err)
	}
	return r, nil
}

// diskIdentity names a file's inode, size and modification time.
func diskIdentity(path string) string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return ""
	}
	return fmt.Sprintf("%d-%d-%d", st.Ino, st.Size, st.Mtim.Nano())
}

// rootDiskHash hashes a root disk past its first 4 KiB, once per file (by inode, size
// and mtime).
func (a *Agent) rootDiskHash(path string) (string, error) {
	id := diskIdentity(path)
	a.mu.Lock()
	h, ok := a.diskHashes[id]
	a.mu.Unlock()
	if ok {
		return h, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sum := sha256.New()
	if _, err := io.Copy(sum, io.NewSectionReader(f, 4096, 1<<62)); err != nil {
		return "", err
	}
	h = hex.EncodeToString(sum.Sum(nil))
	a.mu.Lock()
	if a.diskHashes == nil {
		a.diskHashes = map[string]string{}
	}
	a.diskHashes[id] = h
	a.mu.Unlock()
	return h, nil
}

// errPauseRefused wraps a pause that changed nothing: the sandbox runs on.
var errPauseRefused = errors.New("pause refused")

// Pause saves running sandbox id (see above) and reports it paused. A refusal
// (errPauseRefused: the driver cannot save, too little disk) leaves it running; a save
// that fails once the guest let go of its host ends it (failed), since its processes can
// no longer be supervised.
func (a *Agent) Pause(ctx context.Context, id string) error {
	s, err := a.lookup(id)
	if err != nil {
		return err
	}
	select {
	case <-s.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	s.mu.Lock()
	vm, g, main, stopping, spec, sn := s.vm, s.guest, s.main, s.stopping, s.spec, s.net
	s.mu.Unlock()
	saver, ok := vm.(vmm.Saver)
	switch {
	case main == nil || g == nil:
		return fmt.Errorf("%w: sandbox %s is not running", errPauseRefused, id)
	case stopping != "":
		return fmt.Errorf("%w: sandbox %s is stopping", errPauseRefused, id)
	case !ok:
		return fmt.Errorf("%w: the %s driver cannot save VMs", errPauseRefused, a.vms.driver.Name())
	}
	shape := state.SandboxSpec{VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB}.Reserved()
	mem := shape.MemoryMiB
	// The save holds the pages the guest touched: about what its VMM has resident (QEMU's
	// own memory included), at most its memory, and the scratch disk's blocks.
	likely := int64(mem) << 20
	if rss := residentBytes(vm.Info().PID); rss > 0 {
		likely = min(likely, rss)
	}
	release, err := a.savedRoom(likely + allocated(filepath.Join(s.dir, "scratch.img")))
	if err != nil {
		return fmt.Errorf("%w: %w", errPauseRefused, err)
	}
	defer release()
	rec, err := a.runRecord(ctx, s)
	if err != nil {
		return fmt.Errorf("%w: %v", errPauseRefused, err)
	}
	var netBase NetStats
	if sn != nil {
		if netBase, err = a.NetStats(id); err != nil {
			return fmt.Errorf("%w: network counters: %v", errPauseRefused, err)
		}
	}
	s.mu.Lock()
	s.pausing = true // supervise leaves the report of this end to us
	ran := s.ranBefore
	if !s.runSince.IsZero() {
		ran += time.Since(s.runSince)
	}
	s.mu.Unlock()
	t0 := time.Now()
	// Exec sessions end here, their callers told why: a caller cut off by the pause
	// could not see them carry on after the resume (the main process, which the
	// sandbox is, goes on).
	a.endExecs(ctx, s, "ended by a pause of the sandbox")
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = g.Detach(dctx)
	cancel()
	if err != nil {
		s.mu.Lock()
		s.pausing = false
		s.mu.Unlock()
		return fmt.Errorf("%w: the guest did not let go of its sessions: %v", errPauseRefused, err)
	}
	final := a.savedDir(id)
	tmp := final + ".tmp"
	rec.Net, rec.At, rec.Ran = netBase, time.Now().UTC(), ran
	bytes, err := a.save(ctx, s, saver, tmp, rec)
	if err == nil {
		_ = os.RemoveAll(final)
		err = os.Rename(tmp, final)
	}
	// The VM is stopped for good either way (see vmm.Saver): end it. supervise returns
	// without a report, and the run's cleanup lets its network and run files go.
	_ = vm.Kill()
	select {
	case <-s.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	pin := func(u state.Update) state.Update {
		r, n, res := s.restarts, s.node, s.resumes
		u.IfRestarts, u.IfResumes, u.Time = &r, &res, time.Now()
		if n != "" {
			u.IfNode = &n
		}
		return u
	}
	if err != nil {
		_ = os.RemoveAll(tmp)
		a.log.Warn("pause failed; the sandbox ends", "sandbox", id, "err", err)
		a.report(id, pin(state.Update{Status: status(state.StatusFailed), Reason: "pause failed: " + err.Error()}))
		return err
	}
	a.log.Info("sandbox paused", "sandbox", id, "saved_mib", bytes>>20, "took", time.Since(t0).Round(time.Millisecond))
	a.report(id, pin(state.Update{Status: status(state.StatusPaused), Reason: "paused by request",
		Saved: &state.Saved{Node: a.cfg.Node, Bytes: bytes, At: time.Now()},
		// What belonged to the ended VM (its process, network, run files) is not shown
		// as if it were there.
		Runtime: map[string]string{"pause_took": time.Since(t0).Round(time.Millisecond).String(),
			"pid": "", "netns": "", "address": "", "run_dir": "", "console_log": "", "qemu_cmdline": ""}}))
	return nil
}

// runRecord is what a run of a sandbox needs to go on in another VM (a resume, a
// fork, a migration's target): its process, its image and the very root disk it runs
// on, its shape.
func (a *Agent) runRecord(ctx context.Context, s *sandbox) (savedRecord, error) {
	rec, err := readAdoptRecord(s.dir)
	if err != nil {
		return savedRecord{}, fmt.Errorf("the sandbox's run record: %v", err)
	}
	digest := digestOf(s, rec)
	img, err := a.images.Get(ctx, digest)
	if err != nil || img.RootDisk == "" {
		return savedRecord{}, fmt.Errorf("the image %s the sandbox runs from: %v", digest, err)
	}
	rootHash, err := a.rootDiskHash(img.RootDisk)
	if err != nil {
		return savedRecord{}, fmt.Errorf("hash the root disk: %v", err)
	}
	s.mu.Lock()
	shape := state.SandboxSpec{VCPUs: s.spec.VCPUs, MemoryMiB: s.spec.MemoryMiB}.Reserved()
	s.mu.Unlock()
	return savedRecord{Sandbox: rec.Sandbox, Proc: rec.Proc, Main: rec.Main, RootFS: rec.RootFS, ImageDigest: digest,
		RootDisk: diskIdentity(img.RootDisk), RootDiskHash: rootHash, VCPUs: shape.VCPUs, MemoryMiB: shape.MemoryMiB}, nil
}

// save writes the VM's state and its scratch disk into dir, with rec; it returns the
// bytes they take.
func (a *Agent) save(ctx context.Context, s *sandbox, saver vmm.Saver, dir string, rec savedRecord) (int64, error) {
	_ = os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if err := saver.Save(sctx, filepath.Join(dir, "state")); err != nil {
		return 0, err
	}
	// The disk the guest wrote, as the saved memory knows it (the VMM flushed it).
	if err := moveFile(filepath.Join(s.dir, "scratch.img"), filepath.Join(dir, "scratch.img")); err != nil {
		return 0, fmt.Errorf("keep the scratch disk: %w", err)
	}
	b, err := json.Marshal(rec)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, savedRecordFile), b, 0o600)
	}
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", savedRecordFile, err)
	}
	if err := syncDir(dir); err != nil {
		return 0, err
	}
	return dirSize(dir), nil
}

func syncDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("sync %s: %w", e.Name(), err)
		}
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func digestOf(s *sandbox, rec adoptRecord) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.started.ImageDigest; d != nil {
		return *d
	}
	return rec.Sandbox.ImageDigest
}

// report writes a lifecycle change as it is pinned (update pins it to the live run; a
// run no longer live here pins it itself); failures are logged, as nobody waits for it.
func (a *Agent) report(id string, u state.Update) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := a.store.UpdateSandbox(ctx, id, u); errors.Is(err, state.ErrStaleReport) {
		// The sandbox moved on (re-placed by a drain, stopped, resumed): this run's news
		// is no longer anyone's.
		a.log.Info("report of a run the control plane has moved past", "sandbox", id, "err", err)
	} else if err != nil {
		a.log.Error("record sandbox state", "sandbox", id, "err", err)
	}
}

// resumeSteps are a resume's start (see startSteps): the image the guest ran on, the VM
// restored from its saved state, the main process taken back.
var resumeSteps = []struct {
	name string
	run  func(a *Agent, r *startRun) error
}{
	{"fetch", (*Agent).savedFetchStep},       // phase fetch, when another node holds it
	{"image", (*Agent).savedImageStep},       // phase image
	{"vm", (*Agent).savedVMStep},             // phases net, vmm, guest
	{"reattach", (*Agent).savedReattachStep}, // phase reattach
}

// savedFetchStep brings the saved state from the node that holds it, if that is not
// this one.
func (a *Agent) savedFetchStep(r *startRun) error {
	// Its own, or a fork's source's (a snapshot's start is placed where it is).
	var from state.Saved
	switch {
	case r.sb.Saved != nil:
		from = *r.sb.Saved
	case r.sb.Spec.ForkOf != "":
		from = state.Saved{Node: r.sb.Spec.ForkNode, Address: r.sb.Spec.ForkAddress}
	default:
		return nil
	}
	if from.Node == a.cfg.Node {
		return nil
	}
	// What it writes counts against the node's budget like any saved state (up to the
	// VM's memory and its scratch disk).
	release, err := a.savedRoom(int64(r.sb.Spec.Reserved().MemoryMiB)<<20 + int64(a.vms.scratchMiB)<<20)
	if err != nil {
		return fmt.Errorf("fetch the saved state: %w", err)
	}
	defer release()
	if err := a.fetchSaved(r.ctx, r.sb, from, a.savedFor(r.sb)); err != nil {
		return err
	}
	r.fetched = true
	r.ph.mark("fetch")
	return nil
}

// forkSteps start a fork: a new machine from another sandbox's saved state (see
// ForkSandbox in the server): the image and root disk it ran on, the VM restored from
// that state on a copy of its disk, then its own identity, and its main process.
var forkSteps = []struct {
	name string
	run  func(a *Agent, r *startRun) error
}{
	{"fetch", (*Agent).savedFetchStep},      // phase fetch, when placed away from the source
	{"image", (*Agent).savedImageStep},      // phase image
	{"vm", (*Agent).savedVMStep},            // phases flatten, net, vmm, guest
	{"identity", (*Agent).forkIdentityStep}, // phase identity+reattach
}

// savedFor is the directory of the saved state a start restores: its own (a resume) or
// its source's (a fork).
func (a *Agent) savedFor(sb state.Sandbox) string {
	if sb.Saved != nil {
		return a.savedDir(sb.ID)
	}
	if sb.Spec.ForkOf != "" && sb.Spec.ForkNode != a.cfg.Node {
		return a.fetchedSource(sb.ID) // fetched from the source's node
	}
	if sb.Spec.ForkOf != "" {
		return a.savedDir(sb.Spec.ForkOf)
	}
	if sb.Spec.Snapshot != "" {
		return a.snapshotDir(sb.Spec.Snapshot) // a snapshot with memory
	}
	return a.savedDir(sb.ID)
}

// forkIdentityStep makes the restored guest a machine of its own (hostname, sandbox ID,
// clock, fresh entropy for its CRNG: nothing random is shared with its source or its
// siblings from here on) and takes back the main process, which goes on in it.
func (a *Agent) forkIdentityStep(r *startRun) error {
	ctx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	defer cancel()
	hostname := r.sb.Name
	if n := groupHostname(r.sb); n != "" {
		hostname = n
	}
	if hostname == "" || len(hostname) > 63 {
		hostname = r.sb.ID[:12]
	}
	g := r.h.guest
	// A group member (started from a group's snapshot with memory) learns its group
	// again: the members are the new group's.
	id := proto.Identity{Hostname: hostname, Env: []string{"FIREWORKS_SANDBOX_ID=" + r.sb.ID},
		TimeUnixNano: time.Now().UnixNano(), Entropy: entropy(), Hosts: groupHosts(r.sb.Spec.Group, r.sb.ID)}
	if spec := r.sb.Spec; spec.KeepAlive {
		// The defaults of the commands it runs (envd's and exec's) are its own: a start
		// from a template's snapshot gives its environment, user and working directory
		// (its main process, init's idle program, depends on none of them).
		r.proc.Env = mergeEnv(r.proc.Env, spec.Env)
		r.proc.User, r.proc.Dir = cmp.Or(spec.User, r.proc.User), cmp.Or(spec.WorkingDir, r.proc.Dir)
	}
	if r.sb.Spec.NonRoot && !r.proc.NonRoot && !r.sb.Spec.KeepAlive {
		// Its running process came from the snapshot, started under no such rule: it may
		// run as root, and cannot be checked now.
		return fmt.Errorf("runAsNonRoot: the snapshot's process was not started with it; start from a snapshot of a --non-root sandbox")
	}
	// The rule holds for its execs and envd from now on.
	r.proc.NonRoot = r.proc.NonRoot || r.sb.Spec.NonRoot
	id.Envd = envdFor(r.sb, r.proc) // the fork's own token: its source's opens nothing in it
	if err := g.Identity(ctx, id); err != nil {
		return fmt.Errorf("give the fork its identity: %v", err)
	}
	return r.reattach(ctx, "of the fork", "identity+reattach")
}

// reattach takes back the main process the restored or migrated guest held (session
// r.saved.Main), and ends the start's phase.
func (r *startRun) reattach(ctx context.Context, when, phase string) error {
	main, err := r.h.guest.Reattach(ctx, r.saved.Main)
	if err != nil {
		return fmt.Errorf("take back the main process (session %d) %s: %v", r.saved.Main, when, err)
	}
	r.main = main
	r.ph.mark(phase)
	return nil
}

// savedImageStep finds the saved record, the image and the very root disk the guest ran on.
func (a *Agent) savedImageStep(r *startRun) error {
	if r.saved == nil {
		rec, err := readSavedRecord(a.savedFor(r.sb))
		if err != nil {
			return fmt.Errorf("the saved state on node %s: %v", a.cfg.Node, err)
		}
		r.saved = &rec
	}
	rec := *r.saved
	img, err := a.images.Get(r.ctx, rec.ImageDigest)
	if err != nil && r.fetched {
		// Started on another node than the one it ran on: pull the image it ran from.
		spec := r.sb.Spec
		pctx, cancel := context.WithTimeout(r.ctx, a.cfg.PullTimeout)
		img, err = a.images.Ensure(pctx, spec.Image, a.PullOptions(spec.InsecureRegistries, spec.PullPrivate, r.sb.Owner))
		cancel()
		if err == nil && img.Digest != rec.ImageDigest {
			err = fmt.Errorf("%s is %s now, the sandbox ran %s (the tag moved)", spec.Image, img.Digest, rec.ImageDigest)
		}
	}
	if err != nil {
		return fmt.Errorf("the image %s the sandbox ran from is not on node %s: %v", rec.ImageDigest, a.cfg.Node, err)
	}
	digest := img.Digest
	r.s.mu.Lock()
	r.s.started.ImageDigest = &digest
	r.s.mu.Unlock()
	r.img = img
	if r.rootDisk, r.rootFS, err = a.images.RootDisk(r.ctx, img); err != nil {
		return fmt.Errorf("root disk of %s: %v", rec.ImageDigest, err)
	}
	if id := diskIdentity(r.rootDisk); id != rec.RootDisk {
		// Another file: the saved guest has the old disk's blocks cached, so it runs on
		// this one only if every block it may read is the same.
		h, err := a.rootDiskHash(r.rootDisk)
		if err != nil || rec.RootDiskHash == "" || h != rec.RootDiskHash {
			return fmt.Errorf("the root disk of %s here is not the one the sandbox ran on (rebuilt, or built differently on another node); the saved guest cannot run on it", rec.ImageDigest)
		}
	}
	r.proc, r.rootFS = rec.Proc, rec.RootFS
	r.ph.mark("image")
	return nil
}

// savedVMStep restores the VM from its saved state, on its saved scratch disk, with a
// network of the sandbox's policy.
func (a *Agent) savedVMStep(r *startRun) error {
	s, sb, rec := r.s, r.sb, r.saved
	// The shape is the sandbox's, as the control plane reserved it: a record (maybe
	// fetched from another node) that says otherwise is refused.
	if shape := sb.Spec.Reserved(); rec.VCPUs != shape.VCPUs || rec.MemoryMiB != shape.MemoryMiB {
		return fmt.Errorf("the saved state is of a %d-vCPU %d MiB VM, the sandbox is %d vCPUs %d MiB", rec.VCPUs, rec.MemoryMiB, shape.VCPUs, shape.MemoryMiB)
	}
	if d := sb.ImageDigest; d != "" && d != rec.ImageDigest {
		return fmt.Errorf("the saved state is of image %s, the sandbox ran %s", rec.ImageDigest, d)
	}
	dir := a.savedFor(sb)
	fork := sb.Saved == nil // a new machine from another's save (a fork, a snapshot)
	withNet := sb.Spec.Network != state.NetworkNone
	files := &savedFiles{state: filepath.Join(dir, "state"), scratch: filepath.Join(dir, "scratch.img")}
	if fork {
		// Forks share the save's memory (see flatten.go).
		flat, err := a.flatFor(r.ctx, dir, *rec, r.rootDisk, withNet)
		if err != nil {
			return err
		}
		files.state, files.mem = flat.state(), flat.mem()
		r.ph.mark("flatten")
	}
	in := vmInput{id: sb.ID, dir: s.dir, rootDisk: r.rootDisk, vcpus: rec.VCPUs, mem: rec.MemoryMiB,
		saved: files, savedCopy: fork, net: withNet, policy: policyOf(sb.Spec), volumes: volumesOf(sb.ID, sb.Spec)}
	h, err := a.vms.startVM(r.ctx, in)
	if err != nil {
		return fmt.Errorf("restore the saved VM: %v", err)
	}
	a.takeVM(r, h, "resume")
	if fork {
		// A new machine: its network counters start at zero.
		r.how = "fork"
		if sb.Spec.Snapshot != "" {
			r.how = "snapshot"
		}
	} else {
		s.mu.Lock()
		s.netBase, s.ranBefore = rec.Net, rec.Ran
		s.mu.Unlock()
	}
	r.setRuntime(map[string]string{"resumed_from": rec.At.Format(time.RFC3339Nano)})
	return nil
}

// setRuntime records what the node says of a start's VM (process, paths, network, how
// it started), with extra, as the details its running report carries.
func (r *startRun) setRuntime(extra map[string]string) {
	info := r.h.vm.Info()
	r.rt = map[string]string{
		"pid": strconv.Itoa(info.PID), "run_dir": r.s.dir, "console_log": info.ConsoleLog, "qemu_cmdline": info.CmdlineFile,
		"start_mode": r.how,
	}
	maps.Copy(r.rt, extra)
	if r.h.net != nil {
		r.rt["netns"], r.rt["address"] = r.h.net.Namespace(), r.h.net.Address().String()
	}
	r.s.mu.Lock()
	r.s.started.Runtime = r.rt
	r.s.mu.Unlock()
}

// savedReattachStep brings the guest's clock to now, reseeds its entropy, and takes
// back the main process.
func (a *Agent) savedReattachStep(r *startRun) error {
	ctx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	defer cancel()
	g := r.h.guest
	if err := g.SetTime(ctx, proto.SetTime{TimeUnixNano: time.Now().UnixNano(), Entropy: entropy()}); err != nil {
		return fmt.Errorf("set the resumed guest's clock: %v", err)
	}
	return r.reattach(ctx, "after the resume", "reattach")
}

// residentBytes is process pid's resident memory (0 if unknown).
func residentBytes(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil || pid <= 0 {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}
