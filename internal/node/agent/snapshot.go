package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Filesystem snapshots: a copy of a running sandbox's scratch disk (the writable layer of
// its overlay over the image) taken while the guest's filesystem is frozen, so that
// every write the guest made is either wholly in the copy or not at all. They live in
// snapshots/<id>/ until removed; a sandbox started from one boots the same image with a
// copy of that disk as its own scratch disk.

// SnapshotInfo is what a node knows of a filesystem snapshot it took.
type SnapshotInfo struct {
	ImageDigest string    `json:"image_digest"`
	Bytes       int64     `json:"bytes"`
	At          time.Time `json:"at"`
	Memory      bool      `json:"memory,omitempty"`
}

const snapshotMeta = "snapshot.json"

// snapshotDir is where snapshot id's files are on this node once opened.
func (a *Agent) snapshotDir(id string) string { return a.snaps.Path(id) }

// SnapshotFS copies running sandbox id's filesystem into snapshot snapID: the guest
// freezes its scratch filesystem (running writes end, new ones wait), the disk is
// copied, the guest thaws. The sandbox runs on; its writes wait only for the copy.
func (a *Agent) SnapshotFS(ctx context.Context, id, snapID string) (SnapshotInfo, error) {
	if !routes.ValidSandbox(snapID) {
		return SnapshotInfo{}, fmt.Errorf("%q is not a snapshot ID", snapID)
	}
	s, err := a.lookup(id)
	if err != nil {
		return SnapshotInfo{}, err
	}
	select {
	case <-s.ready:
	case <-ctx.Done():
		return SnapshotInfo{}, ctx.Err()
	}
	s.mu.Lock()
	g, main, digest, busy := s.guest, s.main, s.started.ImageDigest, s.snapshotting
	if !busy {
		s.snapshotting = true
	}
	s.mu.Unlock()
	if busy {
		// Two copies at once would thaw each other's freeze.
		return SnapshotInfo{}, fmt.Errorf("sandbox %s is being snapshotted already", id)
	}
	defer func() {
		s.mu.Lock()
		s.snapshotting = false
		s.mu.Unlock()
	}()
	if g == nil || main == nil || digest == nil {
		return SnapshotInfo{}, fmt.Errorf("sandbox %s is not running: %w", id, ErrNotRunning)
	}
	release, err := a.savedRoom(allocated(filepath.Join(s.dir, "scratch.img")))
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer release()
	tmp, err := a.snaps.Stage(snapID)
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer a.snaps.Unstage(snapID) // nothing is left once kept
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = g.Freeze(fctx)
	cancel()
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("freeze the sandbox's filesystem: %w", err)
	}
	t0 := time.Now()
	// Bounded by the guest's own limit on a freeze: past it the guest thaws by itself and
	// the copy would not be of a frozen filesystem.
	cctx, cancel := context.WithTimeout(ctx, proto.FreezeLimit-5*time.Second)
	copyErr := copySparseCtx(cctx, filepath.Join(s.dir, "scratch.img"), filepath.Join(tmp, "scratch.img"))
	cancel()
	// Thawed whatever happened (the guest also thaws by itself after proto.FreezeLimit).
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	thawErr := g.Thaw(tctx)
	cancel()
	if err := errors.Join(copyErr, thawErr); err != nil {
		return SnapshotInfo{}, fmt.Errorf("copy the sandbox's filesystem: %w", err)
	}
	info := SnapshotInfo{ImageDigest: *digest, At: time.Now().UTC()}
	b, _ := json.Marshal(info)
	if err := os.WriteFile(filepath.Join(tmp, snapshotMeta), b, 0o600); err != nil {
		return SnapshotInfo{}, err
	}
	if info.Bytes, err = a.snaps.Keep(ctx, snapID); err != nil {
		return SnapshotInfo{}, err
	}
	a.log.Info("filesystem snapshot taken", "sandbox", id, "snapshot", snapID, "mib", info.Bytes>>20, "frozen", time.Since(t0).Round(time.Millisecond))
	return info, nil
}

// RemoveSnapshot removes a snapshot's files; one this node does not have is not an error.
func (a *Agent) RemoveSnapshot(ctx context.Context, snapID string) error {
	return a.snaps.Remove(ctx, snapID)
}

