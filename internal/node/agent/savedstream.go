package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Moving a paused sandbox's saved state to the node that resumes it: the holder streams
// the files of sandboxes/<id>/saved/ to the resuming node (over the cluster's mutual TLS,
// see SavedFetcher and ServeSaved), sparse: a scratch disk of gigabytes that holds a few
// megabytes sends those. The stream is, per file: its name and size, then extents
// (offset, length, bytes) ending with a zero length; then an empty name.

// SavedFetcher opens the stream of sandbox id's saved state from the node that holds it
// (from). The agent's process provides it (it holds the node's certificate); a node
// without one (fireworks dev: one node) cannot resume a sandbox saved elsewhere.
type SavedFetcher func(ctx context.Context, from state.Saved, id string) (io.ReadCloser, error)

// savedFiles are the files a saved state is made of; nothing else is sent or accepted.
var savedFileNames = []string{savedRecordFile, "state", "scratch.img"}

// savedLimits bound the files of a saved state as received: the record, the VM's state
// (its RAM and devices, as Save bounds it) and the scratch disk (the node's own size).
func (a *Agent) savedLimits(memMiB int) map[string]uint64 {
	mem := uint64(memMiB) << 20
	return map[string]uint64{savedRecordFile: maxSavedRecord, "state": mem + mem/256 + 128<<20, "scratch.img": uint64(a.vms.scratchMiB) << 20}
}

