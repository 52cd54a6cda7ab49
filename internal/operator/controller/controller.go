// Package controller serves kubernetes-sigs/agent-sandbox's API with Fireworks: it
// turns Sandbox, SandboxTemplate, SandboxWarmPool and SandboxClaim objects into
// Fireworks sandboxes, templates and warm pools, and writes what they are back into the
// objects' status. It is a client of the Fireworks API like any other (one admin token),
// so a Kubernetes user can do through it only what the Kubernetes API lets them write.
package controller

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
	extv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/extensions/v1beta1"
)

// Config is what the reconcilers need to know of the Fireworks cluster.
type Config struct {
	// IngressDomain is the edge's domain: a sandbox's ports answer at
	// <port>-<sandbox>.<IngressDomain> (its serviceFQDN is <sandbox>.<IngressDomain>).
	IngressDomain string
	// OwnNamespace is the controller's (it keeps the namespaces' tokens there, beside the
	// chart's Secret): no Secret or ConfigMap there is ever read into a sandbox's env.
	OwnNamespace string
}

// Scheme is the scheme the controller's client reads and writes: Kubernetes' own kinds
// and agent-sandbox's.
func Scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, agentsv1.AddToScheme, extv1.AddToScheme} {
		if err := add(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Setup registers the four reconcilers with mgr: admin sets warm pools; tenants give
// each namespace's Sandboxes and SandboxTemplates that namespace's own token.
func Setup(mgr ctrl.Manager, admin Fireworks, tenants *Tenants, cfg Config) error {
	kube := mgr.GetClient()
	if err := ctrl.NewControllerManagedBy(mgr).For(&agentsv1.Sandbox{}).Named("sandbox").
		Complete(&SandboxReconciler{Kube: kube, Tenants: tenants, Admin: admin, Cfg: cfg}); err != nil {
		return fmt.Errorf("sandbox controller: %w", err)
	}
	if err := ctrl.NewControllerManagedBy(mgr).For(&extv1.SandboxTemplate{}).Named("sandboxtemplate").
		Complete(&SandboxTemplateReconciler{Kube: kube, Tenants: tenants, Cfg: cfg}); err != nil {
		return fmt.Errorf("sandboxtemplate controller: %w", err)
	}
	// A template's change (its image, its shape) moves its warm pools' Fireworks pool.
	poolsOf := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		reqs, _ := poolsOfTemplate(ctx, kube, o.GetNamespace(), o.GetName())
		return reqs
	})
	if err := ctrl.NewControllerManagedBy(mgr).For(&extv1.SandboxWarmPool{}).Named("sandboxwarmpool").
		Watches(&extv1.SandboxTemplate{}, poolsOf).
		Complete(&SandboxWarmPoolReconciler{Kube: kube, FW: admin, Tenants: tenants, Cfg: cfg}); err != nil {
		return fmt.Errorf("sandboxwarmpool controller: %w", err)
	}
	// A namespace's deletion retires its token (the start's sweep covers the rest).
	if err := ctrl.NewControllerManagedBy(mgr).For(&corev1.Namespace{}, builder.WithPredicates(predicate.Funcs{
		CreateFunc: func(event.CreateEvent) bool { return false }, UpdateFunc: func(event.UpdateEvent) bool { return false },
		GenericFunc: func(event.GenericEvent) bool { return false }})).Named("namespace").
		Complete(&NamespaceReconciler{Kube: kube, Tenants: tenants}); err != nil {
		return fmt.Errorf("namespace controller: %w", err)
	}
	// Namespaces deleted while no controller ran get no event: their tokens go at start
	// (on the leader, like every reconciler).
	if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return nil
		}
		if err := sweepTenants(ctx, kube, tenants); err != nil {
			mgr.GetLogger().Error(err, "retire the tokens of deleted namespaces")
		}
		return nil
	})); err != nil {
		return err
	}
	if err := ctrl.NewControllerManagedBy(mgr).For(&extv1.SandboxClaim{}).Named("sandboxclaim").
		Owns(&agentsv1.Sandbox{}).
		Complete(&SandboxClaimReconciler{Kube: kube, Cfg: cfg}); err != nil {
		return fmt.Errorf("sandboxclaim controller: %w", err)
	}
	return nil
}

func equalStatus(a, b *agentsv1.SandboxStatus) bool { return equality.Semantic.DeepEqual(a, b) }

func equalTemplateStatus(a, b *extv1.SandboxTemplateStatus) bool {
	return equality.Semantic.DeepEqual(a, b)
}

func equalPoolStatus(a, b *extv1.SandboxWarmPoolStatus) bool {
	return equality.Semantic.DeepEqual(a, b)
}

func equalClaimStatus(a, b *extv1.SandboxClaimStatus) bool { return equality.Semantic.DeepEqual(a, b) }
