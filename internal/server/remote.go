package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/agent"
	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/pki"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// nodeClients caches one HTTP/2 client per node address.
type nodeClients struct {
	mu      sync.Mutex
	clients map[string]fireworksv1connect.SandboxServiceClient
}

// nodeClient returns a client for the internal API of the node that runs sb.
func (s *Server) nodeClient(ctx context.Context, nodeID string) (fireworksv1connect.SandboxServiceClient, error) {
	if s.cluster.AgentClientTLS == nil {
		return nil, fmt.Errorf("sandbox runs on node %q, and this server cannot reach nodes", nodeID)
	}
	n, err := s.store.GetNode(ctx, nodeID)
	if err != nil {
		return nil, err
	}
	s.nodes.mu.Lock()
	defer s.nodes.mu.Unlock()
	key := nodeID + "@" + n.Address // a node that moved, or another node at the address, gets its own
	if c, ok := s.nodes.clients[key]; ok {
		return c, nil
	}
	host, _, err := net.SplitHostPort(n.Address)
	if err != nil {
		return nil, fmt.Errorf("node %s has a bad address %q: %w", nodeID, n.Address, err)
	}
	cfg := s.cluster.AgentClientTLS(host, nodeID)
	cfg.NextProtos = []string{"h2"}
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext, TLSHandshakeTimeout: 10 * time.Second}
	c := fireworksv1connect.NewSandboxServiceClient(&http.Client{Transport: tr}, "https://"+n.Address, connect.WithReadMaxBytes(64<<20))
	if s.nodes.clients == nil {
		s.nodes.clients = map[string]fireworksv1connect.SandboxServiceClient{}
	}
	s.nodes.clients[key] = c
	return c, nil
}

// waitStarted waits until the sandbox has left pending (its node has it live, or it is
// already over), so a data-plane call to the node finds it.
func (s *Server) waitStarted(ctx context.Context, id string) (state.Sandbox, error) {
	return s.waitFor(ctx, id, func(sb state.Sandbox) bool { return sb.Status != state.StatusPending })
}

func (s *Server) waitFor(ctx context.Context, id string, done func(state.Sandbox) bool) (state.Sandbox, error) {
	for {
		changed := s.store.Changed()
		sb, err := s.store.GetSandbox(ctx, id)
		if err != nil || done(sb) {
			return sb, err
		}
		select {
		case <-changed:
		case <-time.After(time.Second):
		case <-ctx.Done():
			return sb, ctx.Err()
		}
	}
}

// attachOnNode relays an attach to the node that runs sb, then reports the exit recorded
// in the state (the node's last report is committed before its stream ends).
func (s *Server) attachOnNode(ctx context.Context, sb state.Sandbox, stream attachStream) error {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return toConnectError(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rs := c.Attach(rctx)
	// The node knows sandboxes by ID only (the caller may have named it or given a prefix).
	fwd := &pb.AttachRequest{Msg: &pb.AttachRequest_Start{Start: &pb.AttachStart{Sandbox: sb.ID}}}
	if err := rs.Send(fwd); err != nil && !errors.Is(err, io.EOF) {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("attach on node %s: %w", sb.Node, err))
	}
	go relayRequests(stream.Receive, rs.Send, rs.CloseRequest)
	for {
		m, err := rs.Receive()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("lost the stream from node %s: %w", sb.Node, err))
		}
		if m.GetExit() != nil {
			continue // the state has the authoritative exit
		}
		if err := stream.Send(m); err != nil {
			return err
		}
	}
	final, err := s.waitFor(ctx, sb.ID, func(sb state.Sandbox) bool { return sb.Status.Terminal() })
	if err != nil {
		return toConnectError(err)
	}
	return stream.Send(&pb.AttachResponse{Msg: &pb.AttachResponse_Exit{Exit: exitOf(final)}})
}

func (s *Server) logsOnNode(ctx context.Context, sb state.Sandbox, req *pb.LogsRequest, stream *connect.ServerStream[pb.LogsResponse]) error {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return toConnectError(err)
	}
	rs, err := c.Logs(ctx, connect.NewRequest(&pb.LogsRequest{Sandbox: sb.ID, Follow: req.GetFollow()}))
	if err != nil {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("logs from node %s: %w", sb.Node, err))
	}
	defer rs.Close()
	for rs.Receive() {
		if err := stream.Send(rs.Msg()); err != nil {
			return err
		}
	}
	if err := rs.Err(); err != nil {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("logs from node %s: %w", sb.Node, err))
	}
	return nil
}

