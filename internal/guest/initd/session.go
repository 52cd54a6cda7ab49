package initd

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/pty"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"golang.org/x/sys/unix"
)

const (
	// drainIdle is how long output is still read after the process exited
	// when no data arrives: a background child may hold the pipe open, and
	// the session must end anyway.
	drainIdle = 250 * time.Millisecond
	// drainBudget bounds what is read after exit. The process itself can
	// have left at most one pipe buffer behind; more comes from children
	// that outlived it.
	drainBudget = 1 << 20
)

// session is one exec'd process and its streams.
//
// A session reports to one connection at a time. When that connection goes
// away the session is detached: its output and exit are held back until a
// new connection reattaches it (Server.claim, Server.bind) or the grace
// runs out, after which they are discarded (the session is forgotten).
type session struct {
	srv      *Server
	id       uint32
	pid      int
	tty      bool
	hasStdin bool // started with stdin: the host may write to it

	master *os.File // TTY: both directions
	stdinW *os.File // pipe to the process's stdin (no TTY, Stdin set)
	outs   []*os.File
	exited chan struct{}

	mu       sync.Mutex
	credit   [2]int           // send credit for stdout, stderr
	creditCh [2]chan struct{} // poked when credit grows
	// The attachment, guarded by mu; changed only with Server.mu held too
	// (lock order: Server.mu, then session.mu).
	c        *gconn        // where output and exit go; nil while detached
	claimed  bool          // a reattach was granted and is being bound
	discard  bool          // forgotten: output is discarded, the exit dropped
	changed  chan struct{} // closed and replaced whenever c or discard changes
	grace    *time.Timer   // runs while detached; expire forgets the session
	deadline time.Time     // end of the grace while detached

	inMu     sync.Mutex
	inQ      []stdinChunk
	inQueued int
	inEOF    bool
	inCh     chan struct{}
}

// stdinChunk is host stdin waiting to be written; its credit is returned to
// the connection it came from.
type stdinChunk struct {
	b []byte
	c *gconn
}

func exitFor(err *startError) proto.ExitStatus {
	es := proto.ExitStatus{Code: -1, ErrKind: err.kind, Err: err.Error()}
	switch err.kind {
	case proto.ErrKindNotFound:
		es.Code = 127
	case proto.ErrKindNotExecutable:
		es.Code = 126
	}
	return es
}

// startSession starts req as session id on c. Start failures are reported
// to the host as an Exit frame with an ErrKind; only a broken connection is
// returned as an error.
func (s *Server) startSession(c *gconn, id uint32, req proto.ExecRequest) error {
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		return c.sendJSON(proto.TypeExit, id, exitFor(setupErr("server is shutting down")))
	case s.byID[id] != nil:
		// Also an id held by a detached session: the host learnt those in
		// the hello reply.
		s.mu.Unlock()
		return c.sendJSON(proto.TypeExit, id, exitFor(setupErr("session %d already exists", id)))
	case len(s.sessions) >= s.opts.MaxSessions:
		s.mu.Unlock()
		return c.sendJSON(proto.TypeExit, id, exitFor(setupErr("too many sessions (%d)", s.opts.MaxSessions)))
	}
	baseEnv := s.baseEnv
	s.mu.Unlock()

	if err := s.spawn(c, id, req, baseEnv); err != nil {
		var se *startError
		if !errors.As(err, &se) {
			se = setupErr("%v", err)
		}
		s.log.Info("exec failed", "session", id, "argv0", first(req.Argv), "err", se)
		return c.sendJSON(proto.TypeExit, id, exitFor(se))
	}
	return nil
}

func first(a []string) string {
	if len(a) == 0 {
		return ""
	}
	return a[0]
}

