package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// A server refuses node autoscaler flags it cannot act on before it starts.
func TestNodeScaleFlagsChecked(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	good := []string{"--node-provider=kubernetes", "--kube-namespace=fw", "--kube-placeholder-image=fireworks:1", "--kubeconfig=" + kubeconfig}
	for _, c := range []struct {
		args []string
		want string // "" = accepted
	}{
		{[]string{"--node-provider=none"}, ""},
		{[]string{"--node-provider=static", "--node-pool-min=2", "--node-pool-max=4"}, ""},
		{good, ""},
		{append(good, "--kube-node-selector=pool=sbx,zone=a", `--kube-placeholder-tolerations=[{"key":"pool","operator":"Exists"}]`), ""},
		{[]string{"--node-provider=k8s"}, "want none, static or kubernetes"},
		{[]string{"--node-provider=static", "--node-pool-min=3", "--node-pool-max=2"}, "not a range"},
		{[]string{"--node-provider=kubernetes"}, "needs --kube-namespace"},
		{append(good, "--kube-node-selector=pool"), "want key=value"},
		{append(good, "--kube-placeholder-cpu=lots"), "--kube-placeholder-cpu"},
		{append(good, "--kube-placeholder-tolerations={"), "--kube-placeholder-tolerations"},
		{append(good[:3:3], "--kubeconfig="+filepath.Join(t.TempDir(), "none")), "the Kubernetes API"},
	} {
		var f nodeScaleFlags
		fl := pflag.NewFlagSet("server", pflag.ContinueOnError)
		f.register(fl)
		if err := fl.Parse(c.args); err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		err := f.check()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%v refused: %v", c.args, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%v: got %v, want an error with %q", c.args, err, c.want)
		}
	}
}
