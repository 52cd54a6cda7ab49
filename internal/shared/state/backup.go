package state

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/hashicorp/raft"
)

// A state file is a backup of the whole replicated state (`fireworks state snapshot`):
// one header line of JSON, then the state as the FSM snapshots it. The header says where
// the state was taken and carries the payload's size and SHA-256, so a restore refuses a
// truncated or altered file before it changes anything.

// StateFormat names the file format in its header.
const StateFormat = "fireworks-state/1"

// MaxStateBytes bounds a state file's payload a server accepts for a restore (it is
// checked whole in memory before raft takes it). The state is metadata: tens of MiB for
// tens of thousands of sandboxes.
const MaxStateBytes = 256 << 20

// maxStateHeader bounds the header line.
const maxStateHeader = 4 << 10

// StateHeader is the first line of a state file.
type StateHeader struct {
	Format  string    `json:"format"`
	Index   uint64    `json:"index"` // the last log entry the state includes
	TakenAt time.Time `json:"taken_at"`
	Server  string    `json:"server,omitempty"` // the server that wrote it
	Size    int64     `json:"size"`
	SHA256  string    `json:"sha256"`
}

// StateSummary counts what a state file holds.
type StateSummary struct {
	Header    StateHeader
	Sandboxes int
	Nodes     int
	Tokens    int
}

// SnapshotState writes a state file of the whole state to w. The state is read after a
// linearizable barrier, so it holds every change committed before the call.
func (s *Store) SnapshotState(ctx context.Context, w io.Writer) (StateHeader, error) {
	if err := s.read(ctx); err != nil {
		return StateHeader{}, fmt.Errorf("snapshot state: %w", err)
	}
	s.fsm.mu.RLock()
	index := s.fsm.index
	s.fsm.mu.RUnlock()
	snap, err := s.fsm.Snapshot()
	if err != nil {
		return StateHeader{}, fmt.Errorf("snapshot state: %w", err)
	}
	var payload bytes.Buffer
	if err := snap.(*fsmSnapshot).write(&payload); err != nil {
		return StateHeader{}, fmt.Errorf("snapshot state: %w", err)
	}
	sum := sha256.Sum256(payload.Bytes())
	h := StateHeader{Format: StateFormat, Index: index, TakenAt: time.Now().UTC(), Server: s.id,
		Size: int64(payload.Len()), SHA256: hex.EncodeToString(sum[:])}
	line, err := json.Marshal(h)
	if err != nil {
		return StateHeader{}, err
	}
	if _, err := w.Write(append(line, '\n')); err != nil {
		return StateHeader{}, fmt.Errorf("write state file: %w", err)
	}
	if _, err := w.Write(payload.Bytes()); err != nil {
		return StateHeader{}, fmt.Errorf("write state file: %w", err)
	}
	return h, nil
}

// ReadStateFile reads and checks a whole state file from r: the header, the payload's
// size and checksum, and that the payload is a state this server can load. It returns
// the payload and what it holds.
func ReadStateFile(r io.Reader) ([]byte, StateSummary, error) {
	br := bufio.NewReaderSize(r, maxStateHeader)
	line, err := br.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, StateSummary{}, fmt.Errorf("%w: state file header is longer than %d bytes (not a state file?)", ErrInvalid, maxStateHeader)
		}
		return nil, StateSummary{}, fmt.Errorf("%w: state file has no header line: %v", ErrInvalid, err)
	}
	var h StateHeader
	if err := json.Unmarshal(line, &h); err != nil || h.Format == "" {
		return nil, StateSummary{}, fmt.Errorf("%w: state file header is not a %s header", ErrInvalid, StateFormat)
	}
	if h.Format != StateFormat {
		return nil, StateSummary{}, fmt.Errorf("%w: state file format %q, this server reads %q", ErrInvalid, h.Format, StateFormat)
	}
	if h.Size <= 0 || h.Size > MaxStateBytes {
		return nil, StateSummary{}, fmt.Errorf("%w: state file payload of %d bytes (limit %d)", ErrInvalid, h.Size, MaxStateBytes)
	}
	// Read as it arrives (not allocated at the header's word), one byte past the size to
	// catch trailing data.
	payload, err := io.ReadAll(io.LimitReader(br, h.Size+1))
	switch {
	case err != nil:
		return nil, StateSummary{}, fmt.Errorf("%w: read state file: %v", ErrInvalid, err)
	case int64(len(payload)) < h.Size:
		return nil, StateSummary{}, fmt.Errorf("%w: state file is truncated (%d of %d payload bytes)", ErrInvalid, len(payload), h.Size)
	case int64(len(payload)) > h.Size:
		return nil, StateSummary{}, fmt.Errorf("%w: state file has bytes after its %d-byte payload", ErrInvalid, h.Size)
	}
	if sum := sha256.Sum256(payload); hex.EncodeToString(sum[:]) != h.SHA256 {
		return nil, StateSummary{}, fmt.Errorf("%w: state file checksum does not match its header (altered or corrupt)", ErrInvalid)
	}
	// Loaded into a scratch state machine: what the servers would fail on fails here.
	f := newFSM(slog.New(slog.DiscardHandler))
	if err := f.Restore(io.NopCloser(bytes.NewReader(payload))); err != nil {
		return nil, StateSummary{}, fmt.Errorf("%w: state file: %v", ErrInvalid, err)
	}
	return payload, StateSummary{Header: h, Sandboxes: len(f.sandboxes), Nodes: len(f.nodes), Tokens: len(f.tokens)}, nil
}

