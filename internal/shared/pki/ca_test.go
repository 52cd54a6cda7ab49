package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestCreateLoadCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := CreateCA(dir, "prod")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{CACertFile: 0o644, CAKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s mode = %o, want %o", name, got, want)
		}
	}
	if !regexp.MustCompile(`^sha256:[0-9a-f]{64}$`).MatchString(ca.Fingerprint()) {
		t.Errorf("fingerprint %q not sha256:<64 hex>", ca.Fingerprint())
	}
	c := ca.Cert()
	if !c.IsCA || c.KeyUsage&x509.KeyUsageCertSign == 0 || !strings.Contains(c.Subject.CommonName, "prod") {
		t.Errorf("CA certificate: IsCA=%v usage=%v CN=%q", c.IsCA, c.KeyUsage, c.Subject.CommonName)
	}
	if _, ok := c.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("CA key type %T, want ECDSA", c.PublicKey)
	}
	if life := c.NotAfter.Sub(c.NotBefore); life < 9*365*24*time.Hour {
		t.Errorf("CA lifetime %s, want about 10 years", life)
	}

	loaded, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Fingerprint() != ca.Fingerprint() || !bytes.Equal(loaded.CertPEM(), ca.CertPEM()) || !loaded.CanIssue() {
		t.Fatal("loaded CA differs from the created one")
	}
	// A certificate issued by the loaded CA verifies against the original's pool.
	kp := issue(t, loaded, RoleServer, "s1")
	if _, err := kp.Leaf.Verify(x509.VerifyOptions{Roots: ca.CertPool()}); err != nil {
		t.Fatalf("issued by loaded CA does not verify: %v", err)
	}

	if _, err := CreateCA(dir, "prod"); err == nil {
		t.Fatal("CreateCA over an existing CA succeeded")
	}
	if again, _ := LoadCA(dir); again.Fingerprint() != ca.Fingerprint() {
		t.Fatal("failed CreateCA changed the CA on disk")
	}
	same, err := LoadOrCreateCA(dir, "prod")
	if err != nil || same.Fingerprint() != ca.Fingerprint() {
		t.Fatalf("LoadOrCreateCA on existing CA: %v, same=%v", err, err == nil && same.Fingerprint() == ca.Fingerprint())
	}
}

