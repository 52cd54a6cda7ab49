package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// ErrSessionExited is returned by stdin writes after the process exited.
var ErrSessionExited = errors.New("session exited")

// Session is a process running in the guest. Its Stdout and Stderr must be
// drained (or the session Closed): the guest stops sending once a stream's
// window is full, and the exit is reported only after all output.
type Session struct {
	c          *Client
	id         uint32
	tty        bool // for Reattach: set by the read loop before any output
	stdin      bool
	reattached bool

	started chan struct{} // closed on Started or Exit
	exitCh  chan struct{} // closed on Exit

	mu          sync.Mutex
	pid         int
	exit        proto.ExitStatus
	exited      bool
	abandoned   bool
	stdinCredit int
	stdinClosed bool
	stdinKick   chan struct{}
	// stdinDone is closed when stdin is closed or the session is: a Write waiting
	// for credit the guest never grants returns then, instead of blocking for good.
	stdinDone     chan struct{}
	stdinDoneOnce sync.Once

	out [2]*stream
}

// Exec starts req in the guest. It returns once the guest started the
// process or reported that it could not (then Wait returns an ExitStatus
// with ErrKind set: not_found, not_executable or setup).
func (c *Client) Exec(ctx context.Context, req proto.ExecRequest) (*Session, error) {
	s := newSession(c, req.TTY, req.Stdin)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("exec %q: %w", first(req.Argv), err)
	}
	if len(c.sessions) >= c.opts.MaxSessions {
		c.mu.Unlock()
		return nil, fmt.Errorf("exec %q: too many sessions (%d)", first(req.Argv), c.opts.MaxSessions)
	}
	s.id = c.allocIDLocked()
	c.sessions[s.id] = s
	c.mu.Unlock()

	f, err := proto.JSONFrame(proto.TypeExec, s.id, req)
	if err == nil {
		err = c.send(ctx, f)
	}
	if err == nil {
		select {
		case <-s.started:
			return s, nil
		case <-c.done:
			err = c.Err()
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	// The guest may still start it: kill it if so, and drop its output.
	s.Close()
	if c.Err() == nil {
		if sf, jerr := proto.JSONFrame(proto.TypeSignal, s.id, proto.Signal{Signal: 9}); jerr == nil {
			go c.enqueue(sf)
		}
	}
	return nil, fmt.Errorf("exec %q: %w", first(req.Argv), err)
}

func newSession(c *Client, tty, stdin bool) *Session {
	s := &Session{
		c: c, tty: tty, stdin: stdin,
		started:     make(chan struct{}),
		exitCh:      make(chan struct{}),
		stdinCredit: proto.InitialWindow,
		stdinKick:   make(chan struct{}, 1),
		stdinDone:   make(chan struct{}),
	}
	s.out[0] = newStream(s, proto.TypeStdout)
	s.out[1] = newStream(s, proto.TypeStderr)
	return s
}

// Reattach takes back session id, which an earlier connection to this
// guest started (see Session.ID and GuestInfo.Sessions), typically after
// the host process restarted. The Session behaves like one from Exec: it
// delivers the output the guest held back while no host was connected,
// then further output, then the exit status (even if the process exited
// while detached). Its stdin is closed (the guest closed it when the
// earlier connection went away), unless that connection detached with Detach:
// then it is open and writable as before.
//
// The guest keeps a detached session for a grace period (2 minutes by
// default); after it, for an id it does not know, or for a session
// attached to another live connection, Reattach fails with a *GuestError.
// Guests that predate reattach fail it the same way.
func (c *Client) Reattach(ctx context.Context, id uint32) (*Session, error) {
	if id == 0 {
		return nil, errors.New("reattach session 0: not a session id")
	}
	s := newSession(c, false, false)
	s.id = id
	s.reattached = true
	close(s.started)
	ch := make(chan proto.Response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("reattach session %d: %w", id, err)
	}
	if _, ok := c.sessions[id]; ok {
		c.mu.Unlock()
		return nil, fmt.Errorf("reattach session %d: already open on this connection", id)
	}
	if len(c.sessions) >= c.opts.MaxSessions {
		c.mu.Unlock()
		return nil, fmt.Errorf("reattach session %d: too many sessions (%d)", id, c.opts.MaxSessions)
	}
	// Registered before asking, so frames that follow the reply are
	// routed; the guest sends none before it.
	c.sessions[id] = s
	reqID := c.allocIDLocked()
	c.pending[reqID] = &call{ch: ch, apply: s.applyReattach}
	c.mu.Unlock()

	f, err := proto.JSONFrame(proto.TypeRequest, reqID, proto.Request{Op: proto.OpReattach, Reattach: &proto.Reattach{Session: id}})
	queued := false
	if err == nil {
		queued, err = c.sendQueued(ctx, f)
		var resp proto.Response
		if resp, err = c.awaitResponse(ctx, ch, err); err == nil {
			if resp.Error != "" {
				return nil, &GuestError{Op: proto.OpReattach, Msg: truncate(resp.Error)}
			}
			return s, nil
		}
	}
	if !queued {
		c.mu.Lock()
		delete(c.pending, reqID)
		if c.sessions[id] == s {
			delete(c.sessions, id)
		}
		c.mu.Unlock()
	} else {
		// The guest may still bind the session here: let its output flow
		// unread so it can finish. A refusal unregisters it (applyReattach).
		s.Close()
	}
	return nil, fmt.Errorf("reattach session %d: %w", id, err)
}

// applyReattach takes the guest's answer to Reattach, on the read loop.
func (s *Session) applyReattach(resp proto.Response) error {
	if resp.Error != "" {
		s.c.mu.Lock()
		if s.c.sessions[s.id] == s {
			delete(s.c.sessions, s.id)
		}
		s.c.mu.Unlock()
		return nil
	}
	if resp.Reattached == nil {
		return violation("reattach of session %d answered without the session", s.id)
	}
	s.mu.Lock()
	s.pid = resp.Reattached.Pid
	s.tty = resp.Reattached.TTY
	if r := resp.Reattached; r.Stdin {
		s.stdin, s.stdinCredit = true, min(max(r.StdinWindow, 0), proto.InitialWindow)
	}
	s.mu.Unlock()
	return nil
}

func first(a []string) string {
	if len(a) == 0 {
		return ""
	}
	return a[0]
}

// ID is the session id. It stays the session's id in the guest across
// connections: pass it to Reattach on a later connection.
func (s *Session) ID() uint32 { return s.id }

// Pid is the process id in the guest, 0 if the process did not start.
func (s *Session) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pid
}

