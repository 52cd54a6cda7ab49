package pki

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
)

// JoinTokenPrefix starts every join token; the digit is the format version.
const JoinTokenPrefix = "fwj1_"

const (
	tokenIDHex     = 16 // 64-bit id
	tokenSecretHex = 64 // 256-bit secret
	fingerprintHex = 64 // SHA-256
)

// ErrInvalidJoinToken: the string is not a well-formed join token. Errors wrapping it
// never contain the secret.
var ErrInvalidJoinToken = errors.New("invalid join token")

// JoinToken is a parsed join token (format in the package doc).
type JoinToken struct {
	ID            string // 16 lowercase hex: names the server's stored record
	Secret        string // 64 lowercase hex: proves possession; never log it
	CAFingerprint string // "sha256:<64 hex>", comparable with (*CA).Fingerprint
}

// Encode is the token string to hand to the joining agent.
func (t JoinToken) Encode() string {
	return JoinTokenPrefix + t.ID + "_" + t.Secret + "_" + strings.TrimPrefix(t.CAFingerprint, "sha256:")
}

// String redacts the secret, so a token that reaches a log line or %v leaks nothing.
func (t JoinToken) String() string {
	return JoinTokenPrefix + t.ID + "_<redacted>_" + strings.TrimPrefix(t.CAFingerprint, "sha256:")
}

// NewJoinToken makes a join token for ca. The server stores id and secretHash (never the
// token) and hands token to the operator once.
func NewJoinToken(ca *CA) (token, id, secretHash string) {
	var idb [tokenIDHex / 2]byte
	var sb [tokenSecretHex / 2]byte
	_, _ = rand.Read(idb[:]) // crypto/rand.Read never fails
	_, _ = rand.Read(sb[:])
	t := JoinToken{ID: hex.EncodeToString(idb[:]), Secret: hex.EncodeToString(sb[:]), CAFingerprint: ca.Fingerprint()}
	return t.Encode(), t.ID, HashSecret(t.Secret)
}

// ParseJoinToken parses a join token, tolerating surrounding whitespace from copy-paste.
func ParseJoinToken(s string) (JoinToken, error) {
	s = strings.TrimSpace(s)
	const want = "want " + JoinTokenPrefix + "<16 hex id>_<64 hex secret>_<64 hex CA fingerprint>"
	switch {
	case s == "":
		return JoinToken{}, fmt.Errorf("%w: empty", ErrInvalidJoinToken)
	case strings.HasPrefix(s, "fwk_"):
		return JoinToken{}, fmt.Errorf("%w: this is an API token (fwk_…), not a join token (%s…)", ErrInvalidJoinToken, JoinTokenPrefix)
	case strings.HasPrefix(s, "fwj") && !strings.HasPrefix(s, JoinTokenPrefix):
		return JoinToken{}, fmt.Errorf("%w: unsupported join token version (this build reads %s…)", ErrInvalidJoinToken, JoinTokenPrefix)
	case !strings.HasPrefix(s, JoinTokenPrefix):
		return JoinToken{}, fmt.Errorf("%w: no %q prefix; %s", ErrInvalidJoinToken, JoinTokenPrefix, want)
	}
	parts := strings.Split(strings.TrimPrefix(s, JoinTokenPrefix), "_")
	if len(parts) != 3 {
		return JoinToken{}, fmt.Errorf("%w: %d fields after the prefix, %s", ErrInvalidJoinToken, len(parts), want)
	}
	id, secret, fp := parts[0], parts[1], parts[2]
	if !isLowerHex(id, tokenIDHex) {
		return JoinToken{}, fmt.Errorf("%w: id is not %d lowercase hex digits", ErrInvalidJoinToken, tokenIDHex)
	}
	if !isLowerHex(secret, tokenSecretHex) {
		return JoinToken{}, fmt.Errorf("%w: secret is not %d lowercase hex digits", ErrInvalidJoinToken, tokenSecretHex)
	}
	if !isLowerHex(fp, fingerprintHex) {
		return JoinToken{}, fmt.Errorf("%w: CA fingerprint is not %d lowercase hex digits (a SHA-256)", ErrInvalidJoinToken, fingerprintHex)
	}
	return JoinToken{ID: id, Secret: secret, CAFingerprint: "sha256:" + fp}, nil
}

func isLowerHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// HashSecret is what the server stores for a join secret: "sha256:<hex>". A fast hash is
// enough for a 256-bit random secret.
func HashSecret(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return "sha256:" + hex.EncodeToString(h[:])
}

// VerifySecret reports, in constant time, whether secret hashes to stored.
func VerifySecret(secret, stored string) bool {
	return subtle.ConstantTimeCompare([]byte(HashSecret(secret)), []byte(stored)) == 1
}

