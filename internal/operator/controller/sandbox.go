package controller

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
	extv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/extensions/v1beta1"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// Finalizer keeps a Sandbox object until its microVM is gone.
const Finalizer = "fireworks.dev/sandbox"

// TemplateRefAnnotation names the SandboxTemplate a Sandbox was made from (a claim's).
const TemplateRefAnnotation = "agents.x-k8s.io/sandbox-template-ref"

// How often a Sandbox is looked at again: soon while its microVM is on its way (nothing
// tells the controller when it is up), less often once it is settled, to notice a VM
// that ended or was removed behind the controller's back.
const (
	pollStarting = 2 * time.Second
	pollSettled  = 30 * time.Second
	pollError    = 10 * time.Second
)

// SandboxReconciler runs a microVM for every Sandbox.
type SandboxReconciler struct {
	Kube    client.Client
	Tenants *Tenants
	// Admin reads where a microVM runs (its node and address), which a user token is
	// not told.
	Admin Fireworks
	Cfg   Config

	access accessSecrets
}

func (r *SandboxReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var sb agentsv1.Sandbox
	if err := r.Kube.Get(ctx, req.NamespacedName, &sb); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	name := fireworksName("", sb.Name, string(sb.UID))
	fw, err := r.Tenants.For(ctx, sb.Namespace)
	if err != nil {
		return ctrl.Result{}, err
	}
	if !sb.DeletionTimestamp.IsZero() {
		if !controllerutil.ContainsFinalizer(&sb, Finalizer) {
			return ctrl.Result{}, nil
		}
		if err := fw.remove(ctx, name); err != nil {
			r.forgetIfRevoked(ctx, sb.Namespace, err)
			return ctrl.Result{}, err
		}
		controllerutil.RemoveFinalizer(&sb, Finalizer)
		r.access.forget(sb.UID)
		return ctrl.Result{}, client.IgnoreNotFound(r.Kube.Update(ctx, &sb))
	}
	if controllerutil.AddFinalizer(&sb, Finalizer) {
		if err := r.Kube.Update(ctx, &sb); err != nil {
			return ctrl.Result{}, err
		}
	}
	before := sb.Status.DeepCopy()
	res, err := r.reconcile(ctx, fw, &sb, name)
	if sb.Status.SandboxID == "" && errors.Is(err, errGone) {
		return ctrl.Result{}, nil
	}
	if !equalStatus(before, &sb.Status) {
		if uerr := r.Kube.Status().Update(ctx, &sb); uerr != nil && !apierrors.IsNotFound(uerr) {
			return ctrl.Result{}, errors.Join(err, uerr)
		}
	}
	if errors.Is(err, errGone) {
		err = nil
	}
	return res, err
}

// errGone: the object was deleted by the controller itself (an expired Sandbox whose
// policy is Delete); there is no status to write.
var errGone = errors.New("deleted")

// forgetIfRevoked drops a namespace's token the servers no longer take.
func (r *SandboxReconciler) forgetIfRevoked(ctx context.Context, ns string, err error) {
	if connect.CodeOf(err) == connect.CodeUnauthenticated {
		r.Tenants.Forget(ctx, ns)
	}
}

