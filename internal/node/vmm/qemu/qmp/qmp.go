// Package qmp speaks the QEMU Machine Protocol over a unix socket: the greeting, capability
// negotiation, commands with ids matched to their replies, and asynchronous events.
//
// QEMU is treated as untrusted (a guest may have compromised it): every message is bounded
// in size, and a malformed stream closes the connection instead of being trusted.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// MaxMessage bounds one QMP message. The commands used here answer in a few hundred bytes;
// query-qmp-schema is the largest QEMU reply (~200 KB) and is not used.
const MaxMessage = 1 << 20

// Event is an asynchronous QMP event such as SHUTDOWN, STOP or RESUME.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
	Time time.Time       `json:"-"`
}

// Error is an error reply from QEMU.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// ErrClosed is returned for commands on a connection that has ended.
var ErrClosed = errors.New("qmp: connection closed")

type message struct {
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     json.RawMessage `json:"id"`
	QMP    json.RawMessage `json:"QMP"`
}

type reply struct {
	ret json.RawMessage
	err error
}

// Client is one QMP connection. Its methods are safe for concurrent use.
type Client struct {
	conn    net.Conn
	onEvent func(Event)

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	next    uint64
	pending map[string]chan reply
	err     error // why the connection ended

	done chan struct{} // closed when the reader has stopped
}

// Dial connects to the QMP socket at path, reads the greeting and enters command mode.
// onEvent, if not nil, is called for every event from the connection's reader goroutine;
// it must not block. ctx bounds the connect and the negotiation only.
func Dial(ctx context.Context, path string, onEvent func(Event)) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: connect %s: %w", path, err)
	}
	return New(ctx, conn, path, onEvent)
}

// New is Dial on a connection the caller made (and checked); path names it in errors.
// The client owns conn from here, also when New fails.
func New(ctx context.Context, conn net.Conn, path string, onEvent func(Event)) (*Client, error) {
	c := &Client{conn: conn, onEvent: onEvent, pending: map[string]chan reply{}, done: make(chan struct{})}

	// The greeting comes first; only one client is served at a time, so a second client
	// waits here until the first disconnects - bounded by ctx.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	r := bufio.NewReaderSize(conn, 4096)
	line, err := readLine(r)
	stop()
	_ = conn.SetReadDeadline(time.Time{})
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("qmp: no greeting on %s (is another client attached?): %w", path, ctx.Err())
		}
		return nil, fmt.Errorf("qmp: read greeting on %s: %w", path, err)
	}
	var greet message
	if err := json.Unmarshal(line, &greet); err != nil || greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %s sent no QMP greeting: %.200q", path, line)
	}
	go c.read(r)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("qmp: negotiate capabilities on %s: %w", path, err)
	}
	return c, nil
}

func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, isPrefix, err := r.ReadLine()
		if err != nil {
			return nil, err
		}
		line = append(line, chunk...)
		if len(line) > MaxMessage {
			return nil, fmt.Errorf("qmp: message longer than %d bytes", MaxMessage)
		}
		if !isPrefix {
			return line, nil
		}
	}
}

func (c *Client) read(r *bufio.Reader) {
	var err error
	defer func() {
		c.mu.Lock()
		if c.err == nil {
			c.err = fmt.Errorf("%w: %v", ErrClosed, err)
		}
		for id, ch := range c.pending {
			ch <- reply{err: c.err}
			delete(c.pending, id)
		}
		c.mu.Unlock()
		c.conn.Close()
		close(c.done)
	}()
	for {
		var line []byte
		line, err = readLine(r)
		if err != nil {
			return
		}
		if len(line) == 0 {
			continue
		}
		var m message
		if err = json.Unmarshal(line, &m); err != nil {
			err = fmt.Errorf("qmp: malformed message %.200q: %w", line, err)
			return
		}
		switch {
		case m.Event != "":
			if c.onEvent != nil {
				ev := Event{Name: m.Event, Data: m.Data}
				if m.Timestamp != nil {
					ev.Time = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
				}
				c.onEvent(ev)
			}
		case m.ID != nil:
			c.mu.Lock()
			ch := c.pending[string(m.ID)]
			delete(c.pending, string(m.ID))
			c.mu.Unlock()
			if ch == nil {
				continue // a reply to a command whose caller gave up
			}
			if m.Error != nil {
				ch <- reply{err: m.Error}
			} else {
				ch <- reply{ret: m.Return}
			}
		}
	}
}

// Execute runs command with args (marshalled to JSON; nil for none) and decodes the return
// value into out (nil to discard). ctx bounds the wait for the reply.
func (c *Client) Execute(ctx context.Context, command string, args any, out any) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.next++
	id := strconv.Quote("fw-" + strconv.FormatUint(c.next, 10))
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	req := struct {
		Execute   string          `json:"execute"`
		Arguments any             `json:"arguments,omitempty"`
		ID        json.RawMessage `json:"id"`
	}{command, args, json.RawMessage(id)}
	b, err := json.Marshal(req)
	if err != nil {
		c.forget(id)
		return fmt.Errorf("qmp: encode %s: %w", command, err)
	}
	b = append(b, '\n')
	c.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetWriteDeadline(dl)
	}
	_, err = c.conn.Write(b)
	_ = c.conn.SetWriteDeadline(time.Time{})
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		return fmt.Errorf("qmp: send %s: %w", command, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("qmp %s: %w", command, r.err)
		}
		if out != nil && len(r.ret) > 0 {
			if err := json.Unmarshal(r.ret, out); err != nil {
				return fmt.Errorf("qmp %s: decode reply: %w", command, err)
			}
		}
		return nil
	case <-ctx.Done():
		c.forget(id)
		return fmt.Errorf("qmp %s: no reply: %w", command, ctx.Err())
	}
}

func (c *Client) forget(id string) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// Done is closed when the connection has ended (QEMU exited or Close was called).
func (c *Client) Done() <-chan struct{} { return c.done }

// Err says why the connection ended; nil while it is open.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection and waits for its reader to stop.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.err == nil {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	err := c.conn.Close()
	<-c.done
	return err
}