// spawn prepares and starts the process, registers the session, reports
// Started and starts the session's goroutines.
func (s *Server) spawn(c *gconn, id uint32, req proto.ExecRequest, baseEnv []string) error {
	if len(req.Argv) == 0 {
		return setupErr("empty argv")
	}
	idle := req.Argv[0] == proto.IdleCommand
	builtin := idle || req.Argv[0] == proto.BuildCommand
	if builtin {
		req.User = "0"
	}
	u, err := resolveUser(s.opts.Root, req.User)
	if err != nil {
		return &startError{kind: proto.ErrKindSetup, err: err}
	}
	// (The idle program holds a keep-alive sandbox up and does nothing else; init's
	// other built-in runs as root, so it is refused.)
	if req.NonRoot && !idle && (builtin || u.UID == 0) {
		who := req.User
		if who == "" {
			who = "the image's default, root"
		}
		return &startError{kind: proto.ErrKindSetup, err: fmt.Errorf("runAsNonRoot: the process would run as root (uid 0; user %q): give a user other than root", who)}
	}
	env := mergeEnv(baseEnv, req.Env)
	if _, ok := getEnv(env, "PATH"); !ok {
		env = append(env, "PATH="+defaultPath)
	}
	if _, ok := getEnv(env, "HOME"); !ok {
		env = append(env, "HOME="+u.Home)
	}
	if _, ok := getEnv(env, "TERM"); !ok && req.TTY {
		env = append(env, "TERM=xterm")
	}
	dir := req.Dir
	if dir == "" {
		dir = "/"
	}
	if !filepath.IsAbs(dir) {
		return setupErr("working directory %q is not absolute", dir)
	}
	if req.CreateDir {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return setupErr("creating working directory: %w", err)
		}
	}
	if fi, err := os.Stat(dir); err != nil {
		return setupErr("working directory %s: %w", dir, err)
	} else if !fi.IsDir() {
		return setupErr("working directory %s is not a directory", dir)
	}
	var path string
	if builtin {
		// Init's own programs (a sandbox with no command of its own: proto.IdleCommand; a
		// template build's helper: proto.BuildCommand): init's own binary, through the
		// kernel's link to it (the initramfs it lies in is hidden since the switch of
		// root), as root: only root may exec that link once its credentials changed.
		path = "/proc/self/exe"
		if idle {
			req.Argv = []string{proto.IdleCommand}
		}
	} else {
		pathList, _ := getEnv(env, "PATH")
		if path, err = lookPath(req.Argv[0], pathList, dir); err != nil {
			return err
		}
	}

	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		cred = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
	} else if req.User != "" && (u.UID != uint32(os.Geteuid()) || u.GID != uint32(os.Getegid())) {
		// Outside PID 1 (tests as non-root) the default user is whoever runs.
		return setupErr("cannot run as %d:%d: init is not root", u.UID, u.GID)
	}

	sess := &session{srv: s, c: c, id: id, tty: req.TTY, hasStdin: req.Stdin, exited: make(chan struct{}), inCh: make(chan struct{}, 1), changed: make(chan struct{})}
	sess.credit = [2]int{proto.InitialWindow, proto.InitialWindow}
	sess.creditCh = [2]chan struct{}{make(chan struct{}, 1), make(chan struct{}, 1)}

	// childFiles are the child's ends; the parent closes them after start.
	var childFiles []*os.File
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	sys := &syscall.SysProcAttr{Setsid: true, Credential: cred}
	var files []uintptr
	if req.TTY {
		master, slave, err := pty.Open(req.Rows, req.Cols)
		if err != nil {
			return setupErr("%w", err)
		}
		if cred != nil && u.UID != 0 {
			_ = unix.Fchown(int(slave.Fd()), int(u.UID), -1)
		}
		sess.master = master
		sess.outs = []*os.File{master}
		childFiles = []*os.File{slave}
		fd := slave.Fd()
		files = []uintptr{fd, fd, fd}
		sys.Setctty = true
		sys.Ctty = 0
	} else {
		var stdin *os.File
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return setupErr("stdin pipe: %w", err)
			}
			stdin, sess.stdinW = r, w
		} else {
			f, err := os.Open(os.DevNull)
			if err != nil {
				return setupErr("opening %s: %w", os.DevNull, err)
			}
			stdin = f
		}
		or, ow, err := os.Pipe()
		if err != nil {
			closeAll([]*os.File{stdin, sess.stdinW})
			return setupErr("stdout pipe: %w", err)
		}
		er, ew, err := os.Pipe()
		if err != nil {
			closeAll([]*os.File{stdin, sess.stdinW, or, ow})
			return setupErr("stderr pipe: %w", err)
		}
		sess.outs = []*os.File{or, er}
		childFiles = []*os.File{stdin, ow, ew}
		// Fd switches the child's ends to blocking mode, which the child
		// expects; the parent's ends are separate and stay non-blocking.
		files = []uintptr{stdin.Fd(), ow.Fd(), ew.Fd()}
	}
	parentFiles := append([]*os.File{sess.master, sess.stdinW}, sess.outs...)

	attr := &syscall.ProcAttr{Dir: dir, Env: env, Files: files, Sys: sys}
	var waitCh <-chan unix.WaitStatus
	s.mu.Lock()
	if s.closed {
		// Close kills the sessions it finds: one started after it would outlive it.
		s.mu.Unlock()
		closeAll(childFiles)
		closeAll(parentFiles)
		return setupErr("the guest is shutting down")
	}
	pid, waitCh, err := s.reaper.start(func() (int, error) {
		if cred != nil && cred.Uid != 0 {
			return forkExecFromDir(dir, path, req.Argv, attr, sess.exited)
		}
		return syscall.ForkExec(path, req.Argv, attr)
	})
	if err == nil {
		sess.pid = pid
		c.sessions[id] = sess
		s.sessions[sess] = struct{}{}
		s.byID[id] = sess
	}
	s.mu.Unlock()
	closeAll(childFiles)
	if err != nil {
		closeAll(parentFiles)
		return classify(req.Argv[0], err)
	}
	s.log.Debug("started", "session", id, "pid", pid, "argv0", req.Argv[0])
	// Started goes out before any output or exit frame of the session.
	if err := c.sendJSON(proto.TypeStarted, id, proto.Started{Pid: pid}); err != nil {
		s.log.Debug("could not report start", "session", id, "err", err)
	}

	var outWG sync.WaitGroup
	var work []func()
	for i, f := range sess.outs {
		stream := proto.TypeStdout
		if i == 1 {
			stream = proto.TypeStderr
		}
		outWG.Add(1)
		work = append(work, func() {
			defer outWG.Done()
			sess.pump(i, stream, f)
		})
	}
	if req.Stdin {
		w := sess.stdinW
		if req.TTY {
			w = sess.master
		}
		work = append(work, func() { sess.feedStdin(w, !req.TTY) })
	}
	work = append(work, func() { sess.wait(waitCh, &outWG) })
	if !s.goSafe(work...) {
		// The server closed since the process started: Close killed it with the other
		// sessions; nothing reads its output now.
		closeAll(parentFiles)
	}
	return nil
}

