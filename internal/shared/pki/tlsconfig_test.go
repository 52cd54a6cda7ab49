package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"testing"
)

func TestServerRequiringClientCertsRejectsWrongCA(t *testing.T) {
	ca, other := testCA(t, "c"), testCA(t, "other")
	srv := issue(t, ca, RoleServer, "s1")
	cases := []struct {
		name   string
		cert   *tls.Certificate
		accept bool
	}{
		{"same CA agent", ptr(issue(t, ca, RoleAgent, "a1")), true},
		{"other CA agent", ptr(issue(t, other, RoleAgent, "a1")), false},
		{"other CA server", ptr(issue(t, other, RoleServer, "s1")), false},
		{"no certificate", nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr, res := serveOnce(t, ServerTLS(ca, srv, true))
			cfg := ClientTLS(ca, nil, "127.0.0.1", RoleServer)
			if tc.cert != nil {
				cfg = forceCert(cfg, *tc.cert)
			}
			_, cerr := roundTrip(addr, cfg)
			r := wait(t, res)
			if (r.err == nil) != tc.accept || (cerr == nil) != tc.accept {
				t.Fatalf("server err = %v, client err = %v, want accepted %v", r.err, cerr, tc.accept)
			}
			if tc.accept {
				role, cn, err := PeerIdentity(&r.state)
				if err != nil || role != RoleAgent || cn != "a1" {
					t.Fatalf("PeerIdentity = %q %q %v", role, cn, err)
				}
			}
		})
	}
}

func TestServerNotRequiringClientCerts(t *testing.T) {
	ca, other := testCA(t, "c"), testCA(t, "other")
	srv := issue(t, ca, RoleServer, "s1")

	addr, res := serveOnce(t, ServerTLS(ca, srv, false))
	if _, err := roundTrip(addr, ClientTLS(ca, nil, "localhost", RoleServer)); err != nil {
		t.Fatalf("anonymous client: %v", err)
	}
	r := wait(t, res)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if _, _, err := PeerIdentity(&r.state); err == nil {
		t.Fatal("PeerIdentity of an anonymous client succeeded")
	}

	// A certificate that is presented must still be from the CA.
	addr, res = serveOnce(t, ServerTLS(ca, srv, false))
	_, _ = roundTrip(addr, forceCert(ClientTLS(ca, nil, "localhost", RoleServer), issue(t, other, RoleAgent, "a")))
	if r := wait(t, res); r.err == nil {
		t.Fatal("server accepted a client certificate from another CA")
	}
}

func TestServerTLSSendsCAAndClientChecksName(t *testing.T) {
	ca := testCA(t, "c")
	srv := issue(t, ca, RoleServer, "s1")
	cfg := ServerTLS(ca, srv, false)
	if len(srv.Certificate) != 1 {
		t.Fatal("ServerTLS modified the caller's certificate chain")
	}
	addr, res := serveOnce(t, cfg)
	cs, err := roundTrip(addr, ClientTLS(ca, nil, "localhost", RoleServer))
	if err != nil {
		t.Fatal(err)
	}
	wait(t, res)
	if cs.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %x, want 1.3", cs.Version)
	}
	if n := len(cs.PeerCertificates); n != 2 || !bytes.Equal(cs.PeerCertificates[n-1].Raw, ca.Cert().Raw) {
		t.Fatalf("server sent %d certificates, want leaf + CA", n)
	}

	addr, _ = serveOnce(t, ServerTLS(ca, srv, false))
	if _, err := roundTrip(addr, ClientTLS(ca, nil, "fireworks-server-9.example", RoleServer)); err == nil {
		t.Fatal("client accepted a certificate that does not name the server")
	}
}

func TestVerifyPeerRole(t *testing.T) {
	ca := testCA(t, "c")
	srv := issue(t, ca, RoleServer, "s1")
	cfg := ServerTLS(ca, srv, true)
	cfg.VerifyConnection = VerifyPeerRole(ca, x509.ExtKeyUsageClientAuth, RoleServer)
	for _, tc := range []struct {
		role   Role
		accept bool
	}{{RoleServer, true}, {RoleAgent, false}, {RoleClient, false}} {
		addr, res := serveOnce(t, cfg)
		_, _ = roundTrip(addr, ClientTLS(ca, ptr(issue(t, ca, tc.role, "x")), "localhost", RoleServer))
		if r := wait(t, res); (r.err == nil) != tc.accept {
			t.Errorf("role %s: server err = %v, want accepted %v", tc.role, r.err, tc.accept)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// An agent's certificate for a server's very address does not pass for a server's: the
// CLI, the edge, agents and forwarding servers all dial with the role they want. A node's
// certificate also has to be that node's when its name is asked for.
func TestClientChecksServerRole(t *testing.T) {
	ca := testCA(t, "c")
	agent := issue(t, ca, RoleAgent, "node-a")
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		ok   bool
	}{
		{"want a server", ClientTLS(ca, nil, "localhost", RoleServer), false},
		{"want an agent", ClientTLS(ca, nil, "localhost", RoleAgent), true},
		{"want node-b", func() *tls.Config {
			c := ClientTLS(ca, nil, "localhost", RoleAgent)
			c.VerifyConnection = RequirePeer(RoleAgent, "node-b")
			return c
		}(), false},
		{"want node-a", func() *tls.Config {
			c := ClientTLS(ca, nil, "localhost", RoleAgent)
			c.VerifyConnection = RequirePeer(RoleAgent, "node-a")
			return c
		}(), true},
	} {
		addr, res := serveOnce(t, ServerTLS(ca, agent, false))
		_, err := roundTrip(addr, tc.cfg)
		if (err == nil) != tc.ok {
			t.Errorf("%s, dialing an agent's certificate: %v", tc.name, err)
		}
		if !tc.ok {
			<-res
		} else {
			wait(t, res)
		}
	}
}

// Every certificate names its role and name as a URI the CA sets (Envoy matches it).
func TestIdentityURI(t *testing.T) {
	ca := testCA(t, "c")
	kp := issue(t, ca, RoleAgent, "node-a")
	leaf, err := x509.ParseCertificate(kp.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "fireworks://agent/node-a" {
		t.Errorf("URI SANs %v", leaf.URIs)
	}
}
