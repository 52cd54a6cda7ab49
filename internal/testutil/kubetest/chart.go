package kubetest

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// rightsKinds are the kinds of the chart's objects that grant rights.
var rightsKinds = []string{"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole",
	"ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}

// ApplyChartRights renders the Helm chart at chart as release "fw" in namespace ns (made
// here) with the extra helm args, applies its objects that grant rights (service
// accounts, roles, bindings, admission policies) and nothing else, and returns a client
// that acts as the ServiceAccount fw-fireworks-<component> under them, and the kinds it
// applied: a test of one component's calls then runs with exactly the chart's rights.
func ApplyChartRights(ctx context.Context, cp *ControlPlane, chart, ns, component string, helmArgs ...string) (kubernetes.Interface, []string, error) {
	out, err := cp.Helm(ctx, append([]string{"template", "fw", chart, "--namespace", ns}, helmArgs...)...)
	if err != nil {
		return nil, nil, err
	}
	if _, err := cp.Kubectl(ctx, "", "create", "namespace", ns); err != nil {
		return nil, nil, err
	}
	var applied []string
	for _, doc := range strings.Split(out, "\n---") {
		var obj struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil || !slices.Contains(rightsKinds, obj.Kind) {
			continue
		}
		if _, err := cp.Kubectl(ctx, doc, "apply", "-f", "-"); err != nil {
			return nil, nil, fmt.Errorf("apply the chart's %s: %w", obj.Kind, err)
		}
		if !slices.Contains(applied, obj.Kind) {
			applied = append(applied, obj.Kind)
		}
	}
	cfg := rest.CopyConfig(cp.Rest)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":fw-fireworks-" + component,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}}
	c, err := kubernetes.NewForConfig(cfg)
	return c, applied, err
}

// ForTest runs a Kubernetes control plane for t and stops it after; the tools are built,
// or found cached, by scripts/kube-tools.sh under repo. Without etcd or the tools the
// test is skipped, saying what is missing (it fails under FIREWORKS_REQUIRE_ALL).
func ForTest(ctx context.Context, t *testing.T, repo string) *ControlPlane {
	t.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		testutil.Skipf(t, "etcd not found (Debian's etcd-server; scripts/install-deps.sh installs it)")
	}
	tools, err := ToolsDir(ctx, repo)
	if err != nil {
		testutil.Skipf(t, "the Kubernetes tools were not built (scripts/kube-tools.sh): %v", err)
	}
	cp, err := Start(ctx, tools, t.TempDir())
	if err != nil {
		t.Fatalf("start the Kubernetes control plane: %v", err)
	}
	t.Cleanup(cp.Stop)
	return cp
}

// ChartTest is ForTest with the chart at repo/deploy/helm/fireworks's rights objects
// applied in namespace ns (ApplyChartRights, with helmArgs): it returns the control
// plane, a client acting as its admin, one acting as the chart's ServiceAccount
// fw-fireworks-<component>, and the kinds applied.
func ChartTest(ctx context.Context, t *testing.T, repo, ns, component string, helmArgs ...string) (cp *ControlPlane, admin, as kubernetes.Interface, kinds []string) {
	t.Helper()
	cp = ForTest(ctx, t, repo)
	admin, err := kubernetes.NewForConfig(cp.Rest)
	if err != nil {
		t.Fatal(err)
	}
	as, kinds, err = ApplyChartRights(ctx, cp, filepath.Join(repo, "deploy/helm/fireworks"), ns, component, helmArgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("applied the chart's %v", kinds)
	return cp, admin, as, kinds
}
