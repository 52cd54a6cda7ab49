package cli

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/nodescale"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// nodeScaleFlags configure a server's node autoscaler (it runs on the leader).
type nodeScaleFlags struct {
	provider              string
	cfg                   nodescale.Config
	selector, namespace   string
	image, cpu, memory    string
	tolerations, priority string
	kubeconfig            string
	kube                  *nodescale.Kubernetes // built by check
}

func (f *nodeScaleFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&f.provider, "node-provider", "none", "node autoscaler: none, static (park idle nodes, take them back when sandboxes wait) or kubernetes (a node pool scaled by cluster-autoscaler: pending placeholder pods order nodes)")
	fl.IntVar(&f.cfg.Min, "node-pool-min", 1, "node autoscaler: never give back the last N nodes")
	fl.IntVar(&f.cfg.Max, "node-pool-max", 0, "node autoscaler: never have more than N nodes (0: no bound)")
	fl.DurationVar(&f.cfg.ScaleUpAfter, "scale-up-after", nodescale.DefaultScaleUpAfter, "node autoscaler: a sandbox waiting for room this long asks for a node")
	fl.DurationVar(&f.cfg.IdleAfter, "scale-down-idle", nodescale.DefaultIdleAfter, "node autoscaler: a node holding no sandbox this long is drained and given back")
	fl.DurationVar(&f.cfg.ScaleDownDelay, "scale-down-delay", nodescale.DefaultScaleDownDelay, "node autoscaler: no node is given back this soon after nodes were asked for")
	fl.StringVar(&f.selector, "kube-node-selector", "", "kubernetes provider: labels of the agents' node pool, key=value,... (the agent DaemonSet's nodeSelector)")
	fl.StringVar(&f.namespace, "kube-namespace", os.Getenv("POD_NAMESPACE"), "kubernetes provider: namespace of the placeholder pods ($POD_NAMESPACE)")
	fl.StringVar(&f.image, "kube-placeholder-image", "", "kubernetes provider: image of the placeholder pods (the agents' image: it is on every pool node; it runs sleep)")
	fl.StringVar(&f.cpu, "kube-placeholder-cpu", "100m", "kubernetes provider: a placeholder's CPU request (small: it must fit a new node beside its DaemonSets)")
	fl.StringVar(&f.memory, "kube-placeholder-memory", "64Mi", "kubernetes provider: a placeholder's memory request")
	fl.StringVar(&f.tolerations, "kube-placeholder-tolerations", "", "kubernetes provider: the placeholders' tolerations, as JSON (the agent DaemonSet's)")
	fl.StringVar(&f.priority, "kube-placeholder-priority-class", "", "kubernetes provider: the placeholders' priorityClassName")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "the Kubernetes API (node provider kubernetes, --kube-join-service-account): kubeconfig file (default: in-cluster, else $KUBECONFIG)")
}

// check validates the flags before the server starts (a bad value fails at once).
func (f *nodeScaleFlags) check() error {
	switch f.provider {
	case "none":
		return nil
	case "static", "kubernetes":
		if _, err := nodescale.New(f.cfg, scheduler.Config{}, nodescale.Static{}, nil, nil); err != nil {
			return fmt.Errorf("--node-pool-min %d, --node-pool-max %d: %w", f.cfg.Min, f.cfg.Max, err)
		}
		if f.provider == "static" {
			return nil
		}
	default:
		return fmt.Errorf("--node-provider %q: want none, static or kubernetes", f.provider)
	}
	k := &nodescale.Kubernetes{Namespace: f.namespace, Image: f.image, PriorityClassName: f.priority, NodeSelector: map[string]string{}}
	if k.Namespace == "" || k.Image == "" {
		return fmt.Errorf("--node-provider kubernetes needs --kube-namespace and --kube-placeholder-image")
	}
	for _, kv := range strings.Split(f.selector, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		key, val, ok := strings.Cut(kv, "=")
		if !ok || key == "" {
			return fmt.Errorf("--kube-node-selector %q: want key=value,...", f.selector)
		}
		k.NodeSelector[key] = val
	}
	var err error
	if k.CPU, err = resource.ParseQuantity(f.cpu); err != nil {
		return fmt.Errorf("--kube-placeholder-cpu %q: %w", f.cpu, err)
	}
	if k.Memory, err = resource.ParseQuantity(f.memory); err != nil {
		return fmt.Errorf("--kube-placeholder-memory %q: %w", f.memory, err)
	}
	if t := strings.TrimSpace(f.tolerations); t != "" && t != "null" {
		var tols []corev1.Toleration
		if err := json.Unmarshal([]byte(t), &tols); err != nil {
			return fmt.Errorf("--kube-placeholder-tolerations: %w", err)
		}
		k.Tolerations = tols
	}
	if k.Client, err = kubeClient(f.kubeconfig); err != nil {
		return fmt.Errorf("--node-provider kubernetes: %w", err)
	}
	f.kube = k
	return nil
}

// kubeClient is a client of the Kubernetes API server: in-cluster, or from kubeconfig
// (else $KUBECONFIG).
func kubeClient(kubeconfig string) (kubernetes.Interface, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kubeconfig
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("the Kubernetes API: %w", err)
	}
	return kubernetes.NewForConfig(nodescale.ClientConfig(rc))
}

// autoscaler builds the autoscaler over the open store (nil for none).
func (f *nodeScaleFlags) autoscaler(store *state.Store, sched scheduler.Config, log *slog.Logger) (*nodescale.Autoscaler, error) {
	var p nodescale.Provider
	switch f.provider {
	case "static":
		p = nodescale.Static{}
	case "kubernetes":
		p = f.kube
	default:
		return nil, nil
	}
	return nodescale.New(f.cfg, sched, p, store, log)
}
