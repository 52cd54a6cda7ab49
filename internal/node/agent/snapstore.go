package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// SnapshotStore keeps named snapshots' files: the seam between the agent and where
// snapshots live. Today that is the node's own disk (localSnapshots): a snapshot is
// started on the node that took it, and goes with that node. When a cluster outgrows its
// nodes' disks, or snapshots must outlive nodes, an object store (S3-compatible: one
// object per file, sparse files as extents, as savedstream sends them) implements it:
// Keep uploads, Open downloads into the node's cache (and a start from a snapshot may
// then be placed on any node), Remove deletes the objects. See README, "Snapshots".
//
// A snapshot's files are assembled by the agent in Stage(id), then handed over with
// Keep; starts read them from Open(id), which is Path(id) on this node.
type SnapshotStore interface {
	// Stage returns an empty directory on this node to assemble snapshot id in.
	Stage(id string) (string, error)
	// Keep takes what was staged for id as snapshot id (the staging directory is
	// consumed) and returns the bytes it takes.
	Keep(ctx context.Context, id string) (int64, error)
	// Unstage drops what was staged for id (a create that failed).
	Unstage(id string)
	// Open makes snapshot id's files available at Path(id), fetching them if the store
	// is not on this node's disk.
	Open(ctx context.Context, id string) (string, error)
	// Path is where snapshot id's files are on this node once opened.
	Path(id string) string
	// Remove lets snapshot id go; one the store does not have is not an error.
	Remove(ctx context.Context, id string) error
	// List names the snapshots kept, with when each was kept (the sweep compares them
	// with what the state records).
	List() ([]StoredSnapshot, error)
	// NodeBytes is the node disk the store takes (the node's budget for saved states
	// and snapshots counts it).
	NodeBytes() int64
}

// StoredSnapshot is one snapshot a SnapshotStore keeps.
type StoredSnapshot struct {
	ID   string
	Kept time.Time
}

// localSnapshots keeps snapshots in a directory of the node's disk (<data>/snapshots),
// one directory per snapshot; staging directories end in ".tmp".
type localSnapshots struct{ root string }

var _ SnapshotStore = localSnapshots{}

func (l localSnapshots) Path(id string) string { return filepath.Join(l.root, id) }

func (l localSnapshots) Stage(id string) (string, error) {
	if !routes.ValidSandbox(id) {
		return "", fmt.Errorf("%q is not a snapshot ID", id)
	}
	if _, err := os.Stat(l.Path(id)); err == nil {
		return "", fmt.Errorf("snapshot %s exists on this node already", id)
	}
	tmp := l.Path(id) + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return "", err
	}
	return tmp, nil
}

func (l localSnapshots) Keep(ctx context.Context, id string) (int64, error) {
	tmp := l.Path(id) + ".tmp"
	if err := syncDir(tmp); err != nil {
		return 0, err
	}
	n := dirSize(tmp)
	if err := ctx.Err(); err != nil {
		return 0, err // nobody waits for it: nothing is kept
	}
	if err := os.Rename(tmp, l.Path(id)); err != nil {
		return 0, err
	}
	return n, nil
}

func (l localSnapshots) Unstage(id string) { _ = os.RemoveAll(l.Path(id) + ".tmp") }

func (l localSnapshots) Open(_ context.Context, id string) (string, error) {
	if !routes.ValidSandbox(id) {
		return "", fmt.Errorf("%q is not a snapshot ID", id)
	}
	if _, err := os.Stat(l.Path(id)); err != nil {
		return "", fmt.Errorf("snapshot %s: %w", id, err)
	}
	return l.Path(id), nil
}

func (l localSnapshots) Remove(_ context.Context, id string) error {
	if !routes.ValidSandbox(id) {
		return fmt.Errorf("%q is not a snapshot ID", id)
	}
	return errors.Join(os.RemoveAll(l.Path(id)), os.RemoveAll(l.Path(id)+".tmp"))
}

// List includes staging directories (by the ID they stage), so that a crashed create's
// leftovers are swept too.
func (l localSnapshots) List() ([]StoredSnapshot, error) {
	entries, err := os.ReadDir(l.root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []StoredSnapshot
	for _, e := range entries {
		id, _ := strings.CutSuffix(e.Name(), ".tmp")
		if !routes.ValidSandbox(id) {
			continue // not a snapshot's (never made by this node)
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		out = append(out, StoredSnapshot{ID: id, Kept: fi.ModTime()})
	}
	return out, nil
}

func (l localSnapshots) NodeBytes() int64 { return dirSize(l.root) }
