package nodescale

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// The annotations Kubernetes' cluster-autoscaler reads, and the one that says Fireworks
// set it (an operator's own is never removed).
const (
	ScaleDownDisabled = "cluster-autoscaler.kubernetes.io/scale-down-disabled"
	setByAnnotation   = "fireworks.dev/scale-down-disabled-by"
	setBy             = "fireworks-nodescale"
	// PlaceholderComponent labels the placeholder pods.
	PlaceholderComponent = "capacity-placeholder"
	// RegisteredLabel marks the pool's nodes whose agent has registered: a placeholder
	// fits only a node without it, so it never takes a node the cluster has (not even
	// one that came while it waited).
	RegisteredLabel = "fireworks.dev/registered"
)

// Kubernetes is the provider of a Kubernetes node pool scaled by cluster-autoscaler (or
// any autoscaler that adds a node for a pod that fits none): a node on order is a pending
// placeholder pod that fits only a new node of the pool, and the nodes Fireworks uses
// carry cluster-autoscaler's scale-down-disabled annotation (it sees only the agent's
// DaemonSet pod on them, and would take a node full of microVMs for an empty one).
type Kubernetes struct {
	Client kubernetes.Interface
	// Namespace holds the placeholders (the servers' own).
	Namespace string
	// NodeSelector picks the pool's nodes (the agents' DaemonSet's); Tolerations let a
	// placeholder onto them.
	NodeSelector map[string]string
	Tolerations  []corev1.Toleration
	// Image runs in a placeholder (sleep); the agents' image is on every pool node.
	Image string
	// CPU and Memory are a placeholder's requests: small enough to fit a new node beside
	// its DaemonSets, so the node that comes is one like the others.
	CPU, Memory       resource.Quantity
	PriorityClassName string
}

func (k *Kubernetes) Name() string { return "kubernetes" }

var placeholderLabels = map[string]string{"app.kubernetes.io/name": "fireworks", "app.kubernetes.io/component": PlaceholderComponent}

// poolNodes are the names of the pool's nodes, sorted.
func (k *Kubernetes) poolNodes(ctx context.Context) ([]corev1.Node, error) {
	list, err := k.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(k.NodeSelector).String()})
	if err != nil {
		return nil, fmt.Errorf("list the pool's nodes: %w", err)
	}
	sort.Slice(list.Items, func(i, j int) bool { return list.Items[i].Name < list.Items[j].Name })
	return list.Items, nil
}

// Request keeps n placeholders on order. One bound to a node whose agent has not
// registered yet is that node arriving (it holds the node until then); one bound to a
// registered node is done and deleted.
// ClientConfig is cfg for the servers' client of the API server (the autoscaler's
// calls, the joins' TokenReviews): client-go's default of 5 requests a second would make
// a pass that marks a few nodes and orders a node take seconds, which users wait.
func ClientConfig(cfg *rest.Config) *rest.Config {
	c := rest.CopyConfig(cfg)
	c.QPS, c.Burst = 50, 100
	return c
}

func (k *Kubernetes) Request(ctx context.Context, n int, registered []string) error {
	pods, err := k.Client.CoreV1().Pods(k.Namespace).List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(placeholderLabels).String()})
	if err != nil {
		return fmt.Errorf("list placeholders: %w", err)
	}
	var errs []error
	// Label the registered nodes first: from then on no placeholder fits them.
	nodes, err := k.poolNodes(ctx)
	if err != nil {
		return err
	}
	for _, nd := range nodes {
		if slices.Contains(registered, nd.Name) && nd.Labels[RegisteredLabel] != "true" {
			errs = append(errs, k.patchMeta(ctx, nd.Name, "labels", map[string]any{RegisteredLabel: "true"}))
		}
	}
	var pending []corev1.Pod
	onOrder := 0
	for _, p := range pods.Items {
		switch {
		case p.DeletionTimestamp != nil:
		case p.Spec.NodeName == "":
			pending = append(pending, p)
			onOrder++
		case slices.Contains(registered, p.Spec.NodeName):
			errs = append(errs, k.deletePod(ctx, p.Name))
		default:
			onOrder++ // its node came; its agent is on the way
		}
	}
	// Newest first: those go when fewer are needed.
	sort.Slice(pending, func(i, j int) bool { return pending[j].CreationTimestamp.Before(&pending[i].CreationTimestamp) })
	for i := 0; onOrder > n && i < len(pending); i++ {
		errs = append(errs, k.deletePod(ctx, pending[i].Name))
		onOrder--
	}
	if onOrder < n {
		for ; onOrder < n; onOrder++ {
			if _, err := k.Client.CoreV1().Pods(k.Namespace).Create(ctx, k.placeholder(), metav1.CreateOptions{}); err != nil {
				errs = append(errs, fmt.Errorf("create a placeholder: %w", err))
				break
			}
		}
	}
	return errors.Join(errs...)
}