func (r *SandboxReconciler) reconcile(ctx context.Context, fwc Fireworks, sb *agentsv1.Sandbox, name string) (ctrl.Result, error) {
	gen := sb.Generation
	now := time.Now()
	if t := sb.Spec.ShutdownTime; t != nil && !now.Before(t.Time) {
		if err := fwc.remove(ctx, name); err != nil {
			return ctrl.Result{}, err
		}
		if p := sb.Spec.ShutdownPolicy; p != nil && *p == agentsv1.ShutdownPolicyDelete {
			if err := r.Kube.Delete(ctx, sb); err != nil && !apierrors.IsNotFound(err) {
				return ctrl.Result{}, err
			}
			return ctrl.Result{}, errGone
		}
		sb.Status = agentsv1.SandboxStatus{Conditions: sb.Status.Conditions}
		setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonExpired, "the sandbox reached its shutdownTime; its microVM was removed", gen)
		return ctrl.Result{}, nil
	}
	suspended := sb.Spec.OperatingMode == agentsv1.OperatingModeSuspended
	fw, err := fwc.get(ctx, name)
	if err != nil {
		r.forgetIfRevoked(ctx, sb.Namespace, err)
		setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, "Fireworks: "+err.Error(), gen)
		return ctrl.Result{RequeueAfter: pollError}, nil
	}
	if fw == nil {
		if suspended {
			// Never started: nothing to pause. It starts when the mode says Running.
			setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonSuspended, "suspended before it started", gen)
			setCond(&sb.Status.Conditions, agentsv1.ConditionSuspended, metav1.ConditionTrue, agentsv1.ReasonSuspendedTerminated, "no microVM runs", gen)
			return withShutdown(ctrl.Result{}, sb, now), nil
		}
		if sb.Status.SandboxID != "" {
			// It ran and is gone (removed by hand, or its node was lost for good): say so
			// rather than start a new one behind the user's back.
			sb.Status.NodeName, sb.Status.PodIPs = "", nil
			setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, "the microVM "+sb.Status.SandboxID+" no longer exists in Fireworks", gen)
			return withShutdown(ctrl.Result{RequeueAfter: pollSettled}, sb, now), nil
		}
		spec, err := specFromPod(ctx, sb.Spec.PodTemplate, objectRef{kind: "Sandbox", namespace: sb.Namespace, name: sb.Name, uid: string(sb.UID)}, kubeLookup{r.Kube, sb.Namespace, r.Cfg.OwnNamespace})
		if err != nil {
			setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reasonOf(err), err.Error(), gen)
			if errors.Is(err, errUnsupported) {
				return ctrl.Result{}, nil // until the object changes
			}
			return ctrl.Result{RequeueAfter: pollError}, nil // a Secret may appear
		}
		spec.Template = sb.Annotations[TemplateRefAnnotation]
		if tn := sb.Annotations[SandboxTemplateAnnotation]; tn != "" {
			// The template's network policy, or no microVM: never one looser than asked.
			var t extv1.SandboxTemplate
			if err := r.Kube.Get(ctx, client.ObjectKey{Namespace: sb.Namespace, Name: tn}, &t); err != nil {
				setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reasonOf(err), "SandboxTemplate "+tn+" (its network policy): "+err.Error(), gen)
				return ctrl.Result{RequeueAfter: pollError}, nil
			}
			if spec.Policy, err = egressPolicy(&t.Spec); err != nil {
				setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reasonOf(err), "SandboxTemplate "+tn+": "+err.Error(), gen)
				return ctrl.Result{}, nil // until the object changes
			}
		}
		if fw, err = fwc.create(ctx, name, spec); err != nil {
			setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, "Fireworks: "+err.Error(), gen)
			if connect.CodeOf(err) == connect.CodeInvalidArgument {
				return ctrl.Result{}, nil
			}
			return ctrl.Result{RequeueAfter: pollError}, nil
		}
	}
	status := fw.GetStatus()
	switch {
	case suspended && (status == "running" || status == "starting"):
		p, err := fwc.pause(ctx, fw.GetId())
		if err != nil {
			setCond(&sb.Status.Conditions, agentsv1.ConditionSuspended, metav1.ConditionFalse, agentsv1.ReasonSuspendedTerminating, "pause: "+err.Error(), gen)
			return ctrl.Result{RequeueAfter: pollError}, nil
		}
		fw = p
	case !suspended && status == "paused":
		p, err := fwc.resume(ctx, fw.GetId())
		if err != nil {
			setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, "resume: "+err.Error(), gen)
			return ctrl.Result{RequeueAfter: pollError}, nil
		}
		fw = p
	}
	if full, err := r.Admin.get(ctx, fw.GetId()); err == nil && full != nil {
		fw = full
	}
	res := r.observe(sb, fw, gen)
	if err := r.access.ensure(ctx, r.Kube, sb, fw, sb.Status.ServiceFQDN); err != nil {
		// The microVM runs; only its token is not handed out yet: say so, and try again.
		setCond(&sb.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, err.Error(), gen)
		res = ctrl.Result{RequeueAfter: pollError}
	}
	return withShutdown(res, sb, now), nil
}

