package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/qemu/qmp"
)

// Live migration. RAM goes pre-copy through the migration stream (streamOut). Disks go
// one of two ways: on one node the target opens the source's very files (see the jail's
// sharesDisks); across nodes the source's VMM mirrors each writable disk into the
// target's over NBD (QEMU's blockdev-mirror, the way libvirt migrates without shared
// storage): the target's VMM serves its disks on a unix socket in its directory, the
// source's connects to a socket the driver listens on, and the caller carries each
// connection between the two (vmm.MigrateOptions.DialDisks). The mirror copies the disk
// while the guest runs and, once caught up (ready), every guest write goes to both
// before it completes (copy-mode write-blocking), so the RAM migration can start. The
// migration then pauses before the switch-over (pause-before-switchover: the guest is
// stopped, the device state not yet sent); the mirror jobs end there, in sync, and only
// then does the stream end. A target's disks are whole before it could run.

// migrationDowntime is the pause QEMU aims for at the end of a live migration (the
// last dirty pages and the device state); it keeps copying while more would remain.
const migrationDowntime = 50 * time.Millisecond

// mirrorReadyTimeout bounds the first copy of the disks (they are sparse: what the
// guest wrote, at the speed of the node-to-node stream).
const mirrorReadyTimeout = 10 * time.Minute

// mirrorJob is the name of the mirror job of disk i, and of its NBD node.
func mirrorJob(i int) string { return "mirror-" + diskNode(i) }

// diskNode is the block node name of the VM's disk i.
func diskNode(i int) string { return "fw-disk" + strconv.Itoa(i) }

// serveDisks, on a live migration's target that receives its disks, exports the
// writable ones over NBD on nbdSocket (the VMM creates it, in its own directory) and
// tells the caller how to reach them. Nothing else may be done to the disks until
// stopDiskService.
func (v *vm) serveDisks(ctx context.Context) error {
	c, ok := v.receivesDisks()
	if !ok {
		return nil
	}
	sock := filepath.Join(v.dir, nbdSocket)
	_ = os.Remove(sock)
	// One connection per writable disk is what a mirror opens; a few more, no more.
	addr := map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}, "max-connections": 4}
	if err := c.Execute(ctx, "nbd-server-start", addr, nil); err != nil {
		return fmt.Errorf("serve the disks to the migration's source: %w", err)
	}
	for i, d := range v.spec.Disks {
		if d.ReadOnly {
			continue
		}
		exp := map[string]any{"type": "nbd", "id": diskNode(i), "node-name": diskNode(i), "name": diskNode(i), "writable": true}
		if err := c.Execute(ctx, "block-export-add", exp, nil); err != nil {
			return fmt.Errorf("serve disk %d to the migration's source: %w", i, err)
		}
	}
	v.mu.Lock()
	pid := v.pid
	v.mu.Unlock()
	v.spec.Restore.ReceiveDisks(func(ctx context.Context) (net.Conn, error) {
		return dialVMM(ctx, sock, pid)
	})
	return nil
}