// wait reports the exit once the process ended and its output is drained.
func (sess *session) wait(ws <-chan unix.WaitStatus, outWG *sync.WaitGroup) {
	st := <-ws
	close(sess.exited)
	// Wake pumps blocked in a read so they switch to the bounded drain.
	for _, f := range sess.outs {
		_ = f.SetReadDeadline(time.Now().Add(drainIdle))
	}
	outWG.Wait()
	for _, f := range append([]*os.File{sess.master, sess.stdinW}, sess.outs...) {
		if f != nil {
			f.Close()
		}
	}
	es := proto.ExitStatus{Code: st.ExitStatus()}
	if st.Signaled() {
		es = proto.ExitStatus{Code: 128 + int(st.Signal()), Signal: int(st.Signal())}
	}
	s := sess.srv
	s.log.Debug("exited", "session", sess.id, "pid", sess.pid, "code", es.Code)
	f, err := proto.JSONFrame(proto.TypeExit, sess.id, es)
	for err == nil {
		c, sent := sess.sendAttached(f, -1)
		if !sent {
			s.log.Info("exit status dropped: session was not reattached", "session", sess.id, "pid", sess.pid, "code", es.Code)
			break
		}
		if sess.finish(c) {
			return
		}
		// c went away and another connection took the session before the
		// exit was settled: c may never have read it, so tell the new one.
	}
	sess.finish(nil)
}

// finish forgets the session once its exit went to c (nil: was dropped).
// It returns false if the session was reattached elsewhere meanwhile.
func (sess *session) finish(c *gconn) bool {
	s := sess.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if c != nil && sess.c != c && (sess.c != nil || sess.claimed) {
		return false
	}
	if sess.c != nil && sess.c.sessions[sess.id] == sess {
		delete(sess.c.sessions, sess.id)
	}
	if s.byID[sess.id] == sess {
		delete(s.byID, sess.id)
	}
	if sess.grace != nil {
		sess.grace.Stop()
		sess.grace = nil
	}
	sess.discard = true
	delete(s.sessions, sess)
	return true
}

