package client_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// fakeGuest answers the handshake and then does whatever the test says.
type fakeGuest struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func newFake(t *testing.T) (*fakeGuest, net.Conn) {
	host, guest := net.Pipe()
	t.Cleanup(func() { host.Close(); guest.Close() })
	return &fakeGuest{t: t, conn: guest, r: bufio.NewReader(guest)}, host
}

func (g *fakeGuest) read() (proto.Frame, error) { return proto.ReadFrame(g.r) }

// answerHello reads frames until a hello and answers it with version v.
func (g *fakeGuest) answerHello(v int) error {
	for {
		f, err := g.read()
		if err != nil {
			return err
		}
		if f.Type != proto.TypeHello {
			continue
		}
		var h proto.Hello
		if err := proto.Decode(f, &h); err != nil {
			return err
		}
		rf, _ := proto.JSONFrame(proto.TypeHelloReply, f.ID, proto.HelloReply{Version: v, Nonce: h.Nonce, InitVersion: "fake", KernelRelease: "6.1-fake"})
		return proto.WriteFrame(g.conn, rf)
	}
}

// drain discards whatever the host sends until the connection closes.
func (g *fakeGuest) drain() {
	go func() { _, _ = io.Copy(io.Discard, g.r) }()
}

func handshake(t *testing.T, g *fakeGuest, host net.Conn) *client.Client {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- g.answerHello(proto.Version) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Handshake(ctx, host)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("fake guest: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	if info := c.GuestInfo(); info.InitVersion != "fake" || info.KernelRelease != "6.1-fake" {
		t.Fatalf("guest info %+v", info)
	}
	return c
}

func waitDone(t *testing.T, c *client.Client) error {
	t.Helper()
	select {
	case <-c.Done():
		return c.Err()
	case <-time.After(10 * time.Second):
		t.Fatal("client did not give up on a hostile guest")
		return nil
	}
}

func TestHandshakeTimesOut(t *testing.T) {
	g, host := newFake(t)
	g.drain() // reads hellos, never answers
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := client.HandshakeWithOptions(ctx, host, client.Options{HelloInterval: 50 * time.Millisecond})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
}

func TestHandshakeRejectsOtherVersion(t *testing.T) {
	g, host := newFake(t)
	go func() { _ = g.answerHello(proto.Version + 1); g.drain() }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := client.Handshake(ctx, host); err == nil {
		t.Fatal("handshake accepted an unknown protocol version")
	}
}

