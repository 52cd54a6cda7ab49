package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
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
}

const snapshotMeta = "snapshot.json"

func (a *Agent) snapshotDir(id string) string { return filepath.Join(a.cfg.DataDir, "snapshots", id) }

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
	final := a.snapshotDir(snapID)
	if _, err := os.Stat(final); err == nil {
		return SnapshotInfo{}, fmt.Errorf("snapshot %s exists on this node already", snapID)
	}
	tmp := final + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return SnapshotInfo{}, err
	}
	defer os.RemoveAll(tmp) // nothing is left after the rename
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
	if err := syncDir(tmp); err != nil {
		return SnapshotInfo{}, err
	}
	info.Bytes = dirSize(tmp)
	if err := ctx.Err(); err != nil {
		return SnapshotInfo{}, err // nobody waits for it: nothing is kept
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		return SnapshotInfo{}, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return SnapshotInfo{}, err
	}
	a.log.Info("filesystem snapshot taken", "sandbox", id, "snapshot", snapID, "mib", info.Bytes>>20, "frozen", time.Since(t0).Round(time.Millisecond))
	return info, nil
}

// RemoveSnapshot removes a snapshot's files; one this node does not have is not an error.
func (a *Agent) RemoveSnapshot(snapID string) error {
	if !routes.ValidSandbox(snapID) {
		return fmt.Errorf("%q is not a snapshot ID", snapID)
	}
	return os.RemoveAll(a.snapshotDir(snapID))
}

// snapshotScratch is the scratch disk a start from snapshot snapID copies, after checking
// the snapshot is of the image the start pulled.
func (a *Agent) snapshotScratch(snapID, digest string) (string, error) {
	if !routes.ValidSandbox(snapID) {
		return "", fmt.Errorf("%q is not a snapshot ID", snapID)
	}
	b, err := os.ReadFile(filepath.Join(a.snapshotDir(snapID), snapshotMeta))
	if err != nil {
		return "", fmt.Errorf("snapshot %s is not on node %s: %v", snapID, a.cfg.Node, err)
	}
	var info SnapshotInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return "", fmt.Errorf("snapshot %s: %s: %v", snapID, snapshotMeta, err)
	}
	if info.ImageDigest != digest {
		return "", fmt.Errorf("snapshot %s was taken of image %s, the start pulled %s (the tag moved?)", snapID, info.ImageDigest, digest)
	}
	return filepath.Join(a.snapshotDir(snapID), "scratch.img"), nil
}
