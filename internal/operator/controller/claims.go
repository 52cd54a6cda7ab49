package controller

import (
	"context"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
	extv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/extensions/v1beta1"
)

// Labels agent-sandbox puts on a claim's Sandbox.
const (
	LaunchTypeLabel = "agents.x-k8s.io/launch-type"
	ClaimUIDLabel   = "agents.x-k8s.io/claim-uid"
)

// ReasonClaimExpired: the claim's shutdownTime came.
const ReasonClaimExpired = "ClaimExpired"

// SandboxClaimReconciler gives every claim a Sandbox of its warm pool's template: a
// Sandbox object owned by the claim (deleting the claim deletes it), whose microVM comes
// from the Fireworks warm pool of that template's image and shape.
type SandboxClaimReconciler struct {
	Kube client.Client
	Cfg  Config
}

func (r *SandboxClaimReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var c extv1.SandboxClaim
	if err := r.Kube.Get(ctx, req.NamespacedName, &c); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !c.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil // the garbage collector takes the owned Sandbox
	}
	before := c.Status.DeepCopy()
	res, err := r.reconcile(ctx, &c)
	if err == errGone {
		return ctrl.Result{}, nil
	}
	if !equalClaimStatus(before, &c.Status) {
		if uerr := r.Kube.Status().Update(ctx, &c); uerr != nil && !apierrors.IsNotFound(uerr) {
			return ctrl.Result{}, uerr
		}
	}
	return res, err
}

func (r *SandboxClaimReconciler) reconcile(ctx context.Context, c *extv1.SandboxClaim) (ctrl.Result, error) {
	gen := c.Generation
	var sb agentsv1.Sandbox
	err := r.Kube.Get(ctx, client.ObjectKey{Namespace: c.Namespace, Name: c.Name}, &sb)
	exists := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return ctrl.Result{}, err
	}
	if exists && !metav1.IsControlledBy(&sb, c) {
		setCond(&c.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, "a Sandbox named "+c.Name+" exists and is not this claim's", gen)
		return ctrl.Result{RequeueAfter: pollSettled}, nil
	}
	expiry := claimExpiry(c, &sb, exists)
	if lc := c.Spec.Lifecycle; expiry != nil && !time.Now().Before(*expiry) {
		if exists {
			if err := r.Kube.Delete(ctx, &sb); err != nil && !apierrors.IsNotFound(err) {
				return ctrl.Result{}, err
			}
		}
		if lc.ShutdownPolicy == extv1.ClaimShutdownDelete || lc.ShutdownPolicy == extv1.ClaimShutdownDeleteForeground {
			if err := r.Kube.Delete(ctx, c); err != nil && !apierrors.IsNotFound(err) {
				return ctrl.Result{}, err
			}
			return ctrl.Result{}, errGone
		}
		c.Status.SandboxStatus = extv1.ClaimedSandbox{}
		setCond(&c.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, ReasonClaimExpired, "the claim expired (its shutdownTime, or ttlSecondsAfterFinished after its sandbox finished); its sandbox was deleted", gen)
		return ctrl.Result{}, nil
	}
	if !exists {
		want, err := r.sandboxFor(ctx, c)
		if err != nil {
			setCond(&c.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reasonOf(err), err.Error(), gen)
			return ctrl.Result{RequeueAfter: pollError}, nil
		}
		if err := r.Kube.Create(ctx, want); err != nil {
			return ctrl.Result{}, fmt.Errorf("create the claim's Sandbox %s/%s: %w", c.Namespace, c.Name, err)
		}
		sb = *want
	}
	c.Status.SandboxStatus = extv1.ClaimedSandbox{Name: sb.Name, PodIPs: sb.Status.PodIPs}
	ready := meta.FindStatusCondition(sb.Status.Conditions, agentsv1.ConditionReady)
	if ready == nil {
		setCond(&c.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonDependenciesNotReady, "the sandbox is starting", gen)
	} else {
		setCond(&c.Status.Conditions, agentsv1.ConditionReady, ready.Status, ready.Reason, ready.Message, gen)
	}
	res := ctrl.Result{}
	if expiry != nil {
		res.RequeueAfter = time.Until(*expiry) + 100*time.Millisecond
	}
	if lc := c.Spec.Lifecycle; lc != nil && lc.TTLSecondsAfterFinished != nil && (res.RequeueAfter <= 0 || res.RequeueAfter > pollSettled) {
		res.RequeueAfter = pollSettled // to see its sandbox finish
	}
	return res, nil
}

