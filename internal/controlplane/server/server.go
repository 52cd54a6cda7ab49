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

	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Server serves the API.
type Server struct {
	store  *state.Store
	log    *slog.Logger
	now    func() time.Time
	limits Limits
	// waiting counts each user token's calls in waitFor (Limits.WaitsPerOwner).
	waitMu  sync.Mutex
	waiting map[string]int
	// savedHeld is what each user token's saves under way may add to its saved states
	// (see savedRoom), so that concurrent calls cannot all pass its bound.
	savedMu   sync.Mutex
	savedHeld map[string]int64
	// cluster is set by EnableCluster; its CA is nil on a single-node dev server.
	cluster ClusterOptions
	nodes   nodeConns
	// joinsFrom holds the peer addresses with a Kubernetes-token join under review.
	joinsFrom inFlight
	// pools holds the nodes' last warm-pool reports (cluster leader).
	pools poolReports
	// ingress configures the route feed; routes is its current table.
	ingress IngressOptions
	routes  routeFeed
	// policyMu serialises network policy changes (node first, then the state).
	policyMu sync.Mutex
}

// New wires a server over an open store. API tokens live in the store (see
// EnsureAdminToken).
func New(store *state.Store, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{store: store, log: log, now: time.Now, limits: DefaultLimits()}
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
	// SavedMiBPerOwner bounds the disk the token's snapshots and paused sandboxes' saved
	// states take on nodes together.
	SavedMiBPerOwner int
	// WaitsPerOwner bounds the token's calls waiting at once for a sandbox to change
	// (placed, started, stopped): each holds a goroutine and a stream on this server.
	WaitsPerOwner int
}

// DefaultLimits are the limits of a server not told otherwise.
func DefaultLimits() Limits {
	return Limits{SandboxesPerOwner: 1000, VCPUsPerOwner: 64, MemoryMiBPerOwner: 128 << 10, DiskMiBPerOwner: 1 << 20, SpecBytesPerOwner: 16 << 20, WaitsPerOwner: 256,
		SavedMiBPerOwner: 32 << 10}
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

// Handler returns the HTTP handler with every service mounted behind the token check.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	opts := rpc.HandlerOptions(s.log)
	mux.Handle(fireworksv1connect.NewSandboxServiceHandler(&sandboxService{s}, opts...))
	mux.Handle(fireworksv1connect.NewImageServiceHandler(&imageService{s}, opts...))
	mux.Handle(fireworksv1connect.NewVolumeServiceHandler(&volumeService{s}, opts...))
	mux.Handle(fireworksv1connect.NewTemplateServiceHandler(&templateService{s}, opts...))
	mux.Handle(fireworksv1connect.NewSystemServiceHandler(&systemService{s}, opts...))
	mux.Handle(fireworksv1connect.NewTokenServiceHandler(&tokenService{s}, opts...))
	mux.Handle(fireworksv1connect.NewClusterServiceHandler(&clusterService{s}, opts...))
	mux.Handle(fireworksv1connect.NewIngressServiceHandler(&ingressService{s}, opts...))
	if s.cluster.CA != nil {
		mux.Handle(fireworksv1connect.NewNodeServiceHandler(&nodeService{s}, opts...))
	}
	return rpc.BoundBody(s.authenticate(mux))
}

// Serve listens until ctx ends. HTTP/2 without TLS is enabled so gRPC clients and the
// CLI's bidirectional streams (attach, exec) work on the same plain port.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: s.Handler(), Protocols: &protocols, ReadHeaderTimeout: 10 * time.Second}
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

// toConnectError maps domain errors to API codes so clients can tell "you asked for
// something that does not exist" from "Fireworks broke".
func toConnectError(err error) error { return rpc.Error(err, sentinels) }

// sentinels are the errors of the public API that callers can act on.
var sentinels = []rpc.Sentinel{
	{Err: state.ErrNotFound, Code: connect.CodeNotFound},
	{Err: state.ErrAmbiguous, Code: connect.CodeInvalidArgument},
	{Err: errInvalid, Code: connect.CodeInvalidArgument},
	{Err: state.ErrInvalid, Code: connect.CodeInvalidArgument},
	{Err: state.ErrNameTaken, Code: connect.CodeAlreadyExists},
	{Err: state.ErrQuota, Code: connect.CodeResourceExhausted},
	{Err: errNotRunning, Code: connect.CodeFailedPrecondition},
	{Err: state.ErrStaleReport, Code: connect.CodeFailedPrecondition},
	{Err: state.ErrInvalidTransition, Code: connect.CodeFailedPrecondition},
	{Err: state.ErrNoRoom, Code: connect.CodeResourceExhausted},
	{Err: state.ErrInUse, Code: connect.CodeFailedPrecondition},
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
