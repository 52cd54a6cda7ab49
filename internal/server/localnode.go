package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// The server reaches every node's data plane (attach, logs, exec, policy, port-forward)
// through one interface, the node's SandboxService: a remote node's over mutual TLS
// (nodeClient), this process's own agent's (`fireworks dev`) in-process, through the
// same handler a remote agent serves, over an in-memory HTTP/2 connection. So there is
// one path from the public API to a node, and the node side is the same code whether the
// node is local or not (containerd's local service and its client are the model).

// localNode serves this process's agent's node API in memory.
type localNode struct {
	ln     *pipeListener
	client fireworksv1connect.SandboxServiceClient
}

// serveLocalNode serves the node API of s.agent in memory until ctx ends; the returned
// function waits for that.
func (s *Server) serveLocalNode(ctx context.Context) (wait func()) {
	ln := newPipeListener()
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: nodeAPIHandler(s.agent, s.log), Protocols: &protocols, ReadHeaderTimeout: 10 * time.Second}
	tr := &http.Transport{Protocols: &protocols, DialContext: ln.DialContext}
	s.localMu.Lock()
	s.local = &localNode{ln: ln, client: fireworksv1connect.NewSandboxServiceClient(&http.Client{Transport: tr}, "http://local-node",
		connect.WithReadMaxBytes(64<<20))}
	s.localMu.Unlock()
	done := make(chan struct{})
	go func() { // ends when the listener closes (below)
		defer close(done)
		_ = srv.Serve(ln)
	}()
	stopped := make(chan struct{})
	go func() { // ends with ctx
		defer close(stopped)
		<-ctx.Done()
		s.localMu.Lock()
		s.local = nil
		s.localMu.Unlock()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = srv.Close() // streams still open after the grace (follows, attaches)
		tr.CloseIdleConnections()
	}()
	return func() { <-stopped; <-done }
}

// isLocal reports whether sb is (or would be) on this process's own node (dev). Only stop
// and remove still ask: dev's sandboxes are started and stopped by the server itself, not
// placed and reconciled (issue #13 moves dev onto the control plane).
func (s *Server) isLocal(sb state.Sandbox) bool {
	return s.agent != nil && (sb.Node == "" || sb.Node == s.agent.NodeName())
}

// nodeFor returns the node API of the node that runs (or ran) sb: this process's own
// node for a sandbox on it (or not placed yet, in dev), else the remote node's.
func (s *Server) nodeFor(ctx context.Context, sb state.Sandbox) (fireworksv1connect.SandboxServiceClient, error) {
	if s.isLocal(sb) {
		s.localMu.Lock()
		l := s.local
		s.localMu.Unlock()
		if l == nil {
			return nil, errors.New("this server's node API is not serving (the server is starting or stopping)")
		}
		return l.client, nil
	}
	if sb.Node == "" {
		return nil, fmt.Errorf("sandbox %s is not placed on a node yet: %w", sb.ID, errNotRunning)
	}
	return s.nodeClient(ctx, sb.Node)
}

// pipeListener is an in-memory net.Listener: DialContext hands Accept the other end of a
// new synchronous pipe.
type pipeListener struct {
	conns     chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

// DialContext connects to the listener.
func (l *pipeListener) DialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		client.Close()
		server.Close()
		return nil, fmt.Errorf("dial the local node: %w", net.ErrClosed)
	case <-ctx.Done():
		client.Close()
		server.Close()
		return nil, ctx.Err()
	}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "local-node" }
