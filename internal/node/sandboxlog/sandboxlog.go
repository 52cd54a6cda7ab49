// Package sandboxlog stores a sandbox's output (stdout and stderr kept apart) in one
// append-only file and lets any number of readers replay it from the start and follow it
// while it grows. Attach and `logs -f` both read through it, so output produced before a
// client connects is never lost.
package sandboxlog

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// Stream numbers match the API's Output.stream.
const (
	Stdout = 1
	Stderr = 2
)

// maxRecord bounds one record so a corrupt file cannot make a reader allocate without limit.
const maxRecord = 1 << 20

// Writer appends records. It is safe for concurrent use.
type Writer struct {
	mu        sync.Mutex
	f         *os.File
	closed    bool
	notify    chan struct{} // closed and replaced on every append and on Close
	size      int64         // bytes in the file
	limit     int64         // 0 = none
	truncated bool
	dropped   int64
	budget    *Budget // shared with the owner's other logs, or nil
}

// Budget bounds the bytes several logs take together (one owner's on a node). It is
// charged as they are written and credited when a log is removed.
type Budget struct {
	mu          sync.Mutex
	limit, used int64
}

// NewBudget returns a budget of limit bytes, used bytes of it taken already.
func NewBudget(limit, used int64) *Budget { return &Budget{limit: limit, used: used} }

// take reserves up to n bytes and returns how many it got.
func (b *Budget) take(n int64) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	got := min(n, max(b.limit-b.used, 0))
	b.used += got
	return got
}

// Charge takes n bytes whatever the limit (a log that exists already).
func (b *Budget) Charge(n int64) {
	b.mu.Lock()
	b.used += n
	b.mu.Unlock()
}

// Give returns n bytes (a removed log's).
func (b *Budget) Give(n int64) {
	b.mu.Lock()
	b.used = max(b.used-n, 0)
	b.mu.Unlock()
}

// Used is the bytes taken.
func (b *Budget) Used() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// SetBudget makes w charge what it writes to b too (and stop at b's limit as at its own).
func (w *Writer) SetBudget(b *Budget) {
	w.mu.Lock()
	w.budget = b
	w.mu.Unlock()
}

// Create opens path for appending (creating it if needed), without a size limit.
func Create(path string) (*Writer, error) { return CreateLimited(path, 0) }

// CreateLimited opens path for appending with a cap on the file's size: the output of an
// untrusted guest must not be able to fill the host's disk. Past the cap, output is
// counted and discarded (writes still succeed, so the guest is never blocked on a full
// pipe), after one notice on the stderr stream.
func CreateLimited(path string, limit int64) (*Writer, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open sandbox log %s: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat sandbox log %s: %w", path, err)
	}
	return &Writer{f: f, notify: make(chan struct{}), size: fi.Size(), limit: limit}, nil
}

// Dropped is how many bytes of output were discarded because of the size limit.
func (w *Writer) Dropped() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dropped
}

// TruncationNotice is the stderr record written when the log reaches its limit.
func TruncationNotice(limit int64) string {
	return fmt.Sprintf("\n[fireworks: output exceeded the %d MiB log limit; further output is discarded]\n", limit>>20)
}

// Write appends data as one or more records of the given stream.
func (w *Writer) Write(stream int, data []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return errors.New("sandbox log is closed")
	}
	if w.truncated {
		w.dropped += int64(len(data))
		return nil
	}
	notice := ""
	if w.limit > 0 {
		if room := w.limit - w.size - 5*int64(len(data)/maxRecord+1); int64(len(data)) > room {
			keep := max(room, 0)
			w.dropped += int64(len(data)) - keep
			data = data[:keep]
			w.truncated, notice = true, TruncationNotice(w.limit)
		}
	}
	if w.budget != nil && len(data) > 0 {
		want := int64(len(data)) + 5*int64(len(data)/maxRecord+1)
		if got := w.budget.take(want); got < want {
			keep := max(got-5*int64(len(data)/maxRecord+1), 0)
			w.dropped += int64(len(data)) - keep
			data = data[:keep]
			w.truncated, notice = true, OwnerBudgetNotice
		}
	}
	if notice != "" {
		// The notice may take the file slightly past the limit; it is small.
		defer func() { _ = w.writeRecords(Stderr, []byte(notice)) }()
	}
	return w.writeRecords(stream, data)
}