// observe writes what the microVM is into the Sandbox's status.
func (r *SandboxReconciler) observe(sb *agentsv1.Sandbox, fw *pb.Sandbox, gen int64) ctrl.Result {
	st := &sb.Status
	st.SandboxID, st.NodeName = fw.GetId(), fw.GetNode()
	st.ServiceFQDN = fw.GetId() + "." + r.Cfg.IngressDomain
	st.PodIPs = nil
	if a := fw.GetNetwork().GetAddress(); a != "" {
		st.PodIPs = []string{a}
	}
	st.LabelSelector = ""
	if sb.Spec.OperatingMode != agentsv1.OperatingModeSuspended {
		setCond(&st.Conditions, agentsv1.ConditionSuspended, metav1.ConditionFalse, agentsv1.ReasonNotSuspended, "", gen)
	}
	switch fw.GetStatus() {
	case "running":
		setCond(&st.Conditions, agentsv1.ConditionReady, metav1.ConditionTrue, agentsv1.ReasonDependenciesReady, "the microVM runs on "+fw.GetNode(), gen)
		meta.RemoveStatusCondition(&st.Conditions, agentsv1.ConditionFinished)
		return ctrl.Result{RequeueAfter: pollSettled}
	case "paused":
		st.PodIPs = nil
		setCond(&st.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonSuspended, "paused: its memory and disk are saved", gen)
		setCond(&st.Conditions, agentsv1.ConditionSuspended, metav1.ConditionTrue, agentsv1.ReasonSuspendedTerminated, "the microVM is paused", gen)
		return ctrl.Result{RequeueAfter: pollSettled}
	case "exited", "failed":
		var reason, msg string
		switch {
		case fw.GetStatus() == "exited" && fw.GetExitCode() == 0:
			reason, msg = agentsv1.ReasonPodSucceeded, "the command exited 0"
		case fw.GetStatus() == "exited":
			reason, msg = agentsv1.ReasonPodFailed, fmt.Sprintf("the command exited %d", fw.GetExitCode())
		case fw.GetExitCode() != 0:
			reason, msg = agentsv1.ReasonPodFailed, fmt.Sprintf("the microVM failed (exit code %d): %s", fw.GetExitCode(), fw.GetReason())
		default: // it never ran its command to an end (a pull that failed, a VMM that died...)
			reason, msg = agentsv1.ReasonPodFailed, "the microVM failed: "+fw.GetReason()
		}
		st.PodIPs = nil
		setCond(&st.Conditions, agentsv1.ConditionFinished, metav1.ConditionTrue, reason, msg, gen)
		setCond(&st.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reason, msg, gen)
		if fw.GetSpec().GetRestart() != "never" {
			// Fireworks may start it again (its restart policy): the status follows.
			return ctrl.Result{RequeueAfter: pollSettled}
		}
		return ctrl.Result{}
	case "lost":
		setCond(&st.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonReconcilerError, "the microVM's node was lost: "+fw.GetReason(), gen)
		return ctrl.Result{RequeueAfter: pollSettled}
	default: // pending, starting
		setCond(&st.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, agentsv1.ReasonDependenciesNotReady, "the microVM is "+fw.GetStatus(), gen)
		return ctrl.Result{RequeueAfter: pollStarting}
	}
}

// withShutdown makes sure the object is looked at again when its shutdownTime comes.
func withShutdown(res ctrl.Result, sb *agentsv1.Sandbox, now time.Time) ctrl.Result {
	t := sb.Spec.ShutdownTime
	if t == nil {
		return res
	}
	until := t.Sub(now) + 100*time.Millisecond
	if res.RequeueAfter == 0 || until < res.RequeueAfter {
		res.RequeueAfter = until
	}
	return res
}

func setCond(conds *[]metav1.Condition, typ string, status metav1.ConditionStatus, reason, msg string, gen int64) {
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	meta.SetStatusCondition(conds, metav1.Condition{Type: typ, Status: status, Reason: reason, Message: msg, ObservedGeneration: gen})
}

// kubeLookup reads Secrets and ConfigMaps of one namespace for env.
type kubeLookup struct {
	c  client.Client
	ns string
	// own is the controller's namespace, whose Secrets (tokens, the cluster CA) no
	// sandbox may have.
	own string
}

func (l kubeLookup) guard() error {
	if l.own != "" && l.ns == l.own {
		return fmt.Errorf("%w: env from Secrets and ConfigMaps of %s, the Fireworks controller's own namespace (its tokens), is not read into sandboxes", errUnsupported, l.own)
	}
	return nil
}

func (l kubeLookup) secret(ctx context.Context, name string) (map[string][]byte, error) {
	if err := l.guard(); err != nil {
		return nil, err
	}
	var s corev1.Secret
	if err := l.c.Get(ctx, client.ObjectKey{Namespace: l.ns, Name: name}, &s); err != nil {
		return nil, err
	}
	return s.Data, nil
}

func (l kubeLookup) configMap(ctx context.Context, name string) (map[string]string, error) {
	if err := l.guard(); err != nil {
		return nil, err
	}
	var m corev1.ConfigMap
	if err := l.c.Get(ctx, client.ObjectKey{Namespace: l.ns, Name: name}, &m); err != nil {
		return nil, err
	}
	return m.Data, nil
}

func isNotFound(err error) bool { return apierrors.IsNotFound(err) }

// reasonOf is the condition reason of a failed reconcile: Unsupported for what the
// object asks that cannot be done (errUnsupported), ReconcilerError for the rest.
func reasonOf(err error) string {
	if errors.Is(err, errUnsupported) {
		return agentsv1.ReasonUnsupported
	}
	return agentsv1.ReasonReconcilerError
}