// snapshotScratch is the scratch disk a start from snapshot snapID copies, after checking
// the snapshot is of the image the start pulled.
func (a *Agent) snapshotScratch(snapID, digest string) (string, error) {
	if !routes.ValidSandbox(snapID) {
		return "", fmt.Errorf("%q is not a snapshot ID", snapID)
	}
	dir, err := a.snaps.Open(context.Background(), snapID)
	if err != nil {
		return "", fmt.Errorf("snapshot %s is not on node %s (it was removed?): %v", snapID, a.cfg.Node, err)
	}
	b, err := os.ReadFile(filepath.Join(dir, snapshotMeta))
	if err != nil {
		return "", fmt.Errorf("snapshot %s on node %s: %v", snapID, a.cfg.Node, err)
	}
	var info SnapshotInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return "", fmt.Errorf("snapshot %s: %s: %v", snapID, snapshotMeta, err)
	}
	if info.ImageDigest != digest {
		return "", fmt.Errorf("snapshot %s was taken of image %s, the start pulled %s (the tag moved?)", snapID, info.ImageDigest, digest)
	}
	return filepath.Join(dir, "scratch.img"), nil
}

// Snapshots with memory: a paused sandbox's saved VM, flattened (see flatten.go) and kept
// under the snapshot's ID with a copy of its scratch disk and its saved record:
// snapshots/<id>/{saved.json, scratch.img, flat/}. A start from one restores it as a fork
// restores its source's save (forkSteps): a new machine carrying on the saved processes.
// Unlike a fork's, its files are synced to disk: a snapshot outlives reboots.

// syncedFlat marks flattened files that were synced to disk (flatFiles.boot).
const syncedFlat = "synced"

// SnapshotMemory keeps paused sandbox id's saved VM as snapshot snapID.
func (a *Agent) SnapshotMemory(ctx context.Context, id, snapID string) (SnapshotInfo, error) {
	if !routes.ValidSandbox(snapID) {
		return SnapshotInfo{}, fmt.Errorf("%q is not a snapshot ID", snapID)
	}
	src := a.savedDir(id)
	rec, err := readSavedRecord(src)
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("sandbox %s has no saved state on node %s: %v", id, a.cfg.Node, err)
	}
	img, err := a.images.Get(ctx, rec.ImageDigest)
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("the image %s the sandbox ran from: %v", rec.ImageDigest, err)
	}
	rootDisk, _, err := a.images.RootDisk(ctx, img)
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("root disk of %s: %v", rec.ImageDigest, err)
	}
	// The copy of the scratch disk, and the flattened memory if it is not made yet (its
	// pages then count for the paused sandbox, and go with its save).
	need := allocated(filepath.Join(src, "scratch.img"))
	if _, err := os.Stat(flatFiles{dir: filepath.Join(src, flatDir)}.mem()); err != nil {
		need += int64(rec.MemoryMiB) << 20
	}
	release, err := a.savedRoom(need)
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer release()
	flat, err := a.flatFor(ctx, src, rec, rootDisk, rec.Sandbox.Spec.Network != state.NetworkNone)
	if err != nil {
		return SnapshotInfo{}, err
	}
	tmp, err := a.snaps.Stage(snapID)
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer a.snaps.Unstage(snapID) // nothing is left once kept
	out := flatFiles{dir: filepath.Join(tmp, flatDir)}
	if err := os.MkdirAll(out.dir, 0o700); err != nil {
		return SnapshotInfo{}, err
	}
	// The flattened files are never written again: the snapshot links them. The scratch
	// disk is copied: the source's resume takes the saved one and writes to it.
	for _, f := range []struct{ from, to string }{{flat.mem(), out.mem()}, {flat.state(), out.state()}} {
		if err := os.Link(f.from, f.to); err != nil {
			return SnapshotInfo{}, fmt.Errorf("keep the flattened save: %w", err)
		}
	}
	if err := copySparseCtx(ctx, filepath.Join(src, "scratch.img"), filepath.Join(tmp, "scratch.img")); err != nil {
		return SnapshotInfo{}, fmt.Errorf("copy the sandbox's scratch disk: %w", err)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if err := os.WriteFile(filepath.Join(tmp, savedRecordFile), b, 0o600); err != nil {
		return SnapshotInfo{}, err
	}
	for _, p := range []string{out.mem(), out.state(), filepath.Join(tmp, "scratch.img")} {
		if err := syncFile(p); err != nil {
			return SnapshotInfo{}, err
		}
	}
	if err := os.WriteFile(out.boot(), []byte(syncedFlat), 0o400); err != nil {
		return SnapshotInfo{}, err
	}
	info := SnapshotInfo{ImageDigest: rec.ImageDigest, At: time.Now().UTC(), Memory: true}
	b, _ = json.Marshal(info)
	if err := os.WriteFile(filepath.Join(tmp, snapshotMeta), b, 0o600); err != nil {
		return SnapshotInfo{}, err
	}
	if err := syncDir(out.dir); err != nil {
		return SnapshotInfo{}, err
	}
	if info.Bytes, err = a.snaps.Keep(ctx, snapID); err != nil {
		return SnapshotInfo{}, err
	}
	a.log.Info("snapshot with memory taken", "sandbox", id, "snapshot", snapID, "mib", info.Bytes>>20)
	return info, nil
}