// OwnerBudgetNotice is the stderr record written when the owner's logs on the node reach
// their budget.
const OwnerBudgetNotice = "\n[fireworks: this token's sandbox logs on this node reached their limit; further output is discarded (remove finished sandboxes to make room)]\n"

// writeRecords appends data as records and wakes followers. Called with w.mu held.
func (w *Writer) writeRecords(stream int, data []byte) error {
	for len(data) > 0 {
		n := min(len(data), maxRecord)
		var hdr [5]byte
		hdr[0] = byte(stream)
		binary.BigEndian.PutUint32(hdr[1:], uint32(n))
		// One write per record keeps records whole for concurrent readers of a regular file.
		buf := append(hdr[:], data[:n]...)
		if _, err := w.f.Write(buf); err != nil {
			return fmt.Errorf("append to sandbox log %s: %w", w.f.Name(), err)
		}
		w.size += int64(len(buf))
		data = data[n:]
	}
	close(w.notify)
	w.notify = make(chan struct{})
	return nil
}

// StreamWriter adapts one stream to io.Writer.
func (w *Writer) StreamWriter(stream int) io.Writer { return streamWriter{w, stream} }

type streamWriter struct {
	w      *Writer
	stream int
}

func (s streamWriter) Write(p []byte) (int, error) {
	if err := s.w.Write(s.stream, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Changed returns a channel closed at the next append or at Close.
func (w *Writer) Changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.notify
}

// Close marks the log complete: followers drain it and stop.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	close(w.notify)
	return w.f.Close()
}

// Done reports whether Close was called.
func (w *Writer) Done() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.closed
}

// Record is one chunk of output.
type Record struct {
	Stream int
	Data   []byte
}

// Read replays path from the start, calling fn for each record. When live is non-nil the
// reader follows the file until live is closed (Done) and everything written is read, or
// ctx ends. A missing file with no live writer is an empty log.
func Read(ctx context.Context, path string, live *Writer, fn func(Record) error) error {
	var f *os.File
	for {
		var err error
		f, err = os.Open(path)
		if err == nil {
			break
		}
		if !errors.Is(err, os.ErrNotExist) || live == nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("open sandbox log %s: %w", path, err)
		}
		changed := live.Changed()
		if live.Done() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 64<<10)
	var pending []byte // a partially written record seen at EOF
	for {
		var changed <-chan struct{}
		var done bool
		if live != nil {
			// Take the notification channel before reading so an append that races with
			// our EOF still wakes us.
			changed = live.Changed()
			done = live.Done()
		}
		for {
			rec, rest, err := next(r, pending)
			pending = rest
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("read sandbox log %s: %w", path, err)
			}
			if err := fn(rec); err != nil {
				return err
			}
		}
		if live == nil || done {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// next decodes one record, carrying partial bytes across EOF so a follower never sees a
// torn record.
func next(r *bufio.Reader, pending []byte) (Record, []byte, error) {
	for len(pending) < 5 {
		b, err := r.ReadByte()
		if err != nil {
			return Record{}, pending, err
		}
		pending = append(pending, b)
	}
	n := int(binary.BigEndian.Uint32(pending[1:5]))
	if n > maxRecord || (pending[0] != Stdout && pending[0] != Stderr) {
		return Record{}, nil, fmt.Errorf("corrupt record header (stream %d, length %d)", pending[0], n)
	}
	for len(pending) < 5+n {
		buf := make([]byte, 5+n-len(pending))
		k, err := r.Read(buf)
		pending = append(pending, buf[:k]...)
		if err != nil {
			if len(pending) == 5+n {
				break
			}
			return Record{}, pending, err
		}
	}
	rec := Record{Stream: int(pending[0]), Data: append([]byte(nil), pending[5:5+n]...)}
	return rec, pending[:0:0], nil
}
