package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/kubejoin"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// A join token buys as many certificates as its uses; the names a joiner asks for must
// be plain; a removed node's certificate is refused by the servers from then on.
func TestJoinUsesAndRemovedNode(t *testing.T) {
	ca, err := pki.CreateCA(filepath.Join(t.TempDir(), "ca"), "test")
	if err != nil {
		t.Fatal(err)
	}
	a, httpClient, nodeClient, base := joinServer(t, ClusterOptions{CA: ca})
	ctx := t.Context()
	created, err := fireworksv1connect.NewTokenServiceClient(httpClient(nil), base).
		CreateToken(ctx, as(a.admin, &pb.CreateTokenRequest{Role: "join", MaxUses: 2}))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := pki.ParseJoinToken(created.Msg.GetSecret())
	if err != nil {
		t.Fatal(err)
	}
	join := func(node string, addrs ...string) (*tls.Certificate, error) {
		csr, key, err := pki.NewCSR(node)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := nodeClient(nil).Join(ctx, connect.NewRequest(&pb.JoinRequest{TokenId: tok.ID, TokenSecret: tok.Secret, Node: node, Csr: csr, Addresses: addrs}))
		if err != nil {
			return nil, err
		}
		kp, err := pki.KeyPair(resp.Msg.GetCertPem(), key)
		if err != nil {
			t.Fatal(err)
		}
		return &kp, nil
	}
	for _, bad := range [][]string{{"*.example.com:7768"}, {"localhost:7768"}, {"0.0.0.0:7768"}, {"a:1", "b:1", "c:1", "d:1", "e:1", "f:1", "g:1", "h:1", "i:1"}} {
		_, err := join("n0", bad...)
		wantCode(t, "a join naming "+bad[0], err, connect.CodeInvalidArgument, "")
	}
	n1, err := join("n1", "10.0.0.5:7768")
	if err != nil {
		t.Fatalf("first join: %v", err)
	}
	if _, err := join("n2", "10.0.0.6:7768"); err != nil {
		t.Fatalf("second join: %v", err)
	}
	_, err = join("n3", "10.0.0.7:7768")
	wantCode(t, "a third join with a two-use token", err, connect.CodePermissionDenied, "used 2 times")

	// n1's certificate works (the node is just not registered), until n1 is removed.
	_, err = nodeClient(n1).Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{}))
	wantCode(t, "a heartbeat of a joined, unregistered node", err, connect.CodeNotFound, "not registered")
	cluster := fireworksv1connect.NewClusterServiceClient(httpClient(nil), base)
	if _, err := cluster.RemoveNode(ctx, as(a.user, &pb.NodeActionRequest{Node: "n1"})); err == nil {
		t.Error("a user token removed a node")
	}
	if _, err := cluster.RemoveNode(ctx, as(a.admin, &pb.NodeActionRequest{Node: "n1"})); err != nil {
		t.Fatalf("remove n1: %v", err)
	}
	_, err = nodeClient(n1).Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{}))
	wantCode(t, "a removed node's certificate", err, connect.CodeUnauthenticated, "was removed")
	_, err = cluster.RemoveNode(ctx, as(a.admin, &pb.NodeActionRequest{Node: "never-joined"}))
	wantCode(t, "removing an unknown node", err, connect.CodeNotFound, "")

	// A name with a live certificate is taken; a removed node's name is free again.
	created, err = fireworksv1connect.NewTokenServiceClient(httpClient(nil), base).
		CreateToken(ctx, as(a.admin, &pb.CreateTokenRequest{Role: "join", MaxUses: 5}))
	if err != nil {
		t.Fatal(err)
	}
	if tok, err = pki.ParseJoinToken(created.Msg.GetSecret()); err != nil {
		t.Fatal(err)
	}
	_, err = join("n2", "10.0.0.9:7768")
	wantCode(t, "a join under a name with a live certificate", err, connect.CodeAlreadyExists, "node rm")
	if _, err := join("n1", "10.0.0.5:7768"); err != nil {
		t.Errorf("a join under a removed node's name: %v", err)
	}
}

