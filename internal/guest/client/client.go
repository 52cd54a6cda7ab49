// Package client is the host side of the guest agent channel (see package
// proto): it performs the handshake with fireworks-init and runs control
// requests and exec sessions over one connection.
//
// The guest is untrusted. Everything read from it is bounded: frame sizes by
// proto.ReadFrame, buffered output by the per-stream window the client
// grants, the number of sessions by Options.MaxSessions, waits by contexts,
// and a stuck write by Options.WriteTimeout. A guest that breaks the
// protocol gets its connection closed; no input makes the client panic.
package client

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// GuestInfo is what the guest reported in the handshake.
type GuestInfo struct {
	ProtocolVersion int
	InitVersion     string
	KernelRelease   string
	// Sessions are the ids of sessions earlier connections left in the
	// guest (running, or awaiting reattach); see Client.Reattach. Sessions
	// this client opens never use them.
	Sessions []uint32
}

// Options tunes a Client. Zero values mean the defaults.
type Options struct {
	// MaxSessions bounds concurrently open sessions (default 256). Each
	// session may buffer up to 2*proto.InitialWindow bytes of output.
	MaxSessions int
	// WriteTimeout is how long one frame write may block before the guest
	// is considered hung and the connection is closed (default 30s).
	WriteTimeout time.Duration
	// HandshakeTimeout applies when Handshake's ctx has no deadline
	// (default 30s).
	HandshakeTimeout time.Duration
	// HelloInterval is how often hello is re-sent until answered (default
	// 500ms); a hello can be lost while the guest reopens its port.
	HelloInterval time.Duration
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

func (o *Options) defaults() {
	if o.MaxSessions <= 0 {
		o.MaxSessions = 256
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 30 * time.Second
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 30 * time.Second
	}
	if o.HelloInterval <= 0 {
		o.HelloInterval = 500 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// ErrClosed is returned after Close.
var ErrClosed = errors.New("guest client closed")

// ProtocolError is a violation of the protocol by the guest; the
// connection is closed when one occurs.
type ProtocolError struct{ Msg string }

func (e *ProtocolError) Error() string { return "guest protocol violation: " + e.Msg }

func violation(format string, a ...any) error {
	return &ProtocolError{Msg: fmt.Sprintf(format, a...)}
}

// GuestError is a request the guest received and refused.
type GuestError struct {
	Op  string
	Msg string
}

func (e *GuestError) Error() string { return fmt.Sprintf("guest %s: %s", e.Op, e.Msg) }

// Client is one handshaken connection to a guest. It is safe for
// concurrent use.
type Client struct {
	conn io.ReadWriteCloser
	opts Options
	log  *slog.Logger
	info GuestInfo

	wq         chan *outFrame
	creditKick chan struct{}
	helloCh    chan proto.HelloReply
	nonce      uint64

	mu          sync.Mutex
	nextID      uint32
	pending     map[uint32]*call
	sessions    map[uint32]*Session
	reserved    map[uint32]struct{} // ids of sessions of earlier connections
	creditDue   map[*stream]struct{}
	err         error
	done        chan struct{}
	wg          sync.WaitGroup
	closeCalled bool
}

// call is a control request waiting for its response.
type call struct {
	ch chan proto.Response // buffered
	// apply, if set, runs on the read loop when the response arrives,
	// before any later frame is dispatched; an error is a protocol
	// violation.
	apply func(proto.Response) error
}

type outFrame struct {
	f   proto.Frame
	res chan error // buffered; nil when nobody waits
}

// Handshake performs the versioned handshake on conn with default options.
func Handshake(ctx context.Context, conn io.ReadWriteCloser) (*Client, error) {
	return HandshakeWithOptions(ctx, conn, Options{})
}

// HandshakeWithOptions performs the handshake: it sends hello (re-sending
// it every HelloInterval) until the guest answers with the same nonce, then
// checks the guest's protocol version. It is bounded by ctx, or by
// HandshakeTimeout if ctx has no deadline. On failure conn is closed.
func HandshakeWithOptions(ctx context.Context, conn io.ReadWriteCloser, opts Options) (*Client, error) {
	opts.defaults()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.HandshakeTimeout)
		defer cancel()
	}
	var nb [8]byte
	_, _ = rand.Read(nb[:])
	c := &Client{
		conn:       conn,
		opts:       opts,
		log:        opts.Logger,
		wq:         make(chan *outFrame, 64),
		creditKick: make(chan struct{}, 1),
		helloCh:    make(chan proto.HelloReply, 1),
		nonce:      binary.LittleEndian.Uint64(nb[:]),
		pending:    map[uint32]*call{},
		sessions:   map[uint32]*Session{},
		reserved:   map[uint32]struct{}{},
		creditDue:  map[*stream]struct{}{},
		done:       make(chan struct{}),
	}
	c.wg.Add(2)
	go c.readLoop()
	go c.writeLoop()

	hello, err := proto.JSONFrame(proto.TypeHello, 0, proto.Hello{Version: proto.Version, Nonce: c.nonce})
	if err != nil {
		c.Close()
		return nil, err
	}
	tick := time.NewTicker(opts.HelloInterval)
	defer tick.Stop()
	for {
		c.enqueue(hello)
		select {
		case hr := <-c.helloCh:
			if hr.Version != proto.Version {
				c.Close()
				return nil, fmt.Errorf("guest speaks protocol version %d, host supports %d", hr.Version, proto.Version)
			}
			ids := hr.Sessions
			if len(ids) > proto.MaxHelloSessions {
				ids = ids[:proto.MaxHelloSessions]
			}
			c.mu.Lock()
			for _, id := range ids {
				c.reserved[id] = struct{}{}
			}
			c.mu.Unlock()
			c.info = GuestInfo{ProtocolVersion: hr.Version, InitVersion: hr.InitVersion, KernelRelease: hr.KernelRelease, Sessions: slices.Clone(ids)}
			return c, nil
		case <-tick.C:
		case <-c.done:
			return nil, fmt.Errorf("guest handshake: %w", c.Err())
		case <-ctx.Done():
			c.Close()
			return nil, fmt.Errorf("guest handshake: %w", ctx.Err())
		}
	}
}

// GuestInfo returns what the guest reported in the handshake.
func (c *Client) GuestInfo() GuestInfo {
	info := c.info
	info.Sessions = slices.Clone(info.Sessions)
	return info
}

// Done is closed when the connection is no longer usable.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the client stopped, or nil while it runs.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection and waits for the client's goroutines. Open
// sessions keep running in the guest.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	c.wg.Wait()
	return nil
}

