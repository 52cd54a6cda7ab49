package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/inmem"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// The server reaches every node through one interface, the node's internal API
// (internal/node/nodeapi): a remote node's over mutual TLS, a node in the server's own process
// (`fireworks dev`, a cluster of one server and one node, Nomad's -dev) in memory
// (internal/shared/inmem), through the same handlers and clients. The in-process node is a
// node like any other otherwise: it speaks the node protocol to this server
// (ServeNodeProtocol) and is placed on by the control plane. So the public API has one
// path to every node, and the node side is the same code whether the node is local or
// not (containerd's local service and its client are the model).

// nodeConn is one node's internal API as the server calls it.
type nodeConn struct {
	name      string
	sandboxes fireworksv1connect.SandboxServiceClient
	images    fireworksv1connect.ImageServiceClient
	system    fireworksv1connect.SystemServiceClient
	volumes   fireworksv1connect.VolumeServiceClient
}

func newNodeConn(name string, hc *http.Client, base string) *nodeConn {
	opts := []connect.ClientOption{connect.WithReadMaxBytes(64 << 20), connect.WithInterceptors(callerHeaders{})}
	return &nodeConn{
		name:      name,
		sandboxes: fireworksv1connect.NewSandboxServiceClient(hc, base, opts...),
		images:    fireworksv1connect.NewImageServiceClient(hc, base, opts...),
		system:    fireworksv1connect.NewSystemServiceClient(hc, base, opts...),
		volumes:   fireworksv1connect.NewVolumeServiceClient(hc, base, opts...),
	}
}

// callerHeaders tells the node whom the server acts for (see rpc.CallerTokenHeader): the
// verified identity of the call being served, or none for the server's own calls. They
// are set on every call, so nothing a user sent can pass through.
type callerHeaders struct{}

func (callerHeaders) set(ctx context.Context, h http.Header) {
	h.Del(rpc.CallerTokenHeader)
	h.Del(rpc.CallerAdminHeader)
	if id, ok := auth.From(ctx); ok {
		h.Set(rpc.CallerTokenHeader, id.TokenID)
		h.Set(rpc.CallerAdminHeader, strconv.FormatBool(id.Admin()))
	}
}

func (c callerHeaders) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		c.set(ctx, req.Header())
		return next(ctx, req)
	}
}

func (c callerHeaders) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		c.set(ctx, conn.RequestHeader())
		return conn
	}
}

func (callerHeaders) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// nodeConns holds the nodes in this process, by name, and one connection per remote
// node address.
type nodeConns struct {
	mu     sync.Mutex
	local  map[string]*nodeConn
	remote map[string]*nodeConn // by "name@address"
}

// AddLocalNode serves api, the internal API of node name running in this process (see
// nodeapi.APIHandler), in memory until ctx ends; the returned function waits for that.
// Calls for that node go there instead of over the network.
func (s *Server) AddLocalNode(ctx context.Context, name string, api http.Handler) (wait func()) {
	mem := inmem.Serve(ctx, api)
	s.nodes.mu.Lock()
	if s.nodes.local == nil {
		s.nodes.local = map[string]*nodeConn{}
	}
	s.nodes.local[name] = newNodeConn(name, mem.Client(), "http://"+name)
	s.nodes.mu.Unlock()
	stopped := make(chan struct{})
	context.AfterFunc(ctx, func() {
		defer close(stopped)
		s.nodes.mu.Lock()
		delete(s.nodes.local, name)
		s.nodes.mu.Unlock()
		mem.Close()
	})
	return func() { <-stopped }
}

// ServeNodeProtocol serves the node protocol (NodeService) in memory to node, a node in
// this process, until ctx ends; the returned transport reaches it (see
// agentlink.NewInProcess). The caller is that node by construction: nothing outside the
// process reaches this transport, so there is no certificate to check, and there is no
// Join (the node's identity is not bought with a token).
func (s *Server) ServeNodeProtocol(ctx context.Context, node string) *http.Transport {
	mux := http.NewServeMux()
	mux.Handle(fireworksv1connect.NewNodeServiceHandler(&nodeService{s}, rpc.HandlerOptions(s.log)...))
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == fireworksv1connect.NodeServiceJoinProcedure {
			http.NotFound(w, r)
			return
		}
		mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), agentKey{}, node)))
	})
	return inmem.Serve(ctx, rpc.BoundBody(h)).Transport()
}

// nodeFor returns the internal API of the node that runs (or ran) sb.
func (s *Server) nodeFor(ctx context.Context, sb state.Sandbox) (*nodeConn, error) {
	if sb.Node == "" {
		return nil, fmt.Errorf("sandbox %s is not placed on a node yet: %w", sb.ID, errNotRunning)
	}
	return s.node(ctx, sb.Node)
}

