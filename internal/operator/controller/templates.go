package controller

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
	extv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/extensions/v1beta1"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// SandboxTemplateReconciler registers every SandboxTemplate as a Fireworks template
// (image, shape and environment), so that it is listed beside the others and E2B's API
// can start it by name too.
type SandboxTemplateReconciler struct {
	Kube    client.Client
	Tenants *Tenants
	Cfg     Config
}

// templateSpec is the Fireworks spec a SandboxTemplate's sandboxes start with.
func templateSpec(ctx context.Context, kube client.Client, cfg Config, t *extv1.SandboxTemplate) (*pb.SandboxSpec, error) {
	return specFromPod(ctx, t.Spec.PodTemplate, objectRef{kind: "SandboxTemplate", namespace: t.Namespace, name: t.Name, uid: string(t.UID)}, kubeLookup{kube, t.Namespace, cfg.OwnNamespace})
}

func (r *SandboxTemplateReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var t extv1.SandboxTemplate
	if err := r.Kube.Get(ctx, req.NamespacedName, &t); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	name := fireworksName("", t.Name, string(t.UID))
	fw, err := r.Tenants.For(ctx, t.Namespace)
	if err != nil {
		return ctrl.Result{}, err
	}
	if !t.DeletionTimestamp.IsZero() {
		if !controllerutil.ContainsFinalizer(&t, Finalizer) {
			return ctrl.Result{}, nil
		}
		if err := fw.deleteTemplate(ctx, name); err != nil {
			return ctrl.Result{}, err
		}
		controllerutil.RemoveFinalizer(&t, Finalizer)
		return ctrl.Result{}, client.IgnoreNotFound(r.Kube.Update(ctx, &t))
	}
	if controllerutil.AddFinalizer(&t, Finalizer) {
		if err := r.Kube.Update(ctx, &t); err != nil {
			return ctrl.Result{}, err
		}
	}
	before := t.Status.DeepCopy()
	res := ctrl.Result{}
	spec, err := templateSpec(ctx, r.Kube, r.Cfg, &t)
	if err == nil {
		_, err = fw.putTemplate(ctx, &pb.NamedTemplate{Name: name, Image: spec.GetImage(), Vcpus: spec.GetVcpus(), MemoryMib: spec.GetMemoryMib(), Env: spec.GetEnv()})
	}
	if err != nil {
		setCond(&t.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reasonOf(err), err.Error(), t.Generation)
		if !errors.Is(err, errUnsupported) {
			res.RequeueAfter = pollError
		}
	} else {
		t.Status.Template = name
		setCond(&t.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionTrue, "TemplateRegistered", "Fireworks template "+name+" ("+spec.GetImage()+")", t.Generation)
	}
	if !equalTemplateStatus(before, &t.Status) {
		if err := r.Kube.Status().Update(ctx, &t); err != nil && !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
	}
	return res, nil
}

// poolKey is what a Fireworks warm pool is kept for: an image and a VM shape. Several
// SandboxWarmPools of templates with the same image and shape share one Fireworks pool,
// whose size is the sum of theirs.
type poolKey struct {
	image       string
	vcpus, mem  int32
	templateRef string // one of the templates, for messages
}

// SandboxWarmPoolReconciler keeps Fireworks warm pools as the SandboxWarmPools say.
type SandboxWarmPoolReconciler struct {
	Kube client.Client
	FW   Fireworks
	// Tenants pull a pool's image as its namespace first: the pool is set with the admin
	// token, whose pulls reach what the namespace's may not (private registries, the
	// images an admin pulled with credentials).
	Tenants *Tenants
	Cfg     Config

	pullMu sync.Mutex
	pulled map[string]pullCheck // by namespace and image

	// lastKey is each SandboxWarmPool's last resolved pool (by UID): while one cannot be
	// read, the pool of its image keeps its shape, and no other image's is held back.
	lastKey sync.Map
}

// pullCheck is a namespace's pull of an image: a success is kept, a refusal for a while
// (sync looks at every namespace's pools on each reconcile).
type pullCheck struct {
	err error
	at  time.Time
}

// pullFailureTTL is how long a refused pull is believed before it is tried again.
const pullFailureTTL = time.Minute

