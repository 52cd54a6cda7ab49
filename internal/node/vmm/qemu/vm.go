package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/qemu/qmp"
)

var lookPath = exec.LookPath

// persisted is what Start writes to the run directory for Adopt.
type persisted struct {
	ID        string `json:"id"`
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"` // /proc/<pid>/stat field 22: tells a recycled pid apart
	QMP       string `json:"qmp"`
	Accel     string `json:"accel"`
	// UID is the jail user of a jailed VMM (0: not jailed); Cgroups its cgroups.
	UID     int      `json:"uid,omitempty"`
	Cgroups []string `json:"cgroups,omitempty"`
}

// proc is the VMM process: either our child or, after Adopt, a process we only watch.
type proc interface {
	signal(sig syscall.Signal) error
}

type childProc struct{ p *os.Process }

func (c childProc) signal(sig syscall.Signal) error { return c.p.Signal(sig) }

// adoptedProc signals through a pidfd, which cannot reach a recycled pid.
type adoptedProc struct{ f *os.File }

func (a adoptedProc) signal(sig syscall.Signal) error {
	rc, err := a.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	return serr
}

func (a adoptedProc) release() { a.f.Close() }

type vm struct {
	d    *Driver
	id   string
	dir  string
	args []string
	log  *slog.Logger

	done chan struct{} // closed when the VMM process has ended

	mu       sync.Mutex
	state    string // created, running, ended
	pid      int
	p        proc
	qmp      *qmp.Client
	detached bool
	shutdown string // reason of the last SHUTDOWN event
	// ioErrors counts BLOCK_IO_ERROR events; ioErrorSaid is when one was last logged.
	ioErrors    int
	ioErrorSaid time.Time
	stopping    bool   // the host asked for the end (Stop or Kill)
	killed      string // set when the host sent SIGKILL: why
	exitErr     error
	guardStop   chan struct{}

	memFile     string     // Spec.MemoryFile: the VM can be snapshotted
	taps        []*os.File // Spec.NICs' taps, the caller's: passed to QEMU at launch
	restoreFrom string     // Spec.Restore.StateFile: Start restores instead of booting
	snapshotted bool       // saved: must never run again
	// beforeSwitchover, during an outgoing migration, runs with the guest stopped before
	// the switch-over (see migrate.go).
	beforeSwitchover func(ctx context.Context) error
	prestarted       bool // launched by Prestart; Start loads and resumes
	resuming         bool // Start is loading and resuming a prestarted VM
	resumed          bool // the guest has been let run
	exited           chan struct{}

	spec    vmm.Spec // as created (for the jail: which files it binds)
	uid     int      // jail user while the VMM lives (0: none)
	cgroups []string // its cgroup directories
}

var (
	_ vmm.VM          = (*vm)(nil)
	_ vmm.Pauser      = (*vm)(nil)
	_ vmm.Detacher    = (*vm)(nil)
	_ vmm.Snapshotter = (*vm)(nil)
	_ vmm.Prestarter  = (*vm)(nil)
)

func newVM(d *Driver, id, dir string, args []string) *vm {
	return &vm{d: d, id: id, dir: dir, args: args, log: d.log.With("vm", id), done: make(chan struct{}), state: "created", guardStop: make(chan struct{})}
}

func (v *vm) ID() string { return v.id }

func (v *vm) Wait() <-chan struct{} { return v.done }

func (v *vm) ExitError() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.exitErr
}

func (v *vm) Info() vmm.Info {
	v.mu.Lock()
	defer v.mu.Unlock()
	return vmm.Info{PID: v.pid, Accel: v.d.cfg.Accel, ConsoleLog: filepath.Join(v.dir, consoleLog), CmdlineFile: filepath.Join(v.dir, cmdlineFile)}
}

