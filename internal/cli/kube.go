package cli

import (
	"errors"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fireworks-sandbox/fireworks/internal/operator/controller"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

func newKubeControllerCmd(g *globals) *cobra.Command {
	var (
		kubeconfig, domain, logLevel, ns, health, metrics string
		tokensNS                                          string
		leaderElect                                       bool
	)
	cmd := &cobra.Command{
		Use:   "kube-controller",
		Short: "Serve agent-sandbox's Kubernetes API (Sandbox, SandboxTemplate, SandboxWarmPool, SandboxClaim) with this cluster's microVMs",
		Long: `Run the Kubernetes controller that turns kubernetes-sigs/agent-sandbox objects into
Fireworks sandboxes, templates and warm pools and writes their status back. It talks to
the Kubernetes API (in-cluster, or --kubeconfig / $KUBECONFIG) and to the Fireworks API
(--server, --token: an admin token, since warm pools are cluster-wide; every namespace's
sandboxes and templates are made with a user token of that namespace's own, which it
makes once and keeps in the Secret "` + controller.TokensSecret + `" in --tokens-namespace). The Helm chart
runs it; install the CRDs from deploy/helm/fireworks/crds first when running it by hand.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			rules := clientcmd.NewDefaultClientConfigLoadingRules()
			rules.ExplicitPath = kubeconfig
			kc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
			if err != nil {
				return err
			}
			base, err := client.LoadConfig(g.server, g.token)
			if err != nil {
				return err
			}
			fw, err := g.client()
			if err != nil {
				return err
			}
			if tokensNS == "" {
				// Where the namespaces' tokens are kept must be chosen: a namespace any user
				// can write to would hand them out.
				return errors.New("--tokens-namespace (or $POD_NAMESPACE) is required: the namespace, the controller's own, that keeps every namespace's Fireworks token")
			}
			return controller.Run(ctx, controller.RunConfig{
				Kube: kc, Admin: controller.Fireworks{C: fw}, Base: base, TokensNamespace: tokensNS,
				Cfg:            controller.Config{IngressDomain: domain},
				LeaderElection: leaderElect, LeaderElectionNamespace: ns,
				HealthAddr: health, MetricsAddr: metrics, Log: newLogger(logLevel),
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster, else $KUBECONFIG or ~/.kube/config)")
	fl.StringVar(&domain, "ingress-domain", routes.DefaultDomain, "the edge's domain (as on the servers): a Sandbox's serviceFQDN is <sandbox>.DOMAIN")
	fl.BoolVar(&leaderElect, "leader-elect", false, "run several replicas with one active (a Lease in --leader-election-namespace)")
	fl.StringVar(&ns, "leader-election-namespace", os.Getenv("POD_NAMESPACE"), "namespace of the leader election Lease ($POD_NAMESPACE)")
	fl.StringVar(&tokensNS, "tokens-namespace", os.Getenv("POD_NAMESPACE"), "namespace of the Secret "+controller.TokensSecret+" that keeps each Kubernetes namespace's Fireworks user token (default $POD_NAMESPACE; required)")
	fl.StringVar(&health, "health-addr", ":8081", "serve /healthz and /readyz here (0: off)")
	fl.StringVar(&metrics, "metrics-addr", "0", "serve the controller's Prometheus metrics here (0: off)")
	fl.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}
