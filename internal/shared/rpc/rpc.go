// Package rpc holds what every Fireworks Connect service shares, whichever process it runs
// in (the servers' public API and node protocol, a node's internal API): handler options
// (no panic escapes, messages bounded), the bound on unary bodies, refusals written before
// a handler runs, and the mapping of errors to codes.
package rpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// MaxRequestBytes bounds one request message, decompressed (Connect decompresses a gzip
// body only up to this, so a small compressed body cannot make a server allocate more),
// and the whole body of a unary request as it arrives. Streams are bounded per message.
// The largest legitimate request is a sandbox spec (see state.CheckSizes): well under it.
const MaxRequestBytes = 4 << 20

// HandlerOptions are every Connect handler's: no panic escapes, no message beyond
// MaxRequestBytes is read.
func HandlerOptions(log *slog.Logger) []connect.HandlerOption {
	return []connect.HandlerOption{connect.WithInterceptors(&panicGuard{log: log}), connect.WithReadMaxBytes(MaxRequestBytes)}
}

// BoundBody caps the body of a unary request at MaxRequestBytes before anything reads it
// (streams are bounded per message by the handlers). It comes first, in front of any
// credential check and forwarding: an unauthenticated caller must not make a process
// hold more.
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

// Unauthenticated refuses a call for its credential.
func Unauthenticated(w http.ResponseWriter, r *http.Request, msg string) {
	Refuse(w, r, connect.CodeUnauthenticated, http.StatusUnauthorized, msg)
}

// Refuse answers a call with an error code without calling the handler behind, in the
// caller's protocol (gRPC status trailers-only, or Connect's JSON error).
func Refuse(w http.ResponseWriter, r *http.Request, code connect.Code, httpStatus int, msg string) {
	ct := r.Header.Get("Content-Type")
	if strings.HasPrefix(ct, "application/grpc") {
		w.Header().Set("Content-Type", ct)
		w.Header().Set("Grpc-Status", strconv.Itoa(int(code)))
		w.Header().Set("Grpc-Message", msg)
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(httpStatus)
	body, _ := json.Marshal(map[string]string{"code": code.String(), "message": msg})
	_, _ = w.Write(body)
}

// Sentinel maps an error (matched with errors.Is) to the code a caller gets for it.
type Sentinel struct {
	Err  error
	Code connect.Code
}

// Error maps a domain error to an API error, so that clients can tell "you asked for
// something that does not exist" from "Fireworks broke": connect errors pass through,
// the sentinels given map to their codes, a call's end to canceled or deadline
// exceeded, anything else is internal. nil stays nil.
func Error(err error, sentinels []Sentinel) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	for _, s := range sentinels {
		if errors.Is(err, s.Err) {
			return connect.NewError(s.Code, err)
		}
	}
	switch {
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	}
	return connect.NewError(connect.CodeInternal, err)
}

// panicGuard turns a handler panic into an internal error so no panic reaches a caller or
// takes the process down.
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

// Caller headers carry, on a server's call to a node's internal API, who the server
// acts for: the node charges pulls to that token and applies what that role may do. Only
// servers reach a node's internal API (their certificate is checked, or the call is in
// process), and a server sets both headers itself on every call, whatever its own caller
// sent: a user cannot forge them.
const (
	CallerTokenHeader = "Fireworks-Caller-Token"
	CallerAdminHeader = "Fireworks-Caller-Admin"
)

// ReadExecStart reads and checks the first message of an Exec call (the public API's and
// a node's): it must start a command.
func ReadExecStart(stream interface {
	Receive() (*pb.ExecRequest, error)
}) (*pb.ExecRequest, *pb.ExecStart, error) {
	first, err := stream.Receive()
	if err != nil {
		return nil, nil, Error(fmt.Errorf("read exec request: %w", err), nil)
	}
	start := first.GetStart()
	if start == nil || len(start.GetArgv()) == 0 {
		return nil, nil, connect.NewError(connect.CodeInvalidArgument, errors.New("the first exec message must be start with a non-empty argv"))
	}
	return first, start, nil
}

// AssignmentsRefresh is how often the leader sends a node its assignments when nothing
// changed (NodeService.WatchAssignments): the node's proof that the stream lives (it
// starts its session over after three silent periods).
const AssignmentsRefresh = 20 * time.Second

// NoServerYet says whether a call failed for want of a server (none reachable, none
// leading, none answering in time), not because one refused it: a process started
// together with its servers (an agent, an edge) waits on the first and stops on the
// second. A server that fails certificate verification (another cluster's, an impostor)
// is a refusal.
func NoServerYet(err error) bool {
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	if errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &hn) || errors.Is(err, pki.ErrPinRefused) || errors.Is(err, pki.ErrPeerRefused) {
		return false
	}
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded:
		return true
	}
	return false
}
