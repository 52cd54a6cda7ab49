package envd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/processpb"
	"github.com/fireworks-sandbox/fireworks/internal/guest/pty"
)

// A process started through envd: its output goes to every stream following it (Start's,
// and Connect's); input comes from SendInput/StreamInput; it is known by its pid, and by
// its tag if it has one, until it ends.

// maxProcesses bounds the processes envd runs at once.
const maxProcesses = 1024

type proc struct {
	pid    uint32
	tag    string
	config *processpb.ProcessConfig
	tty    *os.File // the terminal's master, with a PTY
	stdin  *os.File // nil without stdin (and with a PTY: input goes to tty)

	mu     sync.Mutex
	subs   map[chan *processpb.ProcessEvent]struct{}
	end    *processpb.ProcessEvent // once it ended
	output sync.WaitGroup          // the output pumps
	// pumping and reading count the pumps still running and those of them waiting in a
	// read (not handing data on); reads counts the reads that returned: see awaitOutput.
	pumping, reading atomic.Int32
	reads            atomic.Int64
}

// outputGrace is how long, after a process exited, its output may stay open with nothing
// coming: then a child it left behind holds it (`sleep 300 &`), and the process's end is
// the end, as with E2B's envd (what the child writes later is dropped).
const outputGrace = 200 * time.Millisecond

// awaitOutput returns once the output pumps are done, or, outputGrace after the exit,
// once every one left is only waiting for data (never while data is being handed to a
// slow follower: no byte written before the exit is lost).
func (p *proc) awaitOutput() {
	done := make(chan struct{})
	go func() { p.output.Wait(); close(done) }()
	exit := time.Now()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	last := int64(-1)
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			// Idle: every pump in a read, and no read returned since the last tick (a
			// read returning data at the instant of the check would still count as
			// one). A child that keeps writing would keep that from ever holding: from
			// five graces on, every pump in a read is enough (no data in hand).
			n := p.reads.Load()
			waited := time.Since(exit)
			if waited >= outputGrace && p.reading.Load() == p.pumping.Load() && (n == last || waited >= 5*outputGrace) {
				return
			}
			last = n
		}
	}
}

type processes struct {
	mu    sync.Mutex
	byPID map[uint32]*proc
}

func newProcesses() *processes { return &processes{byPID: map[uint32]*proc{}} }

func (ps *processes) find(sel *processpb.ProcessSelector) (*proc, error) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	switch s := sel.GetSelector().(type) {
	case *processpb.ProcessSelector_Pid:
		if p := ps.byPID[s.Pid]; p != nil {
			return p, nil
		}
	case *processpb.ProcessSelector_Tag:
		for _, p := range ps.byPID {
			if p.tag != "" && p.tag == s.Tag {
				return p, nil
			}
		}
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("no process selected (pid or tag)"))
	}
	return nil, connect.NewError(connect.CodeNotFound, errNotRunning)
}

func (ps *processes) killAll() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for pid := range ps.byPID {
		_ = unix.Kill(int(pid), unix.SIGKILL)
	}
}

// subscribe follows p's events from now on (nil if it ended: the end event is returned).
func (p *proc) subscribe() (chan *processpb.ProcessEvent, *processpb.ProcessEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.end != nil {
		return nil, p.end
	}
	ch := make(chan *processpb.ProcessEvent, 256)
	p.subs[ch] = struct{}{}
	return ch, nil
}

func (p *proc) unsubscribe(ch chan *processpb.ProcessEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.subs[ch]; ok {
		delete(p.subs, ch)
		close(ch)
	}
}

// publish sends e to every follower; a follower that does not keep up waits the
// process's output (the pipes fill, the process blocks), as a terminal would.
func (p *proc) publish(e *processpb.ProcessEvent) {
	p.mu.Lock()
	subs := slices.Collect(maps.Keys(p.subs))
	p.mu.Unlock()
	for _, ch := range subs {
		func() {
			defer func() { _ = recover() }() // unsubscribed (closed) meanwhile
			select {
			case ch <- e:
			case <-time.After(time.Minute):
				// A follower gone quiet for a minute is dropped, not waited for forever.
				p.unsubscribe(ch)
			}
		}()
	}
}

type processService struct{ s *Server }