// memorySnapshot says whether sb starts from a snapshot with memory on this node.
func (a *Agent) memorySnapshot(sb state.Sandbox) bool {
	if sb.Spec.Snapshot == "" || !routes.ValidSandbox(sb.Spec.Snapshot) {
		return false
	}
	dir, err := a.snaps.Open(context.Background(), sb.Spec.Snapshot)
	if err != nil {
		return false
	}
	_, err = os.Stat(filepath.Join(dir, savedRecordFile))
	return err == nil
}

// syncFile flushes path's data to disk.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

// ErrSavedDiskFull refuses a pause or snapshot past the node's budget for saved states.
var ErrSavedDiskFull = errors.New("no room in the node's disk budget for saved states and snapshots")

// savedUsed is the disk space paused sandboxes' saved states, forks' fetched copies of
// their sources' and snapshots take here.
func (a *Agent) savedUsed() int64 {
	n := a.snaps.NodeBytes()
	entries, _ := os.ReadDir(a.sandboxRoot())
	for _, e := range entries {
		n += dirSize(a.savedDir(e.Name())) + dirSize(a.fetchedSource(e.Name()))
	}
	return n
}

// savedRoom refuses need more bytes of saved state past the node's budget
// (Config.SavedDiskMiB) or its free disk, saying what takes the rest; otherwise it holds
// need until release is called (once the files are written, and so counted), so that
// saves under way at once see each other.
func (a *Agent) savedRoom(need int64) (release func(), err error) {
	budget := int64(a.cfg.SavedDiskMiB) << 20
	a.savedMu.Lock()
	defer a.savedMu.Unlock()
	used := a.savedUsed() + a.savedHeld
	if used+need > budget {
		return nil, fmt.Errorf("%w: saved states and snapshots take %d MiB of its %d MiB (--saved-disk-mib), this needs up to %d MiB more: remove snapshots, or resume or remove paused sandboxes",
			ErrSavedDiskFull, used>>20, budget>>20, need>>20)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(a.sandboxRoot(), &fs); err == nil && int64(fs.Bavail)*fs.Bsize < a.savedHeld+need+(64<<20) {
		return nil, fmt.Errorf("%w: %d MiB free on its disk, this needs up to %d MiB", ErrSavedDiskFull, int64(fs.Bavail)*fs.Bsize>>20, need>>20)
	}
	a.savedHeld += need
	var once sync.Once
	return func() {
		once.Do(func() {
			a.savedMu.Lock()
			a.savedHeld -= need
			a.savedMu.Unlock()
		})
	}, nil
}

// allocated is the disk space file path takes (its blocks, not its size: scratch disks
// are sparse).
func allocated(path string) int64 {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// snapshotSweepAge is how old a snapshot's files must be before a sweep may take them
// for files the state does not know: past a create's bound (the server records the
// snapshot once its node answers, within snapshotCallTimeout), with room to spare.
const snapshotSweepAge = 15 * time.Minute

// SweepSnapshots removes snapshot files the state does not record on this node (known:
// the IDs it does): those of a create whose node crashed before the record was made, or
// whose record went while this node was away; and a create's leftovers. Only files
// older than snapshotSweepAge go: a create in progress has not been recorded yet.
func (a *Agent) SweepSnapshots(known []string) {
	stored, err := a.snaps.List()
	if err != nil {
		a.log.Warn("list the node's snapshots", "err", err)
		return
	}
	keep := map[string]bool{}
	for _, id := range known {
		keep[id] = true
	}
	for _, sn := range stored {
		if keep[sn.ID] || time.Since(sn.Kept) < snapshotSweepAge {
			continue
		}
		if err := a.snaps.Remove(context.Background(), sn.ID); err != nil {
			a.log.Warn("remove a snapshot the state does not know", "snapshot", sn.ID, "err", err)
			continue
		}
		a.log.Info("removed a snapshot the state does not know", "snapshot", sn.ID)
	}
}