func TestLoadOrCreateCA(t *testing.T) {
	dir := t.TempDir()
	a, err := LoadOrCreateCA(dir, "x")
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreateCA(dir, "x")
	if err != nil || a.Fingerprint() != b.Fingerprint() {
		t.Fatalf("second LoadOrCreateCA: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, CACertFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateCA(dir, "x"); err == nil || !strings.Contains(err.Error(), "only one of") {
		t.Fatalf("half a CA: err = %v, want a damaged-CA error", err)
	}
	if _, err := os.Stat(filepath.Join(dir, CACertFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("LoadOrCreateCA wrote a new certificate next to an old key")
	}
}

func TestLoadCARejectsMismatchedKey(t *testing.T) {
	dirA, dirB := t.TempDir(), t.TempDir()
	if _, err := CreateCA(dirA, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := CreateCA(dirB, "b"); err != nil {
		t.Fatal(err)
	}
	keyB, _ := os.ReadFile(filepath.Join(dirB, CAKeyFile))
	if err := os.WriteFile(filepath.Join(dirA, CAKeyFile), keyB, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(dirA); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("LoadCA with another CA's key: err = %v", err)
	}
}

func TestParseCARejectsLeafAndAllowsVerifyOnly(t *testing.T) {
	ca := testCA(t, "c")
	leafPEM, _, err := ca.Issue(IssueRequest{CommonName: "n", Role: RoleServer})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseCA(leafPEM, nil); err == nil {
		t.Fatal("ParseCA accepted a leaf certificate")
	}
	vo, err := ParseCA(ca.CertPEM(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if vo.CanIssue() {
		t.Fatal("verify-only CA claims it can issue")
	}
	if _, _, err := vo.Issue(IssueRequest{CommonName: "n", Role: RoleAgent}); !errors.Is(err, ErrNoCAKey) {
		t.Fatalf("Issue on verify-only CA: %v, want ErrNoCAKey", err)
	}
	if _, err := vo.KeyPEM(); !errors.Is(err, ErrNoCAKey) {
		t.Fatalf("KeyPEM on verify-only CA: %v", err)
	}
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	full, err := ParseCA(ca.CertPEM(), keyPEM)
	if err != nil || !full.CanIssue() {
		t.Fatalf("ParseCA with exported key: %v", err)
	}
}

func TestIssuedCertVerifiesAndCarriesRole(t *testing.T) {
	ca := testCA(t, "c")
	other := testCA(t, "other")
	for _, tc := range []struct {
		role       Role
		serverAuth bool
	}{{RoleServer, true}, {RoleAgent, true}, {RoleClient, false}} {
		t.Run(string(tc.role), func(t *testing.T) {
			kp := issue(t, ca, tc.role, "node-"+string(tc.role))
			leaf := kp.Leaf
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Errorf("client-auth verify: %v", err)
			}
			_, err := leaf.Verify(x509.VerifyOptions{Roots: ca.CertPool(), DNSName: "localhost"})
			if (err == nil) != tc.serverAuth {
				t.Errorf("server-auth verify err = %v, want success %v", err, tc.serverAuth)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: other.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
				t.Error("certificate verifies against an unrelated CA")
			}
			role, cn, err := RoleOf(leaf)
			if err != nil || role != tc.role || cn != "node-"+string(tc.role) {
				t.Errorf("RoleOf = %q %q %v", role, cn, err)
			}
			if leaf.IsCA {
				t.Error("leaf is a CA")
			}
			if !slices.ContainsFunc(leaf.IPAddresses, func(ip net.IP) bool { return ip.Equal(net.IPv4(127, 0, 0, 1)) }) {
				t.Errorf("IP SANs %v lack 127.0.0.1", leaf.IPAddresses)
			}
		})
	}
}

func TestIssueValidatesAndCapsTTL(t *testing.T) {
	ca := testCA(t, "c")
	for _, req := range []IssueRequest{
		{Role: RoleServer},
		{CommonName: "n", Role: "admin"},
		{CommonName: "n", Role: RoleAgent, TTL: -time.Second},
		{CommonName: "bad\nname", Role: RoleAgent},
		{CommonName: "n", Role: RoleAgent, DNSNames: []string{""}},
	} {
		if _, _, err := ca.Issue(req); err == nil {
			t.Errorf("Issue(%+v) succeeded", req)
		}
	}
	certPEM, _, err := ca.Issue(IssueRequest{CommonName: "n", Role: RoleAgent, TTL: 100 * 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := parseCertPEM(certPEM)
	if leaf.NotAfter.After(ca.Cert().NotAfter) {
		t.Errorf("leaf NotAfter %v outlives CA %v", leaf.NotAfter, ca.Cert().NotAfter)
	}
}

func TestRoleOfRejectsForeignCertificates(t *testing.T) {
	for _, ous := range [][]string{nil, {"ops"}, {"fireworks-admin"}, {"fireworks-server", "fireworks-agent"}} {
		c := &x509.Certificate{Subject: pkix.Name{CommonName: "x", OrganizationalUnit: ous}}
		if r, _, err := RoleOf(c); err == nil {
			t.Errorf("RoleOf(OU=%v) = %q, want error", ous, r)
		}
	}
}

func TestSignCSRIgnoresRequestedNamesAndExtensions(t *testing.T) {
	ca := testCA(t, "c")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// The requester asks to be a server named admin, valid for other hosts, and a CA.
	bc, _ := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:         pkix.Name{CommonName: "admin", OrganizationalUnit: []string{"fireworks-server"}},
		DNSNames:        []string{"evil.example", "fireworks-server-0"},
		IPAddresses:     []net.IP{net.IPv4(1, 2, 3, 4)},
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: bc}},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.SignCSR(csrDER, IssueRequest{CommonName: "node-7", Role: RoleAgent, IPs: []net.IP{net.IPv4(10, 0, 0, 7)}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	role, cn, err := RoleOf(cert)
	if err != nil || role != RoleAgent || cn != "node-7" {
		t.Errorf("role/CN = %q %q %v, want agent node-7", role, cn, err)
	}
	if len(cert.DNSNames) != 0 || len(cert.IPAddresses) != 1 || !cert.IPAddresses[0].Equal(net.IPv4(10, 0, 0, 7)) {
		t.Errorf("SANs = %v %v, want only 10.0.0.7", cert.DNSNames, cert.IPAddresses)
	}
	if cert.IsCA {
		t.Error("CSR made itself a CA")
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		t.Error("certificate is not for the CSR's key")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("signed CSR does not verify: %v", err)
	}
}

func TestSignCSRRejectsBadRequests(t *testing.T) {
	ca := testCA(t, "c")
	req := IssueRequest{CommonName: "n", Role: RoleAgent}

	good, _, err := NewCSR("n")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.SignCSR(good, req); err != nil {
		t.Fatalf("NewCSR output rejected: %v", err)
	}
	tampered := bytes.Clone(good)
	tampered[len(tampered)-5] ^= 0xff // inside the signature
	if _, err := ca.SignCSR(tampered, req); err == nil {
		t.Error("tampered CSR signed")
	}
	if _, err := ca.SignCSR([]byte("not a csr"), req); err == nil {
		t.Error("garbage signed")
	}
	weak, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	weakCSR, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "n"}}, weak)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.SignCSR(weakCSR, req); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Errorf("1024-bit RSA CSR: err = %v", err)
	}
}

func TestKeyPairFiles(t *testing.T) {
	ca := testCA(t, "c")
	dir := filepath.Join(t.TempDir(), "tls")
	certPEM, keyPEM, err := ca.Issue(IssueRequest{CommonName: "s", Role: RoleServer})
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteKeyPair(dir, "server", certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := KeyPairFiles(dir, "server")
	for f, want := range map[string]os.FileMode{certFile: 0o644, keyFile: 0o600} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %o, want %o", f, fi.Mode().Perm(), want)
		}
	}
	kp, err := LoadKeyPair(dir, "server")
	if err != nil {
		t.Fatal(err)
	}
	if role, _, _ := RoleOf(kp.Leaf); role != RoleServer {
		t.Errorf("loaded role %q", role)
	}
	_, otherKey, err := ca.Issue(IssueRequest{CommonName: "s2", Role: RoleServer})
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteKeyPair(dir, "server", certPEM, otherKey); err == nil {
		t.Fatal("WriteKeyPair accepted a mismatched key")
	}
	if _, err := LoadKeyPair(dir, "server"); err != nil {
		t.Fatalf("refused write damaged the existing pair: %v", err)
	}
}
