package nodescale

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
)

// The node autoscaler and its Kubernetes provider against the real API server, with a
// simulated node pool (Node objects made here as a cluster autoscaler would make them,
// their leases renewed as a kubelet would) and the real replicated state: sandboxes that
// wait for room become placeholder pods that kube-scheduler finds fit no node; a new node
// takes one (one per node); its agent registering ends it; when nothing waits nothing
// is on order; the nodes in use carry cluster-autoscaler's scale-down-disabled
// annotation; an idle node is drained, parked and released (its annotation removed);
// and no placeholder is made twice for the same need. The autoscaler's clock is the
// test's, so its rules (wait before asking, idle time, delay after a scale-up) are
// checked without waiting for them.
func TestNodeAutoscalerOnKubernetes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	// The autoscaler acts with the chart's rights: the servers' ServiceAccount as the
	// chart binds it (a Role in the placeholder namespace, a ClusterRole on nodes), under
	// the chart's admission policy on what it may change on a node.
	const chartNS, ns = "fireworks", "fireworks-capacity"
	_, cs, sa, kinds := kubetest.ChartTest(ctx, t, "../../..", chartNS, "server",
		"--set", "autoscaler.enabled=true", "--show-only", "templates/server.yaml")
	// Every kind of rights object is in the servers' template with the autoscaler on.
	if len(kinds) != 8 {
		t.Fatalf("applied the chart's %v, want all 8 kinds of rights objects", kinds)
	}
	pool := map[string]string{"fireworks.dev/pool": "nodescale-test"}
	// Pods need the namespace's default service account, which a controller makes.
	testutil.Eventually(t, time.Minute, "the namespace's default service account", func() (bool, string) {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
		_ = cs.CoreV1().Namespaces().Delete(ctx, chartNS, metav1.DeleteOptions{})
		for _, n := range []string{"pool-a", "pool-b", "pool-c", "not-fireworks"} {
			_ = cs.CoreV1().Nodes().Delete(ctx, n, metav1.DeleteOptions{})
		}
	})
	// Every placeholder seen (the test lists them after each pass, and only a pass makes
	// them): no need is ordered twice.
	made := map[string]bool{}
	// The simulated pool: nodes with the pool's label, Ready, their leases renewed.
	nodes := kubetest.NewNodePool(cs, pool)
	defer nodes.Stop()
	addNode := func(name string) {
		t.Helper()
		if err := nodes.Add(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	addNode("pool-a")

	// The cluster's state (a real Raft store of one server) with pool-a's agent in it.
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	store, err := state.Open(ctx, state.Options{Dir: t.TempDir(), NodeID: "s0", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	t0 := time.Now().UTC()
	register := func(name string) {
		t.Helper()
		if _, err := store.RegisterNode(ctx, state.Node{ID: name, Address: name + ":7768", Capacity: state.Resources{VCPUs: 2, MemoryMiB: 2048, DiskMiB: 20000}, UpdatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	register("pool-a")
	sandbox := func(id string, mem int, on string) {
		t.Helper()
		sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "busybox", VCPUs: 1, MemoryMiB: mem}, Status: state.StatusPending, CreatedAt: t0,
			AccessToken: "at-" + id, Events: []state.Event{{Time: t0, Status: state.StatusPending, Reason: "accepted"}}}
		var err error
		if on != "" {
			err = store.CreateAndPlace(ctx, sb, state.Quota{}, on, scheduler.Config{})
		} else {
			err = store.CreateSandbox(ctx, sb)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	end := func(id string) {
		t.Helper()
		failed := state.StatusFailed
		reason := "ended by the test"
		if _, err := store.UpdateSandbox(ctx, id, state.Update{Status: &failed, Reason: reason, Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	sandbox("busy", 1024, "pool-a")
	sandbox("wait-1", 1536, "") // neither fits beside busy on pool-a, nor two on one node
	sandbox("wait-2", 1536, "")

	provider := &Kubernetes{Client: sa, Namespace: ns, NodeSelector: pool, Image: "fireworks.test/pause:1",
		CPU: resource.MustParse("100m"), Memory: resource.MustParse("64Mi")}
	cfg := Config{Min: 1, Max: 3, ScaleUpAfter: 10 * time.Second, IdleAfter: time.Minute, ScaleDownDelay: 2 * time.Minute}
	as, err := New(cfg, scheduler.Config{}, provider, store, log)
	if err != nil {
		t.Fatal(err)
	}
	placeholders := func() (pending, bound map[string]string) {
		t.Helper()
		list, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + PlaceholderComponent})
		if err != nil {
			t.Fatal(err)
		}
		pending, bound = map[string]string{}, map[string]string{}
		for _, p := range list.Items {
			made[p.Name] = true
			if p.DeletionTimestamp != nil {
				continue
			}
			if p.Spec.NodeName == "" {
				reason := ""
				for _, c := range p.Status.Conditions {
					if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse {
						reason = c.Reason
					}
				}
				pending[p.Name] = reason
			} else {
				bound[p.Name] = p.Spec.NodeName
			}
		}
		return pending, bound
	}

	pass := func(at time.Duration) Plan {
		t.Helper()
		if err := as.Pass(ctx, t0.Add(at)); err != nil {
			t.Fatalf("pass at +%s: %v", at, err)
		}
		placeholders()
		return as.Status()
	}
	// Waiting less than ScaleUpAfter: nothing on order.
	if p := pass(5 * time.Second); p.Want != 0 {
		t.Fatalf("ordered before ScaleUpAfter: %+v", p)
	}
	// Then two nodes (two 1.5 GiB sandboxes, nodes of 2 GiB), as two placeholders
	// kube-scheduler finds fit no node (what a cluster autoscaler acts on).
	asked := time.Now()
	if p := pass(15 * time.Second); p.Want != 2 || p.Waiting != 2 {
		t.Fatalf("want 2 nodes: %+v", p)
	}
	testutil.Eventually(t, time.Minute, "2 placeholders Unschedulable", func() (bool, string) {
		pending, bound := placeholders()
		n := 0
		for _, r := range pending {
			if r == corev1.PodReasonUnschedulable {
				n++
			}
		}
		return n == 2 && len(bound) == 0, fmt.Sprint(pending, bound)
	})
	t.Logf("scale-up: 2 placeholders unschedulable %s after the pass that ordered them", time.Since(asked).Round(time.Millisecond))
	// pool-a is in use: cluster-autoscaler must not take it.
	if a := nodeAnnotation(t, cs, "pool-a"); a != "true" {
		t.Fatalf("pool-a's %s = %q", ScaleDownDisabled, a)
	}

	// The cluster autoscaler's part: a node comes; one placeholder (only one: they avoid
	// each other) lands on it.
	came := time.Now()
	addNode("pool-b")
	testutil.Eventually(t, time.Minute, "a placeholder on pool-b", func() (bool, string) {
		pending, bound := placeholders()
		return len(bound) == 1 && slices.Contains(mapValues(bound), "pool-b") && len(pending) == 1, fmt.Sprint(pending, bound)
	})
	t.Logf("scale-up: a placeholder on the new node %s after it came", time.Since(came).Round(time.Millisecond))
	// Its agent has not registered yet: it is still on order, and nothing more is made.
	if p := pass(20 * time.Second); p.Want != 2 {
		t.Fatalf("after pool-b came: %+v", p)
	}
	if pending, bound := placeholders(); len(pending)+len(bound) != 2 {
		t.Fatalf("placeholders after pool-b came: %v %v", pending, bound)
	}
	// The agent registers and takes a waiting sandbox: one node on order, pool-b's
	// placeholder gone, pool-b protected.
	register("pool-b")
	if _, err := store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: "wait-1", NodeID: "pool-b"}}, scheduler.Config{}, time.Now()); err != nil {
		t.Fatal(err)
	}
	if p := pass(25 * time.Second); p.Want != 1 {
		t.Fatalf("after pool-b registered: %+v", p)
	}
	testutil.Eventually(t, time.Minute, "pool-b's placeholder gone", func() (bool, string) {
		pending, bound := placeholders()
		return len(bound) == 0 && len(pending) == 1, fmt.Sprint(pending, bound)
	})
	if a := nodeAnnotation(t, cs, "pool-b"); a != "true" {
		t.Fatalf("pool-b's %s = %q", ScaleDownDisabled, a)
	}
	// The other waiting sandbox is removed: nothing on order.
	end("wait-2")
	if p := pass(30 * time.Second); p.Want != 0 {
		t.Fatalf("nothing waits: %+v", p)
	}
	testutil.Eventually(t, time.Minute, "no placeholder left", func() (bool, string) {
		pending, bound := placeholders()
		return len(pending)+len(bound) == 0, fmt.Sprint(pending, bound)
	})

	// pool-b's sandbox ends: idle from +40s. Not given back before IdleAfter, nor within
	// ScaleDownDelay of the last scale-up (+25s).
	end("wait-1")
	pass(40 * time.Second)
	if p := pass(40*time.Second + cfg.IdleAfter); p.Drain != "" {
		t.Fatalf("drained within ScaleDownDelay of a scale-up: %+v", p)
	}
	p := pass(25*time.Second + cfg.ScaleDownDelay)
	if p.Drain != "pool-b" {
		t.Fatalf("idle pool-b not given back: %+v", p)
	}
	n := findNode(t, store, "pool-b")
	if !n.Parked || !n.Draining || !n.Cordoned {
		t.Fatalf("pool-b being given back: %+v", n)
	}
	// Drained (nothing on it): released; pool-a stays protected, with its sandbox.
	p = pass(30*time.Second + cfg.ScaleDownDelay)
	if !slices.Equal(p.Release, []string{"pool-b"}) {
		t.Fatalf("pool-b not released: %+v", p)
	}
	if a := nodeAnnotation(t, cs, "pool-b"); a != "" {
		t.Fatalf("released pool-b still has %s = %q", ScaleDownDisabled, a)
	}
	if a := nodeAnnotation(t, cs, "pool-a"); a != "true" {
		t.Fatalf("pool-a lost its %s", ScaleDownDisabled)
	}
	if n := findNode(t, store, "pool-b"); n.Draining || !n.Parked {
		t.Fatalf("pool-b after release: %+v", n)
	}
	// pool-a is the last (Min 1) and busy: nothing more goes, however long.
	if p := pass(time.Hour); p.Drain != "" || len(p.Release) != 0 {
		t.Fatalf("past Min: %+v", p)
	}
	// A sandbox waits again: the parked node is taken back before anything is ordered.
	sandbox("wait-3", 1536, "")
	p = pass(time.Hour + time.Minute)
	if !slices.Equal(p.Unpark, []string{"pool-b"}) || p.Want != 0 {
		t.Fatalf("parked pool-b not taken back first: %+v", p)
	}
	if n := findNode(t, store, "pool-b"); n.Parked || n.Cordoned {
		t.Fatalf("pool-b taken back but still parked: %+v", n)
	}
	if a := nodeAnnotation(t, cs, "pool-b"); a != "true" {
		t.Fatalf("pool-b taken back without %s", ScaleDownDisabled)
	}
	// No flapping: two placeholders were ever made, for the one need of two nodes.
	if len(made) != 2 {
		t.Fatalf("%d placeholders made over the run, want 2: %v", len(made), made)
	}

	// What the chart lets the servers do to a node is only that: another label, a
	// taint, an annotation of someone else's, or taking away a scale-down-disabled they
	// did not set, is refused; so is deleting a node.
	other := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "not-fireworks", Annotations: map[string]string{ScaleDownDisabled: "true"}}} // an operator's own
	if _, err := cs.CoreV1().Nodes().Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ what, patch, want string }{
		{"another label", `{"metadata":{"labels":{"node-role.kubernetes.io/worker":"x"}}}`, "only the label"},
		{"a taint", `{"spec":{"taints":[{"key":"evil","effect":"NoSchedule"}]}}`, "a node's spec"},
		{"an unschedulable flag", `{"spec":{"unschedulable":true}}`, "a node's spec"},
		{"another annotation", `{"metadata":{"annotations":{"example.com/x":"y"}}}`, "only the autoscaler's annotations"},
		{"an owner", `{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"Namespace","name":"gone","uid":"00000000-0000-0000-0000-000000000001"}]}}`, "owners or finalizers"},
		{"a finalizer", `{"metadata":{"finalizers":["example.com/keep"]}}`, "owners or finalizers"},
		{"an operator's scale-down-disabled", `{"metadata":{"annotations":{"` + ScaleDownDisabled + `":null}}}`, "only where they set it"},
	} {
		testutil.Eventually(t, 30*time.Second, "the servers refused "+tc.what, func() (bool, string) {
			_, err := sa.CoreV1().Nodes().Patch(ctx, other.Name, types.MergePatchType, []byte(tc.patch), metav1.PatchOptions{})
			return err != nil && strings.Contains(err.Error(), tc.want), fmt.Sprint(err)
		})
	}
	if err := sa.CoreV1().Nodes().Delete(ctx, other.Name, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the servers deleting a node: %v, want forbidden", err)
	}
}

func mapValues(m map[string]string) []string {
	var v []string
	for _, x := range m {
		v = append(v, x)
	}
	return v
}

func nodeAnnotation(t *testing.T, cs kubernetes.Interface, name string) string {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n.Annotations[ScaleDownDisabled]
}

func findNode(t *testing.T, store *state.Store, id string) state.Node {
	t.Helper()
	for _, n := range store.LocalNodes() {
		if n.ID == id {
			return n
		}
	}
	t.Fatalf("node %s not in the state", id)
	return state.Node{}
}
