package pki

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// Raft transport defaults, as raft.NewTCPTransport uses them.
const (
	raftMaxPool = 3
	raftTimeout = 10 * time.Second
	// handshakeTimeout bounds how long an accepted connection may take to finish its TLS
	// handshake; raft reads accepted connections without deadlines, so without it a peer
	// that connects and stalls would hold a goroutine until it hangs up.
	handshakeTimeout = 10 * time.Second
)

// RaftStreamLayer is a raft.StreamLayer over mutual TLS: both ends must hold a
// RoleServer certificate from the cluster CA. Host names are not checked (see the
// package doc), so the advertised address may be an IP or a DNS name that changes.
type RaftStreamLayer struct {
	ln        net.Listener
	advertise raftAddr
	serverCfg *tls.Config
	clientCfg *tls.Config

	mu     sync.Mutex
	conns  map[*acceptedConn]struct{}
	closed bool
}

var _ raft.StreamLayer = (*RaftStreamLayer)(nil)

// NewRaftStreamLayer listens on listenAddr (host:port; port 0 picks one). advertise is the
// address peers dial (host:port, host may be a DNS name such as a Kubernetes headless
// Service entry, resolved on every Dial); empty means the listener's address, which must
// then not be a wildcard. cert must be a RoleServer certificate issued by ca.
func NewRaftStreamLayer(listenAddr, advertise string, ca *CA, cert tls.Certificate) (*RaftStreamLayer, error) {
	if err := checkOwnCert(ca, cert, RoleServer); err != nil {
		return nil, fmt.Errorf("raft TLS stream layer: %w", err)
	}
	ln, err := net.Listen("tcp", listenAddr)
	if err != nil {
		return nil, fmt.Errorf("raft TLS stream layer: listen on %s: %w", listenAddr, err)
	}
	adv, err := advertiseAddr(advertise, ln.Addr())
	if err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("raft TLS stream layer: %w", err)
	}
	srv := ServerTLS(ca, cert, true)
	srv.VerifyConnection = VerifyPeerRole(ca, x509.ExtKeyUsageClientAuth, RoleServer)
	cli := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		// Identity is the role in a CA-issued certificate, not the address; the
		// chain and the role are checked by VerifyConnection.
		InsecureSkipVerify: true,
		VerifyConnection:   VerifyPeerRole(ca, x509.ExtKeyUsageServerAuth, RoleServer),
	}
	return &RaftStreamLayer{ln: ln, advertise: adv, serverCfg: srv, clientCfg: cli, conns: map[*acceptedConn]struct{}{}}, nil
}

// NewRaftTransport is a raft.NetworkTransport over NewRaftStreamLayer. logger may be nil
// (raft then logs to stderr).
func NewRaftTransport(listenAddr, advertise string, ca *CA, cert tls.Certificate, logger hclog.Logger) (*raft.NetworkTransport, error) {
	stream, err := NewRaftStreamLayer(listenAddr, advertise, ca, cert)
	if err != nil {
		return nil, err
	}
	return raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  stream,
		MaxPool: raftMaxPool,
		Timeout: raftTimeout,
		Logger:  logger,
	}), nil
}

// Accept returns the next connection. Its TLS handshake (and so the peer check) runs on
// the first Read or Write, in the caller's goroutine, bounded by handshakeTimeout: a slow
// peer must not block the accept loop.
func (s *RaftStreamLayer) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	ac := &acceptedConn{Conn: tls.Server(c, s.serverCfg), owner: s}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = ac.Conn.Close()
		return nil, net.ErrClosed
	}
	s.conns[ac] = struct{}{}
	return ac, nil
}

// Close stops listening and closes every accepted connection, so the goroutines raft
// runs per connection return instead of waiting for the peer to hang up.
func (s *RaftStreamLayer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = map[*acceptedConn]struct{}{}
	s.mu.Unlock()
	for c := range conns {
		_ = c.Conn.Close()
	}
	return err
}

// Addr is the advertised address, which raft uses as this node's ServerAddress.
func (s *RaftStreamLayer) Addr() net.Addr { return s.advertise }

// ListenAddr is the address actually bound (useful with port 0).
func (s *RaftStreamLayer) ListenAddr() net.Addr { return s.ln.Addr() }

// Dial connects to a peer and completes the handshake, so a peer without a RoleServer
// certificate from the CA fails here. The host is resolved now, not when the peer list
// was configured.
func (s *RaftStreamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if timeout <= 0 {
		timeout = raftTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	d := &tls.Dialer{NetDialer: &net.Dialer{}, Config: s.clientCfg}
	c, err := d.DialContext(ctx, "tcp", string(address))
	if err != nil {
		return nil, fmt.Errorf("raft dial %s: %w", address, err)
	}
	return c, nil
}

// acceptedConn finishes the server-side handshake under a deadline before the first
// Read or Write, and leaves the owner's set on Close.
type acceptedConn struct {
	*tls.Conn
	owner *RaftStreamLayer

	once  sync.Once
	hsErr error
}

func (c *acceptedConn) handshake() error {
	c.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
		defer cancel()
		if err := c.Conn.HandshakeContext(ctx); err != nil {
			c.hsErr = fmt.Errorf("raft TLS handshake with %s: %w", c.Conn.RemoteAddr(), err)
		}
	})
	return c.hsErr
}

func (c *acceptedConn) Read(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *acceptedConn) Write(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

func (c *acceptedConn) Close() error {
	c.owner.mu.Lock()
	delete(c.owner.conns, c)
	c.owner.mu.Unlock()
	return c.Conn.Close()
}

// raftAddr is an advertised address kept as written, so a DNS name stays a name.
type raftAddr string

func (a raftAddr) Network() string { return "tcp" }
func (a raftAddr) String() string  { return string(a) }

func advertiseAddr(advertise string, bound net.Addr) (raftAddr, error) {
	if advertise == "" {
		tcp, ok := bound.(*net.TCPAddr)
		if !ok || tcp.IP.IsUnspecified() {
			return "", fmt.Errorf("listening on %s, a wildcard address: set an advertise address peers can dial", bound)
		}
		return raftAddr(tcp.String()), nil
	}
	host, port, err := net.SplitHostPort(advertise)
	if err != nil {
		return "", fmt.Errorf("advertise address %q: %w", advertise, err)
	}
	if host == "" {
		return "", fmt.Errorf("advertise address %q has no host", advertise)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return "", fmt.Errorf("advertise address %q is a wildcard; peers cannot dial it", advertise)
	}
	if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
		return "", fmt.Errorf("advertise address %q: bad port", advertise)
	}
	return raftAddr(advertise), nil
}

// checkOwnCert catches a misconfigured node at start rather than at its first peer's
// rejection.
func checkOwnCert(ca *CA, cert tls.Certificate, want Role) error {
	if len(cert.Certificate) == 0 {
		return errors.New("empty certificate")
	}
	leaf := cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("parse own certificate: %w", err)
		}
	}
	if _, err := verifyChain([]*x509.Certificate{leaf}, ca.CertPool(), x509.ExtKeyUsageServerAuth); err != nil {
		return fmt.Errorf("own certificate does not verify against the cluster CA: %w", err)
	}
	role, cn, err := RoleOf(leaf)
	if err != nil {
		return fmt.Errorf("own certificate: %w", err)
	}
	if role != want {
		return fmt.Errorf("own certificate %q has role %s, want %s", cn, role, want)
	}
	return nil
}