func (r *SandboxWarmPoolReconciler) canPull(ctx context.Context, ns, img string) error {
	if r.Tenants == nil {
		return nil
	}
	k := ns + "\x00" + img
	r.pullMu.Lock()
	c, ok := r.pulled[k]
	r.pullMu.Unlock()
	if ok && (c.err == nil || time.Since(c.at) < pullFailureTTL) {
		return c.err
	}
	fwc, err := r.Tenants.For(ctx, ns)
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	err = fwc.pull(pctx, img)
	r.pullMu.Lock()
	if r.pulled == nil {
		r.pulled = map[string]pullCheck{}
	}
	r.pulled[k] = pullCheck{err: err, at: time.Now()}
	r.pullMu.Unlock()
	return err
}

// SelectorLabel marks what a warm pool's claims made (the scale subresource's selector).
const SelectorLabel = "agents.x-k8s.io/warm-pool-sandbox"

func (r *SandboxWarmPoolReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var wp extv1.SandboxWarmPool
	if err := r.Kube.Get(ctx, req.NamespacedName, &wp); err != nil {
		if apierrors.IsNotFound(err) {
			// Gone before its finalizer was added: the sum is what the others ask.
			_, _, err := r.sync(ctx, "")
			return ctrl.Result{}, err
		}
		return ctrl.Result{}, err
	}
	if !wp.DeletionTimestamp.IsZero() {
		if !controllerutil.ContainsFinalizer(&wp, Finalizer) {
			return ctrl.Result{}, nil
		}
		if _, _, err := r.sync(ctx, wp.Status.Image); err != nil {
			return ctrl.Result{}, err
		}
		controllerutil.RemoveFinalizer(&wp, Finalizer)
		return ctrl.Result{}, client.IgnoreNotFound(r.Kube.Update(ctx, &wp))
	}
	if controllerutil.AddFinalizer(&wp, Finalizer) {
		if err := r.Kube.Update(ctx, &wp); err != nil {
			return ctrl.Result{}, err
		}
	}
	before := wp.Status.DeepCopy()
	wp.Status.ObservedGeneration = wp.Generation
	wp.Status.Replicas = replicasOf(&wp)
	wp.Status.Selector = SelectorLabel + "=" + wp.Name
	res := ctrl.Result{RequeueAfter: pollSettled}
	key, err := r.keyOf(ctx, &wp)
	var conflict string
	if err == nil {
		// A template whose image changed leaves the old image's pool to whoever else
		// asks for it, or to nobody.
		kept, failed, serr := r.sync(ctx, wp.Status.Image)
		wp.Status.Image = key.image
		switch {
		case serr != nil:
			// It may name another image (the one this pool asked for before): the log
			// has it, not the status.
			slog.Error("set the Fireworks warm pools", "err", serr)
			err = fmt.Errorf("the Fireworks warm pool of %s could not be set (the controller's log says why)", key.image)
		case failed[key.image] != nil && errors.Is(failed[key.image], errUnsupported):
			err = failed[key.image]
		case failed[key.image] != nil:
			slog.Error("set the Fireworks warm pool", "image", key.image, "err", failed[key.image])
			err = fmt.Errorf("the Fireworks warm pool of %s could not be set (the controller's log says why)", key.image)
		default:
			if k, ok := kept[key.image]; ok && (k.vcpus != key.vcpus || k.mem != key.mem) {
				// Another namespace's template is not named to this one.
				whose := "another namespace's template"
				if ns, name, _ := strings.Cut(k.templateRef, "/"); ns == wp.Namespace {
					whose = "SandboxTemplate " + name
				}
				conflict = fmt.Sprintf("the Fireworks warm pool of %s keeps the shape of %s (%d vCPUs, %d MiB): one warm pool per image; this template asks %d vCPUs, %d MiB", key.image, whose, k.vcpus, k.mem, key.vcpus, key.mem)
			}
		}
	}
	switch {
	case conflict != "":
		wp.Status.ReadyReplicas = 0
		setCond(&wp.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, "ShapeConflict", conflict, wp.Generation)
	case err != nil:
		wp.Status.ReadyReplicas = 0
		setCond(&wp.Status.Conditions, agentsv1.ConditionReady, metav1.ConditionFalse, reasonOf(err), err.Error(), wp.Generation)
		res.RequeueAfter = pollError
	default:
		ready, perr := r.ready(ctx, key)
		if perr != nil {
			return ctrl.Result{}, perr
		}
		wp.Status.ReadyReplicas = min(ready, wp.Status.Replicas)
		status, reason := metav1.ConditionTrue, "PoolFilled"
		if wp.Status.ReadyReplicas < wp.Status.Replicas {
			status, reason = metav1.ConditionFalse, "PoolFilling"
			res.RequeueAfter = pollStarting
		}
		setCond(&wp.Status.Conditions, agentsv1.ConditionReady, status, reason, fmt.Sprintf("%d of %d warm microVMs of %s are booted and waiting", wp.Status.ReadyReplicas, wp.Status.Replicas, key.image), wp.Generation)
	}
	if !equalPoolStatus(before, &wp.Status) {
		if err := r.Kube.Status().Update(ctx, &wp); err != nil && !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
	}
	return res, nil
}

