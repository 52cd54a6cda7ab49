package agentlink

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
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