// restoredCmd records a restore in the audit log (the restore itself replaced the log).
type restoredCmd struct {
	Index   uint64    `json:"index"`
	TakenAt time.Time `json:"taken_at"`
	SHA256  string    `json:"sha256"`
}

func (c restoredCmd) audit() (string, string) {
	return "state", fmt.Sprintf("restored a state file taken at %s (index %d, sha256 %.12s)", c.TakenAt.UTC().Format(time.RFC3339), c.Index, c.SHA256)
}

// RestoreState replaces the whole state, on every server, with a state file's (checked
// whole first). Only the leader restores: raft installs the state as a snapshot that
// followers receive. Everything in the state is the file's afterwards: sandboxes, nodes,
// tokens (the caller's own token may be gone), the audit log, to which the restore is
// then added.
func (s *Store) RestoreState(ctx context.Context, r io.Reader) (StateSummary, error) {
	payload, sum, err := ReadStateFile(r)
	if err != nil {
		return StateSummary{}, err
	}
	// Revocations made since the file was taken stay made: tokens revoked and nodes
	// removed in this cluster are revoked and removed again after the restore (a restore
	// after an incident must not re-admit what was shut out). A new cluster has none.
	s.fsm.mu.RLock()
	tombs, removed := maps.Clone(s.fsm.tokenTombs), maps.Clone(s.fsm.removed)
	s.fsm.mu.RUnlock()
	if err := s.enter(); err != nil {
		return StateSummary{}, err
	}
	// The file's index: raft then continues past it, so entries written after the restore
	// keep indexes above the restored audit log's (even in a younger cluster).
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Size: int64(len(payload)), Index: sum.Header.Index}
	err = s.raft.Restore(meta, bytes.NewReader(payload), timeoutOf(ctx, 5*time.Minute))
	s.mu.RUnlock()
	if err != nil {
		return StateSummary{}, fmt.Errorf("restore state: %w", err)
	}
	// The next read of this term must wait for the restored state like a new leader's.
	s.readyTerm.Store(0)
	c := restoredCmd{Index: sum.Header.Index, TakenAt: sum.Header.TakenAt, SHA256: sum.Header.SHA256}
	if _, err := s.apply(ctx, cmdRestored, c); err != nil {
		return sum, fmt.Errorf("state restored, but recording the restore failed (the revocations made since the file was taken must be checked by hand: tokens %d, nodes %d): %w", len(tombs), len(removed), err)
	}
	var errs []error
	for _, id := range slices.Sorted(maps.Keys(tombs)) {
		if _, err := s.fsm.getToken(id); err != nil {
			continue // not in the file
		}
		if _, err := s.apply(ctx, cmdDeleteToken, deleteTokenCmd{ID: id, Time: time.Now()}); err != nil && !errors.Is(err, ErrNotFound) {
			errs = append(errs, fmt.Errorf("revoke token %s again: %w", id, err))
		}
	}
	for _, node := range slices.Sorted(maps.Keys(removed)) {
		s.fsm.mu.RLock()
		_, known := s.fsm.nodes[node]
		_, gone := s.fsm.removed[node]
		s.fsm.mu.RUnlock()
		if known || !gone || s.HasLiveCerts(node, time.Now()) {
			if _, err := s.apply(ctx, cmdRemoveNode, removeNodeCmd{ID: node, Time: time.Now()}); err != nil && !errors.Is(err, ErrNotFound) {
				errs = append(errs, fmt.Errorf("remove node %s again: %w", node, err))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return sum, fmt.Errorf("state restored, but not every revocation made since the file was taken was made again: %w", err)
	}
	s.log.Info("state restored from a state file", "taken_at", sum.Header.TakenAt, "index", sum.Header.Index, "sandboxes", sum.Sandboxes)
	return sum, nil
}