// fail stops the client with err (the first error wins).
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	close(c.done)
	c.mu.Unlock()
	if !errors.Is(err, ErrClosed) {
		c.log.Warn("guest connection failed", "err", err)
	}
	c.conn.Close()
}

// enqueue queues a frame without waiting for it to be written.
func (c *Client) enqueue(f proto.Frame) {
	select {
	case c.wq <- &outFrame{f: f}:
	case <-c.done:
	}
}

// send queues a frame and waits until it is written.
func (c *Client) send(ctx context.Context, f proto.Frame) error {
	_, err := c.sendQueued(ctx, f)
	return err
}

// sendQueued is send that also reports whether the frame was queued (and
// so will be written unless the connection fails).
func (c *Client) sendQueued(ctx context.Context, f proto.Frame) (bool, error) {
	of := &outFrame{f: f, res: make(chan error, 1)}
	select {
	case c.wq <- of:
	case <-c.done:
		return false, c.Err()
	case <-ctx.Done():
		return false, ctx.Err()
	}
	select {
	case err := <-of.res:
		return true, err
	case <-c.done:
		return true, c.Err()
	case <-ctx.Done():
		// The writer still writes it whole; only the wait is abandoned.
		return true, ctx.Err()
	}
}

func (c *Client) writeLoop() {
	defer c.wg.Done()
	for {
		select {
		case of := <-c.wq:
			err := c.write(of.f)
			if of.res != nil {
				of.res <- err
			}
			if err != nil {
				c.fail(err)
				return
			}
		case <-c.creditKick:
			if err := c.flushCredits(); err != nil {
				c.fail(err)
				return
			}
		case <-c.done:
			return
		}
	}
}

// write writes one frame; a guest that stops reading for WriteTimeout
// gets the connection closed, which also releases the blocked write.
func (c *Client) write(f proto.Frame) error {
	t := time.AfterFunc(c.opts.WriteTimeout, func() {
		c.fail(fmt.Errorf("writing %s frame to guest: blocked for %s", f.Type, c.opts.WriteTimeout))
	})
	defer t.Stop()
	return proto.WriteFrame(c.conn, f)
}

// flushCredits sends the Window frames that readers of output streams
// have earned.
func (c *Client) flushCredits() error {
	c.mu.Lock()
	due := make([]*stream, 0, len(c.creditDue))
	for st := range c.creditDue {
		due = append(due, st)
	}
	clear(c.creditDue)
	c.mu.Unlock()
	for _, st := range due {
		n := st.takeCredit()
		if n == 0 {
			continue
		}
		w := proto.Window{Stream: st.typ, Increment: uint32(n)}
		if err := c.write(proto.Frame{Type: proto.TypeWindow, ID: st.s.id, Payload: w.Encode()}); err != nil {
			return err
		}
	}
	return nil
}

func (c *Client) creditReady(st *stream) {
	c.mu.Lock()
	c.creditDue[st] = struct{}{}
	c.mu.Unlock()
	select {
	case c.creditKick <- struct{}{}:
	default:
	}
}