// MaySendSaved says whether node peer may have sandbox id's saved state: this node holds
// it, and the control plane placed the sandbox on peer to resume it. Anyone else is
// refused.
//
// The resuming node may ask before this node's assignments show the resume (they are
// the same commit, on two streams): it is waited for, a little.
func (a *Agent) MaySendSaved(ctx context.Context, id, peer string) (dir string, err error) {
	deadline := time.Now().Add(savedPeerWait)
	for {
		dir, err := a.maySendSaved(ctx, id, peer)
		if err == nil || time.Now().After(deadline) {
			return dir, err
		}
		select {
		case <-ctx.Done():
			return "", err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// savedPeerWait bounds how long MaySendSaved waits for the assignments to show a resume.
const savedPeerWait = 10 * time.Second

func (a *Agent) maySendSaved(ctx context.Context, id, peer string) (string, error) {
	sb, err := a.store.GetSandbox(ctx, id)
	if err != nil {
		return "", fmt.Errorf("sandbox %s: %w", id, err)
	}
	switch {
	case sb.ID != id || sb.FilesOn() != a.cfg.Node:
		return "", fmt.Errorf("this node holds no saved state sandbox %s starts from", id)
	case sb.Node != peer || (sb.Status != state.StatusPending && sb.Status != state.StatusStarting):
		return "", fmt.Errorf("sandbox %s is not being started on node %s", id, peer)
	}
	dir := a.savedDir(id)
	if sb.Saved == nil {
		dir = a.savedDir(sb.Spec.ForkOf) // a fork's source's
	}
	if _, err := os.Stat(filepath.Join(dir, savedRecordFile)); err != nil {
		return "", fmt.Errorf("the saved state sandbox %s starts from is not on this node: %v", id, err)
	}
	return dir, nil
}

// SendSaved writes the stream of the saved state in dir to w (after MaySendSaved).
func (a *Agent) SendSaved(dir string, w io.Writer) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	for _, name := range savedFileNames {
		if err := writeSparse(bw, name, filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	if err := writeName(bw, ""); err != nil {
		return err
	}
	return bw.Flush()
}

func writeName(w io.Writer, name string) error {
	if err := binary.Write(w, binary.BigEndian, uint16(len(name))); err != nil {
		return err
	}
	_, err := io.WriteString(w, name)
	return err
}

// writeSparse writes one file: its data extents only (SEEK_DATA/SEEK_HOLE).
func writeSparse(w io.Writer, name, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	if err := writeName(w, name); err != nil {
		return err
	}
	if err := binary.Write(w, binary.BigEndian, uint64(size)); err != nil {
		return err
	}
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("%s: find data: %w", name, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("%s: find hole: %w", name, err)
		}
		if err := binary.Write(w, binary.BigEndian, [2]uint64{uint64(data), uint64(hole - data)}); err != nil {
			return err
		}
		if _, err := io.Copy(w, io.NewSectionReader(f, data, hole-data)); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		off = hole
	}
	return binary.Write(w, binary.BigEndian, [2]uint64{0, 0})
}

// readSaved reads a saved-state stream into dir; what does not follow the format (an
// unknown or repeated file, an extent outside its file, a file past maxSavedFile) is
// refused. All of the saved files must come.
func readSaved(r io.Reader, dir string, limits map[string]uint64) error {
	br := bufio.NewReaderSize(r, 1<<20)
	var got []string
	for {
		name, err := readName(br)
		if err != nil {
			return fmt.Errorf("saved state stream: %w", err)
		}
		if name == "" {
			break
		}
		if !slices.Contains(savedFileNames, name) || slices.Contains(got, name) {
			return fmt.Errorf("saved state stream: unexpected file %q", name)
		}
		got = append(got, name)
		if err := readSparse(br, filepath.Join(dir, name), limits[name]); err != nil {
			return fmt.Errorf("saved state stream, %s: %w", name, err)
		}
	}
	if len(got) != len(savedFileNames) {
		return fmt.Errorf("saved state stream: got %v, want %v", got, savedFileNames)
	}
	return nil
}

func readSparse(r io.Reader, path string, limit uint64) error {
	var size uint64
	if err := binary.Read(r, binary.BigEndian, &size); err != nil {
		return err
	}
	if size > limit {
		return fmt.Errorf("%d bytes, more than the %d this file of a saved state may hold", size, limit)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		return err
	}
	if err := readExtents(r, f, size); err != nil {
		return err
	}
	return f.Sync()
}

// readName reads a file's name in a stream ("" ends the stream).
func readName(r io.Reader) (string, error) {
	var n uint16
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return "", err
	}
	name := make([]byte, n)
	if _, err := io.ReadFull(r, name); err != nil {
		return "", err
	}
	return string(name), nil
}

// readExtents reads a file's extents into f, of size bytes (sized already), until the
// end mark; an extent outside it, or out of order, is refused.
func readExtents(r io.Reader, f *os.File, size uint64) error {
	end := uint64(0)
	for {
		var ext [2]uint64
		if err := binary.Read(r, binary.BigEndian, &ext); err != nil {
			return err
		}
		off, n := ext[0], ext[1]
		if n == 0 {
			break
		}
		if off < end || off > size || n > size-off {
			return fmt.Errorf("extent %d+%d outside the file's %d bytes or out of order", off, n, size)
		}
		if _, err := io.Copy(io.NewOffsetWriter(f, int64(off)), io.LimitReader(r, int64(n))); err != nil {
			return err
		}
		end = off + n
	}
	return nil
}

// fetchSaved brings the saved state sandbox sb starts from, from the node that holds it
// (from), into final.
func (a *Agent) fetchSaved(ctx context.Context, sb state.Sandbox, from state.Saved, final string) error {
	if a.cfg.FetchSaved == nil {
		return fmt.Errorf("the saved state is on node %s, and this node cannot fetch from other nodes", from.Node)
	}
	rc, err := a.cfg.FetchSaved(ctx, from, sb.ID)
	if err != nil {
		return fmt.Errorf("fetch the saved state from node %s: %w", from.Node, err)
	}
	defer rc.Close()
	tmp := final + ".fetch"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := readSaved(rc, tmp, a.savedLimits(sb.Spec.Reserved().MemoryMiB)); err != nil {
		return fmt.Errorf("fetch the saved state from node %s: %w", from.Node, err)
	}
	if err := syncDir(tmp); err != nil {
		return err
	}
	_ = os.RemoveAll(final)
	return os.Rename(tmp, final)
}
