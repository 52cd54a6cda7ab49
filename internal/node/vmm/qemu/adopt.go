package qemu

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
)

// Adopt reattaches to a QEMU started by an earlier process in dir: it checks that the
// recorded pid is still that QEMU (same start time, command line naming dir), takes a pidfd
// on it (signals through a pidfd cannot hit a recycled pid), reconnects QMP and watches the
// pidfd for the process's end. The exit status of a process that is not our child cannot be
// read, so ExitError relies on QEMU's SHUTDOWN event for the reason.
func (d *Driver) Adopt(ctx context.Context, dir string) (vmm.VM, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, fmt.Errorf("adopt VM in %s: %w", dir, err)
	}
	var st persisted
	if err := json.Unmarshal(b, &st); err != nil || st.PID <= 0 {
		return nil, fmt.Errorf("adopt VM in %s: bad %s: %v", dir, stateFile, err)
	}
	// What vm.json names must be this VM's: its QMP socket in its own directory, its
	// cgroups named after it under this driver's, its user in the jail's range.
	if st.QMP != filepath.Join(dir, qmpSocket) && st.QMP != filepath.Join(dir, "qmp.sock") {
		return nil, fmt.Errorf("adopt VM in %s: %s names QMP socket %s outside it", dir, stateFile, st.QMP)
	}
	// (Under this driver's cgroup directory as placed now, or, for a directory under the
	// agent's own cgroup, as placed by an agent that ran in another cgroup.)
	parents := d.cgroupParents()
	ours := func(cg string) bool {
		if d.cfg.Jail == nil || filepath.Base(cg) != st.ID {
			return false
		}
		root := cmp.Or(d.cfg.Jail.CgroupRoot, jail.DefaultCgroupRoot) + "/"
		return slices.Contains(parents, filepath.Dir(cg)) ||
			!filepath.IsAbs(d.cfg.Jail.CgroupName) && strings.HasPrefix(cg, root) && filepath.Base(filepath.Dir(cg)) == d.cfg.Jail.CgroupName
	}
	for _, cg := range st.Cgroups {
		if !ours(cg) {
			return nil, fmt.Errorf("adopt VM in %s: %s names cgroup %s, not this VM's", dir, stateFile, cg)
		}
	}
	if st.UID != 0 && (d.cfg.Jail == nil || st.UID < d.cfg.Jail.UIDBase || st.UID >= d.cfg.Jail.UIDBase+d.cfg.Jail.UIDCount) {
		return nil, fmt.Errorf("adopt VM in %s: %s names user %d, not a jail user", dir, stateFile, st.UID)
	}
	if st.Accel != d.cfg.Accel {
		d.log.Warn("adopting a VM started with another accelerator", "vm", st.ID, "accel", st.Accel)
	}
	// PIDFD_NONBLOCK lets the runtime poller wait on it (no thread blocked per VM) and lets
	// Close interrupt that wait.
	pidfd, err := unix.PidfdOpen(st.PID, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("adopt VM %s: process %d: %w", st.ID, st.PID, err)
	}
	pf := os.NewFile(uintptr(pidfd), fmt.Sprintf("pidfd:%d", st.PID))
	// Checked after PidfdOpen: if the pid was recycled before, the start time differs; if
	// after, the pidfd still refers to the process we checked.
	if procStartTime(st.PID) != st.StartTime {
		pf.Close()
		return nil, fmt.Errorf("adopt VM %s: process %d is gone (pid reused by another process)", st.ID, st.PID)
	}
	if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.PID)); err != nil || !strings.Contains(string(cmdline), dir) {
		pf.Close()
		return nil, fmt.Errorf("adopt VM %s: process %d is not the QEMU of %s", st.ID, st.PID, dir)
	}

	v := newVM(d, st.ID, dir, nil)
	v.pid = st.PID
	v.p = adoptedProc{pf}
	v.state = "running"
	if st.UID != 0 {
		d.uids.mark(st.UID) // a jailed VMM keeps its user
		v.uid, v.cgroups = st.UID, st.Cgroups
	}

	qctx := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		qctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	// Failing to adopt leaves the VM running: it must not kill a workload.
	c, err := v.dialQMP(qctx, st.QMP, nil)
	if err != nil {
		pf.Close()
		return nil, fmt.Errorf("adopt VM %s: %w", st.ID, err)
	}
	var status struct {
		Status string `json:"status"`
	}
	if err := c.Execute(qctx, "query-status", nil, &status); err != nil {
		c.Close()
		pf.Close()
		return nil, fmt.Errorf("adopt VM %s: %w", st.ID, err)
	}
	v.mu.Lock()
	v.qmp = c
	v.mu.Unlock()
	go func() {
		if err := waitPidfd(pf); err != nil {
			return // closed by Detach: no longer ours to report
		}
		pf.Close()
		v.finish(exit{})
	}()
	v.log.Info("adopted VM", "pid", st.PID, "status", status.Status)
	go v.guardConsole()
	return v, nil
}

// waitPidfd blocks until the process behind the pidfd has exited (the pidfd turns
// readable), or the file is closed (then it returns an error).
func waitPidfd(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return n > 0 || (err != nil && !errors.Is(err, unix.EINTR))
	})
}