func (c *Client) readLoop() {
	defer c.wg.Done()
	r := bufio.NewReaderSize(c.conn, 64<<10)
	if err := c.readHello(r); err != nil {
		c.fail(fmt.Errorf("waiting for guest hello: %w", err))
		return
	}
	for {
		f, err := proto.ReadFrame(r)
		if err != nil {
			if errors.Is(err, proto.ErrUnknownType) || errors.Is(err, proto.ErrFrameTooLarge) {
				err = violation("%v", err)
			}
			c.fail(fmt.Errorf("reading from guest: %w", err))
			return
		}
		if err := c.dispatch(f); err != nil {
			c.fail(err)
			return
		}
	}
}

const (
	// maxResync bounds the bytes skipped while looking for the reply.
	maxResync = 1 << 20
)

// readHello scans for the guest's reply to our hello. Bytes before it are
// skipped rather than parsed as frames: after the host reconnects, the
// stream can start with the tail of a frame the guest wrote to the previous
// connection, so framing is only trusted from the reply on.
func (c *Client) readHello(r *bufio.Reader) error {
	for skipped := 0; ; skipped++ {
		if skipped > maxResync {
			return violation("no hello reply within %d bytes", maxResync)
		}
		hdr, err := r.Peek(proto.HeaderSize)
		if err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[5:9]))
		if proto.Type(hdr[0]) == proto.TypeHelloReply && binary.BigEndian.Uint32(hdr[1:5]) == 0 && n > 0 && n <= proto.MaxHelloReply {
			// A JSON object starts with '{': checking it first keeps
			// lookalike headers in stale bytes from making us wait for a
			// payload that is not coming.
			b, err := r.Peek(proto.HeaderSize + 1)
			if err != nil {
				return err
			}
			if b[proto.HeaderSize] != '{' {
				_, _ = r.Discard(1)
				continue
			}
			b, err = r.Peek(proto.HeaderSize + n)
			if err != nil {
				return err
			}
			var hr proto.HelloReply
			if proto.Decode(proto.Frame{Type: proto.TypeHelloReply, Payload: b[proto.HeaderSize:]}, &hr) == nil && hr.Nonce == c.nonce {
				_, _ = r.Discard(proto.HeaderSize + n)
				c.helloCh <- hr
				return nil
			}
		}
		_, _ = r.Discard(1)
	}
}

// dispatch routes one guest frame. It never blocks: output is buffered
// within the granted window and replies go to buffered channels.
func (c *Client) dispatch(f proto.Frame) error {
	if f.Type == proto.TypeHelloReply {
		return nil // answer to a re-sent hello
	}
	switch f.Type {
	case proto.TypeResponse:
		var resp proto.Response
		if err := proto.Decode(f, &resp); err != nil {
			return violation("%v", err)
		}
		c.mu.Lock()
		cl := c.pending[f.ID]
		delete(c.pending, f.ID)
		c.mu.Unlock()
		if cl != nil {
			if cl.apply != nil {
				if err := cl.apply(resp); err != nil {
					return err
				}
			}
			cl.ch <- resp
		}
		return nil
	case proto.TypeStarted, proto.TypeStdout, proto.TypeStderr, proto.TypeWindow, proto.TypeExit:
		c.mu.Lock()
		s := c.sessions[f.ID]
		c.mu.Unlock()
		if s == nil {
			// Frames for sessions the host never opened or already
			// finished: drop them, their size was bounded by ReadFrame.
			return nil
		}
		return s.handle(f)
	}
	return violation("unexpected %s frame from guest", f.Type)
}

// request runs a control request and waits for its response.
func (c *Client) request(ctx context.Context, req proto.Request) error {
	ch := make(chan proto.Response, 1)
	c.mu.Lock()
	id := c.allocIDLocked()
	c.pending[id] = &call{ch: ch}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()
	f, err := proto.JSONFrame(proto.TypeRequest, id, req)
	if err != nil {
		return err
	}
	resp, err := c.awaitResponse(ctx, ch, c.send(ctx, f))
	if err != nil {
		return fmt.Errorf("guest %s: %w", req.Op, err)
	}
	if resp.Error != "" {
		return &GuestError{Op: req.Op, Msg: truncate(resp.Error)}
	}
	return nil
}

// awaitResponse waits for the response on ch to a request whose frame
// send reported sendErr.
func (c *Client) awaitResponse(ctx context.Context, ch chan proto.Response, sendErr error) (proto.Response, error) {
	// The reader delivers a reply before it notices the end of the stream,
	// and select picks at random among ready cases: a guest that answers
	// and then goes away (as shutdown does) must still count as having
	// answered, even if the send itself saw the end first.
	answered := func() (proto.Response, bool) {
		select {
		case resp := <-ch:
			return resp, true
		default:
			return proto.Response{}, false
		}
	}
	if sendErr != nil {
		if resp, ok := answered(); ok {
			return resp, nil
		}
		return proto.Response{}, sendErr
	}
	select {
	case resp := <-ch:
		return resp, nil
	case <-c.done:
		if resp, ok := answered(); ok {
			return resp, nil
		}
		return proto.Response{}, c.Err()
	case <-ctx.Done():
		return proto.Response{}, ctx.Err()
	}
}

