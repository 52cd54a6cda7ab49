// Package inmem serves an HTTP handler over in-memory HTTP/2 connections, for the
// calls one part of a process makes to another as if over the network: `fireworks dev`'s
// server reaching its own node's API, and its node speaking the node protocol to its own
// server. Both sides run the same handlers and clients as across hosts (streams, message
// limits, interceptors), so a one-node cluster is not a second code path; only the
// transport differs, and it carries no identity of its own (the caller is the process).
package inmem

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// Server is a handler served in memory.
type Server struct {
	ln        *listener
	srv       *http.Server
	transport *http.Transport
	done      chan struct{}
	stopOnce  sync.Once
}

// Serve serves h in memory until Close (or ctx ends).
func Serve(ctx context.Context, h http.Handler) *Server {
	ln := &listener{conns: make(chan net.Conn), done: make(chan struct{})}
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	s := &Server{
		ln:        ln,
		srv:       &http.Server{Handler: h, Protocols: &protocols, ReadHeaderTimeout: 10 * time.Second},
		transport: &http.Transport{Protocols: &protocols, DialContext: ln.dialContext},
		done:      make(chan struct{}),
	}
	go func() { // ends when the listener closes (Close)
		defer close(s.done)
		_ = s.srv.Serve(ln)
	}()
	context.AfterFunc(ctx, s.Close)
	return s
}

// Transport reaches the handler (any URL host will do).
func (s *Server) Transport() *http.Transport { return s.transport }

// Client is an HTTP client over Transport.
func (s *Server) Client() *http.Client { return &http.Client{Transport: s.transport} }

// Close stops serving, gives calls in flight a grace period, then ends what is left
// (follows, attaches), and waits for the serving goroutine.
func (s *Server) Close() {
	s.stopOnce.Do(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(sctx)
		_ = s.srv.Close()
		s.transport.CloseIdleConnections()
	})
	<-s.done
}

// listener is an in-memory net.Listener: dialContext hands Accept the other end of a new
// synchronous pipe.
type listener struct {
	conns     chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *listener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *listener) Addr() net.Addr { return addr{} }

func (l *listener) dialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		client.Close()
		server.Close()
		return nil, fmt.Errorf("dial in memory: %w", net.ErrClosed)
	case <-ctx.Done():
		client.Close()
		server.Close()
		return nil, ctx.Err()
	}
}

type addr struct{}

func (addr) Network() string { return "memory" }
func (addr) String() string  { return "in-memory" }
