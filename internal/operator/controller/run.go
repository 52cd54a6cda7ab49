package controller

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	fwclient "github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// RunConfig is how the controller process runs.
type RunConfig struct {
	Kube *rest.Config
	// Admin is the controller's own (admin) token's client; Base reaches the same servers
	// and is what namespaces' clients are made from (Tenants).
	Admin Fireworks
	Base  fwclient.Config
	// TokensNamespace keeps the namespaces' tokens (TokensSecret).
	TokensNamespace string
	Cfg             Config
	// LeaderElection lets several replicas run with one active; its Lease lives in
	// LeaderElectionNamespace.
	LeaderElection          bool
	LeaderElectionNamespace string
	// HealthAddr serves /healthz and /readyz ("" or "0": none); MetricsAddr the
	// controller's Prometheus metrics ("0": none).
	HealthAddr, MetricsAddr string
	Log                     *slog.Logger
}

// Run runs the controller until ctx ends.
func Run(ctx context.Context, rc RunConfig) error {
	log := rc.Log
	if log == nil {
		log = slog.Default()
	}
	ctrl.SetLogger(logr.FromSlogHandler(log.Handler()))
	scheme, err := Scheme()
	if err != nil {
		return err
	}
	if rc.MetricsAddr == "" {
		rc.MetricsAddr = "0"
	}
	if rc.HealthAddr == "0" {
		rc.HealthAddr = ""
	}
	mgr, err := ctrl.NewManager(rc.Kube, ctrl.Options{
		Scheme: scheme,
		// Secrets and ConfigMaps are read one by one, when a sandbox's env names them: no
		// cache holding every Secret of the cluster (nor the rights to list them).
		Client:                  client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}, &corev1.ConfigMap{}}}},
		Metrics:                 metricsserver.Options{BindAddress: rc.MetricsAddr},
		HealthProbeBindAddress:  rc.HealthAddr,
		LeaderElection:          rc.LeaderElection,
		LeaderElectionID:        "fireworks-agent-sandbox-controller",
		LeaderElectionNamespace: rc.LeaderElectionNamespace,
		// Give the Lease back on a clean stop, so the next replica leads at once.
		LeaderElectionReleaseOnCancel: true,
	})
	if err != nil {
		return fmt.Errorf("controller manager: %w", err)
	}
	if rc.HealthAddr != "" {
		if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
			return err
		}
		if err := mgr.AddReadyzCheck("ping", healthz.Ping); err != nil {
			return err
		}
	}
	tenants := &Tenants{Admin: rc.Admin.C, Base: rc.Base, Kube: mgr.GetClient(), Namespace: rc.TokensNamespace}
	rc.Cfg.OwnNamespace = rc.TokensNamespace
	if err := Setup(mgr, rc.Admin, tenants, rc.Cfg); err != nil {
		return err
	}
	log.Info("agent-sandbox controller starting", "ingress_domain", rc.Cfg.IngressDomain, "leader_election", rc.LeaderElection)
	return mgr.Start(ctx)
}