func replicasOf(wp *extv1.SandboxWarmPool) int32 {
	if wp.Spec.Replicas == nil {
		return 1
	}
	return *wp.Spec.Replicas
}

// keyOf resolves a warm pool's template to the Fireworks pool it fills.
func (r *SandboxWarmPoolReconciler) keyOf(ctx context.Context, wp *extv1.SandboxWarmPool) (poolKey, error) {
	var t extv1.SandboxTemplate
	if err := r.Kube.Get(ctx, client.ObjectKey{Namespace: wp.Namespace, Name: wp.Spec.TemplateRef.Name}, &t); err != nil {
		return poolKey{}, fmt.Errorf("SandboxTemplate %s: %w", wp.Spec.TemplateRef.Name, err)
	}
	spec, err := templateSpec(ctx, r.Kube, r.Cfg, &t)
	if err != nil {
		return poolKey{}, fmt.Errorf("SandboxTemplate %s: %w", t.Name, err)
	}
	// The pool is set with the controller's admin token, for a template any namespace
	// user writes: only what a user's own sandbox could start from is pooled (a registry
	// image, not a path on the nodes), and within the sizes the servers hold a user to.
	img := spec.GetImage()
	if strings.HasPrefix(img, state.OCIPrefix) || strings.HasPrefix(img, state.DockerArchivePrefix) {
		return poolKey{}, fmt.Errorf("%w: SandboxTemplate %s: image %q is a path on the nodes; a warm pool is of a registry image", errUnsupported, t.Name, img)
	}
	if err := (state.SandboxSpec{Image: img}).CheckSizes(); err != nil {
		return poolKey{}, fmt.Errorf("%w: SandboxTemplate %s: %w", errUnsupported, t.Name, err)
	}
	if err := r.canPull(ctx, wp.Namespace, img); err != nil {
		return poolKey{}, fmt.Errorf("SandboxTemplate %s: its image, pulled as namespace %s: %w", t.Name, wp.Namespace, err)
	}
	return poolKey{image: img, vcpus: spec.GetVcpus(), mem: spec.GetMemoryMib(), templateRef: wp.Namespace + "/" + t.Name}, nil
}

// PoolManager is how the controller's Fireworks warm pools say they are its (and are
// pulled as users' pulls are): it changes and removes only those, never an operator's.
const PoolManager = "agent-sandbox"