func (h *processService) Start(ctx context.Context, req *connect.Request[processpb.StartRequest], stream *connect.ServerStream[processpb.StartResponse]) error {
	p, ch, err := h.s.start(req)
	if err != nil {
		return err
	}
	defer p.unsubscribe(ch)
	if err := stream.Send(&processpb.StartResponse{Event: &processpb.ProcessEvent{Event: &processpb.ProcessEvent_Start{Start: &processpb.ProcessEvent_StartEvent{Pid: p.pid}}}}); err != nil {
		return err
	}
	return follow(ctx, ch, keepAliveEvery(req.Header()), func(e *processpb.ProcessEvent) error {
		return stream.Send(&processpb.StartResponse{Event: e})
	})
}

func (h *processService) Connect(ctx context.Context, req *connect.Request[processpb.ConnectRequest], stream *connect.ServerStream[processpb.ConnectResponse]) error {
	p, err := h.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return err
	}
	ch, end := p.subscribe()
	if end != nil {
		return connect.NewError(connect.CodeNotFound, errNotRunning)
	}
	defer p.unsubscribe(ch)
	if err := stream.Send(&processpb.ConnectResponse{Event: &processpb.ProcessEvent{Event: &processpb.ProcessEvent_Start{Start: &processpb.ProcessEvent_StartEvent{Pid: p.pid}}}}); err != nil {
		return err
	}
	return follow(ctx, ch, keepAliveEvery(req.Header()), func(e *processpb.ProcessEvent) error {
		return stream.Send(&processpb.ConnectResponse{Event: e})
	})
}

// follow sends a process's events until its end (sent), keeping the stream alive.
func follow(ctx context.Context, ch chan *processpb.ProcessEvent, every time.Duration, send func(*processpb.ProcessEvent) error) error {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if err := send(&processpb.ProcessEvent{Event: &processpb.ProcessEvent_Keepalive{Keepalive: &processpb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
		case e, ok := <-ch:
			if !ok {
				return nil
			}
			if err := send(e); err != nil {
				return err
			}
			if e.GetEnd() != nil {
				return nil
			}
		}
	}
}

// start starts the process a Start call asks for, followed by the returned channel.
func (s *Server) start(req *connect.Request[processpb.StartRequest]) (*proc, chan *processpb.ProcessEvent, error) {
	m := req.Msg
	cfg := m.GetProcess()
	if cfg.GetCmd() == "" {
		return nil, nil, connect.NewError(connect.CodeInvalidArgument, errors.New("no command given"))
	}
	s.procs.mu.Lock()
	n := len(s.procs.byPID)
	s.procs.mu.Unlock()
	if n >= maxProcesses {
		return nil, nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("%d processes run already", n))
	}
	userName := s.userOf(req.Header())
	u, err := s.cfg.Spawner.User(userName)
	if err != nil {
		return nil, nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	dir := u.Home
	s.accessMu.RLock()
	if s.cfg.DefaultDir != "" {
		dir = s.cfg.DefaultDir
	}
	s.accessMu.RUnlock()
	if cfg.Cwd != nil && *cfg.Cwd != "" {
		if dir, err = s.resolvePath(req.Header(), *cfg.Cwd); err != nil {
			return nil, nil, err
		}
	}
	s.accessMu.RLock()
	env := slices.Clone(s.cfg.Env)
	s.accessMu.RUnlock()
	env = setEnv(setEnv(env, "HOME", u.Home), "USER", userName)
	for _, k := range slices.Sorted(maps.Keys(cfg.GetEnvs())) {
		env = setEnv(env, k, cfg.GetEnvs()[k])
	}
	c := Cmd{Path: cfg.GetCmd(), Args: append([]string{cfg.GetCmd()}, cfg.GetArgs()...), Env: env, Dir: dir, User: userName}
	p := &proc{tag: m.GetTag(), config: cfg, subs: map[chan *processpb.ProcessEvent]struct{}{}}
	var closeAfter []*os.File // the child's ends, closed once it has them
	var outs []output
	fail := func(err error) (*proc, chan *processpb.ProcessEvent, error) {
		for _, f := range closeAfter {
			f.Close()
		}
		for _, o := range outs {
			o.f.Close()
		}
		if p.stdin != nil {
			p.stdin.Close()
		}
		return nil, nil, err
	}
	if m.Pty != nil {
		size := m.GetPty().GetSize()
		master, slave, err := pty.Open(uint16(size.GetRows()), uint16(size.GetCols()))
		if err != nil {
			return fail(connect.NewError(connect.CodeInternal, err))
		}
		p.tty = master
		c.Stdin, c.Stdout, c.Stderr, c.TTY = slave, slave, slave, true
		c.Env = append(c.Env, "TERM=xterm-256color")
		closeAfter = append(closeAfter, slave)
		outs = append(outs, output{master, "pty"})
	} else {
		if m.GetStdin() {
			r, w, err := os.Pipe()
			if err != nil {
				return fail(connect.NewError(connect.CodeInternal, err))
			}
			c.Stdin, p.stdin = r, w
			closeAfter = append(closeAfter, r)
		} else {
			null, err := os.Open(os.DevNull)
			if err != nil {
				return fail(connect.NewError(connect.CodeInternal, err))
			}
			c.Stdin = null
			closeAfter = append(closeAfter, null)
		}
		for _, kind := range []string{"stdout", "stderr"} {
			r, w, err := os.Pipe()
			if err != nil {
				return fail(connect.NewError(connect.CodeInternal, err))
			}
			if kind == "stdout" {
				c.Stdout = w
			} else {
				c.Stderr = w
			}
			closeAfter = append(closeAfter, w)
			outs = append(outs, output{r, kind})
		}
	}
	ch := make(chan *processpb.ProcessEvent, 256)
	p.subs[ch] = struct{}{}
	pid, exited, err := s.cfg.Spawner.Spawn(c)
	for _, f := range closeAfter {
		f.Close()
	}
	closeAfter = nil
	if err != nil {
		return fail(connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("start %s: %w", cfg.GetCmd(), err)))
	}
	p.pid = uint32(pid)
	s.procs.mu.Lock()
	s.procs.byPID[p.pid] = p
	s.procs.mu.Unlock()
	for _, o := range outs {
		p.output.Add(1)
		p.pumping.Add(1)
		go p.pump(o.f, o.kind)
	}
	go func() {
		ex := <-exited
		p.awaitOutput() // every byte before the end
		if p.tty != nil {
			p.tty.Close()
		}
		if p.stdin != nil {
			p.stdin.Close()
		}
		s.procs.mu.Lock()
		delete(s.procs.byPID, p.pid)
		s.procs.mu.Unlock()
		end := &processpb.ProcessEvent_EndEvent{ExitCode: int32(ex.Code), Exited: ex.Signal == 0, Status: "exit status " + fmt.Sprint(ex.Code)}
		if ex.Signal != 0 {
			end.ExitCode = -1
			end.Status = "signal: " + unix.SignalName(unix.Signal(ex.Signal))
		}
		e := &processpb.ProcessEvent{Event: &processpb.ProcessEvent_End{End: end}}
		p.publish(e)
		p.mu.Lock()
		p.end = e
		subs := p.subs
		p.subs = map[chan *processpb.ProcessEvent]struct{}{}
		p.mu.Unlock()
		for ch := range subs {
			close(ch)
		}
	}()
	return p, ch, nil
}

