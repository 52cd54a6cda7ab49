package agent

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Live migration of a running sandbox (see state.Migration for the control plane's
// part). The source's agent drives it, once its assignments show the migration:
//
//  1. The guest lets go of its sessions (as for a pause: it holds the main process's
//     output and stdin for the target), exec sessions end.
//  2. begin: the target gets the run record (image, root disk, main session, shape)
//     and the sandbox's log so far; it pulls the image if it must, checks that its root
//     disk is the very one the guest ran on, makes the sandbox's network and launches a
//     VMM that waits for the stream and serves an empty scratch disk for the mirror.
//  3. disk and stream: the source's VMM mirrors the scratch disk into the target's and
//     sends its RAM pre-copy (vmm.Migrator); it ends stopped, the target's loaded, with
//     the disk whole.
//  4. switch: the source tells the target what it measured (downtime, bytes) and the
//     network counters to carry on from; the target commits the switch-over in the
//     replicated state (the sandbox is on it from that write) and only then lets the
//     guest run, takes back the main process and supervises it as its own run.
//  5. The source, told (or, failing that, reading the state) that the sandbox moved,
//     ends its VM and lets its network and files go. If anything failed before the
//     commit, it writes the migration's end (which a commit can no longer pass) and
//     only then resumes its guest and takes back the main process.
//
// Every call carries the migration's ID, and the target checks it against the state:
// only the node the migration is from may drive it. The calls go node to node over
// the cluster's mutual TLS (MigrationPeer; nodeapi serves them), or in memory when the
// target is this node.

// MigrationPeer carries a migration's calls from its source's agent to its target's
// (the Migration* methods of the target's Agent), as the node they come from.
type MigrationPeer interface {
	Begin(ctx context.Context, id, mid string, body io.Reader) error
	Stream(ctx context.Context, id, mid string, body io.Reader) error
	Disk(ctx context.Context, id, mid string) (net.Conn, error)
	// Switch returns nil once the target committed the switch-over.
	Switch(ctx context.Context, id, mid string, body io.Reader) error
}

// MigrationDialer gives the peer of migration m's target (a node of the cluster). The
// cluster's agent provides it; without one only migrations within this node are done.
type MigrationDialer func(m state.Migration) (MigrationPeer, error)

// migrationHeader is what begin tells the target; the sandbox's log follows it.
type migrationHeader struct {
	Record       savedRecord `json:"record"`
	ScratchBytes int64       `json:"scratch_bytes"`
	LogBytes     int64       `json:"log_bytes"`
}

// migrationSwitch is what switch tells the target.
type migrationSwitch struct {
	Stats state.MigrationStats `json:"stats"`
	// Stopped is when the source's guest stopped for the switch-over (its host clock).
	Stopped time.Time     `json:"stopped,omitzero"`
	Net     NetStats      `json:"net"` // counters at the switch-over
	Ran     time.Duration `json:"ran"`
	// Flows are the guest's outbound connections through the source's network (at
	// most network.MaxFlows): the target nudges each, so that the guest learns at once
	// that it is cut (network.NudgeFlows).
	Flows []network.Flow `json:"flows,omitempty"`
}

// maxMigrationHeader bounds begin's and switch's JSON.
const maxMigrationHeader = 64 << 10

// migrationSlack is how long after a migration's deadline its parties give up waiting
// for the state to say how it ended (they keep their VM stopped until then).
const migrationSlack = time.Minute

// incoming is a migration this node is the target of, from begin until the switch-over.
type incoming struct {
	mid string
	mig state.Migration
	// vmName and source, within one node: the target's VM and run directory name, and
	// the source's run, which the target's takes over from (see takeOverStep).
	vmName string
	source *sandbox
	hdr    migrationHeader
	stream *io.PipeReader // the VM's Restore.Stream
	feed   *io.PipeWriter
	// disks is set once the VM serves its disks (ready closes then, or on failure).
	disks     vmm.DialFunc
	ready     chan struct{}
	readyOnce func()
	failed    error
	// switches carries the source's switch call to the VM's BeforeResume.
	switches chan switchCall
	// carried is what the switch brought (read after the VM started).
	carried    migrationSwitch
	committed  bool          // the switch-over is written: the sandbox is this run's
	stoppedFor time.Duration // the guest's downtime, as far as this node can tell
	fed        bool
}

// committed says whether the switch-over of migration in was written.
func (a *Agent) committed(in *incoming) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return in.committed
}

type switchCall struct {
	msg   migrationSwitch
	reply chan error
}

// maxMigrationWaits bounds the migration calls of one peer node that wait at once for
// the state to show their migration (a migration makes at most a few at a time).
const maxMigrationWaits = 8

