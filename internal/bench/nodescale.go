package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/nodescale"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
)

// NodeScaleRow is one step of the node autoscaler's scale-up on Kubernetes, measured
// against a real control plane (kube-apiserver, kube-scheduler, kube-controller-manager)
// with a simulated node pool and the real replicated state, the autoscaler's passes made
// as the leader makes them (at once after a change, then every second).
type NodeScaleRow struct {
	Key     string  `json:"key"`
	Path    string  `json:"path"`
	Runs    int     `json:"runs"`
	Latency Summary `json:"latency_ms"`
	// Checked is what every run verified of the path it names.
	Checked string `json:"checked"`
}

// Node autoscaler row keys.
const (
	KeyKubeUnschedulable  = "kube-unschedulable"   // baseline: kube-scheduler alone
	KeyScaleUpPlaceholder = "scale-up-placeholder" // a sandbox waits → its placeholder made
	KeyScaleUpOrder       = "scale-up-order"       // a sandbox waits → its placeholder unschedulable
	KeyScaleUpRelease     = "scale-up-release"     // the new node's agent registers → its placeholder gone
)

// leaderEvery is how often the leader makes a control pass besides those a change asks for.
const leaderEvery = time.Second

// BenchNodeScale starts a Kubernetes control plane (the tools from scripts/kube-tools.sh
// under repo) in dir and measures runs scale-ups, with a baseline in the same control
// plane: a pod that fits no node, which kube-scheduler alone marks unschedulable.
func BenchNodeScale(ctx context.Context, repo, dir string, runs int, log *slog.Logger) ([]NodeScaleRow, error) {
	tools, err := kubetest.ToolsDir(ctx, repo)
	if err != nil {
		return nil, err
	}
	cp, err := kubetest.Start(ctx, tools, filepath.Join(dir, "kube"))
	if err != nil {
		return nil, fmt.Errorf("start the Kubernetes control plane: %w", err)
	}
	defer cp.Stop()
	// The bench's own client watches without the client-side rate limit (polling every
	// 5 ms); the autoscaler's is configured as the servers' is.
	watcher := rest.CopyConfig(cp.Rest)
	watcher.QPS, watcher.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(watcher)
	if err != nil {
		return nil, err
	}
	servers, err := kubernetes.NewForConfig(nodescale.ClientConfig(cp.Rest))
	if err != nil {
		return nil, err
	}
	const ns = "fireworks-capacity"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	// Pods need the namespace's default ServiceAccount, which a controller makes.
	for {
		if _, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{}); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	labels := map[string]string{"fireworks.dev/pool": "bench"}
	pool := kubetest.NewNodePool(cs, labels)
	defer pool.Stop()

	store, err := state.Open(ctx, state.Options{Dir: filepath.Join(dir, "state"), NodeID: "s0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, err
	}
	defer store.Close()
	provider := &nodescale.Kubernetes{Client: servers, Namespace: ns, NodeSelector: labels, Image: "fireworks.bench/pause:1",
		CPU: resource.MustParse("100m"), Memory: resource.MustParse("64Mi")}
	// scaleUpAfter ~0: the figure is the machinery's; add the configured wait (15 s by
	// default) for what a user sees.
	as, err := nodescale.New(nodescale.Config{Min: 1, Max: runs + 2, ScaleUpAfter: time.Nanosecond, IdleAfter: time.Hour, ScaleDownDelay: time.Hour},
		scheduler.Config{}, provider, store, log)
	if err != nil {
		return nil, err
	}
	// A node's agent registering (2 vCPUs, 2 GiB: one sandbox of 2 GiB fills it).
	register := func(name string) error {
		_, err := store.RegisterNode(ctx, state.Node{ID: name, Address: name + ":7768", Capacity: state.Resources{VCPUs: 2, MemoryMiB: 2048, DiskMiB: 20000}, UpdatedAt: time.Now()})
		return err
	}
	// Each sandbox fills a node: one waiting needs one new node.
	sandbox := func(id, on string) error {
		now := time.Now().UTC()
		sb := state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "busybox", VCPUs: 1, MemoryMiB: 2048}, Status: state.StatusPending, CreatedAt: now,
			AccessToken: "at-" + id, Events: []state.Event{{Time: now, Status: state.StatusPending, Reason: "accepted"}}}
		if on != "" {
			return store.CreateAndPlace(ctx, sb, state.Quota{}, on, scheduler.Config{})
		}
		return store.CreateSandbox(ctx, sb)
	}
	if err := pool.Add(ctx, "pool-0"); err != nil {
		return nil, err
	}
	if err := register("pool-0"); err != nil {
		return nil, err
	}
	if err := sandbox("busy-0", "pool-0"); err != nil {
		return nil, err
	}
	// The leader's passes: one at once, then every second, until done says so.
	passUntil := func(done func() (bool, error)) error {
		for {
			if err := as.Pass(ctx, time.Now()); err != nil {
				return err
			}
			deadline := time.Now().Add(leaderEvery)
			for time.Now().Before(deadline) {
				ok, err := done()
				if ok || err != nil {
					return err
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(5 * time.Millisecond):
				}
			}
		}
	}
	placeholders := metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + nodescale.PlaceholderComponent}

	var base, ordered, order, release []float64
	for i := 1; i <= runs; i++ {
		// Baseline: a pod that fits no node (more memory than any has), as a placeholder
		// of a pool nobody has is, marked by kube-scheduler alone.
		t0 := time.Now()
		unfit := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "unfit"}, Spec: corev1.PodSpec{AutomountServiceAccountToken: new(false),
			Containers: []corev1.Container{{Name: "c", Image: "fireworks.bench/pause:1",
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Ti")}}}}}}
		if _, err := cs.CoreV1().Pods(ns).Create(ctx, unfit, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
		at, err := firstPod(ctx, cs, ns, metav1.ListOptions{FieldSelector: "metadata.name=unfit"}, unschedulable)
		if err != nil {
			return nil, fmt.Errorf("baseline run %d: %w", i, err)
		}
		base = append(base, ms(at.Sub(t0)))
		if err := cs.CoreV1().Pods(ns).Delete(ctx, "unfit", metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))}); err != nil {
			return nil, err
		}
		if err := waitGone(ctx, cs, ns, "unfit"); err != nil {
			return nil, err
		}

		// A sandbox waits for room → one placeholder, unschedulable.
		wait := fmt.Sprintf("wait-%d", i)
		t0 = time.Now()
		if err := sandbox(wait, ""); err != nil {
			return nil, err
		}
		var passErr error
		passCtx, stopPasses := context.WithCancel(ctx)
		passesDone := make(chan struct{})
		go func() {
			defer close(passesDone)
			passErr = passUntil(func() (bool, error) { return passCtx.Err() != nil, nil })
		}()
		made, err := firstPod(ctx, cs, ns, placeholders, func(*corev1.Pod) bool { return true })
		if err == nil {
			at, err = firstPod(ctx, cs, ns, placeholders, unschedulable)
		}
		stopPasses()
		<-passesDone
		if err != nil {
			return nil, fmt.Errorf("scale-up run %d: %w", i, err)
		}
		if passErr != nil && !errors.Is(passErr, context.Canceled) {
			return nil, fmt.Errorf("scale-up run %d: %w", i, passErr)
		}
		order = append(order, ms(at.Sub(t0)))
		ordered = append(ordered, ms(made.Sub(t0)))
		list, err := cs.CoreV1().Pods(ns).List(ctx, placeholders)
		if err != nil {
			return nil, err
		}
		// Those released earlier stay, terminating, on nodes with no kubelet to end them.
		var live []string
		for _, p := range list.Items {
			if p.DeletionTimestamp == nil {
				live = append(live, p.Name)
			}
		}
		if len(live) != 1 {
			return nil, fmt.Errorf("scale-up run %d: placeholders %v for one node wanted, want 1", i, live)
		}
		ph := live[0]

		// The cloud's part (a node comes, kube-scheduler binds the placeholder to it),
		// then its agent registers and takes the sandbox → the placeholder goes.
		name := fmt.Sprintf("pool-%d", i)
		if err := pool.Add(ctx, name); err != nil {
			return nil, err
		}
		if _, err := firstPod(ctx, cs, ns, metav1.ListOptions{FieldSelector: "metadata.name=" + ph}, func(p *corev1.Pod) bool { return p.Spec.NodeName == name }); err != nil {
			return nil, fmt.Errorf("scale-up run %d: the placeholder on the new node: %w", i, err)
		}
		t0 = time.Now()
		if err := register(name); err != nil {
			return nil, err
		}
		if _, err := store.PlaceSandboxes(ctx, []state.Plan{{SandboxID: wait, NodeID: name}}, scheduler.Config{}, time.Now()); err != nil {
			return nil, err
		}
		gone := func() (bool, error) {
			p, err := cs.CoreV1().Pods(ns).Get(ctx, ph, metav1.GetOptions{})
			return err != nil || p.DeletionTimestamp != nil, nil
		}
		if err := passUntil(gone); err != nil {
			return nil, fmt.Errorf("scale-up run %d: the placeholder released: %w", i, err)
		}
		release = append(release, ms(time.Since(t0)))
	}
	return []NodeScaleRow{
		{Key: KeyKubeUnschedulable, Path: "baseline: a pod no node fits → Unschedulable (kube-scheduler alone)", Runs: runs, Latency: summarize(base),
			Checked: "PodScheduled=False, reason Unschedulable"},
		{Key: KeyScaleUpPlaceholder, Path: "a sandbox waits → its placeholder pod made (scaleUpAfter=0)", Runs: runs, Latency: summarize(ordered),
			Checked: "a pass of the autoscaler made it"},
		{Key: KeyScaleUpOrder, Path: "a sandbox waits → its placeholder Unschedulable (scaleUpAfter=0)", Runs: runs, Latency: summarize(order),
			Checked: "exactly one placeholder per node wanted, PodScheduled=False Unschedulable: what cluster-autoscaler orders a node for"},
		{Key: KeyScaleUpRelease, Path: "the new node's agent registers → its placeholder gone", Runs: runs, Latency: summarize(release),
			Checked: "the placeholder was bound to the new node before it went"},
	}, nil
}

func unschedulable(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
			return true
		}
	}
	return false
}

// poll is when cond was first seen true, polled every 5 ms for at most a minute (a watch
// of an API server just started may be refused until its cache catches up).
func poll(ctx context.Context, what string, cond func(ctx context.Context) bool) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for !cond(ctx) {
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	return time.Now(), nil
}

// firstPod is when a pod of sel (not being deleted) was first seen to meet ok.
func firstPod(ctx context.Context, cs kubernetes.Interface, ns string, sel metav1.ListOptions, ok func(*corev1.Pod) bool) (time.Time, error) {
	return poll(ctx, "no pod came to the state wanted", func(ctx context.Context) bool {
		list, err := cs.CoreV1().Pods(ns).List(ctx, sel)
		return err == nil && slices.ContainsFunc(list.Items, func(p corev1.Pod) bool { return p.DeletionTimestamp == nil && ok(&p) })
	})
}

// waitGone waits for pod name, bound to no node, to be deleted.
func waitGone(ctx context.Context, cs kubernetes.Interface, ns, name string) error {
	_, err := poll(ctx, "pod "+name+" not gone", func(ctx context.Context) bool {
		_, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		return err != nil
	})
	return err
}