// parseFingerprint accepts "sha256:<64 hex>" or bare 64 hex.
func parseFingerprint(s string) ([]byte, error) {
	h := strings.ToLower(strings.TrimPrefix(strings.TrimSpace(s), "sha256:"))
	if !isLowerHex(h, fingerprintHex) {
		return nil, fmt.Errorf("CA fingerprint %q is not sha256:<64 hex>", s)
	}
	b, _ := hex.DecodeString(h)
	return b, nil
}

// maxPeerChain bounds the work a peer can make the verifier do.
const maxPeerChain = 8

// PinnedCA verifies a server for a client that has no CA yet, only its fingerprint (from
// a join token). Use VerifyPeerCertificate with InsecureSkipVerify (or just ClientTLS): the
// server is accepted only if the chain it sends contains a self-signed CA certificate
// whose SHA-256 equals the pin, and its leaf verifies against that CA for server auth and
// carries RoleServer. Host names are not checked: the pin, not the address, is the trust.
// After a successful handshake CA returns the CA learned from the chain.
type PinnedCA struct {
	pin []byte

	mu sync.Mutex
	ca *CA
}

// PinnedCAVerifier pins fingerprint ("sha256:<hex>" or bare hex, e.g.
// JoinToken.CAFingerprint).
func PinnedCAVerifier(fingerprint string) (*PinnedCA, error) {
	pin, err := parseFingerprint(fingerprint)
	if err != nil {
		return nil, err
	}
	return &PinnedCA{pin: pin}, nil
}

// ErrPinRefused is in the chain of every error VerifyPeerCertificate returns: a server
// that is not the pinned cluster's (trying again will not help).
var ErrPinRefused = errors.New("server refused by the join token's CA pin")

// VerifyPeerCertificate has the signature of tls.Config.VerifyPeerCertificate.
func (p *PinnedCA) VerifyPeerCertificate(rawCerts [][]byte, _ [][]*x509.Certificate) error {
	if err := p.verify(rawCerts); err != nil {
		return fmt.Errorf("%w: %w", ErrPinRefused, err)
	}
	return nil
}

func (p *PinnedCA) verify(rawCerts [][]byte) error {
	if len(rawCerts) == 0 {
		return errors.New("pinned CA: server presented no certificate")
	}
	if len(rawCerts) > maxPeerChain {
		return fmt.Errorf("pinned CA: server chain has %d certificates, over %d", len(rawCerts), maxPeerChain)
	}
	// The leaf itself is never the anchor: a server presenting only the CA certificate
	// would prove nothing about holding a server key.
	var anchor *x509.Certificate
	var rest []*x509.Certificate
	for _, raw := range rawCerts[1:] {
		sum := sha256.Sum256(raw)
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return fmt.Errorf("pinned CA: parse server chain: %w", err)
		}
		if anchor == nil && subtle.ConstantTimeCompare(sum[:], p.pin) == 1 {
			anchor = c
			continue
		}
		rest = append(rest, c)
	}
	if anchor == nil {
		return errors.New("pinned CA: the server's chain does not contain the CA named by the join token's fingerprint (wrong cluster, or a server that does not send its CA)")
	}
	ca, err := ParseCA(certToPEM(anchor.Raw), nil)
	if err != nil {
		return fmt.Errorf("pinned CA: %w", err)
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return fmt.Errorf("pinned CA: parse server certificate: %w", err)
	}
	if _, err := verifyChain(append([]*x509.Certificate{leaf}, rest...), ca.CertPool(), x509.ExtKeyUsageServerAuth); err != nil {
		return fmt.Errorf("pinned CA: %w", err)
	}
	role, cn, err := RoleOf(leaf)
	if err != nil {
		return fmt.Errorf("pinned CA: server certificate: %w", err)
	}
	if role != RoleServer {
		return fmt.Errorf("pinned CA: peer %q has role %s, not server", cn, role)
	}
	p.mu.Lock()
	p.ca = ca
	p.mu.Unlock()
	return nil
}

// CA is the verify-only CA learned from the last accepted handshake, or nil before one.
func (p *PinnedCA) CA() *CA {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ca
}

// ClientTLS is a client configuration that trusts only the pinned CA. cert may be nil
// (the usual case: the joining agent has no certificate yet).
func (p *PinnedCA) ClientTLS(cert *tls.Certificate) *tls.Config {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Go's own verification needs a root pool the joiner does not have yet;
		// VerifyPeerCertificate does all of it against the pin instead.
		InsecureSkipVerify:    true,
		VerifyPeerCertificate: p.VerifyPeerCertificate,
		// The pin checked the chain; only a server may take the join token.
		VerifyConnection: RequirePeer(RoleServer, ""),
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}
