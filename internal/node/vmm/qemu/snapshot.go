package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// maxStateBytes bounds the device state a snapshot may write. With guest RAM excluded
// (x-ignore-shared) a microvm's state is ~60 KB; anything near this bound means RAM is in
// the stream, i.e. the VM was not set up for snapshots.
const maxStateBytes = 64 << 20

// Snapshot implements vmm.Snapshotter: stop the vCPUs, then migrate the device state (guest
// RAM is excluded: it is already in the shared memory file) into stateFile through a unix
// socket the driver listens on.
func (v *vm) Snapshot(ctx context.Context, stateFile string) error {
	if err := v.snapshot(ctx, stateFile, false); err != nil {
		return fmt.Errorf("snapshot VM %s to %s: %w", v.id, stateFile, err)
	}
	return nil
}

// Save implements vmm.Saver: as Snapshot, with the guest's RAM in the stream (whatever
// backs it: a restored VM's private copy of a template, or anonymous memory).
func (v *vm) Save(ctx context.Context, stateFile string) error {
	if err := v.snapshot(ctx, stateFile, true); err != nil {
		return fmt.Errorf("save VM %s to %s: %w", v.id, stateFile, err)
	}
	return nil
}

func (v *vm) snapshot(ctx context.Context, stateFile string, whole bool) error {
	v.mu.Lock()
	c, state, detached, mem := v.qmp, v.state, v.detached, v.memFile
	v.mu.Unlock()
	if mem == "" && !whole {
		return errors.New("the VM's memory is not in a file (create it with Spec.MemoryFile)")
	}
	if state != "running" || c == nil || detached {
		return fmt.Errorf("not running under this process (%s)", state)
	}
	limit := int64(maxStateBytes)
	if whole {
		// The stream names RAM by its backend object: one without mem0 (a VMM an older
		// agent started) could not be restored into a VM of this driver.
		var size int64
		if err := c.Execute(ctx, "qom-get", map[string]any{"path": "/objects/mem0", "property": "size"}, &size); err != nil || size <= 0 {
			return fmt.Errorf("the VM's RAM is not the mem0 object a restore needs (a VMM from before saves were supported): %v", err)
		}
		// RAM pages (each with a small header) and the device state.
		limit += size + size/256
	}
	// A whole save has all RAM in its stream; a snapshot none that is in a file.
	if err := setIgnoreShared(ctx, c, !whole); err != nil {
		return err
	}
	// A save has no switch-over to pause before (a migration may have set it).
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "pause-before-switchover", "state": false}}}
	if err := c.Execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
		return fmt.Errorf("set pause-before-switchover: %w", err)
	}
	// From here on the VM must not run again, whatever happens: its memory file is (part
	// of) a snapshot the moment the vCPUs stop.
	v.mu.Lock()
	v.snapshotted = true
	v.mu.Unlock()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("stop vCPUs: %w", err)
	}

	tmp := stateFile + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create state file: %w", err)
	}
	defer os.Remove(tmp) // after a successful rename this finds nothing
	defer out.Close()
	if err := v.streamOut(ctx, out, limit); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return fmt.Errorf("sync state file: %w", err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("close state file: %w", err)
	}
	return os.Rename(tmp, stateFile)
}

