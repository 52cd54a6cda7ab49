package initd

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

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
type session struct {
	srv *Server
	c   *gconn
	id  uint32
	pid int
	tty bool

	master *os.File // TTY: both directions
	stdinW *os.File // pipe to the process's stdin (no TTY, Stdin set)
	outs   []*os.File
	exited chan struct{}

	mu       sync.Mutex
	credit   [2]int           // send credit for stdout, stderr
	creditCh [2]chan struct{} // poked when credit grows

	inMu     sync.Mutex
	inQ      [][]byte
	inQueued int
	inEOF    bool
	inCh     chan struct{}
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
	case c.sessions[id] != nil:
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
	u, err := resolveUser(s.opts.Root, req.User)
	if err != nil {
		return &startError{kind: proto.ErrKindSetup, err: err}
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
	pathList, _ := getEnv(env, "PATH")
	path, err := lookPath(req.Argv[0], pathList, dir)
	if err != nil {
		return err
	}

	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		cred = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
	} else if req.User != "" && (u.UID != uint32(os.Geteuid()) || u.GID != uint32(os.Getegid())) {
		// Outside PID 1 (tests as non-root) the default user is whoever runs.
		return setupErr("cannot run as %d:%d: init is not root", u.UID, u.GID)
	}

	sess := &session{srv: s, c: c, id: id, tty: req.TTY, exited: make(chan struct{}), inCh: make(chan struct{}, 1)}
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
		master, slave, err := openPTY(req.Rows, req.Cols)
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
	pid, waitCh, err := s.reaper.start(func() (int, error) {
		return syscall.ForkExec(path, req.Argv, attr)
	})
	if err == nil {
		sess.pid = pid
		c.sessions[id] = sess
		s.sessions[sess] = struct{}{}
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
	for i, f := range sess.outs {
		stream := proto.TypeStdout
		if i == 1 {
			stream = proto.TypeStderr
		}
		outWG.Add(1)
		s.goSafe(func() {
			defer outWG.Done()
			sess.pump(i, stream, f)
		})
	}
	if req.Stdin {
		w := sess.stdinW
		if req.TTY {
			w = sess.master
		}
		s.goSafe(func() { sess.feedStdin(w, !req.TTY) })
	}
	s.goSafe(func() { sess.wait(waitCh, &outWG) })
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
	if err := sess.c.sendJSON(proto.TypeExit, sess.id, es); err != nil && !errors.Is(err, errConnClosed) {
		s.log.Debug("could not report exit", "session", sess.id, "err", err)
	}
	s.mu.Lock()
	if sess.c.sessions[sess.id] == sess {
		delete(sess.c.sessions, sess.id)
	}
	delete(s.sessions, sess)
	s.mu.Unlock()
}

// pump forwards one output stream to the host within the credit the host
// grants. Without a host (connection gone) it keeps reading and discards, so
// the process never blocks on a full pipe.
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
			sess.mu.Lock()
			sess.credit[idx] -= m
			sess.mu.Unlock()
			if err := sess.c.send(proto.Frame{Type: stream, ID: sess.id, Payload: buf[:m]}); err != nil {
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

// waitCredit blocks until stream idx may send, returning the credit, or
// false once the host connection is gone.
func (sess *session) waitCredit(idx int) (int, bool) {
	for {
		sess.mu.Lock()
		c := sess.credit[idx]
		sess.mu.Unlock()
		if c > 0 {
			return c, true
		}
		select {
		case <-sess.creditCh[idx]:
		case <-sess.c.done:
			return 0, false
		case <-sess.srv.quit:
			return 0, false
		}
	}
}

// handleFrame applies a host frame to the session. It never blocks: the
// read loop serves every session.
func (sess *session) handleFrame(f proto.Frame) {
	log := sess.srv.log
	switch f.Type {
	case proto.TypeStdin:
		sess.inMu.Lock()
		if sess.inEOF || sess.inQueued+len(f.Payload) > proto.InitialWindow {
			sess.inMu.Unlock()
			log.Warn("dropping stdin beyond window or after close", "session", sess.id)
			return
		}
		sess.inQ = append(sess.inQ, f.Payload)
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
		if err := setWinsize(sess.master, rs.Rows, rs.Cols); err != nil {
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
		var chunk []byte
		if len(sess.inQ) > 0 {
			chunk = sess.inQ[0]
			sess.inQ[0] = nil
			sess.inQ = sess.inQ[1:]
		}
		eof := sess.inEOF && chunk == nil
		sess.inMu.Unlock()
		if chunk != nil {
			if !broken {
				if _, err := w.Write(chunk); err != nil {
					broken = true
				}
			}
			sess.inMu.Lock()
			sess.inQueued -= len(chunk)
			sess.inMu.Unlock()
			if len(chunk) > 0 {
				_ = sess.c.send(proto.Frame{Type: proto.TypeWindow, ID: sess.id,
					Payload: proto.Window{Stream: proto.TypeStdin, Increment: uint32(len(chunk))}.Encode()})
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