func (s *Server) execOnNode(ctx context.Context, sb state.Sandbox, first *pb.ExecRequest, stream execStream) error {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return toConnectError(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rs := c.Exec(rctx)
	start := first.GetStart()
	fwd := &pb.ExecRequest{Msg: &pb.ExecRequest_Start{Start: &pb.ExecStart{
		Sandbox: sb.ID, Argv: start.GetArgv(), Env: start.GetEnv(), WorkingDir: start.GetWorkingDir(), User: start.GetUser(),
		Tty: start.GetTty(), Stdin: start.GetStdin(), Rows: start.GetRows(), Cols: start.GetCols(),
	}}}
	if err := rs.Send(fwd); err != nil && !errors.Is(err, io.EOF) {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("exec on node %s: %w", sb.Node, err))
	}
	go relayRequests(stream.Receive, rs.Send, rs.CloseRequest)
	return relayResponses(rs.Receive, stream.Send, "exec", sb.Node)
}

// relayResponses copies a node's stream to the client until the node ends it. The node's
// own verdicts (bad user, not running...) pass through; a broken stream is "unavailable".
func relayResponses[T any](recv func() (*T, error), send func(*T) error, what, node string) error {
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			var ce *connect.Error
			if errors.As(err, &ce) && ce.Code() != connect.CodeUnknown && ce.Code() != connect.CodeUnavailable {
				return err
			}
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("lost the %s stream from node %s: %w", what, node, err))
		}
		if err := send(m); err != nil {
			return err
		}
	}
}

// relayRequests copies a client's messages to the node until either side ends; the call's
// context (cancelled when the handler returns) ends it.
func relayRequests[T any](recv func() (*T, error), send func(*T) error, closeSend func() error) {
	for {
		m, err := recv()
		if err != nil {
			_ = closeSend()
			return
		}
		if send(m) != nil {
			return
		}
	}
}

// NodeHandler is a node agent's internal API: the data plane (attach, logs, exec) of the
// sandboxes it runs, for the servers, and the node's data address for the ingress (CONNECT
// tunnels and Host-routed requests under the ingress domain, see internal/ingress). Only
// clients with a server certificate from the cluster CA reach the internal API; the
// ingress side also admits ingress certificates. Authorisation of the user happened on
// the server (or, for private ports, at the edge).
func NodeHandler(ag *agent.Agent, opts NodeOptions, log *slog.Logger) http.Handler {
	if opts.IngressDomain == "" {
		opts.IngressDomain = DefaultIngressDomain
	}
	ing := nodeIngressHandler(ag, opts.IngressDomain, opts.RevokedEdges, log)
	api := nodeAPIHandler(ag, log)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isIngressRequest(r, opts.IngressDomain) {
			ing.ServeHTTP(w, r)
			return
		}
		if role, _, err := pki.PeerIdentity(r.TLS); err != nil || role != pki.RoleServer {
			unauthenticated(w, r, "a node's internal API serves only cluster servers")
			return
		}
		api.ServeHTTP(w, r)
	})
}

// nodeAPIHandler is a node's internal API without the peer check: behind NodeHandler's
// for remote servers, or reached in memory by this process's own server (dev).
func nodeAPIHandler(ag *agent.Agent, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(fireworksv1connect.NewSandboxServiceHandler(&nodeSandboxService{ag: ag}, handlerOptions(log)...))
	return BoundBody(mux)
}

// NodeTLS is the listener configuration for NodeHandler: HTTP/2 for the servers' calls,
// HTTP/1.1 for the ingress (CONNECT tunnels, WebSocket upgrades).
func NodeTLS(ca *pki.CA, cert tls.Certificate) *tls.Config {
	cfg := pki.ServerTLS(ca, cert, true)
	cfg.NextProtos = []string{"h2", "http/1.1"}
	return cfg
}

type nodeSandboxService struct {
	fireworksv1connect.UnimplementedSandboxServiceHandler
	ag *agent.Agent
}

func (n *nodeSandboxService) Attach(ctx context.Context, stream *connect.BidiStream[pb.AttachRequest, pb.AttachResponse]) error {
	first, err := stream.Receive()
	if err != nil {
		return toConnectError(fmt.Errorf("read attach request: %w", err))
	}
	id := first.GetStart().GetSandbox()
	spec, _ := n.ag.Spec(id)
	// No exit here: the server reports the one recorded in the state.
	return attachLocal(ctx, n.ag, id, spec.Stdin, stream, func(context.Context) (*pb.Exit, error) { return nil, nil })
}

func (n *nodeSandboxService) Logs(ctx context.Context, req *connect.Request[pb.LogsRequest], stream *connect.ServerStream[pb.LogsResponse]) error {
	return logsLocal(ctx, n.ag, req.Msg.GetSandbox(), req.Msg.GetFollow(), stream.Send)
}

func (n *nodeSandboxService) Exec(ctx context.Context, stream *connect.BidiStream[pb.ExecRequest, pb.ExecResponse]) error {
	_, start, err := readExecStart(stream)
	if err != nil {
		return err
	}
	return execLocal(ctx, n.ag, start.GetSandbox(), start, stream)
}
