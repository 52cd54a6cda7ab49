package client

import (
	"errors"
	"fmt"
	"io"
	"sync"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// Session is the client side of an attach or an exec: one bidirectional stream that
// carries stdin, terminal resizes and signals one way, output and the exit the other.
// Sends are serialised (the stdin pump, a resize and a signal may come from different
// goroutines).
type Session struct {
	what string
	mu   sync.Mutex
	// The call's own messages.
	stdin      func([]byte) error
	stdinClose func() error
	resize     func(rows, cols uint32) error
	signal     func(int32) error
	recv       func() (response, error)
}

// response is what attach and exec answers have in common.
type response interface {
	GetOutput() *pb.Output
	GetExit() *pb.Exit
}

type stream[Req, Resp any] interface {
	Send(*Req) error
	Receive() (*Resp, error)
}

// Attach opens an attach session to sandbox (ID, name or prefix) on stream.
func Attach(st stream[pb.AttachRequest, pb.AttachResponse], sandbox string) (*Session, error) {
	s := &Session{what: "attach to sandbox " + sandbox}
	send := func(m *pb.AttachRequest) error { return s.locked(func() error { return st.Send(m) }) }
	s.stdin = func(b []byte) error { return send(&pb.AttachRequest{Msg: &pb.AttachRequest_Stdin{Stdin: b}}) }
	s.stdinClose = func() error { return send(&pb.AttachRequest{Msg: &pb.AttachRequest_StdinClose{StdinClose: true}}) }
	s.resize = func(r, c uint32) error {
		return send(&pb.AttachRequest{Msg: &pb.AttachRequest_Resize{Resize: &pb.Resize{Rows: r, Cols: c}}})
	}
	s.signal = func(sig int32) error { return send(&pb.AttachRequest{Msg: &pb.AttachRequest_Signal{Signal: sig}}) }
	s.recv = func() (response, error) { return st.Receive() }
	return s, s.started(send(&pb.AttachRequest{Msg: &pb.AttachRequest_Start{Start: &pb.AttachStart{Sandbox: sandbox}}}))
}

// Exec opens an exec session on stream (start names the sandbox and the command).
func Exec(st stream[pb.ExecRequest, pb.ExecResponse], start *pb.ExecStart) (*Session, error) {
	s := &Session{what: "exec in sandbox " + start.GetSandbox()}
	send := func(m *pb.ExecRequest) error { return s.locked(func() error { return st.Send(m) }) }
	s.stdin = func(b []byte) error { return send(&pb.ExecRequest{Msg: &pb.ExecRequest_Stdin{Stdin: b}}) }
	s.stdinClose = func() error { return send(&pb.ExecRequest{Msg: &pb.ExecRequest_StdinClose{StdinClose: true}}) }
	s.resize = func(r, c uint32) error {
		return send(&pb.ExecRequest{Msg: &pb.ExecRequest_Resize{Resize: &pb.Resize{Rows: r, Cols: c}}})
	}
	s.signal = func(sig int32) error { return send(&pb.ExecRequest{Msg: &pb.ExecRequest_Signal{Signal: sig}}) }
	s.recv = func() (response, error) { return st.Receive() }
	return s, s.started(send(&pb.ExecRequest{Msg: &pb.ExecRequest_Start{Start: start}}))
}

func (s *Session) locked(fn func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fn()
}

// started checks the first send. io.EOF means the server already answered (with an
// error, which Wait reads).
func (s *Session) started(err error) error {
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: %w", s.what, err)
	}
	return nil
}

// Resize tells the session's terminal its size.
func (s *Session) Resize(rows, cols uint16) { _ = s.resize(uint32(rows), uint32(cols)) }

// Signal sends a signal to the session's process.
func (s *Session) Signal(sig int32) { _ = s.signal(sig) }

// PumpStdin copies r to the session's stdin until r ends (then it closes the session's
// stdin) or the stream does. It returns at once.
func (s *Session) PumpStdin(r io.Reader) {
	go func() { // ends with r or with the stream (a failed send)
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Read(buf)
			if n > 0 && s.stdin(append([]byte(nil), buf[:n]...)) != nil {
				return
			}
			if err != nil {
				_ = s.stdinClose()
				return
			}
		}
	}()
}

// Wait writes the session's output to stdout and stderr as it comes and returns its
// exit.
func (s *Session) Wait(stdout, stderr io.Writer) (*pb.Exit, error) {
	for {
		msg, err := s.recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("%s: the server ended the stream without an exit status", s.what)
			}
			return nil, err
		}
		if out := msg.GetOutput(); out != nil {
			w := stdout
			if out.GetStream() == 2 {
				w = stderr
			}
			_, _ = w.Write(out.GetData())
		}
		if exit := msg.GetExit(); exit != nil {
			return exit, nil
		}
	}
}