// sync sets every Fireworks pool the SandboxWarmPools ask for to the sum of their
// replicas (at most state.MaxPoolSize), and removes the pool of released (an image a
// warm pool asked for before) when none asks for it any more. It looks at all of them
// each time, since pools of one image are shared. A pool it does not manage (an
// operator's `fireworks pool set`) it leaves as it is.
//
// It returns, per image, the key whose shape the pool keeps (the shape the pool has, while
// a SandboxWarmPool asks for it; else the oldest asking one's: one Fireworks pool per
// image) and what failed for that image: one
// image's failure stops no other's. The error is what failed for released (a
// deletion waits only on its own image).
func (r *SandboxWarmPoolReconciler) sync(ctx context.Context, released string) (map[string]poolKey, map[string]error, error) {
	var all extv1.SandboxWarmPoolList
	if err := r.Kube.List(ctx, &all); err != nil {
		return nil, nil, err
	}
	have, err := r.FW.pools(ctx)
	if err != nil {
		return nil, nil, err
	}
	haveOf := func(image string) *pb.Pool {
		if i := slices.IndexFunc(have, func(h *pb.Pool) bool { return h.GetImage() == image }); i >= 0 {
			return have[i]
		}
		return nil
	}
	type asking struct {
		wp  *extv1.SandboxWarmPool
		key poolKey
	}
	var asks []asking
	unknown := map[string]bool{} // images of pools not read this time (by what they were)
	for i := range all.Items {
		wp := &all.Items[i]
		if !wp.DeletionTimestamp.IsZero() {
			r.lastKey.Delete(wp.UID)
			continue
		}
		key, err := r.keyOf(ctx, wp)
		if err != nil {
			if k, ok := r.lastKey.Load(wp.UID); ok {
				unknown[k.(poolKey).image] = true
			}
			continue // its own reconcile reports it
		}
		r.lastKey.Store(wp.UID, key)
		asks = append(asks, asking{wp, key})
	}
	// The shape is kept by the pool that has it: a pool asking for some (one scaled to
	// zero asks for nothing) whose shape the Fireworks pool already has comes first, then
	// the oldest. A newcomer, of any namespace, never takes an image's pool from under
	// the SandboxWarmPools it serves; it gets ShapeConflict.
	holds := func(a asking) bool {
		h := haveOf(a.key.image)
		return h != nil && h.GetManagedBy() == PoolManager && h.GetVcpus() == a.key.vcpus && h.GetMemoryMib() == a.key.mem
	}
	slices.SortStableFunc(asks, func(a, b asking) int {
		if c := cmp.Compare(min(replicasOf(b.wp), 1), min(replicasOf(a.wp), 1)); c != 0 {
			return c
		}
		if ha, hb := holds(a), holds(b); ha != hb {
			if ha {
				return -1
			}
			return 1
		}
		if c := a.wp.CreationTimestamp.Compare(b.wp.CreationTimestamp.Time); c != 0 {
			return c
		}
		return cmp.Compare(a.wp.Namespace+"/"+a.wp.Name, b.wp.Namespace+"/"+b.wp.Name)
	})
	want := map[string]*pb.Pool{}
	kept := map[string]poolKey{}
	for _, a := range asks {
		key := a.key
		p := want[key.image]
		if p == nil {
			p = &pb.Pool{Image: key.image, Vcpus: key.vcpus, MemoryMib: key.mem, ManagedBy: PoolManager}
			want[key.image] = p
			kept[key.image] = key
		}
		if p.GetVcpus() != key.vcpus || p.GetMemoryMib() != key.mem {
			// One Fireworks pool per image: the first shape keeps it.
			continue
		}
		p.Size = min(p.Size+max(replicasOf(a.wp), 0), state.MaxPoolSize)
	}
	failed := map[string]error{}
	for _, p := range want {
		if h := haveOf(p.GetImage()); h != nil {
			if h.GetManagedBy() != PoolManager {
				failed[p.GetImage()] = fmt.Errorf("%w: the warm pool of %s is the operator's: its warm microVMs serve this template's claims as they are, and no SandboxWarmPool changes it", errUnsupported, p.GetImage())
				continue
			}
			if h.GetSize() == p.GetSize() && h.GetVcpus() == p.GetVcpus() && h.GetMemoryMib() == p.GetMemoryMib() {
				continue
			}
			if unknown[p.GetImage()] && (h.GetVcpus() != p.GetVcpus() || h.GetMemoryMib() != p.GetMemoryMib()) {
				// The pool that holds the shape may be among those not read this time
				// (a pull check that failed for a moment): no change of shape on that.
				continue
			}
		}
		if err := r.FW.setPool(ctx, p); err != nil {
			failed[p.GetImage()] = err
		}
	}
	if _, ok := want[released]; released != "" && !ok && !unknown[released] {
		if h := haveOf(released); h != nil && h.GetManagedBy() == PoolManager {
			return kept, failed, r.FW.deletePool(ctx, released)
		}
	}
	return kept, failed, nil
}

// ready counts the warm microVMs of key's pool booted and waiting on all nodes.
func (r *SandboxWarmPoolReconciler) ready(ctx context.Context, key poolKey) (int32, error) {
	pools, err := r.FW.pools(ctx)
	if err != nil {
		return 0, err
	}
	var n int32
	for _, p := range pools {
		if p.GetImage() != key.image {
			continue
		}
		for _, node := range p.GetNodes() {
			n += node.GetReady()
		}
	}
	return n, nil
}

func poolsOfTemplate(ctx context.Context, kube client.Client, ns, template string) ([]ctrl.Request, error) {
	var all extv1.SandboxWarmPoolList
	if err := kube.List(ctx, &all, client.InNamespace(ns)); err != nil {
		return nil, err
	}
	var out []ctrl.Request
	for _, wp := range all.Items {
		if strings.EqualFold(wp.Spec.TemplateRef.Name, template) {
			out = append(out, ctrl.Request{NamespacedName: client.ObjectKeyFromObject(&wp)})
		}
	}
	return out, nil
}
