package agentlink

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// What a node joins with: a join token, or a Kubernetes token file with the CA it must
// find (read again at each try, trimmed, bounded), never both and never neither.
func TestJoinWithCredentials(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.CreateCA(filepath.Join(dir, "ca"), "test")
	if err != nil {
		t.Fatal(err)
	}
	caFile, tokFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "token")
	if err := os.WriteFile(caFile, ca.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	joinTok, _, _ := pki.NewJoinToken(ca)
	for _, bad := range []struct {
		with JoinWith
		want string
	}{
		{JoinWith{}, "pass a join token"},
		{JoinWith{Token: joinTok, KubeTokenFile: tokFile}, "not both"},
		{JoinWith{KubeTokenFile: tokFile}, "--join-ca-file"},
		{JoinWith{KubeTokenFile: tokFile, CAFile: tokFile}, "cluster CA"},
	} {
		if _, _, err := bad.with.credentials(); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%+v: %v, want an error saying %q", bad.with, err, bad.want)
		}
	}

	cred, pin, err := JoinWith{KubeTokenFile: tokFile, CAFile: caFile}.credentials()
	if err != nil || pin == nil {
		t.Fatal(err)
	}
	var req pb.JoinRequest
	if err := cred(&req); err == nil {
		t.Error("a token file that is not there yet was read")
	}
	for _, tok := range []string{"first\n", "renewed"} { // the kubelet renews the file
		if err := os.WriteFile(tokFile, []byte(tok), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := cred(&req); err != nil || req.GetKubeToken() != strings.TrimSpace(tok) || req.GetTokenId() != "" {
			t.Errorf("join request from token file %q: %v %+v", tok, err, &req)
		}
	}
	if err := os.WriteFile(tokFile, make([]byte, 65<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := cred(&req); err == nil {
		t.Error("a 65 KiB token file was sent")
	}

	cred, _, err = JoinWith{Token: joinTok}.credentials()
	if err != nil {
		t.Fatal(err)
	}
	req = pb.JoinRequest{}
	if err := cred(&req); err != nil || req.GetTokenId() == "" || req.GetTokenSecret() == "" || req.GetKubeToken() != "" {
		t.Errorf("join request from a join token: %v %+v", err, &req)
	}
}

// joinServerDouble is a test double of the servers' Join (the real one is tested in
// internal/controlplane/server): a follower answers "unavailable" naming the leader, as
// servers do; the leader signs.
type joinServerDouble struct {
	fireworksv1connect.UnimplementedNodeServiceHandler
	ca     *pki.CA
	leader string // "" on the leader
	calls  *atomic.Int32
}

func (d joinServerDouble) Join(_ context.Context, req *connect.Request[pb.JoinRequest]) (*connect.Response[pb.JoinResponse], error) {
	d.calls.Add(1)
	if d.leader != "" {
		err := connect.NewError(connect.CodeUnavailable, errors.New("this server is not the leader"))
		err.Meta().Set(leaderHeader, d.leader)
		return nil, err
	}
	cert, err := d.ca.SignCSR(req.Msg.GetCsr(), pki.IssueRequest{CommonName: req.Msg.GetNode(), Role: pki.RoleAgent})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.JoinResponse{CertPem: cert, CaPem: d.ca.CertPEM()}), nil
}

// A join sent to a follower follows its leader hint at once (the hint was appended to
// the list being walked, and never reached).
func TestJoinFollowsLeaderHint(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.CreateCA(filepath.Join(dir, "ca"), "test")
	if err != nil {
		t.Fatal(err)
	}
	serve := func(h joinServerDouble) string {
		t.Helper()
		certPEM, keyPEM, err := ca.Issue(pki.IssueRequest{CommonName: "s", Role: pki.RoleServer, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
		if err != nil {
			t.Fatal(err)
		}
		cert, err := pki.KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		mux := http.NewServeMux()
		mux.Handle(fireworksv1connect.NewNodeServiceHandler(h))
		hs := httptest.NewUnstartedServer(mux)
		hs.EnableHTTP2 = true
		hs.TLS = pki.ServerTLS(ca, cert, false)
		hs.StartTLS()
		t.Cleanup(hs.Close)
		return strings.TrimPrefix(hs.URL, "https://")
	}
	var leaderCalls, followerCalls atomic.Int32
	leader := serve(joinServerDouble{ca: ca, calls: &leaderCalls})
	follower := serve(joinServerDouble{ca: ca, leader: leader, calls: &followerCalls})
	joinTok, _, _ := pki.NewJoinToken(ca)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id, err := EnsureIdentity(ctx, filepath.Join(dir, "node"), "node-1", JoinWith{Token: joinTok}, []string{follower}, []string{"10.0.0.5:7768"})
	if err != nil {
		t.Fatalf("a join through a follower: %v", err)
	}
	if id.Node != "node-1" || followerCalls.Load() != 1 || leaderCalls.Load() != 1 {
		t.Errorf("node %q; follower asked %d times, leader %d (want once each)", id.Node, followerCalls.Load(), leaderCalls.Load())
	}
}