// Start launches QEMU (paused), attaches QMP, records what Adopt needs, then resumes the
// guest (a restore first loads its state). The process is not tied to ctx: it runs in its
// own process group, so neither a cancelled request nor a signal to the host's process
// group ends it. After Prestart, Start only does the loading and resuming.
func (v *vm) Start(ctx context.Context) error {
	v.mu.Lock()
	switch {
	case v.flattenOnly():
		v.mu.Unlock()
		return fmt.Errorf("start VM %s: a VM made to flatten a save into a memory file never runs (see vmm.Flattener)", v.id)
	case v.state == "created":
		v.state = "starting"
		v.mu.Unlock()
		if err := v.launch(ctx); err != nil {
			return fmt.Errorf("start VM %s: %w", v.id, err)
		}
	case v.state == "running" && v.prestarted && !v.resumed && !v.resuming && !v.detached:
		v.resuming = true
		uid := v.uid
		v.mu.Unlock()
		if uid != 0 {
			// Files made since the launch (a restore's scratch disk) become the VMM's.
			if err := v.d.cfg.Jail.prepare(v.spec, uid); err != nil {
				return v.failStart(fmt.Errorf("start VM %s: %w", v.id, err))
			}
		}
	default:
		state := v.state
		v.mu.Unlock()
		return fmt.Errorf("start VM %s: already %s", v.id, state)
	}
	if err := v.resume(ctx); err != nil {
		return fmt.Errorf("start VM %s: %w", v.id, err)
	}
	return nil
}

// Prestart implements vmm.Prestarter: it launches QEMU and attaches QMP, ready to load
// the snapshot, without loading it; Start does the rest.
func (v *vm) Prestart(ctx context.Context) error {
	v.mu.Lock()
	if v.state != "created" {
		state := v.state
		v.mu.Unlock()
		return fmt.Errorf("prestart VM %s: already %s", v.id, state)
	}
	v.state = "starting"
	v.mu.Unlock()
	if err := v.launch(ctx); err != nil {
		return fmt.Errorf("prestart VM %s: %w", v.id, err)
	}
	v.mu.Lock()
	v.prestarted = true
	v.mu.Unlock()
	return nil
}

