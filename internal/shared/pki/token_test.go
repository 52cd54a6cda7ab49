package pki

import (
	"crypto/tls"
	"errors"
	"strings"
	"testing"
)

func TestJoinTokenRoundTrip(t *testing.T) {
	ca := testCA(t, "c")
	token, id, hash := NewJoinToken(ca)
	if !strings.HasPrefix(token, JoinTokenPrefix) {
		t.Fatalf("token %q lacks prefix", token)
	}
	jt, err := ParseJoinToken("  " + token + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if jt.ID != id || jt.CAFingerprint != ca.Fingerprint() || jt.Encode() != token {
		t.Fatalf("parsed %+v, id %s, fingerprint %s", jt, id, ca.Fingerprint())
	}
	if strings.Contains(hash, jt.Secret) || strings.Contains(jt.String(), jt.Secret) || strings.Contains(hash, token) {
		t.Fatal("hash or String() contains the secret")
	}
	if !VerifySecret(jt.Secret, hash) {
		t.Fatal("VerifySecret rejects the right secret")
	}
	wrong := []byte(jt.Secret)
	wrong[0] ^= 1
	if VerifySecret(string(wrong), hash) || VerifySecret(jt.Secret, "") {
		t.Fatal("VerifySecret accepts a wrong secret or empty hash")
	}
	t2, id2, _ := NewJoinToken(ca)
	if t2 == token || id2 == id {
		t.Fatal("two join tokens are equal")
	}
}

func TestParseJoinTokenErrors(t *testing.T) {
	id := strings.Repeat("a", 16)
	secret := strings.Repeat("5", 64)
	fp := strings.Repeat("f", 64)
	for _, tc := range []struct {
		name, token, want string
	}{
		{"empty", "", "empty"},
		{"api token", "fwk_" + id + "_" + secret, "API token"},
		{"future version", "fwj2_" + id + "_" + secret + "_" + fp, "version"},
		{"wrong prefix", "kubeadm.abc.def", "prefix"},
		{"missing field", "fwj1_" + id + "_" + secret, "fields"},
		{"extra field", "fwj1_" + id + "_" + secret + "_" + fp + "_x", "fields"},
		{"short id", "fwj1_abc_" + secret + "_" + fp, "id"},
		{"uppercase secret", "fwj1_" + id + "_" + strings.ToUpper(strings.Repeat("ab", 32)) + "_" + fp, "secret"},
		{"non-hex fingerprint", "fwj1_" + id + "_" + secret + "_" + strings.Repeat("g", 64), "fingerprint"},
		{"short fingerprint", "fwj1_" + id + "_" + secret + "_" + fp[:40], "fingerprint"},
		{"prefixed fingerprint", "fwj1_" + id + "_" + secret + "_sha256:" + fp, "fingerprint"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseJoinToken(tc.token)
			if !errors.Is(err, ErrInvalidJoinToken) {
				t.Fatalf("err = %v, want ErrInvalidJoinToken", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %q, want it to mention %q", err, tc.want)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error leaks the secret: %q", err)
			}
		})
	}
	if _, err := ParseJoinToken("fwj1_" + id + "_" + secret + "_" + fp); err != nil {
		t.Fatalf("valid token rejected: %v", err)
	}
}

func TestPinnedCAVerifier(t *testing.T) {
	ca, other := testCA(t, "c"), testCA(t, "other")
	srv := issue(t, ca, RoleServer, "s1")

	t.Run("right CA", func(t *testing.T) {
		pin, err := PinnedCAVerifier(ca.Fingerprint())
		if err != nil {
			t.Fatal(err)
		}
		if pin.CA() != nil {
			t.Fatal("CA learned before any handshake")
		}
		addr, res := serveOnce(t, ServerTLS(ca, srv, false))
		if _, err := roundTrip(addr, pin.ClientTLS(nil)); err != nil {
			t.Fatalf("pinned client rejected the right server: %v", err)
		}
		wait(t, res)
		learned := pin.CA()
		if learned == nil || learned.Fingerprint() != ca.Fingerprint() || learned.CanIssue() {
			t.Fatalf("learned CA %v", learned)
		}
		// The learned CA is enough to talk to the cluster normally from now on.
		addr, res = serveOnce(t, ServerTLS(ca, srv, false))
		if _, err := roundTrip(addr, ClientTLS(learned, nil, "localhost", RoleServer)); err != nil {
			t.Fatalf("client with learned CA: %v", err)
		}
		wait(t, res)
	})

	reject := func(t *testing.T, fingerprint string, serverCfg *tls.Config) {
		t.Helper()
		pin, err := PinnedCAVerifier(fingerprint)
		if err != nil {
			t.Fatal(err)
		}
		addr, res := serveOnce(t, serverCfg)
		if _, err := roundTrip(addr, pin.ClientTLS(nil)); err == nil {
			t.Fatal("pinned client accepted the server")
		}
		wait(t, res)
		if pin.CA() != nil {
			t.Fatal("rejected handshake taught a CA")
		}
	}
	t.Run("other CA's server", func(t *testing.T) {
		reject(t, ca.Fingerprint(), ServerTLS(other, issue(t, other, RoleServer, "s1"), false))
	})
	t.Run("pin of another CA", func(t *testing.T) {
		reject(t, other.Fingerprint(), ServerTLS(ca, srv, false))
	})
	t.Run("agent posing as server", func(t *testing.T) {
		reject(t, ca.Fingerprint(), ServerTLS(ca, issue(t, ca, RoleAgent, "a1"), false))
	})
	t.Run("pinned CA in chain but leaf from another CA", func(t *testing.T) {
		// An impostor can copy the public CA certificate into its chain; it cannot
		// make the CA sign its leaf.
		forged := issue(t, other, RoleServer, "s1")
		forged.Certificate = [][]byte{forged.Certificate[0], ca.Cert().Raw}
		reject(t, ca.Fingerprint(), &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{forged}})
	})
	t.Run("server that sends no CA", func(t *testing.T) {
		reject(t, ca.Fingerprint(), &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{srv}})
	})

	for _, bad := range []string{"", "sha256:abc", strings.Repeat("z", 64)} {
		if _, err := PinnedCAVerifier(bad); err == nil {
			t.Errorf("PinnedCAVerifier(%q) accepted", bad)
		}
	}
	if _, err := PinnedCAVerifier(strings.TrimPrefix(ca.Fingerprint(), "sha256:")); err != nil {
		t.Errorf("bare hex fingerprint rejected: %v", err)
	}
}
