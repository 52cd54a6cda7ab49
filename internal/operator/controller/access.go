package controller

import (
	"context"
	"fmt"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// A Sandbox's access token (what opens its private ports at the edge and its in-sandbox
// API) is given to whoever may read Secrets in its namespace: a Secret of this type,
// named AccessSecretName, owned by the Sandbox (the garbage collector removes it with
// it). The controller only creates it, never updates or deletes a Secret, and the
// chart's admission policy lets it create no other kind of Secret outside its namespace.
const (
	AccessSecretType   corev1.SecretType = "fireworks.dev/sandbox-access"
	AccessSecretSuffix                   = "-fireworks-access"
)

// Keys of the access Secret's data.
const (
	AccessKeyToken   = "token"      // the access token (header Fireworks-Access-Token)
	AccessKeySandbox = "sandbox-id" // the Fireworks sandbox it opens
	AccessKeyHost    = "host"       // the sandbox's serviceFQDN: its ports at <port>-<host>
)

// AccessSecretName is the name of Sandbox name's access Secret; false if the name is too
// long to carry the suffix (a cut name could be another Sandbox's).
func AccessSecretName(sandbox string) (string, bool) {
	if len(sandbox)+len(AccessSecretSuffix) > 253 {
		return "", false
	}
	return sandbox + AccessSecretSuffix, true
}

// accessSecrets remembers the Sandboxes (by UID) whose Secret is made, so that a settled
// Sandbox costs no API call per look.
type accessSecrets struct{ done sync.Map }

// ensure makes sb's access Secret for its microVM fw, once. A Secret of that name that is
// not this Sandbox's (a predecessor's the garbage collector has not removed yet, or a
// user's own) is left alone, and the error says so.
func (a *accessSecrets) ensure(ctx context.Context, kube client.Client, sb *agentsv1.Sandbox, fw *pb.Sandbox, host string) error {
	tok := fw.GetAccessToken()
	if tok == "" {
		return nil
	}
	if v, ok := a.done.Load(sb.UID); ok && v == fw.GetId() {
		return nil
	}
	name, ok := AccessSecretName(sb.Name)
	if !ok {
		return fmt.Errorf("the Sandbox's name is too long (%d bytes) for its access Secret %q: at most %d", len(sb.Name), "<name>"+AccessSecretSuffix, 253-len(AccessSecretSuffix))
	}
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: sb.Namespace,
			Labels: map[string]string{"app.kubernetes.io/managed-by": "fireworks"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: agentsv1.GroupVersion.String(), Kind: "Sandbox", Name: sb.Name, UID: sb.UID,
				Controller: new(true)}}},
		Type: AccessSecretType,
		Data: map[string][]byte{AccessKeyToken: []byte(tok), AccessKeySandbox: []byte(fw.GetId()), AccessKeyHost: []byte(host)},
	}
	err := kube.Create(ctx, s)
	if apierrors.IsAlreadyExists(err) {
		var have corev1.Secret
		if err := kube.Get(ctx, types.NamespacedName{Namespace: sb.Namespace, Name: name}, &have); err != nil {
			return fmt.Errorf("access Secret %s: %w", name, err)
		}
		if !metav1.IsControlledBy(&have, sb) || have.Type != AccessSecretType {
			return fmt.Errorf("a Secret %s that is not this Sandbox's is in the way of its access Secret (an earlier Sandbox's, until it is collected, or another one: remove it)", name)
		}
		if string(have.Data[AccessKeySandbox]) != fw.GetId() || string(have.Data[AccessKeyToken]) != tok {
			return fmt.Errorf("access Secret %s is of microVM %s, not %s: delete it and the controller makes it again", name, have.Data[AccessKeySandbox], fw.GetId())
		}
		err = nil
	}
	if err != nil {
		return fmt.Errorf("create access Secret %s: %w", name, err)
	}
	a.done.Store(sb.UID, fw.GetId())
	return nil
}

// forget drops what is remembered of a Sandbox that is gone.
func (a *accessSecrets) forget(uid types.UID) { a.done.Delete(uid) }