// launch starts the QEMU process with its vCPUs stopped, attaches QMP and persists what
// Adopt needs.
func (v *vm) launch(ctx context.Context) error {
	qmpPath := filepath.Join(v.dir, qmpSocket)
	_ = os.Remove(qmpPath)
	// Until the process exists, a failure ends the VM here (Kill and Wait then work).
	early := func(err error) error {
		v.end(&vmm.ExitError{Reason: err.Error(), Code: -1})
		return err
	}
	stderr, err := os.OpenFile(filepath.Join(v.dir, stderrFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return early(fmt.Errorf("open %s: %w", stderrFile, err))
	}
	defer stderr.Close() // the child has its own copy
	cmd := exec.Command(v.d.cfg.Binary, v.args...)
	cmd.Dir = v.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if j := v.d.cfg.Jail; j != nil {
		uid, err := v.d.uids.take(j)
		if err != nil {
			return early(err)
		}
		v.mu.Lock()
		v.uid = uid
		v.mu.Unlock()
		if err := j.prepare(v.spec, uid); err != nil {
			return early(err)
		}
		cgs, err := v.d.cgroupsFor(v.id, v.spec.VCPUs, v.spec.MemoryMiB)
		v.mu.Lock()
		v.cgroups = cgs
		v.mu.Unlock()
		if err != nil {
			return early(fmt.Errorf("cgroups for the VMM: %w", err))
		}
		if cmd, err = v.d.jailCommand(v.spec, uid, cgs); err != nil {
			return early(err)
		}
		if err := os.MkdirAll(filepath.Join(v.dir, "jail"), 0o700); err != nil {
			return early(err)
		}
	}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	// The order of ExtraFiles is the fd numbering the command line names (restoreFD,
	// tapFD).
	if r := v.spec.Restore; r != nil && r.Stream != nil {
		// A live migration's stream: QEMU reads one end of a socket pair, which the
		// stream is copied into until it ends (or the VMM does).
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return early(fmt.Errorf("socket pair for the incoming migration: %w", err))
		}
		theirs, ours := os.NewFile(uintptr(fds[0]), "migration-in"), os.NewFile(uintptr(fds[1]), "migration-feed")
		defer theirs.Close() // the child has its own copy
		cmd.ExtraFiles = []*os.File{theirs}
		go func() { // ends with the stream, or when QEMU closes its end (it ended)
			defer ours.Close()
			_, _ = io.Copy(ours, r.Stream)
		}()
	} else if v.restoreFrom != "" {
		f, err := os.Open(v.restoreFrom)
		if err != nil {
			return early(fmt.Errorf("open snapshot state: %w", err))
		}
		defer f.Close() // the child has its own copy
		cmd.ExtraFiles = []*os.File{f}
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, v.taps...)
	if err := cmd.Start(); err != nil {
		return early(fmt.Errorf("run %s: %w", v.d.cfg.Binary, err))
	}
	exited := make(chan struct{})
	v.mu.Lock()
	v.taps = nil // QEMU has its copies; the caller closes its own
	v.pid = cmd.Process.Pid
	v.p = childProc{cmd.Process}
	v.state = "running"
	v.exited = exited
	killedWhileLaunching := v.stopping
	v.mu.Unlock()
	if killedWhileLaunching {
		_ = cmd.Process.Kill() // Kill came before there was a process to signal
	}

	go func() {
		werr := cmd.Wait()
		close(exited)
		v.finish(exitFromChild(cmd.ProcessState, werr))
	}()

	client, err := v.dialQMP(ctx, qmpPath, exited)
	if err != nil {
		return v.failStart(err)
	}
	v.mu.Lock()
	v.qmp = client
	v.mu.Unlock()

	st := persisted{ID: v.id, PID: cmd.Process.Pid, StartTime: procStartTime(cmd.Process.Pid), QMP: qmpPath, Accel: v.d.cfg.Accel,
		UID: v.uid, Cgroups: v.cgroups}
	if err := writeJSON(filepath.Join(v.dir, stateFile), st); err != nil {
		return v.failStart(err)
	}
	_ = os.WriteFile(filepath.Join(v.dir, pidFile), []byte(strconv.Itoa(st.PID)+"\n"), 0o600)
	// File-backed RAM stays out of the stream of a template's save and restore. A whole
	// save's stream has all RAM in it and is made and loaded without the capability (it
	// changes the stream's format), also when a VM flattens it into a memory file.
	if v.restoreFrom == "" && v.memFile != "" || v.spec.Restore != nil && v.spec.Restore.MemoryFile != "" {
		if err := setIgnoreShared(ctx, client, true); err != nil {
			return v.failStart(err)
		}
	}
	return nil
}

// resume loads a restore's state, then lets the guest run.
func (v *vm) resume(ctx context.Context) error {
	v.mu.Lock()
	client, exited := v.qmp, v.exited
	v.mu.Unlock()
	if v.restoreFrom != "" {
		if err := v.serveDisks(ctx); err != nil {
			return v.failStart(err)
		}
		if err := client.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(restoreFD)}, nil); err != nil {
			return v.failStart(fmt.Errorf("restore device state from %s: %w", v.restoreFrom, err))
		}
		// The guest comes back in the run state it was saved in (stopped), whatever
		// autostart says, so wait for the load to finish before resuming it.
		if err := waitIncoming(ctx, client, exited); err != nil {
			return v.failStart(fmt.Errorf("restore device state from %s: %w", v.restoreFrom, err))
		}
		// The disks are whole (the source ended its mirror before it sent the rest):
		// nothing may write them from outside from here on, and that is settled before
		// the switch-over is (after it, failing would lose the sandbox).
		if err := v.stopDiskService(ctx); err != nil {
			return v.failStart(err)
		}
		if r := v.spec.Restore; r != nil && r.BeforeResume != nil {
			// Whole, not running: the guest runs here only if the caller says so (a
			// migration's switch-over was committed).
			if err := r.BeforeResume(ctx); err != nil {
				return v.failStart(fmt.Errorf("the restored VM may not run: %w", err))
			}
		}
		if sharesDisks(v.spec) && v.uid != 0 {
			// The migration's target takes over: the disks are its user's now.
			if err := v.d.cfg.Jail.takeDisks(v.spec, v.uid); err != nil {
				return v.failStart(err)
			}
		}
	}
	if err := client.Execute(ctx, "cont", nil, nil); err != nil {
		return v.failStart(fmt.Errorf("resume the guest: %w", err))
	}
	v.mu.Lock()
	v.resumed = true
	v.mu.Unlock()
	go v.guardConsole()
	return nil
}

