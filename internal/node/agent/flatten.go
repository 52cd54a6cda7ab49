package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
)

// Memory shared by forks. A pause saves a VM whole (RAM in the stream); restoring that
// save loads all of its RAM into each restored VM's own memory. A fork (and a start from
// a snapshot with memory) restores the same save many times, so the save is first
// flattened once (vmm.Flattener) into a memory file and a device state, as a template is
// kept: every VM restored from it maps the one file copy-on-write, and pages none of them
// wrote are in the node's memory once.
//
// The flattened files live in flat/ beside the save they came from and go with it. They
// are not synced to disk (that would cost a write of all of RAM per fork call): a file
// names the boot they were made in, and after a host reboot they are made again.

const flatDir = "flat"

// flattenLimit bounds one flattening (a VMM loading a save of up to the node's largest
// VM into a file).
const flattenLimit = 5 * time.Minute

// flatFiles names a flattened save's files.
type flatFiles struct{ dir string }

func (f flatFiles) mem() string   { return filepath.Join(f.dir, "mem") }
func (f flatFiles) state() string { return filepath.Join(f.dir, "state") }
func (f flatFiles) boot() string  { return filepath.Join(f.dir, "boot_id") }

// bootID names this boot of the host.
func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

// flatFor returns the flattened form of the save in dir (state, scratch.img, rec),
// making it if it is not there from this boot. One flattening runs at a time on the
// node: it takes a VMM and a write of the VM's RAM.
func (a *Agent) flatFor(ctx context.Context, dir string, rec savedRecord, rootDisk string, net bool) (flatFiles, error) {
	f := flatFiles{dir: filepath.Join(dir, flatDir)}
	select {
	case a.flatSem <- struct{}{}:
	case <-ctx.Done():
		return f, ctx.Err()
	}
	defer func() { <-a.flatSem }()
	if b, err := os.ReadFile(f.boot()); err == nil && (string(b) == bootID() || string(b) == syncedFlat) {
		return f, nil
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); err != nil {
		// A snapshot's flattened files without the mark of their sync: the snapshot was
		// not finished (it is renamed into place only after), or was damaged.
		return f, fmt.Errorf("no saved state to flatten in %s (a damaged snapshot?): %w", dir, err)
	}
	// The memory file takes up to the VM's memory on disk, counted with saved states.
	release, err := a.savedRoom(int64(rec.MemoryMiB) << 20)
	if err != nil {
		return f, fmt.Errorf("flatten the saved state: %w", err)
	}
	defer release()
	// Bounded: one flattening at a time holds up every other on the node.
	ctx, cancel := context.WithTimeout(ctx, flattenLimit)
	defer cancel()
	t0 := time.Now()
	tmp := flatFiles{dir: f.dir + ".tmp"}
	_ = os.RemoveAll(tmp.dir)
	if err := os.MkdirAll(tmp.dir, 0o700); err != nil {
		return f, err
	}
	defer os.RemoveAll(tmp.dir) // nothing is left after the rename
	// A run directory of its own (short: socket paths), swept as any at a restart.
	owner := filepath.Base(filepath.Dir(dir)) // sandboxes/<id>/saved
	if len(owner) < 12 {
		return f, fmt.Errorf("flatten %s: not a sandbox's directory", dir)
	}
	runDir := filepath.Join(a.runRoot(), "f-"+owner[:12])
	_ = os.RemoveAll(runDir)
	defer os.RemoveAll(runDir)
	// The device set must be the saved VM's: a NIC if it had one, on a network that lets
	// nothing through (the guest never runs anyway).
	h, err := a.vms.prepareVM(ctx, vmInput{id: filepath.Base(runDir), dir: runDir, rootDisk: rootDisk, vcpus: rec.VCPUs, mem: rec.MemoryMiB,
		saved:   &savedFiles{state: filepath.Join(dir, "state"), scratch: filepath.Join(dir, "scratch.img")},
		memFile: tmp.mem(), net: net, closedNet: true}, false)
	if err != nil {
		return f, fmt.Errorf("flatten the saved state: %w", err)
	}
	defer h.undo()
	fl, ok := h.vm.(vmm.Flattener)
	if !ok {
		return f, fmt.Errorf("the %s driver cannot flatten a save into a memory file: %w", a.vms.driver.Name(), vmm.ErrNotSupported)
	}
	err = fl.Flatten(ctx, tmp.state())
	h.closeTap()
	// The VMM (a jail's user) made the files, and its jail owned the save's scratch disk
	// it linked: all go back to root, read-only, now that it has ended.
	for _, p := range []string{tmp.mem(), tmp.state(), filepath.Join(dir, "scratch.img")} {
		if cerr := os.Chown(p, 0, 0); cerr != nil && !os.IsNotExist(cerr) && err == nil {
			err = cerr
		}
	}
	if err != nil {
		return f, fmt.Errorf("flatten the saved state: %w", err)
	}
	for _, p := range []string{tmp.mem(), tmp.state()} {
		if err := os.Chmod(p, 0o400); err != nil {
			return f, err
		}
	}
	if err := os.WriteFile(tmp.boot(), []byte(bootID()), 0o400); err != nil {
		return f, err
	}
	_ = os.RemoveAll(f.dir)
	if err := os.Rename(tmp.dir, f.dir); err != nil {
		return f, err
	}
	a.log.Info("saved state flattened for restores sharing its memory", "dir", dir, "took", time.Since(t0).Round(time.Millisecond))
	return f, nil
}
