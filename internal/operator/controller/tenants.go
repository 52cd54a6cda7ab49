package controller

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"connectrpc.com/connect"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	fwclient "github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// TokensSecret holds the Fireworks user token of every Kubernetes namespace the
// controller has made sandboxes for, one key per namespace (tokenKey: its name and UID),
// in the controller's own namespace.
const TokensSecret = "fireworks-namespace-tokens"

// tokenKey is a namespace's key in TokensSecret: its name and UID, so that a namespace
// deleted and made again (by someone else, maybe) never inherits the earlier one's token,
// nor its templates, snapshots and volumes.
func tokenKey(ns string, uid types.UID) string { return ns + "." + string(uid) }

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
	var n corev1.Namespace
	if err := t.Kube.Get(ctx, client.ObjectKey{Name: ns}, &n); err != nil {
		return Fireworks{}, fmt.Errorf("namespace %s: %w", ns, err)
	}
	key := tokenKey(ns, n.UID)
	t.mu.Lock()
	defer t.mu.Unlock()
	if f, ok := t.cache[key]; ok {
		return f, nil
	}
	tok, err := t.token(ctx, ns, key)
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
	t.cache[key] = f
	return f, nil
}

// Forget drops a namespace's token after the servers refused it (it was revoked): the
// next For makes a new one.
func (t *Tenants) Forget(ctx context.Context, ns string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var s corev1.Secret
	if err := t.Kube.Get(ctx, client.ObjectKey{Namespace: t.Namespace, Name: TokensSecret}, &s); err == nil {
		for key := range s.Data {
			if keyNamespace(key) == ns {
				delete(s.Data, key)
				delete(t.cache, key)
			}
		}
		_ = t.Kube.Update(ctx, &s)
	}
}

// keyNamespace is the namespace a TokensSecret key is for (a key written before keys
// had UIDs is the bare name).
func keyNamespace(key string) string {
	ns, _, _ := strings.Cut(key, ".")
	return ns
}

// Retire revokes and forgets the tokens of namespace ns but the one of its live UID
// ("" when the namespace is gone): a namespace deleted takes its token with it. The
// namespace is gone only once everything in it is (the Sandboxes' finalizers, which
// need its token, have run).
func (t *Tenants) Retire(ctx context.Context, ns string, live types.UID) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var s corev1.Secret
	if err := t.Kube.Get(ctx, client.ObjectKey{Namespace: t.Namespace, Name: TokensSecret}, &s); err != nil {
		return client.IgnoreNotFound(err)
	}
	changed := false
	for key, tok := range s.Data {
		if keyNamespace(key) != ns || live != "" && (key == ns || key == tokenKey(ns, live)) {
			continue // another namespace's, or this one's (a bare key is moved on its next use)
		}
		if id, _, err := auth.Parse(string(tok)); err == nil {
			if _, err := t.Admin.Tokens.RevokeToken(ctx, connect.NewRequest(&pb.RevokeTokenRequest{Id: id})); err != nil && connect.CodeOf(err) != connect.CodeNotFound {
				return fmt.Errorf("revoke the Fireworks token of deleted namespace %s: %w", ns, err)
			}
		}
		delete(s.Data, key)
		delete(t.cache, key)
		changed = true
	}
	if !changed {
		return nil
	}
	if err := t.Kube.Update(ctx, &s); err != nil {
		return fmt.Errorf("forget the tokens of deleted namespace %s in Secret %s/%s: %w", ns, t.Namespace, TokensSecret, err)
	}
	return nil
}

func (t *Tenants) token(ctx context.Context, ns, key string) (string, error) {
	var s corev1.Secret
	err := t.Kube.Get(ctx, client.ObjectKey{Namespace: t.Namespace, Name: TokensSecret}, &s)
	switch {
	case err == nil:
		if b := s.Data[key]; len(b) > 0 {
			return string(b), nil
		}
		if b := s.Data[ns]; len(b) > 0 {
			// Kept before keys had UIDs: the namespace's own, moved under its key.
			s.Data[key] = b
			delete(s.Data, ns)
			if err := t.Kube.Update(ctx, &s); err != nil {
				return "", fmt.Errorf("move the token of namespace %s in Secret %s/%s: %w", ns, t.Namespace, TokensSecret, err)
			}
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
		s = corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: t.Namespace, Name: TokensSecret}, Data: map[string][]byte{key: []byte(tok)}}
		if err := t.Kube.Create(ctx, &s); err != nil {
			return "", t.lost(ctx, r.Msg.GetToken().GetId(), err)
		}
		return tok, nil
	}
	if s.Data == nil {
		s.Data = map[string][]byte{}
	}
	s.Data[key] = []byte(tok)
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

// NamespaceReconciler retires the Fireworks token of a namespace once it is deleted (or
// made again under the same name).
type NamespaceReconciler struct {
	Kube    client.Client
	Tenants *Tenants
}

func (r *NamespaceReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var n corev1.Namespace
	err := r.Kube.Get(ctx, req.NamespacedName, &n)
	if client.IgnoreNotFound(err) != nil {
		return reconcile.Result{}, err
	}
	live := n.UID // "" when it is gone
	if err != nil {
		live = ""
	}
	return reconcile.Result{}, r.Tenants.Retire(ctx, req.Name, live)
}

// sweepTenants retires, at the controller's start, the tokens of namespaces deleted
// while it did not run (no event will come for them).
func sweepTenants(ctx context.Context, kube client.Client, t *Tenants) error {
	var s corev1.Secret
	if err := kube.Get(ctx, client.ObjectKey{Namespace: t.Namespace, Name: TokensSecret}, &s); err != nil {
		return client.IgnoreNotFound(err)
	}
	seen := map[string]bool{}
	for key := range s.Data {
		ns := keyNamespace(key)
		if seen[ns] {
			continue
		}
		seen[ns] = true
		var n corev1.Namespace
		err := kube.Get(ctx, client.ObjectKey{Name: ns}, &n)
		if client.IgnoreNotFound(err) != nil {
			return err
		}
		if err != nil {
			n.UID = ""
		}
		if err := t.Retire(ctx, ns, n.UID); err != nil {
			return err
		}
	}
	return nil
}
