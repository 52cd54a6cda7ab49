package controller

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
)

func TestAccessSecretName(t *testing.T) {
	if got, ok := AccessSecretName("web"); got != "web-fireworks-access" || !ok {
		t.Errorf("AccessSecretName(web) = %q, %v", got, ok)
	}
	if got, ok := AccessSecretName(strings.Repeat("a", 253-len(AccessSecretSuffix))); !ok || len(got) != 253 {
		t.Errorf("the longest name that fits: %q, %v", got, ok)
	}
	if got, ok := AccessSecretName(strings.Repeat("a", 250)); ok {
		t.Errorf("a 250-byte name gave %q; want none (a cut name could be another Sandbox's)", got)
	}
}

// The controller's rights over Secrets, as the chart grants them (its ServiceAccount,
// impersonated, under the chart's RBAC and admission policy) against a real API server:
// it may create a Sandbox's access Secret in any namespace, and its namespace tokens'
// Secret in its own, and nothing else — no Secret of another type (a
// service-account-token Secret would mint a token for any ServiceAccount), none of
// another name, none without a Sandbox owner, no update of an access Secret.
func TestControllerSecretRights(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const own, team = "fireworks", "team-a"
	_, admin, ctl, _ := kubetest.ChartTest(ctx, t, "../../..", own, "controller", "--show-only", "templates/controller.yaml")
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: team}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	owner := []metav1.OwnerReference{{APIVersion: "agents.x-k8s.io/v1beta1", Kind: "Sandbox", Name: "web", UID: "0b6c7d3e-1111-4222-8333-944445555666", Controller: new(true)}}
	secret := func(ns, name string, typ corev1.SecretType, owners []metav1.OwnerReference) *corev1.Secret {
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, OwnerReferences: owners}, Type: typ,
			Data: map[string][]byte{AccessKeyToken: []byte("t")}}
	}
	// The policy is enforced a moment after it is made.
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := ctl.CoreV1().Secrets(team).Create(ctx, secret(team, "probe-fireworks-access", corev1.SecretTypeOpaque, owner), metav1.CreateOptions{})
		if err != nil && strings.Contains(err.Error(), "may create only") {
			break
		}
		if err == nil {
			_ = admin.CoreV1().Secrets(team).Delete(ctx, "probe-fireworks-access", metav1.DeleteOptions{})
		}
		if time.Now().After(deadline) {
			t.Fatalf("the chart's policy on the controller's Secrets is not enforced: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}

	access, err := ctl.CoreV1().Secrets(team).Create(ctx, secret(team, "web-fireworks-access", AccessSecretType, owner), metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the controller creating a Sandbox's access Secret: %v", err)
	}
	if _, err := ctl.CoreV1().Secrets(own).Create(ctx, secret(own, "fireworks-namespace-tokens", corev1.SecretTypeOpaque, nil), metav1.CreateOptions{}); err != nil {
		t.Fatalf("the controller creating its namespace tokens' Secret: %v", err)
	}
	tokens, err := ctl.CoreV1().Secrets(own).Get(ctx, "fireworks-namespace-tokens", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tokens.Data = map[string][]byte{"team-a": []byte("x")}
	if _, err := ctl.CoreV1().Secrets(own).Update(ctx, tokens, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("the controller updating its namespace tokens' Secret: %v", err)
	}

	for _, bad := range []struct {
		what string
		s    *corev1.Secret
	}{
		{"an Opaque Secret of an access Secret's name", secret(team, "db-fireworks-access", corev1.SecretTypeOpaque, owner)},
		{"a service-account-token Secret", &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sa-fireworks-access", Namespace: team,
			Annotations: map[string]string{corev1.ServiceAccountNameKey: "default"}, OwnerReferences: owner}, Type: corev1.SecretTypeServiceAccountToken}},
		{"an access Secret of another name", secret(team, "app-config", AccessSecretType, owner)},
		{"an access Secret owned by no Sandbox", secret(team, "x-fireworks-access", AccessSecretType, nil)},
		{"an access Secret owned by a Pod", secret(team, "y-fireworks-access", AccessSecretType, []metav1.OwnerReference{{APIVersion: "v1", Kind: "Pod", Name: "p", UID: "0b6c7d3e-1111-4222-8333-944445555667"}})},
		{"a Secret of the tokens' name in another namespace", secret(team, "fireworks-namespace-tokens", corev1.SecretTypeOpaque, nil)},
	} {
		if _, err := ctl.CoreV1().Secrets(team).Create(ctx, bad.s, metav1.CreateOptions{}); err == nil {
			t.Errorf("the controller created %s", bad.what)
		} else {
			t.Logf("%s: %v", bad.what, err)
		}
	}
	access.Data[AccessKeyToken] = []byte("other")
	if _, err := ctl.CoreV1().Secrets(team).Update(ctx, access, metav1.UpdateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the controller updating an access Secret: %v, want forbidden", err)
	}
	if err := ctl.CoreV1().Secrets(team).Delete(ctx, access.Name, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the controller deleting an access Secret: %v, want forbidden", err)
	}
}
