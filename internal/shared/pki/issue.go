package pki

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"
)

// Role is what a certificate's holder is in the cluster.
type Role string

const (
	// RoleServer is a control-plane server: Raft peer, API server, issuer.
	RoleServer Role = "server"
	// RoleAgent is a node agent. It also serves an internal API (server→agent calls,
	// agent↔agent migration), so it gets server-auth as well as client-auth.
	RoleAgent Role = "agent"
	// RoleClient is a client only (CLI, automation): client-auth only.
	RoleClient Role = "client"
	// RoleIngress is an HTTP edge (`fireworks ingress`, or Envoy with its certificate): it
	// opens tunnels to nodes' data addresses and reads the servers' xDS feed. Client-auth
	// only; nodes admit it to their ingress handler and nothing else.
	RoleIngress Role = "ingress"
)

// ouPrefix makes the role's OrganizationalUnit unmistakable in `openssl x509 -text`.
const ouPrefix = "fireworks-"

// DefaultLeafTTL is used when an IssueRequest has no TTL.
const DefaultLeafTTL = 365 * 24 * time.Hour

// Valid reports whether r is one of the defined roles.
func (r Role) Valid() bool {
	return r == RoleServer || r == RoleAgent || r == RoleClient || r == RoleIngress
}

func (r Role) extKeyUsage() []x509.ExtKeyUsage {
	if r == RoleClient || r == RoleIngress {
		return []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	return []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
}

// IssueRequest is what a leaf certificate says. Everything in it is decided by the issuer;
// nothing comes from the requester.
type IssueRequest struct {
	CommonName string // node or client name
	Role       Role
	DNSNames   []string      // SANs: names peers dial this holder by
	IPs        []net.IP      // SANs: addresses peers dial this holder by
	TTL        time.Duration // 0 means DefaultLeafTTL; capped at the CA's expiry
}

func (req IssueRequest) validate() error {
	if req.CommonName == "" {
		return errors.New("empty common name")
	}
	if strings.ContainsAny(req.CommonName, "\x00\n\r") || len(req.CommonName) > 64 {
		return fmt.Errorf("invalid common name %q (at most 64 bytes, no control characters)", req.CommonName)
	}
	if !req.Role.Valid() {
		return fmt.Errorf("unknown role %q", req.Role)
	}
	if req.TTL < 0 {
		return fmt.Errorf("negative TTL %s", req.TTL)
	}
	for _, n := range req.DNSNames {
		if n == "" || strings.ContainsAny(n, " \x00/") {
			return fmt.Errorf("invalid DNS name %q", n)
		}
	}
	for _, ip := range req.IPs {
		if ip.To16() == nil {
			return fmt.Errorf("invalid IP %v", ip)
		}
	}
	return nil
}

// Issue generates a fresh ECDSA P-256 key and a certificate for it. Servers use it to give
// themselves a certificate at start.
func (ca *CA) Issue(req IssueRequest) (certPEM, keyPEM []byte, err error) {
	if ca.key == nil {
		return nil, nil, fmt.Errorf("issue certificate for %q: %w", req.CommonName, ErrNoCAKey)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key for %q: %w", req.CommonName, err)
	}
	certPEM, err = ca.sign(req, key.Public())
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = marshalKeyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return certPEM, keyPEM, nil
}

// SignCSR certifies the public key in a PKCS#10 request (DER). The requester is untrusted:
// only its public key is used, after checking the CSR's self-signature (proof that it
// holds the private key). Its subject, SANs and extensions are ignored; the certificate
// says exactly what req says.
func (ca *CA) SignCSR(csrDER []byte, req IssueRequest) (certPEM []byte, err error) {
	if ca.key == nil {
		return nil, fmt.Errorf("sign CSR for %q: %w", req.CommonName, ErrNoCAKey)
	}
	if len(csrDER) > 64<<10 {
		return nil, fmt.Errorf("sign CSR for %q: CSR is %d bytes, over the 64 KiB limit", req.CommonName, len(csrDER))
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("sign CSR for %q: parse: %w", req.CommonName, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("sign CSR for %q: bad self-signature: %w", req.CommonName, err)
	}
	if err := checkLeafKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("sign CSR for %q: %w", req.CommonName, err)
	}
	return ca.sign(req, csr.PublicKey)
}

// checkLeafKey refuses keys too weak to trust for cluster membership.
func checkLeafKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("unsupported ECDSA curve %s", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("RSA key of %d bits is too small (want >= 2048)", k.N.BitLen())
		}
	default:
		return fmt.Errorf("unsupported public key type %T", pub)
	}
	return nil
}

