package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// The host's side of the network series: plain TCP in this process, so what is timed is
// the path to the guest and the guest's own tools, not a second program on the host.

// transfer is one measured TCP stream: bytes moved in elapsed.
type transfer struct {
	bytes   int64
	elapsed time.Duration
}

// mbps is the transfer's rate in MB/s (10^6 bytes).
func (t transfer) mbps() float64 {
	if t.elapsed <= 0 {
		return 0
	}
	return float64(t.bytes) / t.elapsed.Seconds() / 1e6
}

// sinkOne accepts one connection on ln (within wait) and counts what arrives for dur
// from the first byte, then closes it: the receiver's count, so nothing still queued on
// the way is credited to the sender.
func sinkOne(ctx context.Context, ln net.Listener, wait, dur time.Duration) (transfer, error) {
	c, err := acceptWithin(ctx, ln, wait)
	if err != nil {
		return transfer{}, err
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	_ = c.SetReadDeadline(time.Now().Add(wait))
	if _, err := io.ReadFull(c, buf[:1]); err != nil {
		return transfer{}, fmt.Errorf("first byte from %s: %w", c.RemoteAddr(), err)
	}
	start := time.Now()
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Now()) })
	defer stop()
	_ = c.SetReadDeadline(start.Add(dur))
	var total int64
	for {
		n, err := c.Read(buf)
		total += int64(n)
		if err != nil {
			elapsed := time.Since(start)
			if ctx.Err() != nil {
				return transfer{}, ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return transfer{bytes: total, elapsed: elapsed}, nil
			}
			return transfer{}, fmt.Errorf("stream from %s ended after %s of %s: %w", c.RemoteAddr(), elapsed.Round(time.Millisecond), dur, err)
		}
	}
}

// sourceTo connects to addr (retrying while nothing listens there yet, up to wait),
// writes for dur, half-closes and waits for the peer to close: the peer has then read
// everything, so bytes/elapsed is what it received.
func sourceTo(ctx context.Context, addr string, wait, dur time.Duration) (transfer, error) {
	c, err := dialWithin(ctx, addr, wait)
	if err != nil {
		return transfer{}, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	buf := make([]byte, 256<<10)
	start := time.Now()
	var total int64
	_ = c.SetWriteDeadline(start.Add(dur))
	for {
		n, err := c.Write(buf)
		total += int64(n)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil {
				break
			}
			if ctx.Err() != nil {
				return transfer{}, ctx.Err()
			}
			return transfer{}, fmt.Errorf("stream to %s: %w", addr, err)
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return transfer{}, fmt.Errorf("half-close the stream to %s: %w", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(wait))
	if _, err := io.Copy(io.Discard, c); err != nil {
		return transfer{}, fmt.Errorf("wait for %s to read everything: %w", addr, err)
	}
	return transfer{bytes: total, elapsed: time.Since(start)}, nil
}

// pingPong accepts one connection on ln whose peer echoes what it reads, and times n
// one-byte round trips after warm unmeasured ones. It closes the connection at the end,
// which ends the peer.
func pingPong(ctx context.Context, ln net.Listener, wait time.Duration, warm, n int) ([]float64, error) {
	c, err := acceptWithin(ctx, ln, wait)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(wait + time.Duration(warm+n)*100*time.Millisecond))
	b := []byte{'x'}
	out := make([]float64, 0, n)
	for i := 0; i < warm+n; i++ {
		start := time.Now()
		if _, err := c.Write(b); err != nil {
			return nil, fmt.Errorf("round trip %d to %s: %w", i+1, c.RemoteAddr(), err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return nil, fmt.Errorf("round trip %d to %s: %w", i+1, c.RemoteAddr(), err)
		}
		if i >= warm {
			out = append(out, ms(time.Since(start)))
		}
	}
	return out, nil
}

func acceptWithin(ctx context.Context, ln net.Listener, wait time.Duration) (net.Conn, error) {
	if tl, ok := ln.(*net.TCPListener); ok {
		_ = tl.SetDeadline(time.Now().Add(wait))
		stop := context.AfterFunc(ctx, func() { _ = tl.SetDeadline(time.Now()) })
		defer stop()
	}
	c, err := ln.Accept()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("no connection to %s within %s: %w", ln.Addr(), wait, err)
	}
	return c, nil
}

func dialWithin(ctx context.Context, addr string, wait time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to %s within %s: %w", addr, wait, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