func TestHandshakeSurvivesLostHello(t *testing.T) {
	g, host := newFake(t)
	go func() {
		// Drop the first hello, as a guest reopening its port would.
		if _, err := g.read(); err != nil {
			return
		}
		_ = g.answerHello(proto.Version)
		g.drain()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.HandshakeWithOptions(ctx, host, client.Options{HelloInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// After a host reconnect the stream may start with the tail of an old
// frame; the handshake skips to the reply.
func TestHandshakeSkipsGarbageBeforeReply(t *testing.T) {
	g, host := newFake(t)
	go func() {
		stale := mustFrame(proto.Frame{Type: proto.TypeStdout, ID: 3, Payload: []byte("old output")})
		_, _ = g.conn.Write(append(bytes.Repeat([]byte{0xff}, 64), stale[4:]...))
		_ = g.answerHello(proto.Version)
		g.drain()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Handshake(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestHandshakeGivesUpOnEndlessGarbage(t *testing.T) {
	g, host := newFake(t)
	go func() {
		junk := bytes.Repeat([]byte{0x02, 0, 0, 0, 0, 0, 0, 0x10, 0}, 1<<17) // hello-reply lookalikes, 1.1 MiB
		_, _ = g.conn.Write(junk)
	}()
	g.drain()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := client.Handshake(ctx, host)
	var pe *client.ProtocolError
	if !errors.As(err, &pe) {
		t.Fatalf("got %v, want a protocol error", err)
	}
}

func TestGarbageAfterHandshake(t *testing.T) {
	cases := map[string][]byte{
		"unknown type":    mustFrame(proto.Frame{Type: 99, ID: 1}),
		"oversize":        binary.BigEndian.AppendUint32([]byte{byte(proto.TypeStdout), 0, 0, 0, 1}, proto.MaxPayload+1),
		"host-only type":  mustFrame(proto.Frame{Type: proto.TypeExec, ID: 1, Payload: []byte("{}")}),
		"bad json":        mustFrame(proto.Frame{Type: proto.TypeResponse, ID: 1, Payload: []byte("{")}),
		"random bytes":    []byte("\x07\x00\x00garbage that is not a frame at all"),
		"truncated frame": []byte{byte(proto.TypeStdout), 0, 0, 0, 1, 0, 0, 0, 10, 'x'},
	}
	for name, junk := range cases {
		t.Run(name, func(t *testing.T) {
			g, host := newFake(t)
			c := handshake(t, g, host)
			go func() {
				_, _ = g.conn.Write(junk)
				if name == "truncated frame" {
					g.conn.Close()
				}
			}()
			g.drain()
			if err := waitDone(t, c); err == nil {
				t.Fatal("client stopped without an error")
			}
			// Everything fails cleanly afterwards.
			if err := c.Ping(context.Background()); err == nil {
				t.Fatal("ping succeeded on a dead client")
			}
			if _, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"x"}}); err == nil {
				t.Fatal("exec succeeded on a dead client")
			}
		})
	}
}

func mustFrame(f proto.Frame) []byte {
	b, err := proto.AppendFrame(nil, f)
	if err != nil {
		panic(err)
	}
	return b
}

// startSession makes the fake guest accept one exec and returns its id.
func startSession(t *testing.T, g *fakeGuest, c *client.Client) (*client.Session, uint32) {
	t.Helper()
	idc := make(chan uint32, 1)
	go func() {
		for {
			f, err := g.read()
			if err != nil {
				return
			}
			if f.Type == proto.TypeExec {
				sf, _ := proto.JSONFrame(proto.TypeStarted, f.ID, proto.Started{Pid: 42})
				_ = proto.WriteFrame(g.conn, sf)
				idc <- f.ID
				_, _ = io.Copy(io.Discard, g.r)
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	if s.Pid() != 42 {
		t.Fatalf("pid %d", s.Pid())
	}
	return s, <-idc
}

func TestGuestOverrunningWindowIsCutOff(t *testing.T) {
	g, host := newFake(t)
	c := handshake(t, g, host)
	s, id := startSession(t, g, c)
	chunk := make([]byte, proto.MaxChunk)
	go func() {
		// Never read by the host: more than the window must be refused
		// rather than buffered.
		for range proto.InitialWindow/proto.MaxChunk + 2 {
			if err := proto.WriteFrame(g.conn, proto.Frame{Type: proto.TypeStdout, ID: id, Payload: chunk}); err != nil {
				return
			}
		}
	}()
	err := waitDone(t, c)
	var pe *client.ProtocolError
	if !errors.As(err, &pe) {
		t.Fatalf("got %v, want a protocol error", err)
	}
	if _, err := s.Wait(context.Background()); err == nil {
		t.Fatal("Wait returned a status from a dead connection")
	}
	// Buffered data is still readable, then the loss is reported.
	n, err := io.Copy(io.Discard, s.Stdout())
	if err == nil || n != proto.InitialWindow {
		t.Fatalf("read %d bytes, err %v", n, err)
	}
}

func TestExitStatusIsSanitised(t *testing.T) {
	g, host := newFake(t)
	c := handshake(t, g, host)
	s, id := startSession(t, g, c)
	huge := string(bytes.Repeat([]byte("e"), 100000))
	ef, _ := proto.JSONFrame(proto.TypeExit, id, proto.ExitStatus{Code: 1, Err: huge, ErrKind: "weird"})
	go func() { _ = proto.WriteFrame(g.conn, ef) }()
	st, err := s.Wait(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Err) > proto.MaxErrLen+3 || st.ErrKind != proto.ErrKindSetup {
		t.Fatalf("got err of %d bytes, kind %q", len(st.Err), st.ErrKind)
	}
	if _, err := io.Copy(io.Discard, s.Stdout()); err != nil {
		t.Fatalf("stdout after exit: %v", err)
	}
}

// FuzzClientGuestBytes sends arbitrary bytes from a handshaken guest: the
// client may fail, but must not panic or hang.
func FuzzClientGuestBytes(f *testing.F) {
	f.Add(mustFrame(proto.Frame{Type: proto.TypeStdout, ID: 1, Payload: []byte("x")}))
	f.Add(mustFrame(proto.Frame{Type: proto.TypeExit, ID: 1, Payload: []byte(`{"code":1}`)}))
	f.Add(mustFrame(proto.Frame{Type: proto.TypeWindow, ID: 1, Payload: []byte{7, 0, 0, 0, 1}}))
	f.Add([]byte{0, 1, 2, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		g, host := newFake(t)
		c := handshake(t, g, host)
		go func() {
			_, _ = g.conn.Write(data)
			g.conn.Close()
		}()
		g.drain()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = c.Ping(ctx)
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("client did not notice the closed connection")
		}
	})
}

// handshakeWithSessions handshakes with a fake guest whose hello reply
// lists sessions of earlier connections.
func handshakeWithSessions(t *testing.T, g *fakeGuest, host net.Conn, ids []uint32) *client.Client {
	t.Helper()
	go func() {
		for {
			f, err := g.read()
			if err != nil {
				return
			}
			if f.Type == proto.TypeHello {
				var h proto.Hello
				_ = proto.Decode(f, &h)
				rf, _ := proto.JSONFrame(proto.TypeHelloReply, 0, proto.HelloReply{Version: proto.Version, Nonce: h.Nonce, Sessions: ids})
				_ = proto.WriteFrame(g.conn, rf)
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Handshake(ctx, host)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestExecAvoidsIDsOfEarlierSessions(t *testing.T) {
	g, host := newFake(t)
	c := handshakeWithSessions(t, g, host, []uint32{1, 2, 4})
	if got := c.GuestInfo().Sessions; len(got) != 3 || got[2] != 4 {
		t.Fatalf("guest info sessions %v", got)
	}
	// A ping takes id 3, the session the next free one.
	go func() {
		f, err := g.read()
		if err != nil || f.Type != proto.TypeRequest || f.ID != 3 {
			t.Errorf("ping frame %v/%d: %v, want request 3", f.Type, f.ID, err)
			return
		}
		rf, _ := proto.JSONFrame(proto.TypeResponse, f.ID, proto.Response{})
		_ = proto.WriteFrame(g.conn, rf)
	}()
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, id := startSession(t, g, c); id != 5 {
		t.Fatalf("new session got id %d, want 5", id)
	}
}

func TestReattach(t *testing.T) {
	g, host := newFake(t)
	c := handshakeWithSessions(t, g, host, []uint32{7})
	go func() {
		f, err := g.read()
		if err != nil {
			return
		}
		var req proto.Request
		if err := proto.Decode(f, &req); err != nil || req.Op != proto.OpReattach || req.Reattach == nil || req.Reattach.Session != 7 {
			t.Errorf("reattach request %+v: %v", req, err)
			return
		}
		rf, _ := proto.JSONFrame(proto.TypeResponse, f.ID, proto.Response{Reattached: &proto.Reattached{Pid: 99, TTY: true}})
		ef, _ := proto.JSONFrame(proto.TypeExit, 7, proto.ExitStatus{Code: 7})
		var b []byte
		for _, fr := range []proto.Frame{rf, {Type: proto.TypeStdout, ID: 7, Payload: []byte("held back")}, ef} {
			b, _ = proto.AppendFrame(b, fr)
		}
		_, _ = g.conn.Write(b) // all at once: output right behind the reply
		_, _ = io.Copy(io.Discard, g.r)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := c.Reattach(ctx, 7)
	if err != nil {
		t.Fatal(err)
	}
	if s.ID() != 7 || s.Pid() != 99 {
		t.Fatalf("session id %d pid %d", s.ID(), s.Pid())
	}
	out, err := io.ReadAll(s.Stdout())
	if err != nil || string(out) != "held back" {
		t.Fatalf("stdout %q %v", out, err)
	}
	if st, err := s.Wait(ctx); err != nil || st.Code != 7 {
		t.Fatalf("wait: %+v %v", st, err)
	}
	if err := s.Resize(ctx, 1, 1); err != nil {
		t.Fatalf("resize of a TTY session: %v", err)
	}
}

func TestReattachRefusedOrMalformed(t *testing.T) {
	for name, resp := range map[string]proto.Response{
		"refused":      {Error: "no such session"},
		"without info": {},
	} {
		t.Run(name, func(t *testing.T) {
			g, host := newFake(t)
			c := handshake(t, g, host)
			go func() {
				f, err := g.read()
				if err != nil {
					return
				}
				rf, _ := proto.JSONFrame(proto.TypeResponse, f.ID, resp)
				_ = proto.WriteFrame(g.conn, rf)
				_, _ = io.Copy(io.Discard, g.r)
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := c.Reattach(ctx, 3)
			var gerr *client.GuestError
			var perr *client.ProtocolError
			switch {
			case resp.Error != "" && !errors.As(err, &gerr):
				t.Fatalf("got %v, want a guest error", err)
			case resp.Error == "" && (err == nil || !errors.As(waitDone(t, c), &perr)):
				t.Fatalf("got %v / %v, want the connection closed for a protocol violation", err, c.Err())
			}
		})
	}
}

// A guest filling its window with 1-byte frames makes the host hold about the window's
// bytes, not a slice per byte.
func TestSmallFramesStayWithinTheWindow(t *testing.T) {
	g, host := newFake(t)
	c := handshake(t, g, host)
	s, id := startSession(t, g, c)
	var all []byte
	for range proto.InitialWindow {
		all, _ = proto.AppendFrame(all, proto.Frame{Type: proto.TypeStdout, ID: id, Payload: []byte{'x'}})
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	// net.Pipe's Write returns once the client's read loop has taken every byte; the
	// last frames are handled a moment later.
	if _, err := g.conn.Write(all); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(all)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d one-byte frames buffered in %d KiB", proto.InitialWindow, grown>>10)
	if grown > 4*proto.InitialWindow {
		t.Errorf("the host holds %d KiB for a window of %d KiB", grown>>10, proto.InitialWindow>>10)
	}
	n, _ := io.CopyN(io.Discard, s.Stdout(), proto.InitialWindow)
	if n != proto.InitialWindow {
		t.Errorf("read back %d bytes, want %d", n, proto.InitialWindow)
	}
}

// A stdin write waiting for credit the guest never grants returns once stdin is closed.
func TestStdinWriteEndsOnClose(t *testing.T) {
	g, host := newFake(t)
	c := handshake(t, g, host)
	go func() {
		for {
			f, err := g.read()
			if err != nil {
				return
			}
			if f.Type == proto.TypeExec {
				sf, _ := proto.JSONFrame(proto.TypeStarted, f.ID, proto.Started{Pid: 42})
				_ = proto.WriteFrame(g.conn, sf)
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"cat"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.Stdin().Write(make([]byte, 2*proto.InitialWindow)) // more than the guest granted
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // let it block on credit (the test holds either way)
	_ = s.Stdin().Close()
	select {
	case err := <-done:
		if err == nil {
			t.Error("the write returned no error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a stdin write still blocks after stdin was closed")
	}
}