// joinServer serves a test API with opts over TLS, as servers do, and returns it with
// its clients: httpClient and nodeClient dial it as an agent (cert nil: none yet) would.
func joinServer(t *testing.T, opts ClusterOptions) (*testAPI, func(*tls.Certificate) *http.Client, func(*tls.Certificate) fireworksv1connect.NodeServiceClient, string) {
	t.Helper()
	ca := opts.CA
	a := newTestAPI(t, func(s *Server) { s.EnableCluster(opts) })
	srvPEM, srvKey, err := ca.Issue(pki.IssueRequest{CommonName: "s1", Role: pki.RoleServer, DNSNames: []string{"localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	srvCert, err := pki.KeyPair(srvPEM, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(a.srv.Handler())
	hs.TLS = pki.ServerTLS(ca, srvCert, false)
	hs.StartTLS()
	t.Cleanup(hs.Close)
	base := strings.Replace(hs.URL, "127.0.0.1", "localhost", 1)
	httpClient := func(cert *tls.Certificate) *http.Client {
		return &http.Client{Transport: &http.Transport{TLSClientConfig: pki.ClientTLS(ca, cert, "localhost", pki.RoleServer)}}
	}
	nodeClient := func(cert *tls.Certificate) fireworksv1connect.NodeServiceClient {
		return fireworksv1connect.NewNodeServiceClient(httpClient(cert), base)
	}
	return a, httpClient, nodeClient, base
}

// proverDouble is a test double of kubejoin.Reviewer (the API server's TokenReview, which
// kubejoin's own test runs against a real API server): token "node:NAME" proves NAME,
// "down" cannot be checked, anything else is refused.
type proverDouble struct{}

func (proverDouble) Node(_ context.Context, token string) (string, error) {
	if n, ok := strings.CutPrefix(token, "node:"); ok {
		return n, nil
	}
	if token == "down" {
		return "", errors.New("the API server did not answer")
	}
	return "", fmt.Errorf("%w: test double", kubejoin.ErrRefused)
}

// An agent that joins with a Kubernetes token joins only as the node the token proves,
// and only where the servers admit such tokens; a refused token is refused, one that
// cannot be checked now is "unavailable" (the agent tries again); a name taken stays
// taken; no join token is spent or needed.
func TestJoinByKubernetesToken(t *testing.T) {
	ca, err := pki.CreateCA(filepath.Join(t.TempDir(), "ca"), "test")
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	var lastCert *tls.Certificate
	var certMu sync.Mutex
	join := func(nc fireworksv1connect.NodeServiceClient, node, kubeToken, tokenID string) error {
		csr, key, err := pki.NewCSR(node)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := nc.Join(ctx, connect.NewRequest(&pb.JoinRequest{KubeToken: kubeToken, TokenId: tokenID, Node: node, Csr: csr, Addresses: []string{"10.0.0.5:7768"}}))
		if err == nil {
			kp, err := pki.KeyPair(resp.Msg.GetCertPem(), key)
			if err != nil {
				t.Fatal(err)
			}
			if role, cn, err := pki.RoleOf(kp.Leaf); err != nil || role != pki.RoleAgent || cn != node {
				t.Errorf("the certificate a join as %s bought: %s %s %v", node, role, cn, err)
			}
			certMu.Lock()
			lastCert = &kp
			certMu.Unlock()
		}
		return err
	}

	_, _, plain, _ := joinServer(t, ClusterOptions{CA: ca})
	wantCode(t, "a Kubernetes token where servers do not admit them", join(plain(nil), "node-a", "node:node-a", ""), connect.CodeUnauthenticated, "--kube-join-service-account")

	a, httpClient, nc, base := joinServer(t, ClusterOptions{CA: ca, KubeJoin: proverDouble{}, NoJoinTokens: true})
	// On Kubernetes no join token is admitted: it could name any node.
	created, err := fireworksv1connect.NewTokenServiceClient(httpClient(nil), base).CreateToken(ctx, as(a.admin, &pb.CreateTokenRequest{Role: "join"}))
	if err != nil {
		t.Fatal(err)
	}
	jt, err := pki.ParseJoinToken(created.Msg.GetSecret())
	if err != nil {
		t.Fatal(err)
	}
	csr, _, err := pki.NewCSR("node-b")
	if err != nil {
		t.Fatal(err)
	}
	_, err = nc(nil).Join(ctx, connect.NewRequest(&pb.JoinRequest{TokenId: jt.ID, TokenSecret: jt.Secret, Node: "node-b", Csr: csr}))
	wantCode(t, "a join token where joins are bound to Kubernetes nodes", err, connect.CodeUnauthenticated, "ServiceAccount token only")
	wantCode(t, "a token of node-a joining as node-b", join(nc(nil), "node-b", "node:node-a", ""), connect.CodePermissionDenied, "only as the node it runs on")
	wantCode(t, "a refused token", join(nc(nil), "node-a", "forged", ""), connect.CodeUnauthenticated, "")
	wantCode(t, "a token that cannot be checked now", join(nc(nil), "node-a", "down", ""), connect.CodeUnavailable, "")
	wantCode(t, "a join token and a Kubernetes token", join(nc(nil), "node-a", "node:node-a", "abc"), connect.CodeInvalidArgument, "not both")
	// A node its pod proves is that node: each join replaces its certificate (a join
	// whose answer was lost, a wiped data directory), and the one before is refused
	// from then on (the state revokes it). Of joins racing, one certificate lives.
	works := func(c *tls.Certificate) bool {
		_, err := nc(c).Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{}))
		return connect.CodeOf(err) != connect.CodeUnauthenticated // (not registered: NotFound)
	}
	if err := join(nc(nil), "node-a", "node:node-a", ""); err != nil {
		t.Fatalf("node-a joining with its token: %v", err)
	}
	first := lastCert
	if err := join(nc(nil), "node-a", "node:node-a", ""); err != nil {
		t.Fatalf("node-a joining again with its token: %v", err)
	}
	if works(first) || !works(lastCert) {
		t.Errorf("after node-a joined again: its first certificate works %v (want false), its new one %v (want true)", works(first), works(lastCert))
	}
	var certs []*tls.Certificate
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if err := join(nc(nil), "node-a", "node:node-a", ""); err == nil {
				certMu.Lock()
				certs = append(certs, lastCert)
				certMu.Unlock()
			} else if connect.CodeOf(err) != connect.CodeUnavailable {
				// (Unavailable: one join per address is reviewed at a time.)
				t.Errorf("a racing join of node-a: %v, want it done or try again", err)
			}
		})
	}
	wg.Wait()
	live := 0
	for _, c := range append(certs, first) {
		if works(c) {
			live++
		}
	}
	if len(certs) > 0 && live != 1 {
		t.Errorf("%d of node-a's certificates work after %d racing joins, want 1", live, len(certs))
	}
	cluster := fireworksv1connect.NewClusterServiceClient(httpClient(nil), base)
	if _, err := cluster.RemoveNode(ctx, as(a.admin, &pb.NodeActionRequest{Node: "node-a"})); err != nil {
		t.Fatalf("remove node-a: %v", err)
	}
	if err := join(nc(nil), "node-a", "node:node-a", ""); err != nil {
		t.Errorf("node-a joining again after node rm: %v", err)
	}
	// A join token still may not take a name that is taken.
	a2, httpClient2, nc2, base2 := joinServer(t, ClusterOptions{CA: ca, KubeJoin: proverDouble{}})
	created2, err := fireworksv1connect.NewTokenServiceClient(httpClient2(nil), base2).CreateToken(ctx, as(a2.admin, &pb.CreateTokenRequest{Role: "join", MaxUses: 2}))
	if err != nil {
		t.Fatal(err)
	}
	jt2, err := pki.ParseJoinToken(created2.Msg.GetSecret())
	if err != nil {
		t.Fatal(err)
	}
	if err := join(nc2(nil), "node-c", "node:node-c", ""); err != nil {
		t.Fatal(err)
	}
	csr2, _, _ := pki.NewCSR("node-c")
	_, err = nc2(nil).Join(ctx, connect.NewRequest(&pb.JoinRequest{TokenId: jt2.ID, TokenSecret: jt2.Secret, Node: "node-c", Csr: csr2}))
	wantCode(t, "a join token naming a node its pod proved", err, connect.CodeAlreadyExists, "node rm")
}

func TestInFlightPerPeer(t *testing.T) {
	var f inFlight
	rel, ok := f.take("10.0.0.1")
	if !ok {
		t.Fatal("the first call from an address was not admitted")
	}
	if _, ok := f.take("10.0.0.1"); ok {
		t.Error("a second call from the same address was admitted while the first runs")
	}
	rel2, ok := f.take("10.0.0.2")
	if !ok {
		t.Error("a call from another address was not admitted")
	}
	rel()
	rel2()
	if _, ok := f.take("10.0.0.1"); !ok {
		t.Error("a call after the first ended was not admitted")
	}
	if peerHost("10.0.0.1:5555") != "10.0.0.1" || peerHost("[::1]:1") != "::1" || peerHost("x") != "x" {
		t.Error("peerHost")
	}
}
