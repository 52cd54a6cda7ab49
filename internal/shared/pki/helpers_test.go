package pki

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

func testCA(t *testing.T, name string) *CA {
	t.Helper()
	ca, err := CreateCA(t.TempDir(), name)
	if err != nil {
		t.Fatalf("CreateCA: %v", err)
	}
	return ca
}

// issue gives a key pair for role, valid for 127.0.0.1 and localhost.
func issue(t *testing.T, ca *CA, role Role, cn string) tls.Certificate {
	t.Helper()
	certPEM, keyPEM, err := ca.Issue(IssueRequest{
		CommonName: cn, Role: role, DNSNames: []string{"localhost"},
		IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, TTL: time.Hour,
	})
	if err != nil {
		t.Fatalf("Issue %s %s: %v", role, cn, err)
	}
	kp, err := KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatalf("KeyPair: %v", err)
	}
	return kp
}

type serverResult struct {
	state tls.ConnectionState
	err   error
}

// serveOnce accepts one TLS connection with cfg, completes the handshake and echoes one
// byte. The result says whether the server accepted the client.
func serveOnce(t *testing.T, cfg *tls.Config) (addr string, result <-chan serverResult) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan serverResult, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- serverResult{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			ch <- serverResult{err: err}
			return
		}
		var b [1]byte
		if _, err := io.ReadFull(tc, b[:]); err != nil {
			ch <- serverResult{err: err}
			return
		}
		if _, err := tc.Write(b[:]); err != nil {
			ch <- serverResult{err: err}
			return
		}
		ch <- serverResult{state: tc.ConnectionState()}
	}()
	return ln.Addr().String(), ch
}

// roundTrip dials addr with cfg and exchanges one byte. With TLS 1.3 the server's
// rejection of a client certificate arrives after the client's handshake completes, so
// only a full round trip shows whether the client was accepted.
func roundTrip(addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{42}); err != nil {
		return tls.ConnectionState{}, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return tls.ConnectionState{}, err
	}
	if b[0] != 42 {
		return tls.ConnectionState{}, errors.New("echo mismatch")
	}
	return c.(*tls.Conn).ConnectionState(), nil
}

func wait(t *testing.T, ch <-chan serverResult) serverResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(20 * time.Second):
		t.Fatal("server did not finish")
		return serverResult{}
	}
}

// forceCert makes a client send cert even when the server's list of acceptable CAs does
// not name its issuer (Go's client would otherwise send no certificate at all), so a
// test can show what the server does with a foreign certificate.
func forceCert(cfg *tls.Config, cert tls.Certificate) *tls.Config {
	cfg.Certificates = nil
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	return cfg
}