// sendAttached sends f on the session's connection, following the session
// across reattaches: a frame that could not be written is sent again on the
// next connection, so nothing is lost within the grace. idx >= 0 charges
// the frame to that output stream's credit, which the caller obtained with
// waitCredit (a reattach only raises it). It returns the connection that
// took the frame, or false if the frame was dropped because the session
// was forgotten or the server is closing.
func (sess *session) sendAttached(f proto.Frame, idx int) (*gconn, bool) {
	var failed *gconn
	for {
		sess.mu.Lock()
		c, discard, changed := sess.c, sess.discard, sess.changed
		if discard {
			sess.mu.Unlock()
			return nil, false
		}
		if c != nil && c != failed {
			if idx >= 0 {
				sess.credit[idx] -= len(f.Payload)
			}
			sess.mu.Unlock()
			err := c.send(f)
			if err == nil {
				return c, true
			}
			if !errors.Is(err, errConnClosed) {
				sess.srv.log.Debug("could not send to host", "session", sess.id, "type", f.Type, "err", err)
				// A connection that cannot be written is of no use; closing
				// it ends its serve loop, which detaches the session.
				c.rw.Close()
			}
			failed = c
			continue
		}
		sess.mu.Unlock()
		select {
		case <-changed:
		case <-sess.srv.quit:
			return nil, false
		}
	}
}

// attachedTo returns the session's connection, nil while detached.
func (sess *session) attachedTo() *gconn {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	return sess.c
}

// notifyLocked wakes everything waiting for the attachment to change.
func (sess *session) notifyLocked() {
	close(sess.changed)
	sess.changed = make(chan struct{})
}

// forgetLocked makes the session unaddressable and its output and exit
// discarded. Server.mu and sess.mu are held.
func (sess *session) forgetLocked() {
	s := sess.srv
	if s.byID[sess.id] == sess {
		delete(s.byID, sess.id)
	}
	sess.discard = true
	sess.notifyLocked()
}

// detach is called with Server.mu held when c, the session's connection,
// went away: the session now waits for a reattach until the grace ends.
func (sess *session) detach(c *gconn) {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.c != c {
		return
	}
	sess.c = nil
	grace := sess.srv.opts.ReattachGrace
	if grace < 0 {
		sess.forgetLocked()
		return
	}
	sess.deadline = time.Now().Add(grace)
	sess.grace = time.AfterFunc(grace, sess.expire)
	sess.notifyLocked()
}

// expire forgets the session if it is still detached at the end of its
// grace. It runs on the grace timer.
func (sess *session) expire() {
	s := sess.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	sess.mu.Lock()
	defer sess.mu.Unlock()
	// A timer stopped too late by a reattach finds the session attached,
	// claimed or detached again with a later deadline.
	if sess.c != nil || sess.claimed || sess.discard || time.Now().Before(sess.deadline) {
		return
	}
	sess.grace = nil
	s.log.Info("session not reattached within grace; discarding its output", "session", sess.id, "pid", sess.pid)
	sess.forgetLocked()
}

// stopGrace stops the grace timer (server shutdown).
func (sess *session) stopGrace() {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.grace != nil {
		sess.grace.Stop()
		sess.grace = nil
	}
}

// claim grants connection c the reattach of session id. The caller answers
// the host and then calls bind, so that the answer precedes the session's
// frames on c.
func (s *Server) claim(c *gconn, id uint32) (*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("reattach: server is shutting down")
	}
	sess := s.byID[id]
	if sess == nil {
		return nil, fmt.Errorf("reattach session %d: no such session (never started, ended, or not reattached within %s)", id, s.opts.ReattachGrace)
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	switch {
	case sess.c == c:
		return nil, fmt.Errorf("reattach session %d: already attached to this connection", id)
	case sess.c != nil:
		return nil, fmt.Errorf("reattach session %d: attached to another live connection", id)
	case sess.claimed:
		return nil, fmt.Errorf("reattach session %d: being reattached by another connection", id)
	}
	sess.claimed = true
	if sess.grace != nil {
		sess.grace.Stop()
		sess.grace = nil
	}
	return sess, nil
}

