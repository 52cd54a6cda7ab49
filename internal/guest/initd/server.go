// Package initd is fireworks-init, the PID 1 of every Fireworks guest: it
// boots the initramfs (mounts, kernel modules), then serves the host over
// the agent channel (see package proto): control requests and exec sessions.
//
// The serving part (Server) does no mounting and can run in any process, so
// it is tested on the host over a socket pair; the PID 1 part (Main) adds
// the boot steps and the privileged System operations.
package initd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/envd"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"golang.org/x/sys/unix"
)

// System performs the privileged requests that change the whole guest.
// PID 1 uses the real implementation; tests use a fake.
type System interface {
	// Setup mounts the sandbox root and switches into it.
	Setup(ctx context.Context, s proto.Setup) error
	// SetTime sets the clock and credits entropy.
	SetTime(ctx context.Context, t proto.SetTime) error
	// SetHostname sets the guest's hostname.
	SetHostname(name string, hosts []proto.HostEntry) error
	// SetNameservers replaces /etc/resolv.conf of the (set-up) root with these
	// nameservers, already validated.
	SetNameservers(servers []string) error
	// MountVolumes mounts volumes (already validated) in the set-up root.
	MountVolumes(vols []proto.VolumeMount) error
	// KillAll ends every process but init and waits (bounded) until they are gone.
	KillAll(ctx context.Context) error
	// Freeze freezes the writable filesystem (see proto.OpFreeze); Thaw undoes it.
	Freeze() error
	Thaw() error
	// PowerOff stops all processes, syncs and powers the VM off. The server
	// calls it after the reply to Shutdown has been written.
	PowerOff(ctx context.Context)
}

// Options configures a Server.
type Options struct {
	// Root is where /etc/passwd and /etc/group are read for user lookup.
	// Empty means "/". Paths of executables and working directories are
	// always those of the process's own root.
	Root string
	// InitVersion is reported to the host in the handshake.
	InitVersion string
	// ReapAll makes the server reap every child with wait4(-1), which PID 1
	// must do for orphans. Leave it off when running inside another process.
	ReapAll bool
	// System handles Setup, SetTime and Shutdown; nil rejects them.
	System System
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
	// EnvdAddr is where envd listens once asked to (default ":49983", every address of
	// the guest; tests give a loopback one).
	EnvdAddr string
	// MaxSessions bounds concurrently running sessions (default 1024).
	MaxSessions int
	// ReattachGrace is how long a session whose connection went away is
	// kept for a new connection to take back (proto.OpReattach): its
	// output is held back (the process blocks once its pipe is full) and
	// its exit status kept. After the grace its output is discarded and
	// its exit dropped. Zero means DefaultReattachGrace; negative disables
	// reattach (sessions are forgotten as soon as their connection ends).
	ReattachGrace time.Duration
	// OnPanic, if set, is called with a recovered panic from any goroutine
	// the server owns. PID 1 must never exit (the kernel panics), so it logs
	// and powers off instead. If nil the panic propagates.
	OnPanic func(v any)
}

// DefaultReattachGrace is the default of Options.ReattachGrace: long enough
// for a node agent to restart and reconnect to its VMs.
const DefaultReattachGrace = 2 * time.Minute

// Server serves host connections. One Server lives for the whole boot and
// serves one connection at a time; sessions outlive the connection that
// started them.
type Server struct {
	opts   Options
	log    *slog.Logger
	reaper *reaper

	wg sync.WaitGroup // session goroutines

	mu          sync.Mutex
	setupDone   bool
	baseEnv     []string
	envd        *envd.Server // E2B's in-sandbox API, once an identity asked for it
	envdNonRoot bool         // the sandbox's runAsNonRoot: envd acts as no root user
	envdAddr    string
	sessions    map[*session]struct{}
	// byID holds the sessions that can still be addressed: attached to a
	// connection or awaiting reattach. Session ids are unique among them
	// across connections, so a reattached session never meets a namesake.
	byID   map[uint32]*session
	closed bool
	// thawTimer thaws the filesystem if the host that froze it never does (OpFreeze).
	thawTimer *time.Timer
	quit      chan struct{} // closed by Close
}

// NewServer returns a Server; call Close to stop it.
func NewServer(opts Options) *Server {
	if opts.Root == "" {
		opts.Root = "/"
	}
	if opts.MaxSessions <= 0 {
		opts.MaxSessions = 1024
	}
	if opts.ReattachGrace == 0 {
		opts.ReattachGrace = DefaultReattachGrace
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		opts:     opts,
		log:      log,
		reaper:   newReaper(opts.ReapAll, log),
		sessions: map[*session]struct{}{},
		byID:     map[uint32]*session{},
		quit:     make(chan struct{}),
	}
}

