// Package agentlink is a node agent's connection to the control plane: joining the
// cluster with a join token (certificate through a pinned-CA handshake), registering,
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

// EnsureIdentity loads the node's certificate from dir, or joins the cluster with
// joinToken to get one. The node name is fixed by the certificate once joined.
func EnsureIdentity(ctx context.Context, dir, node, joinToken string, servers, addresses []string) (*Identity, error) {
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
	if joinToken == "" {
		return nil, fmt.Errorf("no node certificate in %s: pass a join token (`fireworks token create --role join` on a server) to join the cluster", dir)
	}
	if node == "" {
		node, _ = os.Hostname()
	}
	tok, err := pki.ParseJoinToken(joinToken)
	if err != nil {
		return nil, err
	}
	pin, err := pki.PinnedCAVerifier(tok.CAFingerprint)
	if err != nil {
		return nil, err
	}
	csr, keyPEM, err := pki.NewCSR(node)
	if err != nil {
		return nil, err
	}
	// Servers that are not up yet (a DaemonSet's agents start with the servers) are waited
	// for: the join is tried again until ctx ends. A refusal (a bad token, another
	// cluster's CA) ends it at once.
	for wait := time.Second; ; wait = min(2*wait, 15*time.Second) {
		id, err := join(ctx, dir, node, tok, pin, csr, keyPEM, slices.Clone(servers), addresses)
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

// join asks each server in turn to sign the node's certificate.
func join(ctx context.Context, dir, node string, tok pki.JoinToken, pin *pki.PinnedCA, csr, keyPEM []byte, servers, addresses []string) (*Identity, error) {
	var lastErr error
	for _, srv := range servers {
		cfg := pin.ClientTLS(nil)
		cfg.NextProtos = []string{"h2"}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true,
			DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}, Timeout: 30 * time.Second}
		c := fireworksv1connect.NewNodeServiceClient(hc, "https://"+srv)
		resp, err := c.Join(ctx, connect.NewRequest(&pb.JoinRequest{TokenId: tok.ID, TokenSecret: tok.Secret, Node: node, Csr: csr, Addresses: addresses}))
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