// receivesDisks says whether v is a live migration's target that receives its disks
// (its QMP client if so).
func (v *vm) receivesDisks() (*qmp.Client, bool) {
	r := v.spec.Restore
	if r == nil || r.Stream == nil || r.ReceiveDisks == nil {
		return nil, false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.qmp, true
}

// stopDiskService ends what serveDisks started, once the stream is loaded (the source
// ended its mirror before it sent the rest): nothing can write the disks from outside
// when the guest runs.
func (v *vm) stopDiskService(ctx context.Context) error {
	c, ok := v.receivesDisks()
	if !ok {
		return nil
	}
	for i, d := range v.spec.Disks {
		if d.ReadOnly {
			continue
		}
		if err := c.Execute(ctx, "block-export-del", map[string]any{"id": diskNode(i), "mode": "hard"}, nil); err != nil {
			return fmt.Errorf("stop serving disk %d: %w", i, err)
		}
	}
	if err := c.Execute(ctx, "nbd-server-stop", nil, nil); err != nil {
		return fmt.Errorf("stop the disk service: %w", err)
	}
	_ = os.Remove(filepath.Join(v.dir, nbdSocket))
	return nil
}

// MigrateOut implements vmm.Migrator: pre-copy live migration of the running VM into w
// (RAM copied while the guest runs, again as it dirties it, then the guest stopped for
// the rest and the device state), its disks mirrored first if opts says where. The VM
// ends stopped, not ended: the caller ends it once the target has taken over, or
// resumes it (vmm.Pauser) if the target failed.
func (v *vm) MigrateOut(ctx context.Context, w io.Writer, opts vmm.MigrateOptions) (vmm.MigrationStats, error) {
	st, err := v.migrateOut(ctx, w, opts)
	if err != nil {
		return st, fmt.Errorf("migrate VM %s: %w", v.id, err)
	}
	return st, nil
}

func (v *vm) migrateOut(ctx context.Context, w io.Writer, opts vmm.MigrateOptions) (vmm.MigrationStats, error) {
	v.mu.Lock()
	c, state, detached := v.qmp, v.state, v.detached
	v.mu.Unlock()
	var st vmm.MigrationStats
	if state != "running" || c == nil || detached {
		return st, fmt.Errorf("not running under this process (%s)", state)
	}
	// All RAM is in the stream (a template-restored VM's private copy included).
	if err := setIgnoreShared(ctx, c, false); err != nil {
		return st, err
	}
	// Paused before the switch-over always: that is where the guest stops (recorded),
	// and where a disk mirror ends in step with it.
	mirroring := opts.DialDisks != nil
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "pause-before-switchover", "state": true}}}
	if err := c.Execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
		return st, fmt.Errorf("set pause-before-switchover: %w", err)
	}
	params := map[string]any{"downtime-limit": migrationDowntime.Milliseconds(), "max-bandwidth": int64(8) << 30}
	if err := c.Execute(ctx, "migrate-set-parameters", params, nil); err != nil {
		return st, fmt.Errorf("set parameters: %w", err)
	}
	var m *mirror
	var mirrored time.Time
	if mirroring {
		var err error
		if m, err = v.startMirror(ctx, opts.DialDisks); err != nil {
			return st, err
		}
		defer m.close()
		mirrored = time.Now()
	}
	var stopped, mirrorEnded time.Time
	v.mu.Lock()
	v.beforeSwitchover = func(ctx context.Context) error {
		stopped = time.Now()
		if m != nil {
			err := m.finish(ctx)
			mirrorEnded = time.Now()
			return err
		}
		return nil
	}
	v.mu.Unlock()
	defer func() {
		v.mu.Lock()
		v.beforeSwitchover = nil
		v.mu.Unlock()
	}()
	if err := v.streamOut(ctx, w, 0); err != nil {
		return st, err
	}
	var q struct {
		TotalTime int64 `json:"total-time"`
		Downtime  int64 `json:"downtime"`
		RAM       struct {
			Transferred int64 `json:"transferred"`
		} `json:"ram"`
	}
	if err := c.Execute(ctx, "query-migrate", nil, &q); err == nil {
		st = vmm.MigrationStats{Bytes: q.RAM.Transferred, Downtime: time.Duration(q.Downtime) * time.Millisecond, Total: time.Duration(q.TotalTime) * time.Millisecond}
	}
	if m != nil {
		st.DiskBytes = m.bytes()
	}
	st.Stopped, st.Mirrored, st.MirrorEnded = stopped, mirrored, mirrorEnded
	return st, nil
}

// mirror is the disk mirror of one outgoing migration: a blockdev-mirror job per
// writable disk into an NBD node whose connections the driver carries to the target.
type mirror struct {
	v       *vm
	c       *qmp.Client
	ln      net.Listener
	pid     int      // the VMM's: only its connections are carried
	jobs    []string // job IDs, also the NBD nodes' names
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
	carried int64 // bytes carried to the target (NBD requests and the data written)
	ended   bool
}