func (k *Kubernetes) deletePod(ctx context.Context, name string) error {
	zero := int64(0)
	err := k.Client.CoreV1().Pods(k.Namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete placeholder %s: %w", name, err)
	}
	return nil
}

// placeholder is a pod that fits only a node of the pool whose agent has not registered
// (required node affinity), one per node (required anti-affinity among placeholders):
// a cluster autoscaler adds a node for each.
func (k *Kubernetes) placeholder() *corev1.Pod {
	no, yes := false, true
	user := int64(65532)
	zero := int64(0)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "fireworks-capacity-", Namespace: k.Namespace, Labels: placeholderLabels,
			Annotations: map[string]string{"fireworks.dev/why": "a Fireworks node on order: sandboxes wait for room (deleted once the node's agent joins)"}},
		Spec: corev1.PodSpec{
			NodeSelector:                  k.NodeSelector,
			Tolerations:                   k.Tolerations,
			PriorityClassName:             k.PriorityClassName,
			AutomountServiceAccountToken:  &no,
			TerminationGracePeriodSeconds: &zero,
			SecurityContext:               &corev1.PodSecurityContext{RunAsNonRoot: &yes, RunAsUser: &user, SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
			Affinity: &corev1.Affinity{
				NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
					NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{{
						Key: RegisteredLabel, Operator: corev1.NodeSelectorOpDoesNotExist}}}}}},
				PodAntiAffinity: &corev1.PodAntiAffinity{RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
					TopologyKey: corev1.LabelHostname, LabelSelector: &metav1.LabelSelector{MatchLabels: placeholderLabels}}}},
			},
			Containers: []corev1.Container{{
				Name: "placeholder", Image: k.Image, Command: []string{"sleep", "infinity"},
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: k.CPU, corev1.ResourceMemory: k.Memory}},
				SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes,
					Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}},
			}},
		},
	}
	return p
}

// Keep sets the scale-down-disabled annotation on the pool's nodes in keep and removes
// the one Fireworks set from the others.
func (k *Kubernetes) Keep(ctx context.Context, keep []string) error {
	nodes, err := k.poolNodes(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range nodes {
		want := slices.Contains(keep, n.Name)
		has := n.Annotations[ScaleDownDisabled] == "true"
		ours := n.Annotations[setByAnnotation] == setBy
		switch {
		case want && !has:
			errs = append(errs, k.patchMeta(ctx, n.Name, "annotations", map[string]any{ScaleDownDisabled: "true", setByAnnotation: setBy}))
		case !want && has && ours:
			errs = append(errs, k.patchMeta(ctx, n.Name, "annotations", map[string]any{ScaleDownDisabled: nil, setByAnnotation: nil}))
		}
	}
	return errors.Join(errs...)
}

// Release lets the platform take node: the annotation Fireworks set goes.
func (k *Kubernetes) Release(ctx context.Context, node string) error {
	n, err := k.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil // gone already
	}
	if err != nil {
		return fmt.Errorf("node %s: %w", node, err)
	}
	if n.Annotations[setByAnnotation] != setBy {
		return nil
	}
	return k.patchMeta(ctx, node, "annotations", map[string]any{ScaleDownDisabled: nil, setByAnnotation: nil})
}

// patchMeta merges m into node's labels or annotations (a nil value removes the key).
func (k *Kubernetes) patchMeta(ctx context.Context, node, field string, m map[string]any) error {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{field: m}})
	if err != nil {
		return err
	}
	if _, err := k.Client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("patch the %s of node %s: %w", field, node, err)
	}
	return nil
}