// allocIDLocked returns an id not used by a pending request or a session,
// including sessions of earlier connections (which a reattach may bind
// here).
func (c *Client) allocIDLocked() uint32 {
	for {
		c.nextID++
		id := c.nextID
		if id == 0 {
			continue
		}
		if _, ok := c.pending[id]; ok {
			continue
		}
		if _, ok := c.sessions[id]; ok {
			continue
		}
		if _, ok := c.reserved[id]; ok {
			continue
		}
		return id
	}
}

func truncate(s string) string {
	if len(s) > proto.MaxErrLen {
		return s[:proto.MaxErrLen] + "..."
	}
	return s
}

// Ping checks that the guest answers.
func (c *Client) Ping(ctx context.Context) error {
	return c.request(ctx, proto.Request{Op: proto.OpPing})
}

// Setup mounts the sandbox root in the guest and seeds its hostname, clock
// and entropy. The guest accepts it once.
func (c *Client) Setup(ctx context.Context, s proto.Setup) error {
	return c.request(ctx, proto.Request{Op: proto.OpSetup, Setup: &s})
}

// Identity makes a set-up guest a particular sandbox (hostname, base
// environment, clock, fresh entropy): what a warm-pool VM gets when claimed.
func (c *Client) Identity(ctx context.Context, id proto.Identity) error {
	return c.request(ctx, proto.Request{Op: proto.OpIdentity, Identity: &id})
}

// IdentityAndExec applies an identity and starts a process with it, sending both frames
// back to back: the guest handles them in order, so the exec sees the new identity, and a
// start's critical path saves a round trip. If the identity fails, the process (if it
// started) is killed and the identity's error returned.
func (c *Client) IdentityAndExec(ctx context.Context, id proto.Identity, req proto.ExecRequest) (*Session, error) {
	ch := make(chan proto.Response, 1)
	c.mu.Lock()
	rid := c.allocIDLocked()
	c.pending[rid] = &call{ch: ch}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, rid)
		c.mu.Unlock()
	}()
	f, err := proto.JSONFrame(proto.TypeRequest, rid, proto.Request{Op: proto.OpIdentity, Identity: &id})
	if err != nil {
		return nil, err
	}
	if err := c.send(ctx, f); err != nil {
		return nil, fmt.Errorf("guest %s: %w", proto.OpIdentity, err)
	}
	sess, execErr := c.Exec(ctx, req)
	resp, err := c.awaitResponse(ctx, ch, nil)
	if err == nil && resp.Error != "" {
		err = &GuestError{Op: proto.OpIdentity, Msg: truncate(resp.Error)}
	} else if err != nil {
		err = fmt.Errorf("guest %s: %w", proto.OpIdentity, err)
	}
	if err != nil {
		if sess != nil {
			_ = sess.Signal(ctx, 9)
			sess.Close()
		}
		return nil, err
	}
	return sess, execErr
}

// Detach asks the guest to hold this connection's sessions for a reattach (output kept,
// stdin open): the host is about to save the VM and go away. After it, nothing more comes
// from the guest on this connection; the caller closes it.
func (c *Client) Detach(ctx context.Context) error {
	return c.request(ctx, proto.Request{Op: proto.OpDetach})
}

// Freeze freezes the guest's writable filesystem (see proto.OpFreeze): once it answers,
// the scratch disk holds everything written, and nothing is written until Thaw.
func (c *Client) Freeze(ctx context.Context) error {
	return c.request(ctx, proto.Request{Op: proto.OpFreeze})
}

// Thaw lets the guest's filesystem take writes again.
func (c *Client) Thaw(ctx context.Context) error {
	return c.request(ctx, proto.Request{Op: proto.OpThaw})
}

// KillAll ends every process in the guest but init.
func (c *Client) KillAll(ctx context.Context) error {
	return c.request(ctx, proto.Request{Op: proto.OpKillAll})
}

// SetTime sets the guest clock and, if entropy is given, reseeds its CRNG;
// use it after restoring a snapshot.
func (c *Client) SetTime(ctx context.Context, t proto.SetTime) error {
	return c.request(ctx, proto.Request{Op: proto.OpSetTime, SetTime: &t})
}

// Shutdown asks the guest to stop its processes, sync and power off. It
// returns once the guest acknowledged; the VM exits shortly after.
func (c *Client) Shutdown(ctx context.Context) error {
	return c.request(ctx, proto.Request{Op: proto.OpShutdown})
}
