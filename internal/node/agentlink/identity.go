// Package agentlink is a node agent's connection to the control plane: joining the
// cluster with a join token or a Kubernetes ServiceAccount token (certificate through a
// pinned-CA handshake), registering,
// heartbeats, following its assignments, and reporting sandbox progress — all over mutual
// TLS to whichever server leads.
package agentlink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
)

// Identity is the node's credentials in the cluster.
type Identity struct {
	Node string
	CA   *pki.CA
	Cert tls.Certificate
}

// certName is the key pair's name in the node's pki directory.
const certName = "node"

// JoinWith is what a node that has no certificate yet joins the cluster with: a join
// token, or a Kubernetes ServiceAccount token and the cluster CA's certificate.
type JoinWith struct {
	// Token is a join token (fwj1_...): it names the cluster CA's fingerprint too.
	Token string
	// KubeTokenFile holds a projected ServiceAccount token of the agent's pod (read at
	// each try: the kubelet renews it). The servers check it with the API server and
	// admit the agent only as the node its pod runs on.
	KubeTokenFile string
	// CAFile is the cluster CA's certificate (PEM), which servers must chain to; with
	// KubeTokenFile, which names no CA.
	CAFile string
}

// EnsureIdentity loads the node's certificate from dir, or joins the cluster as node with
// with to get one. The node name is fixed by the certificate once joined.
func EnsureIdentity(ctx context.Context, dir, node string, with JoinWith, servers, addresses []string) (*Identity, error) {
	if caPEM, err := os.ReadFile(filepath.Join(dir, pki.CACertFile)); err == nil {
		ca, err := pki.ParseCA(caPEM, nil)
		if err != nil {
			return nil, fmt.Errorf("cluster CA in %s: %w", dir, err)
		}
		if cert, err := pki.LoadKeyPair(dir, certName); err == nil {
			_, cn, err := pki.RoleOf(cert.Leaf)
			if err != nil {
				return nil, fmt.Errorf("node certificate in %s: %w", dir, err)
			}
			if node != "" && node != cn {
				return nil, fmt.Errorf("node certificate in %s is for %q, not %q (remove %s to join again under a new name)", dir, cn, node, dir)
			}
			return &Identity{Node: cn, CA: ca, Cert: cert}, nil
		}
	}
	if node == "" {
		node, _ = os.Hostname()
	}
	cred, pin, err := with.credentials()
	if err != nil {
		return nil, fmt.Errorf("no node certificate in %s: %w", dir, err)
	}
	csr, keyPEM, err := pki.NewCSR(node)
	if err != nil {
		return nil, err
	}
	// Servers that are not up yet (a DaemonSet's agents start with the servers) are waited
	// for: the join is tried again until ctx ends. A refusal (a bad token, another
	// cluster's CA) ends it at once.
	for wait := time.Second; ; wait = min(2*wait, 15*time.Second) {
		req := &pb.JoinRequest{Node: node, Csr: csr, Addresses: addresses}
		if err := cred(req); err != nil {
			return nil, err
		}
		id, err := join(ctx, dir, req, pin, keyPEM, slices.Clone(servers))
		if err == nil || !rpc.NoServerYet(err) {
			return id, err
		}
		slog.Warn("joining the cluster: no server answered yet; trying again", "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (gave up: %w)", err, ctx.Err())
		case <-time.After(wait):
		}
	}
}

// credentials checks with and returns what fills a join request's credential, and the
// verifier of the servers' CA.
func (with JoinWith) credentials() (func(*pb.JoinRequest) error, *pki.PinnedCA, error) {
	switch {
	case with.Token != "" && with.KubeTokenFile != "":
		return nil, nil, errors.New("join with a join token or a Kubernetes token file, not both")
	case with.Token != "":
		tok, err := pki.ParseJoinToken(with.Token)
		if err != nil {
			return nil, nil, err
		}
		pin, err := pki.PinnedCAVerifier(tok.CAFingerprint)
		if err != nil {
			return nil, nil, err
		}
		return func(r *pb.JoinRequest) error { r.TokenId, r.TokenSecret = tok.ID, tok.Secret; return nil }, pin, nil
	case with.KubeTokenFile != "":
		if with.CAFile == "" {
			return nil, nil, errors.New("joining with a Kubernetes token needs the cluster CA's certificate (--join-ca-file)")
		}
		caPEM, err := os.ReadFile(with.CAFile)
		if err != nil {
			return nil, nil, fmt.Errorf("the cluster CA to join: %w", err)
		}
		ca, err := pki.ParseCA(caPEM, nil)
		if err != nil {
			return nil, nil, fmt.Errorf("the cluster CA to join, %s: %w", with.CAFile, err)
		}
		pin, err := pki.PinnedCAVerifier(ca.Fingerprint())
		if err != nil {
			return nil, nil, err
		}
		return func(r *pb.JoinRequest) error {
			b, err := os.ReadFile(with.KubeTokenFile)
			if err != nil {
				return fmt.Errorf("the Kubernetes token to join with: %w", err)
			}
			if len(b) > 64<<10 {
				return fmt.Errorf("the Kubernetes token in %s is %d bytes: not a ServiceAccount token", with.KubeTokenFile, len(b))
			}
			r.KubeToken = strings.TrimSpace(string(b))
			return nil
		}, pin, nil
	}
	return nil, nil, errors.New("pass a join token (`fireworks token create --role join` on a server), or a Kubernetes token file and the cluster CA, to join the cluster")
}

// join asks each server in turn to sign the node's certificate.
func join(ctx context.Context, dir string, req *pb.JoinRequest, pin *pki.PinnedCA, keyPEM []byte, servers []string) (*Identity, error) {
	node := req.GetNode()
	var lastErr error
	// (By index: a follower's leader hint is appended, and tried in this same pass.)
	for i := 0; i < len(servers); i++ {
		srv := servers[i]
		cfg := pin.ClientTLS(nil)
		cfg.NextProtos = []string{"h2"}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true,
			DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}, Timeout: 30 * time.Second}
		c := fireworksv1connect.NewNodeServiceClient(hc, "https://"+srv)
		resp, err := c.Join(ctx, connect.NewRequest(req))
		if err != nil {
			var ce *connect.Error
			if errors.As(err, &ce) && ce.Code() == connect.CodeUnavailable {
				if leader := ce.Meta().Get(leaderHeader); leader != "" {
					servers = append(servers, leader) // try the leader next
				}
			}
			lastErr = fmt.Errorf("join via %s: %w", srv, err)
			if len(servers) > 16 {
				break
			}
			continue
		}
		ca := pin.CA()
		if ca == nil {
			return nil, errors.New("join: the server's CA was not learned from the handshake")
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, pki.CACertFile), ca.CertPEM(), 0o644); err != nil {
			return nil, fmt.Errorf("save cluster CA: %w", err)
		}
		if err := pki.WriteKeyPair(dir, certName, resp.Msg.GetCertPem(), keyPEM); err != nil {
			return nil, fmt.Errorf("save node certificate: %w", err)
		}
		cert, err := pki.KeyPair(resp.Msg.GetCertPem(), keyPEM)
		if err != nil {
			return nil, fmt.Errorf("node certificate from %s: %w", srv, err)
		}
		return &Identity{Node: node, CA: ca, Cert: cert}, nil
	}
	if lastErr == nil {
		lastErr = errors.New("no server given")
	}
	return nil, lastErr
}

// leaderHeader is where a follower names the leader's API address (see internal/controlplane/server).
const leaderHeader = "Fireworks-Leader"
