package rpc

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"testing"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// A process started with its servers waits while none answers, and stops at once when refused.
func TestNoServerYet(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"no server listening", connect.NewError(connect.CodeUnavailable, errors.New("dial tcp 10.96.0.9:7766: connect: connection refused")), true},
		{"no leader yet", fmt.Errorf("join via s0:7766: %w", connect.NewError(connect.CodeUnavailable, errors.New("no leader"))), true},
		{"timed out", connect.NewError(connect.CodeDeadlineExceeded, errors.New("deadline")), true},
		{"another cluster's CA", connect.NewError(connect.CodeUnavailable, fmt.Errorf("tls: %w: chain", pki.ErrPinRefused)), false},
		{"a certificate from another CA", connect.NewError(connect.CodeUnavailable, fmt.Errorf("tls: %w", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}})), false},
		{"a peer of another role", connect.NewError(connect.CodeUnavailable, fmt.Errorf("tls: %w: peer \"node-a\" has a agent certificate, want a server's", pki.ErrPeerRefused)), false},
		{"token refused", connect.NewError(connect.CodePermissionDenied, errors.New("join token expired")), false},
		{"bad request", connect.NewError(connect.CodeInvalidArgument, errors.New("node name")), false},
	} {
		if got := NoServerYet(c.err); got != c.want {
			t.Errorf("%s: transient = %v, want %v", c.name, got, c.want)
		}
	}
}
