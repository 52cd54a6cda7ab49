package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// File names inside a CA directory.
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

// CAValidity is how long a new cluster CA is valid. Rotating a CA means re-issuing every
// certificate, so it is long; leaves are short and renewable.
const CAValidity = 10 * 365 * 24 * time.Hour

// clockSkew backdates NotBefore so a peer whose clock is slightly behind accepts a
// certificate issued a moment ago.
const clockSkew = 5 * time.Minute

// ErrNoCAKey: the CA was loaded without its private key, so it can verify but not issue.
var ErrNoCAKey = errors.New("CA private key not available (verify-only CA)")

// CA is the cluster certificate authority. The zero value is not usable; get one from
// CreateCA, LoadCA, LoadOrCreateCA or ParseCA.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer // nil for a verify-only CA
}

// CreateCA makes a new cluster CA (ECDSA P-256, self-signed, CAValidity) and writes
// dir/ca.pem (0644) and dir/ca-key.pem (0600). It never overwrites: if either file exists
// it fails, because replacing a CA silently orphans every certificate it issued.
func CreateCA(dir, clusterName string) (*CA, error) {
	if clusterName == "" {
		return nil, errors.New("create CA: empty cluster name")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create CA directory %s: %w", dir, err)
	}
	ca, keyPEM, err := newCA(clusterName, time.Now())
	if err != nil {
		return nil, err
	}
	// Key first: a crash between the two writes leaves a key without a certificate, which
	// LoadOrCreateCA reports instead of creating a second CA over it.
	if err := writeFileExclusive(filepath.Join(dir, CAKeyFile), keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("create CA in %s: %w", dir, err)
	}
	if err := writeFileExclusive(filepath.Join(dir, CACertFile), ca.certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("create CA in %s: %w", dir, err)
	}
	if err := syncDir(dir); err != nil {
		return nil, fmt.Errorf("create CA in %s: %w", dir, err)
	}
	return ca, nil
}

func newCA(clusterName string, now time.Time) (*CA, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject: pkix.Name{
			CommonName:   "Fireworks cluster CA " + clusterName,
			Organization: []string{"fireworks"},
		},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		// The CA signs leaves only, never intermediates.
		MaxPathLen:     0,
		MaxPathLenZero: true,
		KeyUsage:       x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("self-sign CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parse new CA certificate: %w", err)
	}
	keyPEM, err := marshalKeyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return &CA{cert: cert, certPEM: certToPEM(der), key: key}, keyPEM, nil
}

// LoadCA reads dir/ca.pem and dir/ca-key.pem and checks they belong together.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	ca, err := ParseCA(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA from %s: %w", dir, err)
	}
	return ca, nil
}

// LoadOrCreateCA loads the CA in dir, or creates one when neither file exists. One file
// without the other is an error: that is a damaged CA, not a missing one.
func LoadOrCreateCA(dir, clusterName string) (*CA, error) {
	_, certErr := os.Stat(filepath.Join(dir, CACertFile))
	_, keyErr := os.Stat(filepath.Join(dir, CAKeyFile))
	certMissing, keyMissing := errors.Is(certErr, fs.ErrNotExist), errors.Is(keyErr, fs.ErrNotExist)
	switch {
	case certMissing && keyMissing:
		return CreateCA(dir, clusterName)
	case certMissing || keyMissing:
		return nil, fmt.Errorf("load CA from %s: only one of %s and %s exists; restore the missing one or remove both to create a new CA (which invalidates every issued certificate)", dir, CACertFile, CAKeyFile)
	}
	return LoadCA(dir)
}

// ParseCA builds a CA from PEM. keyPEM may be nil for a verify-only CA (e.g. a node that
// trusts the cluster but does not issue); Issue and SignCSR then return ErrNoCAKey.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("CA certificate %q is not a CA (basic constraints or cert-sign key usage missing)", cert.Subject.CommonName)
	}
	// The cluster CA is a root: it must verify its own signature.
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return nil, fmt.Errorf("CA certificate %q is not self-signed: %w", cert.Subject.CommonName, err)
	}
	ca := &CA{cert: cert, certPEM: certToPEM(cert.Raw)}
	if keyPEM == nil {
		return ca, nil
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, errors.New("CA key does not match the CA certificate")
	}
	ca.key = key
	return ca, nil
}

// Cert is the CA certificate. Callers must not modify it.
func (ca *CA) Cert() *x509.Certificate { return ca.cert }

// CertPEM is the CA certificate, PEM-encoded.
func (ca *CA) CertPEM() []byte { return bytes.Clone(ca.certPEM) }

// CanIssue reports whether the CA holds its private key.
func (ca *CA) CanIssue() bool { return ca.key != nil }

// KeyPEM is the CA private key (PKCS#8 PEM), for replicating the CA to other servers
// (e.g. through a Kubernetes Secret). Handle it as the cluster's root secret.
func (ca *CA) KeyPEM() ([]byte, error) {
	if ca.key == nil {
		return nil, ErrNoCAKey
	}
	return marshalKeyPEM(ca.key)
}

// Fingerprint is "sha256:<hex SHA-256 of the CA certificate's DER>".
func (ca *CA) Fingerprint() string { return Fingerprint(ca.cert) }

// CertPool is a pool holding only the CA certificate.
func (ca *CA) CertPool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// Fingerprint is "sha256:<hex SHA-256 of cert's DER>".
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// randomSerial is a 128-bit positive serial: unique without keeping state, which matters
// because any server may issue.
func randomSerial() *big.Int {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	b[0] &= 0x7f
	n := new(big.Int).SetBytes(b[:])
	if n.Sign() == 0 {
		n.SetInt64(1)
	}
	return n
}

func certToPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func marshalKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// parseCertPEM returns the first certificate in data.
func parseCertPEM(data []byte) (*x509.Certificate, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no CERTIFICATE PEM block")
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		return cert, nil
	}
}

func parseKeyPEM(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	var (
		key any
		err error
	)
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unsupported PEM block %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("private key type %T cannot sign", key)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}