// output is a process's output file and what it carries: stdout, stderr or pty.
type output struct {
	f    *os.File
	kind string
}

// pump publishes what the process writes on f until it closes. A terminal's master
// reads EIO once the last slave is closed (the process ended): that is its end.
func (p *proc) pump(f *os.File, kind string) {
	defer p.output.Done()
	defer p.pumping.Add(-1)
	if kind != "pty" {
		defer f.Close()
	}
	buf := make([]byte, 32<<10)
	for {
		p.reading.Add(1)
		n, err := f.Read(buf)
		p.reads.Add(1)
		p.reading.Add(-1)
		if n > 0 {
			data := slices.Clone(buf[:n])
			d := &processpb.ProcessEvent_DataEvent{}
			switch kind {
			case "stdout":
				d.Output = &processpb.ProcessEvent_DataEvent_Stdout{Stdout: data}
			case "stderr":
				d.Output = &processpb.ProcessEvent_DataEvent_Stderr{Stderr: data}
			default:
				d.Output = &processpb.ProcessEvent_DataEvent_Pty{Pty: data}
			}
			p.publish(&processpb.ProcessEvent{Event: &processpb.ProcessEvent_Data{Data: d}})
		}
		if err != nil {
			return
		}
	}
}

func (h *processService) List(ctx context.Context, req *connect.Request[processpb.ListRequest]) (*connect.Response[processpb.ListResponse], error) {
	h.s.procs.mu.Lock()
	defer h.s.procs.mu.Unlock()
	out := &processpb.ListResponse{}
	for _, pid := range slices.Sorted(maps.Keys(h.s.procs.byPID)) {
		p := h.s.procs.byPID[pid]
		info := &processpb.ProcessInfo{Config: p.config, Pid: p.pid}
		if p.tag != "" {
			info.Tag = &p.tag
		}
		out.Processes = append(out.Processes, info)
	}
	return connect.NewResponse(out), nil
}