// node returns the internal API of the named node: in memory for a node in this process,
// else over mutual TLS to the address it registered.
func (s *Server) node(ctx context.Context, name string) (*nodeConn, error) {
	s.nodes.mu.Lock()
	c := s.nodes.local[name]
	s.nodes.mu.Unlock()
	if c != nil {
		return c, nil
	}
	if s.cluster.AgentClientTLS == nil {
		return nil, fmt.Errorf("node %q is not reachable from this server", name)
	}
	n, err := s.store.GetNode(ctx, name)
	if err != nil {
		return nil, err
	}
	s.nodes.mu.Lock()
	defer s.nodes.mu.Unlock()
	key := name + "@" + n.Address // a node that moved, or another node at the address, gets its own
	if c, ok := s.nodes.remote[key]; ok {
		return c, nil
	}
	host, _, err := net.SplitHostPort(n.Address)
	if err != nil {
		return nil, fmt.Errorf("node %s has a bad address %q: %w", name, n.Address, err)
	}
	cfg := s.cluster.AgentClientTLS(host, name)
	cfg.NextProtos = []string{"h2"}
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext, TLSHandshakeTimeout: 10 * time.Second,
		// A node that vanished without closing the connection (host down, partition) is
		// noticed by unanswered pings, so streams to it end instead of hanging.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
	c = newNodeConn(name, &http.Client{Transport: tr}, "https://"+n.Address)
	if s.nodes.remote == nil {
		s.nodes.remote = map[string]*nodeConn{}
	}
	s.nodes.remote[key] = c
	return c, nil
}

// targetNodes are the nodes a node-wide call (images, templates) acts on: the one named,
// which must be ready, or every ready node, sorted by name.
func (s *Server) targetNodes(named string) ([]string, error) {
	var names []string
	for _, n := range s.store.LocalNodes() {
		if named != "" && n.ID != named {
			continue
		}
		if n.Status != state.NodeReady {
			if named != "" {
				return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %s is %s (%s)", n.ID, n.Status, n.StatusReason))
			}
			continue
		}
		names = append(names, n.ID)
	}
	if named != "" && len(names) == 0 {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no node %q (see `fireworks node ls`)", named))
	}
	if len(names) == 0 {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("no node is ready (see `fireworks node ls`)"))
	}
	slices.SortFunc(names, cmp.Compare)
	return names, nil
}

// nodeCallTimeout bounds a short node-wide call (a listing, a removal) on each node: a
// node that accepts the call and never answers must not hang it.
const nodeCallTimeout = 10 * time.Second

// schedulableNode is the first ready node that takes sandboxes (by name): where a user's
// pull goes.
func (s *Server) schedulableNode() ([]string, error) {
	var names []string
	for _, n := range s.store.LocalNodes() {
		if n.Status == state.NodeReady && !n.Cordoned && !n.Draining {
			names = append(names, n.ID)
		}
	}
	if len(names) == 0 {
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("no node takes sandboxes now; try again later"))
	}
	slices.Sort(names)
	return names[:1], nil
}

// onNodes calls fn with each named node's API in turn, until one fails; a node that
// cannot be reached fails as "unavailable", naming it. With a timeout, each node's call
// gets that long (fn is given the context to call under).
func (s *Server) onNodes(ctx context.Context, names []string, what string, timeout time.Duration, fn func(context.Context, *nodeConn) error) error {
	for _, name := range names {
		c, err := s.node(ctx, name)
		if err != nil {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("%s on node %s: %w", what, name, err))
		}
		cctx, cancel := ctx, context.CancelFunc(func() {})
		if timeout > 0 {
			cctx, cancel = context.WithTimeout(ctx, timeout)
		}
		err = fn(cctx, c)
		cancel()
		if err != nil {
			return nodeError(c, what, err)
		}
	}
	return nil
}

// nodeError is a node's answer to a call made on a user's behalf: the node's own verdict
// (not found, invalid, over budget...) passes through; anything else says which node failed.
func nodeError(n *nodeConn, what string, err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() != connect.CodeUnknown && ce.Code() != connect.CodeUnavailable && ce.Code() != connect.CodeInternal &&
		ce.Code() != connect.CodeDeadlineExceeded {
		return err
	}
	if errors.As(err, &ce) && ce.Code() == connect.CodeCanceled {
		return err
	}
	return connect.NewError(connect.CodeUnavailable, fmt.Errorf("%s on node %s: %w", what, n.name, err))
}
