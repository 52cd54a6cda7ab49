package kubejoin

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
)

// Against a real API server, with the servers' rights as the chart grants them (their
// ServiceAccount, impersonated): a projected token of an agent pod proves the node its
// pod is bound to, and nothing else proves any node — a token for another audience,
// another ServiceAccount's, one bound to no pod, a pod's token after the pod is gone,
// garbage, an empty or oversized one.
func TestReviewerOnKubernetes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const ns = "fireworks"
	_, admin, servers, _ := kubetest.ChartTest(ctx, t, "../../..", ns, "server",
		"--show-only", "templates/server.yaml", "--show-only", "templates/agent.yaml")
	r, err := New(servers, ns+"/fw-fireworks-agent")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"node-a", "node-b"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Pods need their ServiceAccount; the namespace's default one is made by a controller.
	testutil.Eventually(t, time.Minute, "the namespace's default service account", func() (bool, string) {
		_, err := admin.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
	pod := func(name, sa, node string) *corev1.Pod {
		t.Helper()
		p, err := admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{ServiceAccountName: sa, NodeName: node, AutomountServiceAccountToken: new(false),
				Containers: []corev1.Container{{Name: "c", Image: "fireworks"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	token := func(sa, audience string, bound *corev1.Pod) string {
		t.Helper()
		req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{ExpirationSeconds: new(int64(600))}}
		if audience != "" {
			req.Spec.Audiences = []string{audience}
		}
		if bound != nil {
			req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: bound.Name, UID: bound.UID}
		}
		tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr.Status.Token
	}
	refused := func(what, tok string) {
		t.Helper()
		node, err := r.Node(ctx, tok)
		if !errors.Is(err, ErrRefused) {
			t.Errorf("%s: node %q, %v; want a refusal", what, node, err)
		} else {
			t.Logf("%s: %v", what, err)
		}
	}

	agentA := pod("agent-a", "fw-fireworks-agent", "node-a")
	agentB := pod("agent-b", "fw-fireworks-agent", "node-b")
	for p, want := range map[*corev1.Pod]string{agentA: "node-a", agentB: "node-b"} {
		if node, err := r.Node(ctx, token("fw-fireworks-agent", Audience, p)); err != nil || node != want {
			t.Errorf("the token of %s: node %q, %v; want %s", p.Name, node, err, want)
		}
	}

	refused("a token for the API server's audience", token("fw-fireworks-agent", "", agentA))
	refused("a token for another audience", token("fw-fireworks-agent", "vault", agentA))
	refused("a token bound to no pod", token("fw-fireworks-agent", Audience, nil))
	other := pod("other-a", "default", "node-a")
	refused("another ServiceAccount's token, of a pod on the node", token("default", Audience, other))
	refused("garbage", "not-a-token")
	refused("a JWT for another audience, unsigned", "eyJhbGciOiJub25lIn0."+base64.RawURLEncoding.EncodeToString([]byte(`{"aud":["api"]}`))+".x")
	refused("an empty token", "")
	refused("an oversized token", strings.Repeat("a", MaxTokenBytes+1))

	// A pod's token ends with the pod.
	stale := token("fw-fireworks-agent", Audience, agentB)
	if err := admin.CoreV1().Pods(ns).Delete(ctx, agentB.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, time.Minute, "agent-b's pod gone", func() (bool, string) {
		_, err := admin.CoreV1().Pods(ns).Get(ctx, agentB.Name, metav1.GetOptions{})
		return err != nil, fmt.Sprint(err)
	})
	refused("the token of a pod that is gone", stale)

	// Without the chart's TokenReview right the servers cannot check, and say so: not a
	// refusal of the agent (it tries again), an error.
	if err := admin.RbacV1().ClusterRoleBindings().Delete(ctx, "fw-fireworks-tokenreview", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, time.Minute, "the review forbidden without the chart's binding", func() (bool, string) {
		_, err := r.Node(ctx, token("fw-fireworks-agent", Audience, agentA))
		return err != nil && !errors.Is(err, ErrRefused) && strings.Contains(err.Error(), "forbidden"), fmt.Sprint(err)
	})
}