func (h *processService) Update(ctx context.Context, req *connect.Request[processpb.UpdateRequest]) (*connect.Response[processpb.UpdateResponse], error) {
	p, err := h.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if req.Msg.Pty != nil {
		if p.tty == nil {
			return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("the process has no terminal"))
		}
		size := req.Msg.GetPty().GetSize()
		if err := pty.SetSize(p.tty, uint16(size.GetRows()), uint16(size.GetCols())); err != nil {
			return nil, connect.NewError(connect.CodeInternal, err)
		}
	}
	return connect.NewResponse(&processpb.UpdateResponse{}), nil
}

// write gives a process input: its terminal's, or its stdin's.
func (p *proc) write(in *processpb.ProcessInput) error {
	var f *os.File
	var data []byte
	switch i := in.GetInput().(type) {
	case *processpb.ProcessInput_Pty:
		f, data = p.tty, i.Pty
	case *processpb.ProcessInput_Stdin:
		f, data = p.stdin, i.Stdin
		if f == nil && p.tty != nil {
			f = p.tty
		}
	default:
		return connect.NewError(connect.CodeInvalidArgument, errors.New("no input given"))
	}
	if f == nil {
		return connect.NewError(connect.CodeFailedPrecondition, errors.New("the process takes no input (start it with stdin)"))
	}
	if _, err := f.Write(data); err != nil {
		if errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EPIPE) {
			return connect.NewError(connect.CodeFailedPrecondition, errors.New("the process's input is closed"))
		}
		return connect.NewError(connect.CodeInternal, err)
	}
	return nil
}

func (h *processService) SendInput(ctx context.Context, req *connect.Request[processpb.SendInputRequest]) (*connect.Response[processpb.SendInputResponse], error) {
	p, err := h.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.write(req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&processpb.SendInputResponse{}), nil
}

func (h *processService) StreamInput(ctx context.Context, stream *connect.ClientStream[processpb.StreamInputRequest]) (*connect.Response[processpb.StreamInputResponse], error) {
	var p *proc
	for stream.Receive() {
		switch e := stream.Msg().GetEvent().(type) {
		case *processpb.StreamInputRequest_Start:
			found, err := h.s.procs.find(e.Start.GetProcess())
			if err != nil {
				return nil, err
			}
			p = found
		case *processpb.StreamInputRequest_Data:
			if p == nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("input before the process was named (start event)"))
			}
			if err := p.write(e.Data.GetInput()); err != nil {
				return nil, err
			}
		}
	}
	if err := stream.Err(); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return connect.NewResponse(&processpb.StreamInputResponse{}), nil
}

func (h *processService) SendSignal(ctx context.Context, req *connect.Request[processpb.SendSignalRequest]) (*connect.Response[processpb.SendSignalResponse], error) {
	p, err := h.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	var sig unix.Signal
	switch req.Msg.GetSignal() {
	case processpb.Signal_SIGNAL_SIGKILL:
		sig = unix.SIGKILL
	case processpb.Signal_SIGNAL_SIGTERM:
		sig = unix.SIGTERM
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("signal %v: want SIGTERM or SIGKILL", req.Msg.GetSignal()))
	}
	// Its whole process group when it leads one (a terminal's session), else itself.
	if err := unix.Kill(-int(p.pid), sig); err != nil {
		if err := unix.Kill(int(p.pid), sig); err != nil && !errors.Is(err, unix.ESRCH) {
			return nil, connect.NewError(connect.CodeInternal, err)
		}
	}
	return connect.NewResponse(&processpb.SendSignalResponse{}), nil
}

func (h *processService) CloseStdin(ctx context.Context, req *connect.Request[processpb.CloseStdinRequest]) (*connect.Response[processpb.CloseStdinResponse], error) {
	p, err := h.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	switch {
	case p.stdin != nil:
		p.stdin.Close()
	case p.tty != nil:
		// A terminal's end of input is its EOF character.
		if _, err := p.tty.Write([]byte{4}); err != nil {
			return nil, connect.NewError(connect.CodeInternal, err)
		}
	default:
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("the process takes no input"))
	}
	return connect.NewResponse(&processpb.CloseStdinResponse{}), nil
}

// setEnv sets key in env, replacing an entry of that key: a C library's getenv reads the
// first, so a key must appear once for the latest value to be the one seen.
func setEnv(env []string, key, value string) []string {
	env = slices.DeleteFunc(env, func(kv string) bool { k, _, _ := strings.Cut(kv, "="); return k == key })
	return append(env, key+"="+value)
}