func (ca *CA) sign(req IssueRequest, pub any) ([]byte, error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	now := time.Now()
	ttl := req.TTL
	if ttl == 0 {
		ttl = DefaultLeafTTL
	}
	notAfter := now.Add(ttl)
	// A leaf that outlives its CA fails verification anyway; say so in the certificate.
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	keyUsage := x509.KeyUsageDigitalSignature
	if _, isRSA := pub.(*rsa.PublicKey); isRSA {
		keyUsage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject: pkix.Name{
			CommonName:         req.CommonName,
			Organization:       []string{"fireworks"},
			OrganizationalUnit: []string{ouPrefix + string(req.Role)},
		},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		KeyUsage:              keyUsage,
		ExtKeyUsage:           req.Role.extKeyUsage(),
		BasicConstraintsValid: true,
		IsCA:                  false,
		DNSNames:              append([]string(nil), req.DNSNames...),
		IPAddresses:           append([]net.IP(nil), req.IPs...),
		// The role and name again, as a URI SAN the CA alone chooses: verifiers that cannot
		// read the role from the subject (Envoy) match this to know whose it is.
		URIs: []*url.URL{IdentityURI(req.Role, req.CommonName)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %q: %w", req.CommonName, err)
	}
	return certToPEM(der), nil
}

// IdentityURI is the URI SAN naming a certificate's role and name:
// fireworks://<role>/<name>.
func IdentityURI(role Role, name string) *url.URL {
	return &url.URL{Scheme: "fireworks", Host: string(role), Path: "/" + name}
}

// NewCSR is the joining side: a fresh ECDSA P-256 key and a CSR for it. The CSR carries
// only the common name, as a hint; the issuer decides everything the certificate says.
func NewCSR(commonName string) (csrDER, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key for CSR %q: %w", commonName, err)
	}
	csrDER, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create CSR %q: %w", commonName, err)
	}
	keyPEM, err = marshalKeyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return csrDER, keyPEM, nil
}

// RoleOf reads the role and common name from a certificate this package issued. It does
// not verify the certificate; call it on a verified chain's leaf.
func RoleOf(cert *x509.Certificate) (Role, string, error) {
	var role Role
	for _, ou := range cert.Subject.OrganizationalUnit {
		r, ok := strings.CutPrefix(ou, ouPrefix)
		if !ok {
			continue
		}
		if role != "" {
			return "", "", fmt.Errorf("certificate %q has more than one role", cert.Subject.CommonName)
		}
		role = Role(r)
	}
	if role == "" {
		return "", "", fmt.Errorf("certificate %q carries no fireworks role", cert.Subject.CommonName)
	}
	if !role.Valid() {
		return "", "", fmt.Errorf("certificate %q has unknown role %q", cert.Subject.CommonName, role)
	}
	return role, cert.Subject.CommonName, nil
}

// SerialOf reads the serial number (hex) and expiry of a PEM certificate.
func SerialOf(certPEM []byte) (serial string, notAfter time.Time, err error) {
	c, err := parseCertPEM(certPEM)
	if err != nil {
		return "", time.Time{}, err
	}
	return c.SerialNumber.Text(16), c.NotAfter, nil
}
