package kubetest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

// NodePool is a simulated node pool: Node objects made as a cluster autoscaler's cloud
// would make them, Ready, their leases renewed as a kubelet would (without it the node
// lifecycle controller taints a node unreachable after 40 seconds). No kubelet runs:
// pods are scheduled onto these nodes, never started.
type NodePool struct {
	cs     kubernetes.Interface
	labels map[string]string

	mu    sync.Mutex
	names []string
	stop  context.CancelFunc
	done  chan struct{}
}

// NewNodePool starts renewing the leases of the nodes Add makes, with labels, until Stop.
func NewNodePool(cs kubernetes.Interface, labels map[string]string) *NodePool {
	ctx, cancel := context.WithCancel(context.Background())
	p := &NodePool{cs: cs, labels: labels, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			p.mu.Lock()
			names := slices.Clone(p.names)
			p.mu.Unlock()
			for _, n := range names {
				p.renew(ctx, n)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(5 * time.Second):
			}
		}
	}()
	return p
}

// Add makes node name, Ready, with 4 CPUs and 8 GiB.
func (p *NodePool) Add(ctx context.Context, name string) error {
	labels := map[string]string{corev1.LabelHostname: name}
	for k, v := range p.labels {
		labels[k] = v
	}
	if _, err := p.cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("make node %s: %w", name, err)
	}
	res := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("4"), corev1.ResourceMemory: resource.MustParse("8Gi"), corev1.ResourcePods: resource.MustParse("110")}
	// The node lifecycle controller writes to a new node too: retry on its conflicts.
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := p.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Status = corev1.NodeStatus{Capacity: res, Allocatable: res, Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue,
			Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}}
		_, err = p.cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	}); err != nil {
		return fmt.Errorf("make node %s Ready: %w", name, err)
	}
	p.renew(ctx, name)
	p.mu.Lock()
	p.names = append(p.names, name)
	p.mu.Unlock()
	return nil
}

// Stop stops renewing leases.
func (p *NodePool) Stop() {
	p.stop()
	<-p.done
}

// renew is a kubelet's heartbeat for node.
func (p *NodePool) renew(ctx context.Context, node string) {
	now := metav1.NowMicro()
	secs := int32(40)
	leases := p.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	l, err := leases.Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		_, _ = leases.Create(ctx, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: node},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &node, LeaseDurationSeconds: &secs, RenewTime: &now}}, metav1.CreateOptions{})
		return
	}
	l.Spec.RenewTime = &now
	_, _ = leases.Update(ctx, l, metav1.UpdateOptions{}) // a conflict: the next beat renews it
}