// migrationFor checks that peer may drive migration mid of sandbox id to this node, as
// the state says; the state may lag the source's (another server answers; a node sees
// the sandbox once its assignments do), a little, so a call the state does not show yet
// waits for it. A call on a migration the state shows with other nodes is refused at
// once, and a peer has at most maxMigrationWaits calls waiting: a node cannot hold this
// one's calls open by the hundred with migrations that are not its own.
func (a *Agent) migrationFor(ctx context.Context, id, mid, peer string) (state.Sandbox, error) {
	// One answer for every refusal: it tells a caller nothing of what migrates here.
	refused := fmt.Errorf("no migration %s of sandbox %s from node %s to this node", mid, id, peer)
	deadline := time.Now().Add(savedPeerWait)
	waiting := false
	defer func() {
		if waiting {
			a.mu.Lock()
			if a.migrationWaits[peer]--; a.migrationWaits[peer] <= 0 {
				delete(a.migrationWaits, peer)
			}
			a.mu.Unlock()
		}
	}()
	for {
		sb, err := a.store.GetSandbox(ctx, id)
		m := sb.Migration
		if err == nil && m != nil && m.ID == mid && m.From == peer && m.To == a.cfg.Node && sb.Node == peer {
			return sb, nil
		}
		if (err == nil && m != nil && m.ID == mid) || time.Now().After(deadline) {
			return sb, refused
		}
		if !waiting {
			a.mu.Lock()
			if a.migrationWaits[peer] >= maxMigrationWaits {
				a.mu.Unlock()
				return sb, refused
			}
			a.migrationWaits[peer]++
			waiting = true
			a.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return sb, refused
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// incomingRun is the sandbox run this node is the target of migration mid for.
func (a *Agent) incomingRun(id, mid string) (*sandbox, *incoming, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.incomingRuns[id]
	if s == nil {
		s = a.live[id]
	}
	if s == nil || s.incoming == nil || s.incoming.mid != mid {
		return nil, nil, fmt.Errorf("no migration %s of sandbox %s is coming in here", mid, id)
	}
	return s, s.incoming, nil
}

// MigrationBegin is begin on the target (see above): it returns once the VM that
// receives the sandbox is ready for the disk mirror and the stream.
func (a *Agent) MigrationBegin(ctx context.Context, peer, id, mid string, body io.Reader) error {
	sb, err := a.migrationFor(ctx, id, mid, peer)
	if err != nil {
		return err
	}
	br := bufio.NewReader(io.LimitReader(body, maxMigrationHeader))
	line, err := br.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("read the migration's header: %w", err)
	}
	var hdr migrationHeader
	if err := json.Unmarshal(line, &hdr); err != nil {
		return fmt.Errorf("parse the migration's header: %w", err)
	}
	if hdr.ScratchBytes <= 0 || hdr.ScratchBytes > int64(a.vms.scratchMiB)<<20 || hdr.LogBytes < 0 || hdr.LogBytes > max(a.cfg.MaxLogBytes, 0) {
		return fmt.Errorf("the migration's scratch disk (%d bytes) or log (%d bytes) is out of this node's bounds", hdr.ScratchBytes, hdr.LogBytes)
	}
	// Within this node (a fresh VMM for it): the run lives beside the source's, in a
	// directory and a VM of its own, until the switch-over (see takeOverStep).
	local := sb.Node == a.cfg.Node
	// The run after the switch-over: this node's, one more resume.
	next := sb
	next.Node, next.Resumes, next.Migration = a.cfg.Node, sb.Resumes+1, nil
	a.mu.Lock()
	_, live := a.live[id]
	_, coming := a.incomingRuns[id]
	a.mu.Unlock()
	if live != local || coming {
		return fmt.Errorf("sandbox %s is live on this node already", id)
	}
	if err := os.MkdirAll(filepath.Join(a.sandboxRoot(), id), 0o700); err != nil {
		return fmt.Errorf("create sandbox directory: %w", err)
	}
	if local {
		// Its log is here: the source's, which the guest stopped writing to.
		if _, err := io.CopyN(io.Discard, io.MultiReader(br, body), hdr.LogBytes); err != nil {
			return fmt.Errorf("receive the sandbox's log: %w", err)
		}
	} else if err := writeBounded(a.LogPath(id), io.MultiReader(br, body), hdr.LogBytes); err != nil {
		// Its log so far, so that `logs` (and a follower) carry on from where it was.
		return fmt.Errorf("receive the sandbox's log: %w", err)
	}
	w, err := a.openLog(next)
	if err != nil {
		return err
	}
	pr, pw := io.Pipe()
	in := &incoming{mid: mid, mig: *sb.Migration, hdr: hdr, stream: pr, feed: pw, ready: make(chan struct{}), switches: make(chan switchCall)}
	in.readyOnce = sync.OnceFunc(func() { close(in.ready) })
	dir := filepath.Join(a.runRoot(), id)
	if local {
		in.vmName = "m-" + mid[:min(12, len(mid))]
		dir = filepath.Join(a.runRoot(), in.vmName)
	}
	s := &sandbox{id: id, dir: dir, log: w, ready: make(chan struct{}), done: make(chan struct{}), groupReady: make(chan struct{}),
		spec: next.Spec, restarts: next.Restarts, resumes: next.Resumes, node: a.cfg.Node, incoming: in, incomingMid: mid}
	// The run lives until the migration's deadline if nothing comes (and on, once it
	// committed).
	s.ctx, s.cancel = context.WithCancel(a.ctx)
	a.mu.Lock()
	_, live = a.live[id]
	_, coming = a.incomingRuns[id]
	if live != local || coming {
		a.mu.Unlock()
		w.Close()
		return fmt.Errorf("sandbox %s is live on this node already", id)
	}
	if local {
		in.source = a.live[id]
		a.incomingRuns[id] = s
	} else {
		a.live[id] = s
	}
	a.mu.Unlock()
	a.goSandbox(s, func() { a.run(s, next) })
	select {
	case <-in.ready:
		a.mu.Lock()
		err := in.failed
		a.mu.Unlock()
		return err
	case <-s.done:
		return fmt.Errorf("the target could not take sandbox %s (see its agent's log)", id)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// writeBounded writes exactly n bytes of r to a new file at path.
func writeBounded(path string, r io.Reader, n int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	if _, err := io.CopyN(f, r, n); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// MigrationStream is stream on the target: body is the VM's migration stream.
func (a *Agent) MigrationStream(ctx context.Context, peer, id, mid string, body io.Reader) error {
	if _, err := a.migrationFor(ctx, id, mid, peer); err != nil {
		return err
	}
	_, in, err := a.incomingRun(id, mid)
	if err != nil {
		return err
	}
	a.mu.Lock()
	fed := in.fed
	in.fed = true
	a.mu.Unlock()
	if fed {
		return fmt.Errorf("the stream of migration %s was sent already", mid)
	}
	_, err = io.Copy(in.feed, body)
	if err != nil {
		in.feed.CloseWithError(err)
		return fmt.Errorf("the migration stream broke: %w", err)
	}
	return in.feed.Close()
}

// MigrationDisk is disk on the target: a connection to the disk service of the VM that
// receives the sandbox (one per connection the source's VMM opens).
func (a *Agent) MigrationDisk(ctx context.Context, peer, id, mid string) (net.Conn, error) {
	if _, err := a.migrationFor(ctx, id, mid, peer); err != nil {
		return nil, err
	}
	_, in, err := a.incomingRun(id, mid)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	dial := in.disks
	a.mu.Unlock()
	if dial == nil {
		return nil, fmt.Errorf("the target of migration %s serves no disks yet", mid)
	}
	return dial(ctx)
}

// MigrationSwitch is switch on the target: it returns nil once the switch-over is
// committed (the guest runs here from now on).
func (a *Agent) MigrationSwitch(ctx context.Context, peer, id, mid string, body io.Reader) error {
	if _, err := a.migrationFor(ctx, id, mid, peer); err != nil {
		return err
	}
	_, in, err := a.incomingRun(id, mid)
	if err != nil {
		return err
	}
	var msg migrationSwitch
	if err := json.NewDecoder(io.LimitReader(body, maxMigrationHeader)).Decode(&msg); err != nil {
		return fmt.Errorf("parse the switch-over: %w", err)
	}
	call := switchCall{msg: msg, reply: make(chan error, 1)}
	select {
	case in.switches <- call:
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Minute):
		return fmt.Errorf("the target's VM of migration %s is not waiting for the switch-over (it failed?)", mid)
	}
	select {
	case err := <-call.reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// beforeResume is the target VM's switch-over gate: it waits for the source's switch
// call, commits the switch-over, and lets the guest run only if the commit is written.
func (a *Agent) beforeResume(in *incoming, sb state.Sandbox, deadline time.Time) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		// The VMM has stopped serving the disks (before it asks for the switch-over):
		// no disk call reaches them from here on.
		a.mu.Lock()
		in.disks = nil
		a.mu.Unlock()
		var call switchCall
		select {
		case call = <-in.switches:
		case <-time.After(time.Until(deadline)):
			return errors.New("the source never asked for the switch-over")
		case <-ctx.Done():
			return ctx.Err()
		}
		received := time.Now()
		stats := call.msg.Stats
		if !call.msg.Stopped.IsZero() {
			// The record's downtime: from the source's stop to this commit (the host's
			// clock; QEMU's own measure ends when the source has sent the last byte).
			stats.Downtime = max(stats.Downtime, time.Since(call.msg.Stopped))
		}
		err := a.commitMigration(ctx, sb.ID, in.mid, stats, deadline)
		if !call.msg.Stopped.IsZero() {
			// Where a switch-over's time goes (the guest stopped throughout).
			a.log.Debug("switch-over", "sandbox", sb.ID, "migration", in.mid, "to_switch_call", received.Sub(call.msg.Stopped),
				"commit", time.Since(received), "err", err)
		}
		if err == nil {
			a.mu.Lock()
			in.carried, in.committed = call.msg, true
			if !call.msg.Stopped.IsZero() {
				// From the source's stop to this release (the guest runs a QMP call
				// later): on other nodes, give or take their clocks' difference.
				in.stoppedFor = time.Since(call.msg.Stopped)
			}
			a.mu.Unlock()
		}
		call.reply <- err
		return err
	}
}

// commitMigration writes the switch-over of migration mid; if the answer is lost it
// reads the state until it says how the migration ended.
func (a *Agent) commitMigration(ctx context.Context, id, mid string, stats state.MigrationStats, deadline time.Time) error {
	_, err := a.store.UpdateSandbox(ctx, id, state.Update{CommitMigration: mid, MigrationStats: &stats, MigrationBy: a.cfg.Node, Time: time.Now()})
	if err == nil || refused(err) {
		if err != nil {
			err = fmt.Errorf("the switch-over was refused: %w", err)
		}
		return err
	}
	moved, err := a.migrationEnded(ctx, id, mid, deadline, false)
	if err != nil {
		return err
	}
	if !moved {
		return errors.New("the migration ended without its switch-over")
	}
	return nil
}

// refused says whether err is the control plane's refusal of a write (not a failure to
// reach it).
func refused(err error) bool {
	return errors.Is(err, state.ErrStaleReport) || errors.Is(err, state.ErrInvalidTransition) ||
		errors.Is(err, state.ErrInvalid) || errors.Is(err, state.ErrNotFound)
}

// migrationEnded reads the state (this node's assignments) until migration mid of
// sandbox id has ended, and says whether the sandbox moved. A sandbox that is no longer
// this node's at all has left the source (source) and never came to the target. It
// gives up migrationSlack after the deadline.
func (a *Agent) migrationEnded(ctx context.Context, id, mid string, deadline time.Time, source bool) (moved bool, err error) {
	for {
		sb, err := a.store.GetSandbox(ctx, id)
		if err == nil && (sb.Migration == nil || sb.Migration.ID != mid) {
			for _, m := range sb.Migrations {
				if m.ID == mid {
					return m.Outcome == state.MigrationMoved, nil
				}
			}
			// Ended so long ago the history dropped it: where it is says.
			return source != (sb.Node == a.cfg.Node), nil
		}
		if errors.Is(err, state.ErrNotFound) {
			return source, nil
		}
		if time.Now().After(deadline.Add(migrationSlack)) {
			return false, fmt.Errorf("the state did not say how migration %s ended: %v", mid, err)
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// migrateSteps are the target's start of a migrating sandbox (see startSteps): the
// image and the very root disk the guest runs on, a VM that receives it, the main
// process taken back.
var migrateSteps = []struct {
	name string
	run  func(a *Agent, r *startRun) error
}{
	{"image", (*Agent).savedImageStep},         // phase image
	{"vm", (*Agent).migrateVMStep},             // phases net, vmm (mirror, stream, switch-over), guest
	{"reattach", (*Agent).migrateReattachStep}, // phase reattach
	{"takeover", (*Agent).takeOverStep},        // within one node
}

// migrateVMStep launches the VM that receives the sandbox and returns once the guest
// runs here and answered.
func (a *Agent) migrateVMStep(r *startRun) (err error) {
	s, sb, rec, in := r.s, r.sb, r.saved, r.s.incoming
	defer func() {
		if err != nil {
			a.mu.Lock()
			if in.failed == nil {
				in.failed = err
			}
			in.readyOnce()
			a.mu.Unlock()
			in.stream.CloseWithError(err) // a stream call still feeding it ends
		}
	}()
	if shape := sb.Spec.Reserved(); rec.VCPUs != shape.VCPUs || rec.MemoryMiB != shape.MemoryMiB {
		return fmt.Errorf("the migrating VM is %d vCPUs %d MiB, the sandbox is %d vCPUs %d MiB", rec.VCPUs, rec.MemoryMiB, shape.VCPUs, shape.MemoryMiB)
	}
	if d := sb.ImageDigest; d != "" && d != rec.ImageDigest {
		return fmt.Errorf("the migrating VM runs image %s, the sandbox ran %s", rec.ImageDigest, d)
	}
	mig := r.migration
	snap := &vmm.Snapshot{Stream: in.stream, BeforeResume: a.beforeResume(in, sb, mig.Deadline),
		ReceiveDisks: func(d vmm.DialFunc) {
			a.mu.Lock()
			in.disks = d
			in.readyOnce()
			a.mu.Unlock()
		}}
	ctx, cancel := context.WithDeadline(r.ctx, mig.Deadline)
	defer cancel()
	h, err := a.vms.startVM(ctx, vmInput{id: cmp.Or(in.vmName, sb.ID), dir: s.dir, rootDisk: r.rootDisk, vcpus: rec.VCPUs, mem: rec.MemoryMiB,
		net: sb.Spec.Network != state.NetworkNone, policy: policyOf(sb.Spec), incoming: snap, scratchBytes: in.hdr.ScratchBytes,
		volumes: volumesOf(sb.ID, sb.Spec)})
	if err == nil && in.carried.Stats == (state.MigrationStats{}) && in.carried.Ran == 0 {
		// Cannot be: the VM runs only after a switch-over (see beforeResume).
		h.undo()
		err = errors.New("the VM ran without a switch-over")
	}
	if err != nil {
		return fmt.Errorf("receive the migrating VM: %v", err)
	}
	a.takeVM(r, h, "migrated")
	a.mu.Lock()
	carried := in.carried
	a.mu.Unlock()
	r.flows = carried.Flows
	s.mu.Lock()
	s.netBase, s.ranBefore = carried.Net, max(carried.Ran, 0) // a negative time would lengthen --timeout
	if in.source == nil {
		s.incoming = nil // its own run from here (within one node: after takeOverStep)
	}
	s.mu.Unlock()
	extra := map[string]string{"migrated_from": mig.From, "migration": mig.ID}
	a.mu.Lock()
	if d := in.stoppedFor; d > 0 {
		extra["migration_downtime"] = fmtMs(d)
	}
	a.mu.Unlock()
	r.setRuntime(extra)
	return nil
}

// migrateReattachStep takes back the main process, which the guest held over the
// migration (its clock ran on: nothing to set).
func (a *Agent) migrateReattachStep(r *startRun) error {
	ctx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	defer cancel()
	if err := r.reattach(ctx, "after the migration", "reattach"); err != nil {
		return err
	}
	// The guest's connections out through the source's network are cut: it learns so
	// now (a reset from each far end), not when it next sends on one.
	if r.h.net != nil && len(r.flows) > 0 {
		if err := r.h.net.Nudge(r.flows); err != nil {
			a.log.Warn("tell the guest its connections are cut", "sandbox", r.sb.ID, "connections", len(r.flows), "err", err)
		} else {
			a.log.Debug("nudged the guest's cut connections", "sandbox", r.sb.ID, "connections", len(r.flows))
		}
	}
	return nil
}

// takeOverStep, within one node, makes the target's run the sandbox's once the
// source's has ended (the switch-over ended its VM): the live sandbox of its ID, and
// run/<id> a link to its directory (where inspect, adoption and removal look).
func (a *Agent) takeOverStep(r *startRun) error {
	in := r.s.incoming
	if in == nil {
		return nil // cross-node: it was the live sandbox from its begin
	}
	if src := in.source; src != nil {
		select {
		case <-src.done:
		case <-time.After(time.Minute):
			return errors.New("the source's run did not end after the switch-over")
		case <-r.ctx.Done():
			return r.ctx.Err()
		}
	}
	link := filepath.Join(a.runRoot(), r.sb.ID)
	if err := a.removeRunDir(r.sb.ID); err != nil {
		return fmt.Errorf("remove the source's run directory: %v", err)
	}
	if err := os.Symlink(in.vmName, link); err != nil {
		return fmt.Errorf("link the run directory: %v", err)
	}
	a.mu.Lock()
	a.live[r.sb.ID] = r.s
	delete(a.incomingRuns, r.sb.ID)
	a.mu.Unlock()
	r.s.mu.Lock()
	r.s.incoming = nil
	r.s.mu.Unlock()
	r.ph.mark("takeover")
	return nil
}

// migrationOutcome is how a source's migration ended for supervise: the main process
// taken back (it failed), or nil (the sandbox moved away).
type migrationOutcome struct {
	main  *client.Session
	moved bool   // the sandbox runs on the target: nothing to report here
	lost  string // neither: why the sandbox is lost here
}

// migrateOut runs the source's side of migration mig of sandbox sb (see above). It
// returns nil once the sandbox runs on the target, or the error after which it runs on
// here (or ended).
func (a *Agent) migrateOut(ctx context.Context, sb state.Sandbox, mig state.Migration) error {
	s, err := a.lookup(sb.ID)
	if err != nil {
		return a.endMigration(ctx, sb.ID, mig, err)
	}
	select {
	case <-s.ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	ctx, cancel := context.WithDeadline(ctx, mig.Deadline)
	defer cancel()
	// The control plane may end the migration first (its target node went down, a
	// stop): nothing on this side need notice (a VMM's disk mirror into a dead target can
	// wait for minutes), so the state is watched and ends the work here.
	stopWatch := a.watchMigration(ctx, sb.ID, mig.ID, cancel)
	defer stopWatch()
	s.mu.Lock()
	vm, g, main, stopping, sn := s.vm, s.guest, s.main, s.stopping, s.net
	s.mu.Unlock()
	m, ok := vm.(vmm.Migrator)
	switch {
	case main == nil || g == nil:
		return a.endMigration(ctx, sb.ID, mig, errors.New("the sandbox is not running here"))
	case stopping != "":
		return a.endMigration(ctx, sb.ID, mig, errors.New("the sandbox is stopping"))
	case !ok:
		return a.endMigration(ctx, sb.ID, mig, fmt.Errorf("the %s driver cannot migrate VMs", a.vms.driver.Name()))
	}
	peer, err := a.migrationPeer(mig)
	if err != nil {
		return a.endMigration(ctx, sb.ID, mig, err)
	}
	rec, err := a.runRecord(ctx, s)
	if err != nil {
		return a.endMigration(ctx, sb.ID, mig, err)
	}
	scratch := filepath.Join(s.dir, "scratch.img")
	fi, err := os.Stat(scratch)
	if err != nil {
		return a.endMigration(ctx, sb.ID, mig, fmt.Errorf("the scratch disk: %w", err))
	}
	t0 := time.Now()
	// From here the guest holds the main process for whoever takes it back; supervise
	// leaves the sandbox's end to this call.
	outcome := make(chan migrationOutcome, 1)
	gate := make(chan struct{})
	s.mu.Lock()
	if s.stopping != "" {
		// A stop came first (Stop reads the gate under the same lock): it wins.
		s.mu.Unlock()
		return a.endMigration(ctx, sb.ID, mig, errors.New("the sandbox is stopping"))
	}
	s.migrating, s.guestGate, s.stopMigration = outcome, gate, cancel
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.guestGate, s.stopMigration = nil, nil
		s.mu.Unlock()
		close(gate)
	}()
	// No exec starts from here on (they wait at the gate). Those starting get into the
	// sessions, those under way get a moment to finish (most are short), and the rest
	// are ended, their callers told why.
	a.waitExecs(ctx, s, 10*time.Second, func() bool { return s.execStarts == 0 })
	a.waitExecs(ctx, s, execsFinishGrace, func() bool { return len(s.execs) == 0 })
	a.endExecs(ctx, s, "ended by a live migration of the sandbox")
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	err = g.Detach(dctx)
	dcancel()
	if err != nil {
		return a.migrationFailed(ctx, s, sb.ID, mig, outcome, fmt.Errorf("the guest did not let go of its sessions: %w", err))
	}
	// The log is whole now (the guest holds what comes next): it goes with the sandbox.
	logBytes := int64(0)
	if fi, err := os.Stat(a.LogPath(sb.ID)); err == nil {
		logBytes = min(fi.Size(), max(a.cfg.MaxLogBytes, 0))
	}
	lf, err := os.Open(a.LogPath(sb.ID))
	if err != nil {
		return a.migrationFailed(ctx, s, sb.ID, mig, outcome, fmt.Errorf("the sandbox's log: %w", err))
	}
	hdr, _ := json.Marshal(migrationHeader{Record: rec, ScratchBytes: fi.Size(), LogBytes: logBytes})
	detached := time.Now()
	err = peer.Begin(ctx, sb.ID, mig.ID, io.MultiReader(bytes.NewReader(append(hdr, '\n')), io.LimitReader(lf, logBytes)))
	lf.Close()
	begun := time.Now()
	if err != nil {
		return a.migrationFailed(ctx, s, sb.ID, mig, outcome, fmt.Errorf("the target node %s could not take the sandbox: %w", mig.To, err))
	}
	pr, pw := io.Pipe()
	streamed := make(chan error, 1)
	go func() { // ends with the pipe (closed below) or the call's context
		err := peer.Stream(ctx, sb.ID, mig.ID, pr)
		pr.CloseWithError(err)
		streamed <- err
	}()
	st, err := m.MigrateOut(ctx, pw, vmm.MigrateOptions{DialDisks: func(ctx context.Context) (net.Conn, error) {
		return peer.Disk(ctx, sb.ID, mig.ID)
	}})
	pw.CloseWithError(err)
	copied := time.Now()
	if serr := <-streamed; err == nil && serr != nil {
		err = fmt.Errorf("the target did not receive the stream: %w", serr)
	}
	if err != nil {
		return a.migrationFailed(ctx, s, sb.ID, mig, outcome, err)
	}
	var netNow NetStats
	var flows []network.Flow
	if sn != nil {
		netNow, _ = a.NetStats(sb.ID)
		if flows, err = sn.Flows(); err != nil {
			a.log.Warn("list the guest's connections to cut them on the target", "sandbox", sb.ID, "err", err)
		}
	}
	s.mu.Lock()
	ran := s.ranBefore
	if !s.runSince.IsZero() {
		ran += time.Since(s.runSince)
	}
	s.mu.Unlock()
	sw, _ := json.Marshal(migrationSwitch{Stats: state.MigrationStats{Downtime: st.Downtime, Bytes: st.Bytes, DiskBytes: st.DiskBytes},
		Stopped: st.Stopped, Net: netNow, Ran: ran, Flows: flows})
	received := time.Now()
	if err := peer.Switch(ctx, sb.ID, mig.ID, bytes.NewReader(sw)); err != nil {
		// Refused, or the answer lost: the state decides. The end, if it can still be
		// written, keeps the sandbox here; if the commit came first, it moved.
		a.log.Warn("migration switch-over not confirmed; the state decides", "sandbox", sb.ID, "migration", mig.ID, "err", err)
		return a.migrationFailed(ctx, s, sb.ID, mig, outcome, fmt.Errorf("switch-over: %w", err))
	}
	// Where the time went (the guest stopped from "stopped" on): a slow migration's
	// first question.
	a.log.Debug("migration phases", "sandbox", sb.ID, "migration", mig.ID, "detach", detached.Sub(t0), "begin", begun.Sub(detached),
		"mirror", sinceOr(st.Mirrored, begun), "copy_to_stop", st.Stopped.Sub(latest(begun, st.Mirrored)),
		"mirror_end", sinceOr(st.MirrorEnded, st.Stopped), "stop_to_copy_end", copied.Sub(st.Stopped), "target_received", received.Sub(copied), "switch", time.Since(received))
	a.log.Info("sandbox migrated", "sandbox", sb.ID, "migration", mig.ID, "to", mig.To, "downtime", st.Downtime,
		"bytes", st.Bytes, "disk_bytes", st.DiskBytes, "took", time.Since(t0).Round(time.Millisecond))
	a.movedAway(s, outcome)
	return nil
}

// migrationWatchEvery is how often a source reads the state for a migration ended
// without it.
const migrationWatchEvery = time.Second

// watchMigration calls cancel once the state says migration mid of sandbox id ended
// (or the sandbox is gone), until the returned stop is called. The work it cancels
// settles the migration as usual: the end already written, the state says where the
// sandbox runs.
func (a *Agent) watchMigration(ctx context.Context, id, mid string, cancel context.CancelFunc) (stop func()) {
	wctx, wcancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { // owned by the migration: stop ends it
		defer close(done)
		t := time.NewTicker(migrationWatchEvery)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			sb, err := a.store.GetSandbox(wctx, id)
			if err == nil && (sb.Migration == nil || sb.Migration.ID != mid) || errors.Is(err, state.ErrNotFound) {
				a.log.Info("migration ended by the control plane; ending it here", "sandbox", id, "migration", mid)
				cancel()
				return
			}
		}
	}()
	return func() {
		wcancel()
		<-done
	}
}

// execsFinishGrace is how long the execs under way when a migration begins have to
// finish before they are ended.
const execsFinishGrace = time.Second

// waitExecs waits (up to limit) until done, read under s.mu, says so.
func (a *Agent) waitExecs(ctx context.Context, s *sandbox, limit time.Duration, done func() bool) {
	deadline := time.Now().Add(limit)
	for {
		s.mu.Lock()
		ok := done()
		s.mu.Unlock()
		if ok || time.Now().After(deadline) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// sinceOr is t - from, or 0 when t is zero (the step did not happen).
func sinceOr(t, from time.Time) time.Duration {
	if t.IsZero() {
		return 0
	}
	return t.Sub(from)
}

// latest is the later of two times.
func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// movedAway ends the source's stopped VM once the sandbox runs on the target:
// supervise returns without a report, and the run's cleanup lets the rest go.
func (a *Agent) movedAway(s *sandbox, outcome chan migrationOutcome) {
	outcome <- migrationOutcome{moved: true}
	s.mu.Lock()
	vm := s.vm
	s.movedAway = true
	s.mu.Unlock()
	_ = vm.Kill()
}

// migrationFailed settles a migration that failed on the source's side after the guest
// let go of its sessions: it writes the end (or finds the sandbox moved after all),
// then resumes the guest here and takes back the main process.
func (a *Agent) migrationFailed(ctx context.Context, s *sandbox, id string, mig state.Migration, outcome chan migrationOutcome, cause error) error {
	moved, err := a.settleMigration(context.WithoutCancel(ctx), id, mig, cause)
	if err != nil {
		// The state cannot be read: the VM stays stopped (a target may run it) and the
		// sandbox is reported lost when the state says so; nothing resumes it here.
		// Reported as lost here: if the target committed after all, that report is of a
		// run the state has moved past, and is refused.
		a.log.Error("migration outcome unknown; the source's VM ends", "sandbox", id, "migration", mig.ID, "err", err)
		// The reason is the sandbox's, which its owner reads: the causes (naming nodes
		// and addresses) are in this node's log.
		outcome <- migrationOutcome{lost: "lost in a live migration whose outcome could not be read"}
		return err
	}
	if moved {
		a.log.Info("sandbox migrated (the switch-over was committed)", "sandbox", id, "migration", mig.ID, "to", mig.To)
		a.movedAway(s, outcome)
		return nil
	}
	a.log.Warn("migration failed; the sandbox runs on here", "sandbox", id, "migration", mig.ID, "err", cause)
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	main, err := a.takeBack(rctx, s)
	if err != nil {
		a.log.Error("resume the sandbox after a failed migration", "sandbox", id, "migration", mig.ID, "cause", cause, "err", err)
		outcome <- migrationOutcome{lost: "its live migration failed and it could not be resumed"}
		s.mu.Lock()
		vm := s.vm
		s.mu.Unlock()
		_ = vm.Kill()
		return fmt.Errorf("%w (and resuming it here failed: %v)", cause, err)
	}
	outcome <- migrationOutcome{main: main}
	return cause
}

// settleMigration writes the end of migration mig with cause, and says whether the
// sandbox moved after all (the commit came first).
func (a *Agent) settleMigration(ctx context.Context, id string, mig state.Migration, cause error) (moved bool, err error) {
	for {
		_, err := a.store.UpdateSandbox(ctx, id, state.Update{EndMigration: mig.ID, Reason: cause.Error(), MigrationBy: a.cfg.Node, Time: time.Now()})
		if err == nil {
			return false, nil
		}
		if refused(err) {
			return a.migrationEnded(ctx, id, mig.ID, mig.Deadline, true)
		}
		if time.Now().After(mig.Deadline.Add(migrationSlack)) {
			return false, err
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// endMigration ends a migration this node could not begin (nothing changed here).
func (a *Agent) endMigration(ctx context.Context, id string, mig state.Migration, cause error) error {
	if _, err := a.settleMigration(context.WithoutCancel(ctx), id, mig, cause); err != nil {
		a.log.Warn("end a migration", "sandbox", id, "migration", mig.ID, "err", err)
	}
	return cause
}

// takeBack resumes the source's guest after a failed migration and takes back the main
// process on a new guest connection (the old one's sessions were detached).
func (a *Agent) takeBack(ctx context.Context, s *sandbox) (*client.Session, error) {
	s.mu.Lock()
	vm, g, ln, mainID := s.vm, s.guest, s.guestLn, s.main.ID()
	s.mu.Unlock()
	if p, ok := vm.(vmm.Pauser); ok {
		if err := p.Resume(ctx); err != nil {
			return nil, fmt.Errorf("resume the guest: %w", err)
		}
	}
	// A new connection: the VMM dials the channel again once this one is closed.
	g.Close()
	ng, err := a.vms.connectGuest(ctx, ln, vm)
	if err != nil {
		return nil, err
	}
	main, err := ng.Reattach(ctx, mainID)
	if err != nil {
		ng.Close()
		return nil, fmt.Errorf("take back the main process: %w", err)
	}
	s.mu.Lock()
	s.guest, s.main = ng, main
	s.mu.Unlock()
	return main, nil
}

// migrationPeer is the way to migration m's target: this agent itself, or another
// node's through the dialer.
func (a *Agent) migrationPeer(m state.Migration) (MigrationPeer, error) {
	if m.To == a.cfg.Node {
		return localPeer{a}, nil
	}
	if a.cfg.DialMigration == nil {
		return nil, fmt.Errorf("this node cannot reach node %s to migrate to it", m.To)
	}
	return a.cfg.DialMigration(m)
}

// localPeer is a migration to this node.
type localPeer struct{ a *Agent }

func (p localPeer) Begin(ctx context.Context, id, mid string, body io.Reader) error {
	return p.a.MigrationBegin(ctx, p.a.cfg.Node, id, mid, body)
}

func (p localPeer) Stream(ctx context.Context, id, mid string, body io.Reader) error {
	return p.a.MigrationStream(ctx, p.a.cfg.Node, id, mid, body)
}

func (p localPeer) Disk(ctx context.Context, id, mid string) (net.Conn, error) {
	return p.a.MigrationDisk(ctx, p.a.cfg.Node, id, mid)
}

func (p localPeer) Switch(ctx context.Context, id, mid string, body io.Reader) error {
	return p.a.MigrationSwitch(ctx, p.a.cfg.Node, id, mid, body)
}

// orphanedMigration ends a migration away from this node that a previous agent process
// began: the VMM it adopted may have been stopped for the switch-over, and runs again
// only once the end is written (never if the commit came first).
func (a *Agent) orphanedMigration(ctx context.Context, id string, mig state.Migration) {
	moved, err := a.settleMigration(ctx, id, mig, errors.New("the source node's agent restarted during the migration"))
	if err != nil || moved {
		return // the assignments take it from here
	}
	s, err := a.lookup(id)
	if err != nil {
		return
	}
	s.mu.Lock()
	vm := s.vm
	s.mu.Unlock()
	if p, ok := vm.(vmm.Pauser); ok && vm != nil {
		if err := p.Resume(ctx); err != nil {
			a.log.Warn("resume a sandbox after its migration was interrupted", "sandbox", id, "err", err)
		}
	}
}