// failStart kills a VMM whose start went wrong and returns err with QEMU's last words.
func (v *vm) failStart(err error) error {
	if sharesDisks(v.spec) && v.d.cfg.Jail != nil {
		dropDiskACLs(v.spec) // a migration's target that did not take over
	}
	v.mu.Lock()
	v.stopping = true
	v.killed = "VMM killed: start failed: " + err.Error()
	p := v.p
	v.mu.Unlock()
	_ = p.signal(syscall.SIGKILL)
	<-v.done
	return fmt.Errorf("%w%s", err, v.stderrTail())
}

// setIgnoreShared keeps file-backed guest RAM out of the migration stream (on), or puts
// it in (off). Both ends of a save/restore must agree: it changes the stream's format.
func setIgnoreShared(ctx context.Context, c *qmp.Client, on bool) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": on}}}
	if err := c.Execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
		return fmt.Errorf("set x-ignore-shared to %v: %w", on, err)
	}
	return nil
}

// dialQMP connects to QEMU's QMP socket, retrying until QEMU has created it.
func (v *vm) dialQMP(ctx context.Context, path string, exited <-chan struct{}) (*qmp.Client, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	v.mu.Lock()
	pid := v.pid
	v.mu.Unlock()
	for {
		c, err := v.dialQMPOnce(ctx, path, pid)
		if err == nil {
			return c, nil
		}
		select {
		case <-exited:
			return nil, errors.New("QEMU exited during startup")
		case <-ctx.Done():
			return nil, fmt.Errorf("attach QMP at %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// dialQMPOnce connects to the QMP socket of VMM pid (checked: see dialVMM).
func (v *vm) dialQMPOnce(ctx context.Context, path string, pid int) (*qmp.Client, error) {
	conn, err := dialVMM(ctx, path, pid)
	if err != nil {
		return nil, fmt.Errorf("qmp: connect %s: %w", path, err)
	}
	return qmp.New(ctx, conn, path, v.onEvent)
}

// waitIncoming polls the run state until an incoming migration has been loaded.
func waitIncoming(ctx context.Context, c *qmp.Client, exited <-chan struct{}) error {
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "inmigrate":
		case "paused", "running", "prelaunch":
			return nil
		default:
			return fmt.Errorf("VM is %s after loading its state", st.Status)
		}
		select {
		case <-exited:
			return errors.New("QEMU exited while loading the state")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
}

func (v *vm) onEvent(ev qmp.Event) {
	switch ev.Name {
	case "SHUTDOWN":
		var data struct {
			Guest  bool   `json:"guest"`
			Reason string `json:"reason"`
		}
		_ = json.Unmarshal(ev.Data, &data)
		v.mu.Lock()
		v.shutdown = data.Reason
		v.mu.Unlock()
		v.log.Debug("VM shutdown", "reason", data.Reason)
	case "GUEST_PANICKED":
		v.mu.Lock()
		v.shutdown = "guest-panic"
		v.mu.Unlock()
	case "BLOCK_IO_ERROR":
		// The guest got an I/O error from its disk (see werror=report). A guest that
		// keeps writing makes one event per failed request, which QEMU does not rate
		// limit: they are counted, and said at most once a minute.
		now := time.Now()
		v.mu.Lock()
		v.ioErrors++
		n := v.ioErrors
		due := now.Sub(v.ioErrorSaid) >= time.Minute
		if due {
			v.ioErrorSaid = now
		}
		v.mu.Unlock()
		if !due {
			return
		}
		var data struct {
			Node      string `json:"node-name"`
			Operation string `json:"operation"`
			NoSpace   bool   `json:"nospace"`
			Reason    string `json:"reason"`
		}
		_ = json.Unmarshal(ev.Data, &data)
		what := "a disk error"
		// nospace is there only when the device keeps an I/O status; the host's
		// error text says it too.
		if data.NoSpace || strings.Contains(data.Reason, "No space left") {
			what = "the node's disk is full"
		}
		v.log.Warn("the guest's disk "+data.Operation+"s fail: "+what, "disk", data.Node, "reason", data.Reason, "vm", v.id, "errors_so_far", n)
	}
}

// exit describes how the process ended, as far as the watcher can tell.
type exit struct {
	known  bool // exit status known (our child)
	code   int
	signal syscall.Signal
}

func exitFromChild(ps *os.ProcessState, err error) exit {
	if ps == nil {
		return exit{}
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exit{known: true, code: -1, signal: ws.Signal()}
	}
	return exit{known: true, code: ps.ExitCode()}
}

// finish records why the VM ended and closes done. It runs once, from the process watcher.
func (v *vm) finish(e exit) {
	v.mu.Lock()
	c := v.qmp
	v.mu.Unlock()
	if c != nil {
		// The SHUTDOWN event is written before QEMU exits; let the reader catch up with
		// the stream (it ends at EOF now that the process is gone).
		select {
		case <-c.Done():
		case <-time.After(time.Second):
		}
		c.Close()
	}
	v.mu.Lock()
	reason := v.classify(e)
	v.mu.Unlock()
	var err error
	if reason != "" {
		err = &vmm.ExitError{Reason: reason, Code: e.code, Signal: e.signal, ConsoleTail: consoleTail(filepath.Join(v.dir, consoleLog))}
		if !e.known {
			err.(*vmm.ExitError).Code = -1
		}
	}
	v.end(err)
}

func (v *vm) end(err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.state == "ended" {
		return
	}
	v.state = "ended"
	v.exitErr = err
	if v.uid != 0 {
		v.d.uids.give(v.uid)
		jail.RemoveCgroups(v.cgroups)
	}
	close(v.guardStop)
	close(v.done)
}

// classify turns the exit and the last SHUTDOWN reason into an ExitError reason, "" for a
// clean end. Called with v.mu held.
func (v *vm) classify(e exit) string {
	switch {
	case v.killed != "":
		return v.killed
	case e.known && e.signal != 0:
		return fmt.Sprintf("VMM killed by signal %s", signalName(e.signal))
	case e.known && e.code != 0:
		return fmt.Sprintf("VMM exited with code %d%s", e.code, v.stderrTailLocked())
	}
	if v.detached && v.shutdown == "" && e.known {
		return "" // ended cleanly under another handle (the one that adopted it)
	}
	switch v.shutdown {
	case "guest-shutdown":
		return ""
	case "host-qmp-quit", "host-signal", "host-ui":
		if v.stopping {
			return ""
		}
		return fmt.Sprintf("VMM shut down by the host outside this driver (%s)", v.shutdown)
	case "guest-reset":
		if msg := panicMessage(filepath.Join(v.dir, consoleLog)); msg != "" {
			return "guest kernel panic: " + msg
		}
		return "guest reset (reboot or kernel panic; -no-reboot turns a reset into an exit)"
	case "guest-panic":
		return "guest kernel panicked"
	case "":
		if !e.known {
			return "VMM process ended (exit status unknown: the VM was adopted, so it is not this process's child)"
		}
		return "VMM exited without a shutdown event"
	default:
		return "VMM shut down: " + v.shutdown
	}
}

// Stop asks QEMU to quit over QMP, then sends SIGTERM, then SIGKILL, spending at most grace
// before the SIGKILL. A cancelled ctx goes straight to SIGKILL.
func (v *vm) Stop(ctx context.Context, grace time.Duration) error {
	v.mu.Lock()
	switch v.state {
	case "created":
		v.mu.Unlock()
		v.end(nil)
		return nil
	case "ended":
		v.mu.Unlock()
		return nil
	}
	if v.detached {
		v.mu.Unlock()
		return fmt.Errorf("stop VM %s: detached from this process", v.id)
	}
	v.stopping = true
	c, p := v.qmp, v.p
	v.mu.Unlock()
	if p == nil {
		return fmt.Errorf("stop VM %s: still launching (Kill ends it)", v.id)
	}

	deadline := time.Now().Add(grace)
	waitUntil := func(t time.Time) bool {
		timer := time.NewTimer(time.Until(t))
		defer timer.Stop()
		select {
		case <-v.done:
			return true
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
	if c != nil {
		qctx, cancel := context.WithDeadline(ctx, time.Now().Add(grace/2))
		err := c.Execute(qctx, "quit", nil, nil)
		cancel()
		if err != nil {
			v.log.Debug("QMP quit failed; escalating", "err", err)
		} else if waitUntil(time.Now().Add(grace / 2)) {
			return nil
		}
	}
	if ctx.Err() == nil {
		if err := p.signal(syscall.SIGTERM); err == nil && waitUntil(deadline) {
			return nil
		}
	}
	v.mu.Lock()
	if v.killed == "" {
		v.killed = fmt.Sprintf("VMM did not stop within %s; killed with SIGKILL", grace)
	}
	v.mu.Unlock()
	if err := p.signal(syscall.SIGKILL); err != nil && !isDone(v.done) && !errors.Is(err, os.ErrProcessDone) && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("stop VM %s: SIGKILL: %w", v.id, err)
	}
	select {
	case <-v.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop VM %s: %w", v.id, ctx.Err())
	case <-time.After(10 * time.Second):
		return fmt.Errorf("stop VM %s: process %d survived SIGKILL for 10s", v.id, v.Info().PID)
	}
}

// Kill sends SIGKILL to the VMM.
func (v *vm) Kill() error {
	v.mu.Lock()
	switch v.state {
	case "created":
		v.mu.Unlock()
		v.end(&vmm.ExitError{Reason: "killed before it started", Code: -1})
		return nil
	case "ended":
		v.mu.Unlock()
		return nil
	}
	v.stopping = true
	if v.killed == "" {
		v.killed = "VMM killed by the host (SIGKILL)"
	}
	p := v.p
	v.mu.Unlock()
	if p == nil {
		return nil // still launching: the launch sees stopping and ends it
	}
	if err := p.signal(syscall.SIGKILL); err != nil && !isDone(v.done) && !errors.Is(err, os.ErrProcessDone) && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill VM %s: %w", v.id, err)
	}
	return nil
}

// Pause freezes the guest's vCPUs (QMP stop).
func (v *vm) Pause(ctx context.Context) error { return v.command(ctx, "pause", "stop") }

// Resume thaws them (QMP cont).
func (v *vm) Resume(ctx context.Context) error {
	v.mu.Lock()
	saved := v.snapshotted
	v.mu.Unlock()
	if saved {
		return fmt.Errorf("resume VM %s: it was snapshotted, and running it would change the snapshot's memory", v.id)
	}
	return v.command(ctx, "resume", "cont")
}

func (v *vm) command(ctx context.Context, what, cmd string) error {
	v.mu.Lock()
	c, state, detached, notYet := v.qmp, v.state, v.detached, v.prestarted && !v.resumed
	v.mu.Unlock()
	if state != "running" || c == nil || detached {
		return fmt.Errorf("%s VM %s: not running under this process (%s)", what, v.id, state)
	}
	if notYet {
		return fmt.Errorf("%s VM %s: launched ahead but not started", what, v.id)
	}
	if err := c.Execute(ctx, cmd, nil, nil); err != nil {
		return fmt.Errorf("%s VM %s: %w", what, v.id, err)
	}
	return nil
}

// Detach closes the QMP connection and stops the console guard, leaving QEMU running for
// another process to Adopt. The process watcher stays: it is what reaps our child.
func (v *vm) Detach() error {
	v.mu.Lock()
	if v.detached || v.state != "running" {
		v.mu.Unlock()
		return nil
	}
	v.detached = true
	c := v.qmp
	v.qmp = nil
	if a, ok := v.p.(adoptedProc); ok {
		a.release() // stops the pidfd watcher
	}
	v.mu.Unlock()
	if c != nil {
		return c.Close()
	}
	return nil
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func signalName(s syscall.Signal) string {
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return s.String()
}

// guardConsole bounds console.log, which the guest fills at will: past ConsoleLogMax it is
// cut to its last quarter. QEMU opened it with O_APPEND, so its writes continue at the new
// end; output written during the cut itself may be lost, which is acceptable for a log.
func (v *vm) guardConsole() {
	path := filepath.Join(v.dir, consoleLog)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-v.guardStop:
			return
		case <-t.C:
		}
		v.mu.Lock()
		detached := v.detached
		v.mu.Unlock()
		if detached {
			return
		}
		if err := trimLog(path, v.d.cfg.ConsoleLogMax); err != nil {
			v.log.Debug("bound console log", "err", err)
		}
	}
}

func trimLog(path string, max int64) error {
	// The log is in the VMM's part of the run directory: never follow a link there.
	f, err := openOwnFile(path, os.O_RDWR|os.O_APPEND)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() <= max {
		return err
	}
	keep := max / 4
	tail := make([]byte, keep)
	n, err := f.ReadAt(tail, fi.Size()-keep)
	if err != nil && err != io.EOF {
		return err
	}
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err = f.Write(append([]byte("[fireworks: console log cut to its last part]\n"), tail[:n]...))
	return err
}

// panicMessage finds the kernel's "Kernel panic - not syncing: ..." line near the end of
// the console log; the stack trace after it pushes it out of the short tail.
func panicMessage(path string) string {
	tail := readTail(path, 64<<10)
	const marker = "Kernel panic - not syncing: "
	i := strings.LastIndex(tail, marker)
	if i < 0 {
		return ""
	}
	msg, _, _ := strings.Cut(tail[i+len(marker):], "\n")
	return strings.TrimSpace(msg)
}

// consoleTail returns the last lines of the console log (at most ~4 KiB).
func consoleTail(path string) string { return readTail(path, 4096) }

// openOwnFile opens a regular file in a VMM's part of its run directory, never through
// a symlink (a VMM taken over by its guest could link its console log to a host file, to
// have the host read it back to the user or cut it).
func openOwnFile(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	return f, nil
}

func readTail(path string, n int64) string {
	f, err := openOwnFile(path, os.O_RDONLY)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, n)
	k, _ := f.ReadAt(b, off)
	b = b[:k]
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.ToValidUTF8(string(b), "?")
}

func (v *vm) stderrTail() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stderrTailLocked()
}

func (v *vm) stderrTailLocked() string {
	b, err := os.ReadFile(filepath.Join(v.dir, stderrFile))
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	if len(b) > 1024 {
		b = b[len(b)-1024:]
	}
	return ": " + strings.TrimSpace(string(b))
}

func writeJSON(path string, x any) error {
	b, err := json.MarshalIndent(x, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.Rename(tmp, path)
}

// procStartTime reads field 22 of /proc/<pid>/stat (start time in clock ticks since boot).
func procStartTime(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}