// streamOut runs QEMU's outgoing migration into dst (at most limit bytes; 0: no bound)
// through a unix socket the driver listens on, and returns once it completed.
func (v *vm) streamOut(ctx context.Context, dst io.Writer, limit int64) error {
	v.mu.Lock()
	c, pid := v.qmp, v.pid
	v.mu.Unlock()
	sock := filepath.Join(v.dir, migrateSocket)
	ln, err := v.listenForVMM(sock)
	if err != nil {
		return fmt.Errorf("listen for the migration stream: %w", err)
	}
	defer os.Remove(sock)
	defer ln.Close()
	copied := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			copied <- fmt.Errorf("accept QEMU's migration connection: %w", err)
			return
		}
		defer conn.Close()
		if err := peerIs(conn, pid); err != nil {
			// The stream is the VMM's only: nothing else may write the saved state.
			copied <- fmt.Errorf("the migration socket: %w", err)
			return
		}
		var src io.Reader = conn
		if limit > 0 {
			src = io.LimitReader(conn, limit+1)
		}
		n, err := io.Copy(dst, src)
		if err == nil && limit > 0 && n > limit {
			err = fmt.Errorf("the saved state exceeds %d bytes (is guest RAM in the stream?)", limit)
		}
		copied <- err
	}()
	if err := c.Execute(ctx, "migrate", map[string]any{"uri": "unix:" + sock}, nil); err != nil {
		ln.Close()
		<-copied
		return fmt.Errorf("start migration: %w", err)
	}
	if err := v.waitMigration(ctx); err != nil {
		ln.Close()
		<-copied
		return err
	}
	select {
	case err := <-copied:
		return err
	case <-ctx.Done():
		ln.Close()
		return ctx.Err()
	}
}

// flattenOnly says whether v was made to flatten a whole save (vmm.Flattener). v.mu held.
func (v *vm) flattenOnly() bool {
	return v.memFile != "" && v.spec.Restore != nil && v.spec.Restore.MemoryFile == ""
}

// Flatten implements vmm.Flattener: launch QEMU with its RAM the shared memory file, load
// the whole save into it (no vCPU runs), then save the device state as a template's is
// saved (RAM excluded: it is in the file), and end the VMM.
func (v *vm) Flatten(ctx context.Context, stateFile string) error {
	v.mu.Lock()
	ok, st := v.flattenOnly(), v.state
	if ok && st == "created" {
		v.state = "starting"
	}
	v.mu.Unlock()
	if !ok {
		return fmt.Errorf("flatten VM %s: it was not made to (a whole save to restore and a memory file are both needed)", v.id)
	}
	if st != "created" {
		return fmt.Errorf("flatten VM %s: already %s", v.id, st)
	}
	err := v.flatten(ctx, stateFile)
	_ = v.Kill()
	<-v.done
	if err != nil {
		return fmt.Errorf("flatten VM %s from %s: %w", v.id, v.restoreFrom, err)
	}
	return nil
}

func (v *vm) flatten(ctx context.Context, stateFile string) error {
	if err := v.launch(ctx); err != nil {
		return err
	}
	v.mu.Lock()
	client, exited := v.qmp, v.exited
	v.mu.Unlock()
	if err := client.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(restoreFD)}, nil); err != nil {
		return fmt.Errorf("load the save: %w", err)
	}
	if err := waitIncoming(ctx, client, exited); err != nil {
		return fmt.Errorf("load the save: %w%s", err, v.stderrTail())
	}
	// snapshot stops the (never started) vCPUs and refuses to let the VM run again.
	return v.snapshot(ctx, stateFile, false)
}

// waitMigration polls query-migrate until the outgoing migration ends.
func (v *vm) waitMigration(ctx context.Context) error {
	v.mu.Lock()
	c := v.qmp
	v.mu.Unlock()
	continued := false
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return fmt.Errorf("query migration: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		case "pre-switchover":
			// Paused before the switch-over (see migrate.go): the guest is stopped; what
			// must be whole first (the disk mirror) ends now.
			if !continued {
				v.mu.Lock()
				before := v.beforeSwitchover
				v.mu.Unlock()
				if before != nil {
					if err := before(ctx); err != nil {
						_ = c.Execute(context.Background(), "migrate_cancel", nil, nil)
						return err
					}
				}
				if err := c.Execute(ctx, "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
					return fmt.Errorf("continue the migration: %w", err)
				}
				continued = true
			}
		}
		select {
		case <-ctx.Done():
			_ = c.Execute(context.Background(), "migrate_cancel", nil, nil)
			return ctx.Err()
		case <-v.done:
			return fmt.Errorf("VMM ended during the save: %v", v.ExitError())
		case <-time.After(2 * time.Millisecond):
		}
	}
}