// bind attaches a claimed session to c, unless answering the host failed
// (ok false) or c went away meanwhile; then the rest of the grace applies.
// Send credit starts afresh, as the host's view of the session does.
func (s *Server) bind(sess *session, c *gconn, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sess.mu.Lock()
	defer sess.mu.Unlock()
	sess.claimed = false
	select {
	case <-c.done:
		ok = false
	default:
	}
	if !ok || s.closed {
		sess.grace = time.AfterFunc(max(time.Until(sess.deadline), 0), sess.expire)
		return
	}
	sess.c = c
	c.sessions[sess.id] = sess
	sess.credit = [2]int{proto.InitialWindow, proto.InitialWindow}
	sess.notifyLocked()
}

// pump forwards one output stream to the host within the credit the host
// grants. While the session is detached it waits (the process may block on
// a full pipe) and forwards to the connection that reattaches it; once the
// session is forgotten it keeps reading and discards, so the process never
// blocks for good.
func (sess *session) pump(idx int, stream proto.Type, f *os.File) {
	buf := make([]byte, proto.MaxChunk)
	discard := false
	drained := 0
	for {
		n := len(buf)
		if !discard {
			credit, ok := sess.waitCredit(idx)
			if !ok {
				discard = true
			} else if credit < n {
				n = credit
			}
		}
		fresh := false
		select {
		case <-sess.exited:
			if drained >= drainBudget {
				return
			}
			_ = f.SetReadDeadline(time.Now().Add(drainIdle))
			fresh = true
		default:
		}
		m, err := f.Read(buf[:n])
		if fresh {
			drained += m
		}
		if m > 0 && !discard {
			if _, ok := sess.sendAttached(proto.Frame{Type: stream, ID: sess.id, Payload: buf[:m]}, idx); !ok {
				discard = true
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !fresh {
				// The deadline set at exit hit a read begun before; retry
				// with a fresh one so buffered output is not lost.
				continue
			}
			if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, fs.ErrClosed) && !isEOF(err) {
				sess.srv.log.Debug("output read failed", "session", sess.id, "stream", stream, "err", err)
			}
			return
		}
	}
}

// isEOF reports the end of a pipe (EOF) or of a pty whose slave is closed
// (EIO).
func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.EIO)
}

// waitCredit blocks until stream idx may send on an attached connection,
// returning the credit, or false once output is to be discarded (the
// session was forgotten or the server is closing).
func (sess *session) waitCredit(idx int) (int, bool) {
	for {
		sess.mu.Lock()
		c, credit, discard, changed := sess.c, sess.credit[idx], sess.discard, sess.changed
		sess.mu.Unlock()
		if discard {
			return 0, false
		}
		if c != nil && credit > 0 {
			return credit, true
		}
		// A connection that went away is detached under Server.mu, which
		// closes changed.
		select {
		case <-sess.creditCh[idx]:
		case <-changed:
		case <-sess.srv.quit:
			return 0, false
		}
	}
}

