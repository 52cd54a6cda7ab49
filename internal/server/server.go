// Package server is the Fireworks API: authentication, sandbox lifecycle on top of the
// replicated state store, and the node agent that runs the VMs. One port serves gRPC,
// gRPC-Web and Connect's HTTP/JSON.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/agent"
	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/image"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// Version is the Fireworks version reported by Info.
var Version = "0.1.0-dev"

// Server serves the API.
type Server struct {
	store  *state.Store
	agent  *agent.Agent
	log    *slog.Logger
	now    func() time.Time
	limits Limits
	// cluster is set by EnableCluster; its CA is nil on a single-node dev server.
	cluster ClusterOptions
	nodes   nodeClients
	// pools holds the nodes' last warm-pool reports (cluster leader).
	pools poolReports
	// ingress configures the route feed; routes is its current table.
	ingress IngressOptions
	routes  routeFeed
	// policyMu serialises network policy changes (node first, then the state).
	policyMu sync.Mutex
	// local is this process's own node API, in memory, while Serve runs (see nodeFor).
	localMu sync.Mutex
	local   *localNode
}

// New wires a server over an open store and a running agent. API tokens live in the
// store (see EnsureAdminToken).
func New(store *state.Store, ag *agent.Agent, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{store: store, agent: ag, log: log, now: time.Now, limits: DefaultLimits()}
}

// Limits bound what one non-admin token may hold (admins are not limited).
type Limits struct {
	// SandboxesPerOwner counts every sandbox the token holds, exited ones included (each
	// is replicated state until removed).
	SandboxesPerOwner int
	// VCPUsPerOwner and MemoryMiBPerOwner bound the token's sandboxes not over yet.
	VCPUsPerOwner, MemoryMiBPerOwner int
	// DiskMiBPerOwner bounds the scratch disk those sandboxes reserve on nodes.
	DiskMiBPerOwner int
	// SpecBytesPerOwner bounds the bytes of all the token's sandbox specs (commands,
	// environments, policies): what it makes every server keep.
	SpecBytesPerOwner int
}

// DefaultLimits are the limits of a server not told otherwise.
func DefaultLimits() Limits {
	return Limits{SandboxesPerOwner: 1000, VCPUsPerOwner: 64, MemoryMiBPerOwner: 128 << 10, DiskMiBPerOwner: 1 << 20, SpecBytesPerOwner: 16 << 20}
}

// quota is what a token of this role may hold.
func (l Limits) quota(admin bool) state.Quota {
	if admin {
		return state.Quota{}
	}
	return state.Quota{Sandboxes: l.SandboxesPerOwner, VCPUs: l.VCPUsPerOwner, MemoryMiB: l.MemoryMiBPerOwner, DiskMiB: l.DiskMiBPerOwner, SpecBytes: l.SpecBytesPerOwner}
}

// SetLimits replaces the per-token limits (0 = unlimited).
func (s *Server) SetLimits(l Limits) { s.limits = l }

// MaxRequestBytes bounds one request message, decompressed (Connect decompresses a gzip
// body only up to this, so a small compressed body cannot make a server allocate more),
// and the whole body of a unary request as it arrives. Streams are bounded per message.
// The largest legitimate request is a sandbox spec (see state.CheckSizes): well under it.
const MaxRequestBytes = 4 << 20

// handlerOptions are every Connect handler's: no panic escapes, no message beyond
// MaxRequestBytes is read.
func handlerOptions(log *slog.Logger) []connect.HandlerOption {
	return []connect.HandlerOption{connect.WithInterceptors(recoverInterceptor(log)), connect.WithReadMaxBytes(MaxRequestBytes)}
}

// BoundBody caps the body of a unary request at MaxRequestBytes before anything reads
// it (streams are bounded per message by the handlers). It comes first, in front of the
// token check and the forwarding to the leader: an unauthenticated caller must not make
// a server hold more.
func BoundBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !IsStream(r) {
			r.Body = http.MaxBytesReader(w, r.Body, MaxRequestBytes)
		}
		next.ServeHTTP(w, r)
	})
}

// IsStream tells a streaming call (Connect streaming or gRPC) from a unary one.
func IsStream(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return strings.Contains(ct, "connect+") || strings.HasPrefix(ct, "application/grpc")
}