// startMirror starts mirroring every writable disk through dial and returns once all
// of them are in step with the guest (ready).
func (v *vm) startMirror(ctx context.Context, dial vmm.DialFunc) (_ *mirror, err error) {
	v.mu.Lock()
	c, pid := v.qmp, v.pid
	v.mu.Unlock()
	sock := filepath.Join(v.dir, mirrorSocket)
	ln, err := v.listenForVMM(sock)
	if err != nil {
		return nil, fmt.Errorf("listen for the disk mirror: %w", err)
	}
	m := &mirror{v: v, c: c, ln: ln, pid: pid}
	defer func() {
		if err != nil {
			m.close()
		}
	}()
	m.wg.Add(1)
	go m.carry(dial)
	// The writable disks as the VMM has them (not the spec: a VM adopted from an earlier
	// agent has none); a migration with none to mirror would leave the target's empty.
	writable, err := writableDisks(ctx, c)
	if err != nil {
		return m, err
	}
	if len(writable) == 0 {
		return m, errors.New("the VMM lists no writable disk to mirror")
	}
	// An agent that died during a migration left its mirror in the VMM a later agent
	// adopted: it goes first (its node names are the ones used here).
	var stale []string
	for _, i := range writable {
		stale = append(stale, mirrorJob(i))
	}
	m.drop(ctx, stale)
	for _, i := range writable {
		job := mirrorJob(i)
		// discard=unmap: the mirror zeroes the target first with holes rather than
		// written zeros (the target's disk is opened so too), then copies only what
		// the source holds.
		target := map[string]any{"driver": "nbd", "node-name": job, "export": diskNode(i), "discard": "unmap",
			"server": map[string]any{"type": "unix", "path": sock}}
		if err := c.Execute(ctx, "blockdev-add", target, nil); err != nil {
			return m, fmt.Errorf("reach the target's disk %d: %w", i, err)
		}
		m.jobs = append(m.jobs, job)
		// auto-dismiss off: how the job ended is read (finish) before it goes.
		args := map[string]any{"job-id": job, "device": "disk" + strconv.Itoa(i), "target": job, "sync": "full",
			"copy-mode": "write-blocking", "auto-finalize": true, "auto-dismiss": false}
		if err := c.Execute(ctx, "blockdev-mirror", args, nil); err != nil {
			return m, fmt.Errorf("mirror disk %d: %w", i, err)
		}
	}
	rctx, cancel := context.WithTimeout(ctx, mirrorReadyTimeout)
	defer cancel()
	for {
		jobs, err := m.query(rctx)
		if err != nil {
			return m, err
		}
		ready := 0
		for _, id := range m.jobs {
			j, ok := jobs[id]
			switch {
			case !ok || j.Status == "concluded" || j.Status == "aborting":
				return m, fmt.Errorf("disk mirror %s ended before it caught up (the target's disk service went away?) %s", id, j.Error)
			case j.Ready:
				ready++
			}
		}
		if ready == len(m.jobs) {
			return m, nil
		}
		select {
		case <-rctx.Done():
			return m, fmt.Errorf("the disk mirror did not catch up (jobs %+v): %w", jobs, rctx.Err())
		case <-v.done:
			return m, fmt.Errorf("VMM ended during the disk mirror: %v", v.ExitError())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// writableDisks lists the indexes of the VMM's writable disks (block devices disk0,
// disk1, ... as the command line names them).
func writableDisks(ctx context.Context, c *qmp.Client) ([]int, error) {
	var devs []struct {
		Device   string `json:"device"`
		Inserted *struct {
			RO bool `json:"ro"`
		} `json:"inserted"`
	}
	if err := c.Execute(ctx, "query-block", nil, &devs); err != nil {
		return nil, fmt.Errorf("list the VMM's disks: %w", err)
	}
	var out []int
	for _, d := range devs {
		n, ok := strings.CutPrefix(d.Device, "disk")
		i, err := strconv.Atoi(n)
		if !ok || err != nil || d.Inserted == nil || d.Inserted.RO {
			continue
		}
		out = append(out, i)
	}
	return out, nil
}

type blockJob struct {
	Device string `json:"device"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
	Error  string `json:"error"`
}

func (m *mirror) query(ctx context.Context) (map[string]blockJob, error) {
	var jobs []blockJob
	if err := m.c.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, fmt.Errorf("query the disk mirror: %w", err)
	}
	out := make(map[string]blockJob, len(jobs))
	for _, j := range jobs {
		out[j.Device] = j
	}
	return out, nil
}

// carry takes each connection the VMM opens to the mirror socket to the target, through
// dial, until the listener closes.
func (m *mirror) carry(dial vmm.DialFunc) {
	defer m.wg.Done()
	for {
		conn, err := m.ln.Accept()
		if err != nil {
			return
		}
		if err := peerIs(conn, m.pid); err != nil {
			// Only the VMM's connections go to the target's disks.
			m.v.d.log.Warn("refused a connection to the disk mirror's socket", "vm", m.v.id, "err", err)
			conn.Close()
			continue
		}
		m.mu.Lock()
		if m.ended {
			m.mu.Unlock()
			conn.Close()
			return
		}
		m.conns = append(m.conns, conn)
		m.wg.Add(1)
		m.mu.Unlock()
		go func() { // each on its own: one slow target must not hold up the others
			defer m.wg.Done()
			m.carryOne(conn, dial)
		}()
	}
}

// mirrorAnswerTimeout bounds how long the target may take to answer a connection of the
// mirror (the NBD handshake): the VMM's NBD client waits for it with the VMM's main loop
// held, so a target that never answers must be cut off.
const mirrorAnswerTimeout = 30 * time.Second

// carryOne carries one connection of the VMM's to the target.
func (m *mirror) carryOne(conn net.Conn, dial vmm.DialFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), mirrorAnswerTimeout)
	far, err := dial(ctx)
	cancel()
	if err != nil {
		conn.Close() // the VMM's NBD client reports the failure to connect
		return
	}
	m.mu.Lock()
	if m.ended {
		m.mu.Unlock()
		conn.Close()
		far.Close()
		return
	}
	m.conns = append(m.conns, far)
	m.mu.Unlock()
	answered := make(chan struct{})
	watchdog := time.AfterFunc(mirrorAnswerTimeout, func() {
		select {
		case <-answered:
		default:
			conn.Close()
			far.Close()
		}
	})
	defer watchdog.Stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(counted{far, m}, conn)
		closeWrite(far)
	}()
	first := true
	buf := make([]byte, 64<<10)
	for {
		n, err := far.Read(buf)
		if n > 0 && first {
			first = false
			close(answered)
		}
		if n > 0 {
			if _, werr := conn.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	closeWrite(conn)
	<-done
}

// counted counts what is written through it to the target into the mirror's total.
type counted struct {
	w io.Writer
	m *mirror
}

func (c counted) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.m.mu.Lock()
	c.m.carried += int64(n)
	c.m.mu.Unlock()
	return n, err
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

// finish ends the mirror jobs in sync, with the guest stopped (the migration paused
// before its switch-over): a ready mirror job that is cancelled completes, its target
// a copy of the disk as it is now. A job that ends with an error (the target's disk
// full, the connection cut while it drained) fails the migration: its copy is not whole.
func (m *mirror) finish(ctx context.Context) error {
	for _, id := range m.jobs {
		if err := m.c.Execute(ctx, "block-job-cancel", map[string]any{"device": id}, nil); err != nil {
			return fmt.Errorf("end the disk mirror %s: %w", id, err)
		}
	}
	for {
		jobs, err := m.query(ctx)
		if err != nil {
			return err
		}
		left := 0
		for _, id := range m.jobs {
			j, ok := jobs[id]
			switch {
			case !ok:
				return fmt.Errorf("the disk mirror %s went without saying how it ended", id)
			case j.Status != "concluded":
				left++
			case j.Error != "":
				return fmt.Errorf("the disk mirror %s failed as it ended: %s", id, j.Error)
			}
		}
		if left == 0 {
			for _, id := range m.jobs {
				_ = m.c.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the disk mirror did not end: %w", ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

func (m *mirror) bytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.carried
}

// close ends what is left of the mirror: its jobs (cancelled: the target's copy is not
// whole), its NBD nodes, the connections and the listener.
func (m *mirror) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m.drop(ctx, m.jobs)
	m.mu.Lock()
	m.ended = true
	conns := m.conns
	m.mu.Unlock()
	m.ln.Close()
	for _, c := range conns {
		c.Close()
	}
	m.wg.Wait()
	_ = os.Remove(filepath.Join(m.v.dir, mirrorSocket))
}

// drop ends the mirror jobs named ids, if the VMM has them, and removes their NBD nodes
// (of the same names).
func (m *mirror) drop(ctx context.Context, ids []string) {
	if jobs, err := m.query(ctx); err == nil {
		for _, id := range ids {
			if j, ok := jobs[id]; ok && j.Status != "concluded" {
				_ = m.c.Execute(ctx, "block-job-cancel", map[string]any{"device": id, "force": true}, nil)
			}
		}
		for _, id := range ids {
			for range 1000 {
				jobs, err := m.query(ctx)
				j, ok := jobs[id]
				if err != nil || !ok {
					break
				}
				if j.Status == "concluded" {
					_ = m.c.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
					break
				}
				time.Sleep(2 * time.Millisecond)
			}
		}
	}
	for _, id := range ids {
		_ = m.c.Execute(ctx, "blockdev-del", map[string]any{"node-name": id}, nil)
	}
}