// Close kills the processes of all remaining sessions, waits for their
// goroutines and stops the reaper.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		close(s.quit)
	}
	s.closed = true
	for sess := range s.sessions {
		sess.stopGrace()
		sess.kill(int(unix.SIGKILL))
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.reaper.close()
	return nil
}

// goSafe runs each of fns in a goroutine owned by the server (Close waits for them):
// all of them, or none once Close has begun (it reports which). Adding to the wait group
// under mu, where Close marks the server closed, keeps an Add from racing Close's Wait.
func (s *Server) goSafe(fns ...func()) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	s.wg.Add(len(fns))
	s.mu.Unlock()
	for _, fn := range fns {
		go func() {
			defer s.wg.Done()
			if s.opts.OnPanic != nil {
				defer func() {
					if v := recover(); v != nil {
						s.opts.OnPanic(v)
					}
				}()
			}
			fn()
		}()
	}
	return true
}

// gconn is one host connection.
type gconn struct {
	rw       io.ReadWriteCloser
	wmu      sync.Mutex
	done     chan struct{}
	sessions map[uint32]*session // guarded by Server.mu
}

var errConnClosed = errors.New("host connection closed")

// send writes one frame. Frames from all goroutines are serialised; a write
// that blocks (host not reading) is released when the connection closes.
func (c *gconn) send(f proto.Frame) error {
	select {
	case <-c.done:
		return errConnClosed
	default:
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return proto.WriteFrame(c.rw, f)
}

func (c *gconn) sendJSON(t proto.Type, id uint32, v any) error {
	f, err := proto.JSONFrame(t, id, v)
	if err != nil {
		return err
	}
	return c.send(f)
}

// ServeConn runs the handshake and serves rw until it fails or ctx ends.
// It always closes rw. Sessions started on rw keep running afterwards with
// their stdin closed; for Options.ReattachGrace a later connection can take
// them back (proto.OpReattach) and get their held-back output and exit.
func (s *Server) ServeConn(ctx context.Context, rw io.ReadWriteCloser) error {
	c := &gconn{rw: rw, done: make(chan struct{}), sessions: map[uint32]*session{}}
	stop := context.AfterFunc(ctx, func() { rw.Close() })
	defer stop()
	defer s.detach(c)

	r := bufio.NewReaderSize(rw, 64<<10)
	// Wait for the host's hello; anything before it is stale data from a
	// previous connection and is dropped.
	for {
		f, err := proto.ReadFrame(r)
		if err != nil {
			return fmt.Errorf("waiting for hello: %w", err)
		}
		if f.Type == proto.TypeHello {
			if err := s.answerHello(c, f); err != nil {
				return err
			}
			break
		}
		s.log.Debug("dropping frame before hello", "type", f.Type)
	}
	s.log.Info("host connected")
	err := s.serveFrames(ctx, c, r)
	s.log.Info("host disconnected", "err", err)
	return err
}

func (s *Server) serveFrames(ctx context.Context, c *gconn, r io.Reader) error {
	for {
		f, err := proto.ReadFrame(r)
		if err != nil {
			if errors.Is(err, proto.ErrUnknownType) {
				s.log.Warn("ignoring frame", "err", err)
				continue
			}
			return fmt.Errorf("reading from host: %w", err)
		}
		if err := s.handle(ctx, c, f); err != nil {
			return err
		}
	}
}

func (s *Server) answerHello(c *gconn, f proto.Frame) error {
	var h proto.Hello
	if err := proto.Decode(f, &h); err != nil {
		return err
	}
	reply := proto.HelloReply{Version: proto.Version, Nonce: h.Nonce, InitVersion: s.opts.InitVersion, KernelRelease: kernelRelease(), Sessions: s.liveIDs(c)}
	if h.Version < proto.Version {
		// Answer anyway so the host can report the mismatch.
		s.log.Warn("host speaks an older protocol", "host_version", h.Version)
	}
	return c.sendJSON(proto.TypeHelloReply, f.ID, reply)
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// liveIDs returns the ids of addressable sessions not attached to c, which
// the host on c must not reuse.
func (s *Server) liveIDs(c *gconn) []uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []uint32
	for id, sess := range s.byID {
		if sess.attachedTo() != c {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	if len(ids) > proto.MaxHelloSessions {
		// Exec of a colliding id still fails cleanly; see startSession.
		ids = ids[:proto.MaxHelloSessions]
	}
	return ids
}

// detach ends connection c: its sessions keep running without a host and
// wait for a reattach. Their stdin is closed: a process reading it sees
// EOF rather than hanging on a host that may never come back.
func (s *Server) detach(c *gconn) {
	s.mu.Lock()
	close(c.done)
	list := make([]*session, 0, len(c.sessions))
	for _, sess := range c.sessions {
		list = append(list, sess)
		sess.detach(c)
	}
	s.mu.Unlock()
	c.rw.Close()
	for _, sess := range list {
		sess.closeStdin()
	}
}

func (s *Server) handle(ctx context.Context, c *gconn, f proto.Frame) error {
	switch f.Type {
	case proto.TypeHello:
		// The host re-sends hello until answered; answer every copy.
		return s.answerHello(c, f)
	case proto.TypeRequest:
		var req proto.Request
		if err := proto.Decode(f, &req); err != nil {
			return c.sendJSON(proto.TypeResponse, f.ID, proto.Response{Error: err.Error()})
		}
		return s.handleRequest(ctx, c, f.ID, req)
	case proto.TypeExec:
		var req proto.ExecRequest
		if err := proto.Decode(f, &req); err != nil {
			return c.sendJSON(proto.TypeExit, f.ID, proto.ExitStatus{Code: -1, ErrKind: proto.ErrKindSetup, Err: err.Error()})
		}
		return s.startSession(c, f.ID, req)
	case proto.TypeStdin, proto.TypeCloseStdin, proto.TypeWindow, proto.TypeSignal, proto.TypeResize:
		s.mu.Lock()
		sess := c.sessions[f.ID]
		s.mu.Unlock()
		if sess == nil {
			// The session ended while the frame was in flight.
			return nil
		}
		sess.handleFrame(c, f)
		return nil
	}
	s.log.Warn("ignoring unexpected frame from host", "type", f.Type, "id", f.ID)
	return nil
}

func (s *Server) handleRequest(ctx context.Context, c *gconn, id uint32, req proto.Request) error {
	reply := func(err error) error {
		var r proto.Response
		if err != nil {
			r.Error = err.Error()
			s.log.Warn("request failed", "op", req.Op, "err", err)
		}
		return c.sendJSON(proto.TypeResponse, id, r)
	}
	sys := s.opts.System
	switch req.Op {
	case proto.OpPing:
		return reply(nil)
	case proto.OpDetach:
		// Taken off the connection too, so that its end (if the guest sees one) does
		// not close their stdin as a host that is gone for good would.
		s.mu.Lock()
		for id, sess := range c.sessions {
			sess.detach(c)
			delete(c.sessions, id)
		}
		s.mu.Unlock()
		return reply(nil)
	case proto.OpSetup:
		if req.Setup == nil {
			return reply(errors.New("setup request without setup"))
		}
		// Checked before anything is touched, so a refused Setup can be corrected
		// and sent again.
		if err := validateSetup(req.Setup); err != nil {
			return reply(err)
		}
		s.mu.Lock()
		done := s.setupDone
		// A failed Setup may have mounted half the root, so it is not retried
		// either: the host must start a fresh VM.
		s.setupDone = true
		s.mu.Unlock()
		if done {
			return reply(errors.New("setup already done"))
		}
		if sys == nil {
			return reply(errors.New("setup is not supported by this server"))
		}
		if err := proto.ValidateHosts(req.Setup.Hosts); err != nil {
			return reply(fmt.Errorf("setup: %w", err))
		}
		if err := proto.ValidateVolumes(req.Setup.Volumes); err != nil {
			return reply(fmt.Errorf("setup: %w", err))
		}
		if err := sys.Setup(ctx, *req.Setup); err != nil {
			return reply(err)
		}
		if err := sys.MountVolumes(req.Setup.Volumes); err != nil {
			return reply(err)
		}
		s.mu.Lock()
		s.baseEnv = append([]string(nil), req.Setup.Env...)
		s.mu.Unlock()
		if req.Setup.Envd != nil {
			if err := s.serveEnvd(*req.Setup.Envd, req.Setup.Env); err != nil {
				return reply(fmt.Errorf("setup: %w", err))
			}
		}
		s.log.Info("setup done", "hostname", req.Setup.Hostname)
		return reply(nil)
	case proto.OpIdentity:
		id := req.Identity
		if id == nil {
			return reply(errors.New("identity request without identity"))
		}
		if err := proto.ValidateNameservers(id.Nameservers); err != nil {
			return reply(fmt.Errorf("identity: %w", err))
		}
		if err := proto.ValidateVolumes(id.Volumes); err != nil {
			return reply(fmt.Errorf("identity: %w", err))
		}
		if err := proto.ValidateHosts(id.Hosts); err != nil {
			return reply(fmt.Errorf("identity: %w", err))
		}
		s.mu.Lock()
		done := s.setupDone
		s.mu.Unlock()
		if !done {
			return reply(errors.New("identity before setup"))
		}
		if sys == nil {
			return reply(errors.New("identity is not supported by this server"))
		}
		if id.Hostname != "" {
			if err := sys.SetHostname(id.Hostname, id.Hosts); err != nil {
				return reply(err)
			}
		}
		if err := sys.SetTime(ctx, proto.SetTime{TimeUnixNano: id.TimeUnixNano, Entropy: id.Entropy}); err != nil {
			return reply(err)
		}
		// Identity is on the warm start's critical path: without nameservers it
		// touches no file.
		if len(id.Nameservers) > 0 {
			if err := sys.SetNameservers(id.Nameservers); err != nil {
				return reply(err)
			}
		}
		if err := sys.MountVolumes(id.Volumes); err != nil {
			return reply(err)
		}
		s.mu.Lock()
		s.baseEnv = append([]string(nil), id.Env...)
		s.mu.Unlock()
		if id.Envd != nil {
			if err := s.serveEnvd(*id.Envd, id.Env); err != nil {
				return reply(fmt.Errorf("identity: %w", err))
			}
		}
		s.log.Info("identity set", "hostname", id.Hostname)
		return reply(nil)
	case proto.OpKillAll:
		if sys == nil {
			return reply(errors.New("kill_all is not supported by this server"))
		}
		return reply(sys.KillAll(ctx))
	case proto.OpFreeze:
		if sys == nil {
			return reply(errors.New("freeze is not supported by this server"))
		}
		if err := sys.Freeze(); err != nil {
			return reply(err)
		}
		s.mu.Lock()
		if s.thawTimer != nil {
			s.thawTimer.Stop()
		}
		// Thawed by itself if the host never comes back to do it.
		s.thawTimer = time.AfterFunc(proto.FreezeLimit, func() {
			if err := sys.Thaw(); err == nil {
				s.log.Warn("thawed the filesystem: no host thawed it in time", "limit", proto.FreezeLimit)
			}
		})
		s.mu.Unlock()
		return reply(nil)
	case proto.OpThaw:
		if sys == nil {
			return reply(errors.New("thaw is not supported by this server"))
		}
		s.mu.Lock()
		if s.thawTimer != nil {
			s.thawTimer.Stop()
			s.thawTimer = nil
		}
		s.mu.Unlock()
		return reply(sys.Thaw())
	case proto.OpSetTime:
		if req.SetTime == nil {
			return reply(errors.New("set_time request without set_time"))
		}
		if sys == nil {
			return reply(errors.New("set_time is not supported by this server"))
		}
		return reply(sys.SetTime(ctx, *req.SetTime))
	case proto.OpReattach:
		if req.Reattach == nil {
			return reply(errors.New("reattach request without reattach"))
		}
		sess, err := s.claim(c, req.Reattach.Session)
		if err != nil {
			return reply(err)
		}
		// The reply goes out before the session is bound, so that it
		// precedes the session's frames on c.
		r := &proto.Reattached{Pid: sess.pid, TTY: sess.tty}
		sess.inMu.Lock()
		if sess.hasStdin && !sess.inEOF {
			// Detached by OpDetach, not by a lost connection: its stdin is open, with
			// what is still queued counted against the new host's window.
			r.Stdin, r.StdinWindow = true, max(proto.InitialWindow-sess.inQueued, 0)
		}
		sess.inMu.Unlock()
		err = c.sendJSON(proto.TypeResponse, id, proto.Response{Reattached: r})
		s.bind(sess, c, err == nil)
		if err == nil {
			s.log.Info("session reattached", "session", sess.id, "pid", sess.pid)
		}
		return err
	case proto.OpShutdown:
		if sys == nil {
			return reply(errors.New("shutdown is not supported by this server"))
		}
		if err := reply(nil); err != nil {
			s.log.Warn("could not acknowledge shutdown", "err", err)
		}
		sys.PowerOff(ctx)
		return errors.New("shut down")
	}
	return reply(fmt.Errorf("unknown request op %q", req.Op))
}

// validateSetup checks the parts of a Setup that are plain data (the network and the
// nameservers); devices are checked by System.Setup.
func validateSetup(su *proto.Setup) error {
	if err := su.Net.Validate(); err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	if err := proto.ValidateNameservers(su.Nameservers); err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	return nil
}
