// Package kubejoin admits node agents that join with a Kubernetes ServiceAccount token
// instead of a join token. The API server vouches for the token (TokenReview): it is
// live, minted for Fireworks's audience, of the agents' ServiceAccount, and bound to a
// pod that still exists on a node. The node's name comes from the token, not from the
// agent, so an agent can join only as the Kubernetes node it runs on: a taken-over node,
// or whoever can read the chart's Secrets, cannot register itself under another node's
// name and be sent that node's sandboxes.
package kubejoin

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
)

// Audience is the audience an agent's projected token must be minted for. A token for
// any other audience (the API server's own, another service's) is refused, so a token a
// pod holds for something else cannot be replayed as a join.
const Audience = "fireworks-join"

// MaxTokenBytes bounds the token a joining agent sends (a projected token is about a
// kilobyte): it is untrusted input, forwarded to the API server.
const MaxTokenBytes = 16 << 10

// The claims the API server adds to a token bound to a pod (TokenReview's user.extra).
const (
	extraNodeName = "authentication.kubernetes.io/node-name"
	extraPodName  = "authentication.kubernetes.io/pod-name"
)

// plausible checks, without trusting it, that token looks like a JWT minted for Audience
// (its signature and everything else are the API server's to check).
func plausible(token string) error {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return errors.New("not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return errors.New("not a JWT")
	}
	var claims struct {
		Aud json.RawMessage `json:"aud"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return errors.New("not a JWT")
	}
	var auds []string
	if err := json.Unmarshal(claims.Aud, &auds); err != nil {
		var one string
		if json.Unmarshal(claims.Aud, &one) != nil {
			return errors.New("a JWT with no audience")
		}
		auds = []string{one}
	}
	if !slices.Contains(auds, Audience) {
		return fmt.Errorf("a JWT not for the audience %q", Audience)
	}
	return nil
}

// ErrRefused: the token does not prove a node (not live, wrong audience, another
// ServiceAccount, not bound to a scheduled pod). Other errors mean the API server could
// not be asked, and the join may be tried again.
var ErrRefused = errors.New("the Kubernetes token does not prove a node")

// Reviewer checks agents' tokens with the API server.
type Reviewer struct {
	Client kubernetes.Interface
	// Namespace and ServiceAccount name the agents' ServiceAccount: the only one whose
	// tokens join.
	Namespace, ServiceAccount string

	inflight chan struct{} // reviews under way (made by New)
}

// MaxReviews bounds the reviews under way at once: Join is open to anyone who reaches
// the servers, and each review is a call to the API server. A join past it is told to
// try again (agents do).
const MaxReviews = 8

// reviewTimeout bounds one review: a slow API server must not hold a slot for long.
const reviewTimeout = 10 * time.Second

// ErrBusy: MaxReviews reviews are under way; try again.
var ErrBusy = errors.New("too many joins are being checked; try again")

// New checks serviceAccount ("namespace/name") and returns a Reviewer over client.
func New(client kubernetes.Interface, serviceAccount string) (*Reviewer, error) {
	ns, name, ok := strings.Cut(serviceAccount, "/")
	if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
		return nil, fmt.Errorf("agents' ServiceAccount %q: want namespace/name", serviceAccount)
	}
	return &Reviewer{Client: client, Namespace: ns, ServiceAccount: name, inflight: make(chan struct{}, MaxReviews)}, nil
}

// Node returns the name of the Kubernetes node whose pod holds token, once the API
// server confirmed it. Errors wrap ErrRefused when the token proves nothing.
func (r *Reviewer) Node(ctx context.Context, token string) (string, error) {
	if token == "" || len(token) > MaxTokenBytes {
		return "", fmt.Errorf("%w: a token of 1 to %d bytes is needed, not %d", ErrRefused, MaxTokenBytes, len(token))
	}
	// Join runs before any credential: what cannot be a projected token for this
	// audience is refused here, without a call to the API server on a stranger's behalf.
	if err := plausible(token); err != nil {
		return "", fmt.Errorf("%w: %w", ErrRefused, err)
	}
	select {
	case r.inflight <- struct{}{}:
		defer func() { <-r.inflight }()
	default:
		return "", ErrBusy
	}
	ctx, cancel := context.WithTimeout(ctx, reviewTimeout)
	defer cancel()
	tr, err := r.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("review the agent's token with the Kubernetes API server: %w", err)
	}
	st := tr.Status
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "not authenticated"
		}
		return "", fmt.Errorf("%w: the API server says: %s", ErrRefused, why)
	}
	// The API server checked the audience it was asked for; an authenticator that
	// ignores audiences answers with none, and is not trusted for this.
	if !slices.Contains(st.Audiences, Audience) {
		return "", fmt.Errorf("%w: it is not for the audience %q", ErrRefused, Audience)
	}
	want := "system:serviceaccount:" + r.Namespace + ":" + r.ServiceAccount
	if st.User.Username != want {
		return "", fmt.Errorf("%w: it is %q's, not the agents' ServiceAccount %s/%s", ErrRefused, st.User.Username, r.Namespace, r.ServiceAccount)
	}
	// A token bound to a pod names it and, once the pod is scheduled, its node. One
	// that is not (a TokenRequest with no bound pod, an old Secret-based token) could
	// be presented from anywhere.
	pod, node := st.User.Extra[extraPodName], st.User.Extra[extraNodeName]
	if len(pod) != 1 || len(node) != 1 || node[0] == "" {
		return "", fmt.Errorf("%w: it is not bound to a pod on a node (a projected token of the agent's pod is)", ErrRefused)
	}
	return node[0], nil
}
