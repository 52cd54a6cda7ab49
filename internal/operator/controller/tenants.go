package controller

import (
	"context"
	"fmt"
	"sync"

	"connectrpc.com/connect"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	fwclient "github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// TokensSecret holds the Fireworks user token of every Kubernetes namespace the
// controller has made sandboxes for, one key per namespace, in the controller's own
// namespace.
const TokensSecret = "fireworks-namespace-tokens"

// Tenants gives every Kubernetes namespace a Fireworks user token of its own, made with
// the controller's admin token the first time the namespace needs one: a namespace's
// sandboxes and templates are that token's, so their images are pulled with a user's
// rights, the servers' per-token limits are per-namespace quotas, and one namespace's
// objects can never name another's microVMs. The admin token itself only sets warm pools
// and makes these tokens.
type Tenants struct {
	Admin *fwclient.Client
	// Base is how to reach the servers (address, CA); each namespace's client is Base
	// with its own token.
	Base fwclient.Config
	Kube client.Client
	// Namespace keeps TokensSecret.
	Namespace string

	mu    sync.Mutex
	cache map[string]Fireworks
}

// For returns the client of namespace ns, making its token on first use.
func (t *Tenants) For(ctx context.Context, ns string) (Fireworks, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if f, ok := t.cache[ns]; ok {
		return f, nil
	}
	tok, err := t.token(ctx, ns)
	if err != nil {
		return Fireworks{}, fmt.Errorf("the Fireworks token of namespace %s: %w", ns, err)
	}
	cfg := t.Base
	cfg.Token = tok
	c, err := fwclient.New(cfg)
	if err != nil {
		return Fireworks{}, err
	}
	if t.cache == nil {
		t.cache = map[string]Fireworks{}
	}
	f := Fireworks{C: c}
	t.cache[ns] = f
	return f, nil
}

// Forget drops a namespace's token after the servers refused it (it was revoked): the
// next For makes a new one.
func (t *Tenants) Forget(ctx context.Context, ns string) {
	t.mu.Lock()
	delete(t.cache, ns)
	t.mu.Unlock()
	var s corev1.Secret
	if err := t.Kube.Get(ctx, client.ObjectKey{Namespace: t.Namespace, Name: TokensSecret}, &s); err == nil {
		delete(s.Data, ns)
		_ = t.Kube.Update(ctx, &s)
	}
}

func (t *Tenants) token(ctx context.Context, ns string) (string, error) {
	var s corev1.Secret
	err := t.Kube.Get(ctx, client.ObjectKey{Namespace: t.Namespace, Name: TokensSecret}, &s)
	switch {
	case err == nil:
		if b := s.Data[ns]; len(b) > 0 {
			return string(b), nil
		}
	case !apierrors.IsNotFound(err):
		return "", err
	}
	r, err := t.Admin.Tokens.CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{Role: "user", Name: "k8s-ns-" + ns}))
	if err != nil {
		return "", fmt.Errorf("create a user token: %w", err)
	}
	tok := r.Msg.GetSecret()
	if s.Name == "" { // there was no Secret yet
		s = corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: t.Namespace, Name: TokensSecret}, Data: map[string][]byte{ns: []byte(tok)}}
		if err := t.Kube.Create(ctx, &s); err != nil {
			return "", t.lost(ctx, r.Msg.GetToken().GetId(), err)
		}
		return tok, nil
	}
	if s.Data == nil {
		s.Data = map[string][]byte{}
	}
	s.Data[ns] = []byte(tok)
	if err := t.Kube.Update(ctx, &s); err != nil {
		return "", t.lost(ctx, r.Msg.GetToken().GetId(), err)
	}
	return tok, nil
}

// lost revokes a token that could not be kept (another replica wrote the Secret first;
// the next reconcile reads theirs), so no unrecorded token stays valid.
func (t *Tenants) lost(ctx context.Context, id string, err error) error {
	_, _ = t.Admin.Tokens.RevokeToken(ctx, connect.NewRequest(&pb.RevokeTokenRequest{Id: id}))
	return fmt.Errorf("keep the new token in Secret %s/%s: %w", t.Namespace, TokensSecret, err)
}