// Stdout returns the process's standard output (with TTY: the terminal).
func (s *Session) Stdout() io.Reader { return s.out[0] }

// Stderr returns the process's standard error; empty with TTY.
func (s *Session) Stderr() io.Reader { return s.out[1] }

// Stdin returns the writer for the process's standard input. Closing it
// sends EOF (ignored for TTY sessions, whose terminal stays open). Writes
// fail unless ExecRequest.Stdin was set.
func (s *Session) Stdin() io.WriteCloser { return stdinWriter{s} }

// Signal sends sig to the process.
func (s *Session) Signal(ctx context.Context, sig int) error {
	f, err := proto.JSONFrame(proto.TypeSignal, s.id, proto.Signal{Signal: sig})
	if err != nil {
		return err
	}
	return s.c.send(ctx, f)
}

// Resize changes the terminal size of a TTY session.
func (s *Session) Resize(ctx context.Context, rows, cols uint16) error {
	if !s.tty {
		return errors.New("resize: session has no TTY")
	}
	f, err := proto.JSONFrame(proto.TypeResize, s.id, proto.Resize{Rows: rows, Cols: cols})
	if err != nil {
		return err
	}
	return s.c.send(ctx, f)
}

// Wait returns the exit status once the guest reported it. A start
// failure is an ExitStatus with ErrKind set, not an error; errors mean the
// status is unknown (connection lost, ctx done).
func (s *Session) Wait(ctx context.Context) (proto.ExitStatus, error) {
	select {
	case <-s.exitCh:
	case <-s.c.done:
	case <-ctx.Done():
		return proto.ExitStatus{}, ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.exited {
		return proto.ExitStatus{}, fmt.Errorf("session %d: %w", s.id, s.c.Err())
	}
	return s.exit, nil
}

// Close stops caring about the session: its output is discarded from now
// on (and the guest keeps getting credit), so it can run to completion
// without a reader. It does not kill the process.
func (s *Session) Close() error {
	s.mu.Lock()
	s.abandoned = true
	s.mu.Unlock()
	s.endStdin()
	for _, st := range s.out {
		st.abandon()
	}
	return nil
}

func (s *Session) endStdin() { s.stdinDoneOnce.Do(func() { close(s.stdinDone) }) }

// handle applies a guest frame for this session (called by the read loop).
func (s *Session) handle(f proto.Frame) error {
	switch f.Type {
	case proto.TypeStarted:
		var st proto.Started
		if err := proto.Decode(f, &st); err != nil {
			return violation("%v", err)
		}
		s.mu.Lock()
		select {
		case <-s.started:
			s.mu.Unlock()
			return violation("session %d started twice", s.id)
		default:
		}
		s.pid = st.Pid
		close(s.started)
		s.mu.Unlock()
		return nil
	case proto.TypeStdout, proto.TypeStderr:
		idx := 0
		if f.Type == proto.TypeStderr {
			idx = 1
		}
		if s.tty && idx == 1 {
			return violation("stderr on TTY session %d", s.id)
		}
		return s.out[idx].deliver(f.Payload)
	case proto.TypeWindow:
		w, err := proto.DecodeWindow(f.Payload)
		if err != nil {
			return violation("%v", err)
		}
		if w.Stream != proto.TypeStdin {
			return violation("window for %s from guest", w.Stream)
		}
		s.mu.Lock()
		if s.stdinCredit+int(w.Increment) > proto.InitialWindow {
			s.mu.Unlock()
			return violation("stdin window of session %d over %d", s.id, proto.InitialWindow)
		}
		s.stdinCredit += int(w.Increment)
		s.mu.Unlock()
		select {
		case s.stdinKick <- struct{}{}:
		default:
		}
		return nil
	case proto.TypeExit:
		var es proto.ExitStatus
		if err := proto.Decode(f, &es); err != nil {
			return violation("%v", err)
		}
		es.Err = truncate(es.Err)
		switch es.ErrKind {
		case "", proto.ErrKindNotFound, proto.ErrKindNotExecutable, proto.ErrKindSetup:
		default:
			es.ErrKind = proto.ErrKindSetup
		}
		s.c.mu.Lock()
		delete(s.c.sessions, s.id)
		s.c.mu.Unlock()
		s.mu.Lock()
		s.exit = es
		s.exited = true
		select {
		case <-s.started:
		default:
			close(s.started)
		}
		close(s.exitCh)
		s.mu.Unlock()
		for _, st := range s.out {
			st.finish()
		}
		return nil
	}
	return violation("unexpected %s frame for session %d", f.Type, s.id)
}

type stdinWriter struct{ s *Session }

func (w stdinWriter) Write(p []byte) (int, error) {
	s := w.s
	s.mu.Lock()
	open := s.stdin
	s.mu.Unlock()
	if s.reattached && !open {
		return 0, errors.New("stdin: closed when the session's earlier connection went away")
	}
	if !open {
		return 0, errors.New("stdin: session was started without stdin")
	}
	written := 0
	for len(p) > 0 {
		s.mu.Lock()
		credit, closed := s.stdinCredit, s.stdinClosed
		s.mu.Unlock()
		if closed {
			return written, errors.New("stdin: write after close")
		}
		if credit == 0 {
			select {
			case <-s.stdinKick:
				continue
			case <-s.exitCh:
				return written, ErrSessionExited
			case <-s.c.done:
				return written, s.c.Err()
			case <-s.stdinDone:
				return written, errors.New("stdin: closed while waiting for the guest to take more")
			}
		}
		n := min(len(p), credit, proto.MaxChunk)
		s.mu.Lock()
		s.stdinCredit -= n
		s.mu.Unlock()
		chunk := append([]byte(nil), p[:n]...)
		if err := s.c.send(context.Background(), proto.Frame{Type: proto.TypeStdin, ID: s.id, Payload: chunk}); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

func (w stdinWriter) Close() error {
	s := w.s
	s.mu.Lock()
	if s.reattached && !s.stdin {
		s.mu.Unlock()
		return nil // the guest closed it already
	}
	if s.stdinClosed {
		s.mu.Unlock()
		return nil
	}
	s.stdinClosed = true
	s.mu.Unlock()
	s.endStdin()
	select {
	case <-s.exitCh:
		return nil
	default:
	}
	return s.c.send(context.Background(), proto.Frame{Type: proto.TypeCloseStdin, ID: s.id})
}

// stream buffers one output stream. The guest may have at most
// proto.InitialWindow bytes unacknowledged; credit is returned as the
// caller reads.
type stream struct {
	s   *Session
	typ proto.Type

	mu     sync.Mutex
	chunks [][]byte
	// tail says the last chunk is a buffer of this stream's (small frames are copied
	// into it), not a frame's payload: appending to it is safe.
	tail      bool
	unacked   int // received but not yet granted back
	consumed  int // read (or discarded) and not yet granted back
	eof       bool
	abandoned bool
	notify    chan struct{}
}

func newStream(s *Session, typ proto.Type) *stream {
	return &stream{s: s, typ: typ, notify: make(chan struct{}, 1)}
}

// creditBatch is how many consumed bytes are collected before a Window
// frame is sent while the buffer is not yet empty.
const creditBatch = proto.InitialWindow / 4

func (st *stream) deliver(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	st.mu.Lock()
	if st.unacked+len(p) > proto.InitialWindow {
		st.mu.Unlock()
		return violation("session %d overran its %s window", st.s.id, st.typ)
	}
	st.unacked += len(p)
	if st.abandoned {
		st.consumed += len(p)
		st.mu.Unlock()
		st.s.c.creditReady(st)
		return nil
	}
	st.buffer(p)
	st.mu.Unlock()
	st.poke()
	return nil
}

// Small frames are copied into buffers of the stream's own, growing from
// minTail to maxTail bytes; larger ones are kept as they came. The window
// counts payload bytes, so without this a guest sending 1-byte frames would
// make the host hold a slice (and an allocation) per byte: tens of times the
// window in memory.
const (
	smallFrame = 1024
	minTail    = 512
	maxTail    = 64 << 10
)

// buffer queues p (st.mu held).
func (st *stream) buffer(p []byte) {
	if len(p) >= smallFrame {
		st.chunks, st.tail = append(st.chunks, p), false
		return
	}
	if n := len(st.chunks); st.tail && n > 0 && len(st.chunks[n-1])+len(p) <= cap(st.chunks[n-1]) {
		st.chunks[n-1] = append(st.chunks[n-1], p...)
		return
	}
	size := minTail
	if n := len(st.chunks); st.tail && n > 0 {
		size = min(2*cap(st.chunks[n-1]), maxTail)
	}
	b := append(make([]byte, 0, max(size, len(p))), p...)
	st.chunks, st.tail = append(st.chunks, b), true
}

func (st *stream) poke() {
	select {
	case st.notify <- struct{}{}:
	default:
	}
}

func (st *stream) finish() {
	st.mu.Lock()
	st.eof = true
	st.mu.Unlock()
	st.poke()
}

func (st *stream) abandon() {
	st.mu.Lock()
	st.abandoned = true
	for _, c := range st.chunks {
		st.consumed += len(c)
	}
	st.chunks = nil
	due := st.consumed > 0
	st.mu.Unlock()
	if due {
		st.s.c.creditReady(st)
	}
	st.poke()
}

// takeCredit returns the bytes to grant back and marks them granted.
func (st *stream) takeCredit() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.eof {
		return 0 // the session is over; credit is pointless
	}
	n := st.consumed
	st.consumed = 0
	st.unacked -= n
	return n
}

// Read returns buffered output, io.EOF after the exit, or the connection's
// error if it was lost before the exit.
func (st *stream) Read(p []byte) (int, error) {
	for {
		st.mu.Lock()
		if len(st.chunks) > 0 {
			n := copy(p, st.chunks[0])
			if n == len(st.chunks[0]) {
				st.chunks[0] = nil
				st.chunks = st.chunks[1:]
			} else {
				st.chunks[0] = st.chunks[0][n:]
			}
			st.consumed += n
			grant := st.consumed >= creditBatch || len(st.chunks) == 0
			st.mu.Unlock()
			if grant {
				st.s.c.creditReady(st)
			}
			return n, nil
		}
		if st.eof || st.abandoned {
			st.mu.Unlock()
			return 0, io.EOF
		}
		st.mu.Unlock()
		select {
		case <-st.notify:
		case <-st.s.c.done:
			st.mu.Lock()
			empty := len(st.chunks) == 0 && !st.eof
			st.mu.Unlock()
			if empty {
				return 0, fmt.Errorf("guest connection lost: %w", st.s.c.Err())
			}
		}
	}
}
