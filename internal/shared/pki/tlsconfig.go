package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// ServerTLS is the configuration for a cluster listener. It serves cert followed by the CA
// certificate, so a joining agent that holds only the CA fingerprint (PinnedCA) can learn
// and check the CA from the handshake.
//
// With requireClientCert every client must present a certificate that chains to the CA.
// Without it a client may connect with no certificate (a joining agent, a CLI with an API
// token), but a certificate it does present must chain to the CA; handlers read who it is
// with PeerIdentity.
func ServerTLS(ca *CA, cert tls.Certificate, requireClientCert bool) *tls.Config {
	chain := slices.Clone(cert.Certificate)
	if n := len(chain); n == 0 || !bytes.Equal(chain[n-1], ca.cert.Raw) {
		chain = append(chain, ca.cert.Raw)
	}
	cert.Certificate = chain
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    ca.CertPool(),
		ClientAuth:   tls.VerifyClientCertIfGiven,
	}
	if requireClientCert {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg
}

// ClientTLS is the configuration for dialing a cluster member by name: the server must
// chain to the CA, its certificate must name serverName (a DNS SAN or IP SAN) and carry
// role want. The role matters as much as the chain: every member's certificate comes from
// the same CA, and an agent's (whose holder only had a join token) must never pass for a
// server's. cert may be nil for a client without a certificate.
func ClientTLS(ca *CA, cert *tls.Certificate, serverName string, want Role) *tls.Config {
	cfg := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		RootCAs:          ca.CertPool(),
		ServerName:       serverName,
		VerifyConnection: RequirePeer(want, ""),
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}

// ErrPeerRefused is in the chain of the errors RequirePeer and VerifyPeerRole return: the
// peer is not who it must be (another role, another name, a certificate of no role).
var ErrPeerRefused = errors.New("peer refused")

// RequirePeer returns a tls.Config.VerifyConnection function, for a configuration that
// verifies the chain itself (RootCAs), that accepts the peer only if its certificate
// carries role and, when name is not empty, that common name (a node's name).
func RequirePeer(role Role, name string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return fmt.Errorf("%w: peer sent no certificate", ErrPeerRefused)
		}
		got, cn, err := RoleOf(cs.PeerCertificates[0])
		if err != nil {
			return fmt.Errorf("%w: peer certificate: %w", ErrPeerRefused, err)
		}
		if got != role {
			return fmt.Errorf("%w: peer %q has a %s certificate, want a %s's", ErrPeerRefused, cn, got, role)
		}
		if name != "" && cn != name {
			return fmt.Errorf("%w: peer is %q, want %q", ErrPeerRefused, cn, name)
		}
		return nil
	}
}

// VerifyPeerRole returns a tls.Config.VerifyConnection function that accepts the peer only
// if its certificate chains to ca for usage (x509.ExtKeyUsageServerAuth when the peer is
// the server, ExtKeyUsageClientAuth when it is the client) and carries one of roles. It
// verifies the chain itself, so it also works on a client with InsecureSkipVerify, i.e.
// when identity is the role, not a host name (as between Raft peers).
func VerifyPeerRole(ca *CA, usage x509.ExtKeyUsage, roles ...Role) func(tls.ConnectionState) error {
	pool := ca.CertPool()
	return func(cs tls.ConnectionState) error {
		leaf, err := verifyChain(cs.PeerCertificates, pool, usage)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrPeerRefused, err)
		}
		role, cn, err := RoleOf(leaf)
		if err != nil {
			return fmt.Errorf("%w: peer certificate: %w", ErrPeerRefused, err)
		}
		if !slices.Contains(roles, role) {
			return fmt.Errorf("%w: peer %q has role %s, want one of %v", ErrPeerRefused, cn, role, roles)
		}
		return nil
	}
}

// verifyChain checks that certs[0] chains to a root in pool, using the rest as
// intermediates, for usage. It returns the leaf.
func verifyChain(certs []*x509.Certificate, pool *x509.CertPool, usage x509.ExtKeyUsage) (*x509.Certificate, error) {
	if len(certs) == 0 {
		return nil, errors.New("peer presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{usage},
	})
	if err != nil {
		return nil, fmt.Errorf("peer certificate %q: %w", certs[0].Subject.CommonName, err)
	}
	return certs[0], nil
}

// PeerIdentity is the role and common name of the peer's verified certificate (e.g.
// http.Request.TLS on a ServerTLS listener). It fails when the peer presented no
// certificate or the certificate was not verified.
func PeerIdentity(cs *tls.ConnectionState) (Role, string, error) {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", "", errors.New("peer presented no verified certificate")
	}
	return RoleOf(cs.VerifiedChains[0][0])
}

// KeyPairFiles are the paths LoadKeyPair and WriteKeyPair use: dir/name.pem and
// dir/name-key.pem.
func KeyPairFiles(dir, name string) (certFile, keyFile string) {
	return filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
}

// LoadKeyPair reads dir/name.pem and dir/name-key.pem.
func LoadKeyPair(dir, name string) (tls.Certificate, error) {
	certFile, keyFile := KeyPairFiles(dir, name)
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load key pair %s in %s: %w", name, dir, err)
	}
	return c, nil
}

// WriteKeyPair checks that certPEM and keyPEM belong together, then writes dir/name.pem
// (0644) and dir/name-key.pem (0600), each replaced atomically (renewal overwrites).
func WriteKeyPair(dir, name string, certPEM, keyPEM []byte) error {
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return fmt.Errorf("write key pair %s: %w", name, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("write key pair %s: %w", name, err)
	}
	certFile, keyFile := KeyPairFiles(dir, name)
	if err := writeFileAtomic(keyFile, keyPEM, 0o600); err != nil {
		return fmt.Errorf("write key pair %s: %w", name, err)
	}
	if err := writeFileAtomic(certFile, certPEM, 0o644); err != nil {
		return fmt.Errorf("write key pair %s: %w", name, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("write key pair %s: %w", name, err)
	}
	return nil
}

// KeyPair parses PEM into a tls.Certificate (with Leaf set).
func KeyPair(certPEM, keyPEM []byte) (tls.Certificate, error) {
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("parse key pair: %w", err)
	}
	return c, nil
}