// claimExpiry is when a claim ends, as agent-sandbox computes it: its shutdownTime, or
// ttlSecondsAfterFinished after its sandbox finished (the Sandbox's Finished condition),
// whichever comes first; nil for never.
func claimExpiry(c *extv1.SandboxClaim, sb *agentsv1.Sandbox, exists bool) *time.Time {
	lc := c.Spec.Lifecycle
	if lc == nil {
		return nil
	}
	var at *time.Time
	if lc.ShutdownTime != nil {
		t := lc.ShutdownTime.Time
		at = &t
	}
	if lc.TTLSecondsAfterFinished != nil && exists {
		if f := meta.FindStatusCondition(sb.Status.Conditions, agentsv1.ConditionFinished); f != nil && f.Status == metav1.ConditionTrue && !f.LastTransitionTime.IsZero() {
			t := f.LastTransitionTime.Add(time.Duration(*lc.TTLSecondsAfterFinished) * time.Second)
			if at == nil || t.Before(*at) {
				at = &t
			}
		}
	}
	return at
}

// sandboxFor is the Sandbox a claim gets: its pool's template's blueprint, the claim's
// metadata and (where the template allows) environment, and the claim's shutdownTime.
func (r *SandboxClaimReconciler) sandboxFor(ctx context.Context, c *extv1.SandboxClaim) (*agentsv1.Sandbox, error) {
	var wp extv1.SandboxWarmPool
	if err := r.Kube.Get(ctx, client.ObjectKey{Namespace: c.Namespace, Name: c.Spec.WarmPoolRef.Name}, &wp); err != nil {
		return nil, fmt.Errorf("SandboxWarmPool %s: %w", c.Spec.WarmPoolRef.Name, err)
	}
	var t extv1.SandboxTemplate
	if err := r.Kube.Get(ctx, client.ObjectKey{Namespace: c.Namespace, Name: wp.Spec.TemplateRef.Name}, &t); err != nil {
		return nil, fmt.Errorf("SandboxTemplate %s of SandboxWarmPool %s: %w", wp.Spec.TemplateRef.Name, wp.Name, err)
	}
	if t.Status.Template == "" {
		return nil, fmt.Errorf("SandboxTemplate %s is not registered with Fireworks yet", t.Name)
	}
	bp := *t.Spec.SandboxBlueprint.DeepCopy()
	if len(c.Spec.Env) > 0 {
		policy := t.Spec.EnvVarsInjectionPolicy
		if policy == "" || policy == extv1.EnvVarsDisallowed {
			return nil, fmt.Errorf("SandboxTemplate %s does not allow claims to set environment variables (envVarsInjectionPolicy: %s)", t.Name, policy)
		}
		for i := range bp.PodTemplate.Spec.Containers {
			ct := &bp.PodTemplate.Spec.Containers[i]
			for _, e := range c.Spec.Env {
				if e.ContainerName != "" && e.ContainerName != ct.Name {
					continue
				}
				j := slices.IndexFunc(ct.Env, func(v corev1.EnvVar) bool { return v.Name == e.Name })
				switch {
				case j < 0:
					ct.Env = append(ct.Env, corev1.EnvVar{Name: e.Name, Value: e.Value})
				case policy == extv1.EnvVarsOverrides:
					ct.Env[j] = corev1.EnvVar{Name: e.Name, Value: e.Value}
				default:
					return nil, fmt.Errorf("env %s is the template's, and its envVarsInjectionPolicy (%s) does not let a claim override it", e.Name, policy)
				}
			}
		}
	}
	if len(c.Spec.VolumeClaimTemplates) > 0 {
		return nil, fmt.Errorf("volumeClaimTemplates: pod volumes are not mounted in a microVM")
	}
	labels := map[string]string{LaunchTypeLabel: "warm", SelectorLabel: wp.Name, ClaimUIDLabel: string(c.UID)}
	for k, v := range c.Spec.AdditionalPodMetadata.Labels {
		if bp.PodTemplate.ObjectMeta.Labels == nil {
			bp.PodTemplate.ObjectMeta.Labels = map[string]string{}
		}
		bp.PodTemplate.ObjectMeta.Labels[k] = v
	}
	sb := &agentsv1.Sandbox{
		ObjectMeta: metav1.ObjectMeta{
			Name: c.Name, Namespace: c.Namespace, Labels: labels,
			Annotations: map[string]string{TemplateRefAnnotation: t.Status.Template, SandboxTemplateAnnotation: t.Name},
		},
		Spec: agentsv1.SandboxSpec{SandboxBlueprint: bp, OperatingMode: agentsv1.OperatingModeRunning},
	}
	if lc := c.Spec.Lifecycle; lc != nil && lc.ShutdownTime != nil {
		sb.Spec.ShutdownTime = lc.ShutdownTime.DeepCopy()
	}
	if err := controllerutil.SetControllerReference(c, sb, r.Kube.Scheme()); err != nil {
		return nil, err
	}
	return sb, nil
}
