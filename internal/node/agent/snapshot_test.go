package agent

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// SweepSnapshots lets go of snapshot files the state does not record on the node, once
// they are older than any create in progress could be; recorded ones, recent ones and
// names no create makes stay.
func TestSweepSnapshots(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{DataDir: dir}, log: slog.New(slog.DiscardHandler), snaps: localSnapshots{root: filepath.Join(dir, "snapshots")}}
	root := filepath.Join(dir, "snapshots")
	old := time.Now().Add(-2 * snapshotSweepAge)
	for name, age := range map[string]time.Time{
		"aaaaaaaaaaaaaaaa":     old,        // recorded
		"bbbbbbbbbbbbbbbb":     old,        // not recorded: a crash between copy and record
		"cccccccccccccccc":     time.Now(), // not recorded yet: a create in progress
		"dddddddddddddddd.tmp": old,        // a create's leftover
		"lost+found":           old,        // not a snapshot's
	} {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, age, age); err != nil {
			t.Fatal(err)
		}
	}
	a.SweepSnapshots([]string{"aaaaaaaaaaaaaaaa"})
	for name, want := range map[string]bool{"aaaaaaaaaaaaaaaa": true, "bbbbbbbbbbbbbbbb": false, "cccccccccccccccc": true,
		"dddddddddddddddd.tmp": false, "lost+found": true} {
		_, err := os.Stat(filepath.Join(root, name))
		if got := err == nil; got != want {
			t.Errorf("%s: kept %v, want %v", name, got, want)
		}
	}
}

// Saves under way count against the node's budget: of two at once that fit only one by
// one, the second is refused until the first lets go.
func TestSavedRoomHoldsSavesUnderWay(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{DataDir: dir, SavedDiskMiB: 100}, log: slog.New(slog.DiscardHandler), snaps: localSnapshots{root: filepath.Join(dir, "snapshots")}}
	release, err := a.savedRoom(60 << 20)
	if err != nil {
		t.Fatalf("a first save within the budget: %v", err)
	}
	if _, err := a.savedRoom(60 << 20); !errors.Is(err, ErrSavedDiskFull) {
		t.Errorf("a second save at once past the budget: %v", err)
	}
	release()
	release() // once only
	if r, err := a.savedRoom(60 << 20); err != nil {
		t.Errorf("after the first let go: %v", err)
	} else {
		r()
	}
}