// Handler returns the HTTP handler with every service mounted behind the token check.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	opts := handlerOptions(s.log)
	mux.Handle(fireworksv1connect.NewSandboxServiceHandler(&sandboxService{s}, opts...))
	mux.Handle(fireworksv1connect.NewImageServiceHandler(&imageService{s}, opts...))
	mux.Handle(fireworksv1connect.NewSystemServiceHandler(&systemService{s}, opts...))
	mux.Handle(fireworksv1connect.NewTokenServiceHandler(&tokenService{s}, opts...))
	mux.Handle(fireworksv1connect.NewClusterServiceHandler(&clusterService{s}, opts...))
	mux.Handle(fireworksv1connect.NewIngressServiceHandler(&ingressService{s}, opts...))
	if s.cluster.CA != nil {
		mux.Handle(fireworksv1connect.NewNodeServiceHandler(&nodeService{s}, opts...))
	}
	return BoundBody(s.authenticate(mux))
}

// Serve listens until ctx ends. HTTP/2 without TLS is enabled so gRPC clients and the
// CLI's bidirectional streams (attach, exec) work on the same plain port.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: s.Handler(), Protocols: &protocols, ReadHeaderTimeout: 10 * time.Second}
	if s.agent != nil {
		// This process's own node applies the warm-pool configuration as it changes, and
		// serves its node API to this server in memory.
		fctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); s.feedAgentPools(fctx) }()
		waitNode := s.serveLocalNode(fctx)
		defer func() { stop(); <-done; waitNode() }()
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		return nil
	case err := <-errc:
		return fmt.Errorf("serve API on %s: %w", ln.Addr(), err)
	}
}

// recoverInterceptor turns a handler panic into an internal error so no panic reaches a user
// or takes the server down.
func recoverInterceptor(log *slog.Logger) connect.Interceptor {
	return &panicGuard{log: log}
}

type panicGuard struct{ log *slog.Logger }

func (p *panicGuard) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (resp connect.AnyResponse, err error) {
		defer func() {
			if r := recover(); r != nil {
				p.log.Error("panic in handler", "procedure", req.Spec().Procedure, "panic", r)
				err = connect.NewError(connect.CodeInternal, fmt.Errorf("internal error in %s", req.Spec().Procedure))
			}
		}()
		return next(ctx, req)
	}
}

func (p *panicGuard) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (p *panicGuard) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) (err error) {
		defer func() {
			if r := recover(); r != nil {
				p.log.Error("panic in handler", "procedure", conn.Spec().Procedure, "panic", r)
				err = connect.NewError(connect.CodeInternal, fmt.Errorf("internal error in %s", conn.Spec().Procedure))
			}
		}()
		return next(ctx, conn)
	}
}

// toConnectError maps domain errors to API codes so clients can tell "you asked for
// something that does not exist" from "Fireworks broke".
func toConnectError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	switch {
	case errors.Is(err, state.ErrNotFound), errors.Is(err, image.ErrNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, state.ErrAmbiguous), errors.Is(err, errInvalid), errors.Is(err, state.ErrInvalid):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, state.ErrNameTaken):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, state.ErrQuota):
		return connect.NewError(connect.CodeResourceExhausted, err)
	case errors.Is(err, agent.ErrNotRunning), errors.Is(err, errNotRunning), errors.Is(err, state.ErrStaleReport):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	}
	return connect.NewError(connect.CodeInternal, err)
}

var (
	errInvalid    = errors.New("invalid request")
	errNotRunning = errors.New("not running")
)

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errInvalid, fmt.Sprintf(format, args...))
}

// validName keeps names usable as hostnames and in URLs.
func validName(n string) error {
	if n == "" {
		return nil
	}
	if len(n) > 63 {
		return invalid("name %q... is longer than 63 characters", n[:63])
	}
	for i, r := range n {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r >= 'A' && r <= 'Z'
		if !ok || (r == '-' && (i == 0 || i == len(n)-1)) {
			return invalid("name %q: use letters, digits and inner hyphens", n)
		}
	}
	if strings.Trim(n, "0123456789abcdef") == "" && len(n) >= 4 {
		// An all-hex name could shadow an ID prefix.
		return invalid("name %q looks like a sandbox ID; pick a name with a non-hex letter", n)
	}
	return nil
}
