package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Moving a volume to another node (an admin's `volume move`, or a drain of its node):
// the control plane records the move (no sandbox may mount the volume meanwhile, and
// none does), tells this node, which holds it, to let the new node have it
// (ExportVolume: unmounted, kept so until the move ends), then tells the new node to
// fetch it (ImportVolume), node to node over the cluster's mutual TLS, sparse, in the
// saved-state stream's format; the new node checks the filesystem before it takes it.
// Once the move is recorded, this node's copy is removed.

// VolumeFetcher opens the stream of volume id's image from node (at address), which
// holds it. The agent's process provides it (it holds the node's certificate).
type VolumeFetcher func(ctx context.Context, node, address, id string) (io.ReadCloser, error)

// volumeExportTTL bounds how long an export waits for its fetch: a move the control
// plane never ended (its server died) gives the volume back to this node then. It is
// longer than the servers give an import (2 h), so that no copy is under way when it
// ends (the volume could be mounted again then).
const volumeExportTTL = 3 * time.Hour

// volumeStreamName names a volume's image in its stream.
const volumeStreamName = "volume.ext4"

// ExportVolume lets node to fetch volume id's data for a move (to "" ends that: the
// move was given up). The volume is unmounted, and is not mounted again here until the
// move ends.
func (a *Agent) ExportVolume(ctx context.Context, id, to string) error {
	if to == "" {
		a.vms.setExport(id, "", time.Time{})
		return nil
	}
	if err := a.mountedHere(id); err != nil {
		return err
	}
	// The control plane moves only a volume no sandbox mounts; a relayed server of one
	// that ended goes with the assignment set that says so, which may come a moment
	// after: it is waited for, a little.
	for deadline := time.Now().Add(10 * time.Second); a.relayedVolumes()[id]; {
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: volume %s is mounted by a sandbox on another node", state.ErrInUse, id)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		if all, err := a.store.ListSandboxes(ctx); err == nil {
			a.sweepRelays(all)
		}
	}
	a.vms.setExport(id, to, time.Now().Add(volumeExportTTL))
	if _, err := a.vms.volumes.Export(ctx, id); err != nil {
		a.vms.setExport(id, "", time.Time{})
		return fmt.Errorf("export volume %s: %w", id, err)
	}
	a.log.Info("volume exported for a move", "volume", id, "to", to)
	return nil
}

// setExport records (or, with to "", forgets) that volume id is exported to node to
// until until.
func (m *vms) setExport(id, to string, until time.Time) {
	m.exportMu.Lock()
	defer m.exportMu.Unlock()
	if to == "" {
		delete(m.exports, id)
		return
	}
	if m.exports == nil {
		m.exports = map[string]volumeExport{}
	}
	m.exports[id] = volumeExport{to: to, until: until}
}

type volumeExport struct {
	to    string
	until time.Time
}

// exportedTo is the node volume id is exported to ("" if none, or its time is over).
func (m *vms) exportedTo(id string) string {
	m.exportMu.Lock()
	defer m.exportMu.Unlock()
	e, ok := m.exports[id]
	if !ok || time.Now().After(e.until) {
		return ""
	}
	return e.to
}

// SendVolume writes volume id's image to w for node peer, to which it is exported.
func (a *Agent) SendVolume(ctx context.Context, id, peer string, w io.Writer) error {
	if to := a.vms.exportedTo(id); to == "" || to != peer {
		return fmt.Errorf("volume %s is not being moved to node %s", id, peer)
	}
	path, err := a.vms.volumes.Export(ctx, id)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	if err := writeSparse(bw, volumeStreamName, path); err != nil {
		return err
	}
	if err := writeName(bw, ""); err != nil {
		return err
	}
	return bw.Flush()
}

// ImportVolume fetches volume id (of sizeMiB) from node from (at fromAddress), which
// exported it to this node, and keeps it here.
func (a *Agent) ImportVolume(ctx context.Context, id string, sizeMiB int, from, fromAddress string) error {
	if a.cfg.FetchVolume == nil {
		return fmt.Errorf("volume %s is on node %s, and this node cannot fetch from other nodes", id, from)
	}
	rc, err := a.cfg.FetchVolume(ctx, from, fromAddress, id)
	if err != nil {
		return fmt.Errorf("fetch volume %s from node %s: %w", id, from, err)
	}
	defer rc.Close()
	err = a.vms.volumes.Import(ctx, id, sizeMiB, func(f *os.File) error {
		return readVolumeStream(bufio.NewReaderSize(rc, 1<<20), f, uint64(sizeMiB)<<20)
	})
	if err != nil {
		return fmt.Errorf("%w: fetch volume %s from node %s: %v", state.ErrInvalid, id, from, err)
	}
	a.log.Info("volume imported", "volume", id, "from", from, "size_mib", sizeMiB)
	return nil
}

// readVolumeStream reads a volume's image stream into f, which is size bytes: one file,
// named volumeStreamName, of that size, then the end.
func readVolumeStream(r io.Reader, f *os.File, size uint64) error {
	name, err := readName(r)
	if err != nil {
		return err
	}
	if name != volumeStreamName {
		return fmt.Errorf("volume stream: unexpected file %q", name)
	}
	var got uint64
	if err := binary.Read(r, binary.BigEndian, &got); err != nil {
		return err
	}
	if got != size {
		return fmt.Errorf("volume stream: %d bytes, the volume has %d", got, size)
	}
	if err := readExtents(r, f, size); err != nil {
		return fmt.Errorf("volume stream: %w", err)
	}
	if name, err = readName(r); err != nil || name != "" {
		return fmt.Errorf("volume stream: no end after the image (%q, %v)", name, err)
	}
	return nil
}