// handleFrame applies a frame from host connection c to the session. It
// never blocks: the read loop serves every session.
func (sess *session) handleFrame(c *gconn, f proto.Frame) {
	log := sess.srv.log
	switch f.Type {
	case proto.TypeStdin:
		sess.inMu.Lock()
		if sess.inEOF || sess.inQueued+len(f.Payload) > proto.InitialWindow {
			sess.inMu.Unlock()
			log.Warn("dropping stdin beyond window or after close", "session", sess.id)
			return
		}
		sess.inQ = append(sess.inQ, stdinChunk{b: f.Payload, c: c})
		sess.inQueued += len(f.Payload)
		sess.inMu.Unlock()
		poke(sess.inCh)
	case proto.TypeCloseStdin:
		sess.closeStdin()
	case proto.TypeWindow:
		w, err := proto.DecodeWindow(f.Payload)
		if err != nil || w.Stream == proto.TypeStdin {
			log.Warn("bad window frame", "session", sess.id, "err", err)
			return
		}
		idx := 0
		if w.Stream == proto.TypeStderr {
			idx = 1
		}
		sess.mu.Lock()
		if sess.credit[idx]+int(w.Increment) <= 16*proto.InitialWindow {
			sess.credit[idx] += int(w.Increment)
		}
		sess.mu.Unlock()
		poke(sess.creditCh[idx])
	case proto.TypeSignal:
		var sg proto.Signal
		if err := proto.Decode(f, &sg); err != nil || sg.Signal <= 0 || sg.Signal > 64 {
			log.Warn("bad signal frame", "session", sess.id, "err", err, "signal", sg.Signal)
			return
		}
		sess.kill(sg.Signal)
	case proto.TypeResize:
		var rs proto.Resize
		if err := proto.Decode(f, &rs); err != nil || sess.master == nil {
			return
		}
		if err := pty.SetSize(sess.master, rs.Rows, rs.Cols); err != nil {
			log.Debug("resize failed", "session", sess.id, "err", err)
		}
	}
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// kill signals the session's process unless it was already reaped (its pid
// could then belong to another process).
func (sess *session) kill(sig int) {
	select {
	case <-sess.exited:
		return
	default:
	}
	if err := unix.Kill(sess.pid, unix.Signal(sig)); err != nil {
		sess.srv.log.Debug("signal failed", "session", sess.id, "signal", sig, "err", err)
	}
}

func (sess *session) closeStdin() {
	sess.inMu.Lock()
	sess.inEOF = true
	sess.inMu.Unlock()
	poke(sess.inCh)
}

// feedStdin writes queued host stdin to the process and returns the credit
// to the host once written. Credit is returned for data the process did not
// take too (it closed stdin), so the host's writer never stalls.
func (sess *session) feedStdin(w *os.File, closeOnEOF bool) {
	broken := false
	for {
		sess.inMu.Lock()
		var chunk stdinChunk
		ok := len(sess.inQ) > 0
		if ok {
			chunk = sess.inQ[0]
			sess.inQ[0] = stdinChunk{}
			sess.inQ = sess.inQ[1:]
		}
		eof := sess.inEOF && !ok
		sess.inMu.Unlock()
		if ok {
			if !broken {
				if _, err := w.Write(chunk.b); err != nil {
					broken = true
				}
			}
			sess.inMu.Lock()
			sess.inQueued -= len(chunk.b)
			sess.inMu.Unlock()
			if len(chunk.b) > 0 {
				// Only the connection that sent the data expects its credit
				// back; if it went away, send fails harmlessly.
				_ = chunk.c.send(proto.Frame{Type: proto.TypeWindow, ID: sess.id,
					Payload: proto.Window{Stream: proto.TypeStdin, Increment: uint32(len(chunk.b))}.Encode()})
			}
			continue
		}
		if eof {
			if closeOnEOF {
				w.Close()
			}
			return
		}
		select {
		case <-sess.inCh:
		case <-sess.exited:
			return
		}
	}
}

// forkExecFromDir starts a process that drops privileges with dir as its working
// directory entered while still root, as runc (and so Docker and Podman) does: `-u 1234 -w
// /root` runs the command in /root even though uid 1234 could not enter it. Go's
// ForkExec changes directory after switching credentials, so instead the fork happens
// on a thread of its own whose working directory (unshared from the process with
// CLONE_FS) is already dir; the child inherits it. That thread is the child's parent as
// far as PR_SET_PDEATHSIG goes (bwrap --die-with-parent, setpriv --pdeathsig), so it lives
// until exited is closed (the process ended) and only then goes away.
func forkExecFromDir(dir, path string, argv []string, attr *syscall.ProcAttr, exited <-chan struct{}) (int, error) {
	type result struct {
		pid int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: this thread's working directory is no longer the process's,
		// so the runtime must end the thread with this goroutine rather than reuse it.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			ch <- result{err: setupErr("unshare the working directory: %v", err)}
			return
		}
		if err := unix.Chdir(dir); err != nil {
			ch <- result{err: setupErr("working directory %s: %v", dir, err)}
			return
		}
		a := *attr
		a.Dir = ""
		pid, err := syscall.ForkExec(path, argv, &a)
		ch <- result{pid, err}
		if err == nil {
			<-exited
		}
	}()
	r := <-ch
	return r.pid, r.err
}
