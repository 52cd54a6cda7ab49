package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// kubeToolsEnv carries the directory of the Kubernetes tools (scripts/kube-tools.sh)
// from the outer run, which builds them with the machine's network, into the run in the
// private network namespace; kubeToolsErrEnv says why there are none.
const (
	kubeToolsEnv    = "FIREWORKS_KUBE_TOOLS"
	kubeToolsErrEnv = "FIREWORKS_KUBE_TOOLS_ERROR"
)

// chartDir is the Helm chart, from this package's directory.
const chartDir = "../../deploy/helm/fireworks"

// kube is the e2e world's Kubernetes control plane (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler), started by the first test that needs it and
// shared by the rest; TestMain stops it.
var kube struct {
	once sync.Once
	cp   *kubetest.ControlPlane
	err  error
}

func needKube(t *testing.T) *kubetest.ControlPlane {
	t.Helper()
	need(t)
	tools := os.Getenv(kubeToolsEnv)
	if tools == "" {
		testutil.Skipf(t, "the Kubernetes tools were not built (scripts/kube-tools.sh): %s", os.Getenv(kubeToolsErrEnv))
	}
	kube.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		// The e2e run has a network namespace of its own: the API server may listen on
		// every address of it, for the node of TestHelmChartOnARealNode.
		kube.cp, kube.err = kubetest.Start(ctx, tools, filepath.Join(world.root, "kube"), kubetest.ForNodes())
	})
	if kube.err != nil {
		t.Fatalf("start the Kubernetes control plane: %v", kube.err)
	}
	return kube.cp
}

func decodeB64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func stopKube() {
	if kube.cp != nil {
		kube.cp.Stop()
	}
}

func kubectl(t *testing.T, cp *kubetest.ControlPlane, stdin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := cp.Kubectl(ctx, stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func helm(t *testing.T, cp *kubetest.ControlPlane, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := cp.Helm(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// kubeJSON reads one object (or a list) as JSON into v.
func kubeJSON(t *testing.T, cp *kubetest.ControlPlane, v any, args ...string) {
	t.Helper()
	out := kubectl(t, cp, "", append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// The chart is checked the way CI checks any chart, against this very Kubernetes:
// helm lint, then helm template with several sets of values validated by kubeconform
// -strict against schemas generated from the API server (its CRDs included), and the
// same schemas refuse a misspelt field (so the check can fail).
func TestHelmChartValidates(t *testing.T) {
	cp := needKube(t)
	helm(t, cp, "lint", "--strict", chartDir)
	// The CRDs first, so that their kinds have schemas too.
	kubectl(t, cp, "", "apply", "--server-side", "-f", filepath.Join(chartDir, "crds"))
	schemas := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The API server publishes a new CRD's schema in its OpenAPI document a moment later.
	eventuallyWithin(t, time.Minute, "the CRDs' schemas published", func() (bool, string) {
		n, err := kubetest.WriteSchemas(ctx, cp, schemas)
		if err != nil {
			return false, err.Error()
		}
		for _, f := range []string{"agents.x-k8s.io/v1beta1/sandbox.json", "extensions.agents.x-k8s.io/v1beta1/sandboxclaim.json",
			"extensions.agents.x-k8s.io/v1beta1/sandboxtemplate.json", "extensions.agents.x-k8s.io/v1beta1/sandboxwarmpool.json", "apps/v1/statefulset.json"} {
			if _, err := os.Stat(filepath.Join(schemas, f)); err != nil {
				return false, fmt.Sprintf("%d schemas, not %s", n, f)
			}
		}
		return true, ""
	})
	kubeconform := func(manifests string) (string, error) {
		cmd := exec.Command(filepath.Join(cp.Tools, "kubeconform"), "-strict", "-summary", "-output", "text",
			"-schema-location", kubetest.SchemaLocation(schemas), "-")
		cmd.Stdin = strings.NewReader(manifests)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// A CA of one's own, brought in a Secret: the agents get its certificate from the value.
	myCA, err := pki.CreateCA(filepath.Join(t.TempDir(), "ca"), "mine")
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, myCA.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, values := range [][]string{
		nil,
		{"--set", "secrets.existingSecret=mine", "--set-file", "secrets.caCert=" + caFile, "--set", "secrets.existingEdgeSecret=mine-edge",
			"--set", "secrets.existingControllerSecret=mine-controller"},
		{"--set", "server.replicas=5", "--set", "edge.tlsSecret=edge-tls", "--set", "edge.e2bAPI=false"},
		{"--set", "agent.nodeSelector.fireworks\\.dev/agent=true", "--set", "agent.cpus=8", "--set", "agent.memoryMiB=16384", "--set", "agent.labels.zone=a", "--set", "server.persistence.storageClassName=local"},
		{"--set", "agent.enabled=false", "--set", "edge.enabled=false", "--set", "secrets.existingSecret=mine", "--set", "controller.enabled=false"},
		{"--set", "controller.replicas=2"},
		{"--set", "autoscaler.enabled=true", "--set", "autoscaler.max=10", "--set", "agent.nodeSelector.pool=sandboxes",
			"--set", "agent.tolerations[0].key=pool", "--set", "agent.tolerations[0].operator=Exists", "--set", "agent.hostModules=false"},
	} {
		args := append([]string{"template", "fw", chartDir, "--namespace", "fireworks", "--include-crds"}, values...)
		manifests := helm(t, cp, args...)
		out, err := kubeconform(manifests)
		if err != nil || !strings.Contains(out, "Invalid: 0, Errors: 0, Skipped: 0") {
			t.Errorf("kubeconform of helm template %v: %v\n%s", values, err, out)
		}
	}
	// Helm cannot read a Secret of one's own in `helm template`: without its certificate
	// the agents would have no CA to trust, and the chart says what it needs.
	if out, err := cp.Helm(ctx, "template", "fw", chartDir, "--set", "secrets.existingSecret=mine"); err == nil || !strings.Contains(out, "secrets.caCert") {
		t.Errorf("helm template with an existing Secret and no caCert: %v\n%s", err, out)
	}
	// The check can fail: a misspelt field and a wrong type are refused.
	bad := `apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  replicas: "two"
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, imagePullPolicy: Always, comand: [x]}]
`
	if out, err := kubeconform(bad); err == nil || !strings.Contains(out, "comand") || !strings.Contains(out, "replicas") {
		t.Errorf("kubeconform passed a manifest with a misspelt field and a string for replicas: %v\n%s", err, out)
	}
	badSandbox := `apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: x}
spec:
  operatingMode: Sleeping
  podTemplate: {spec: {containers: [{name: c, image: i}]}}
`
	if out, err := kubeconform(badSandbox); err == nil || !strings.Contains(out, "operatingMode") {
		t.Errorf("kubeconform passed a Sandbox with an unknown operatingMode: %v\n%s", err, out)
	}
}

// helm install against the real API server: every object is accepted by its validation
// and admission, the StatefulSet and DaemonSet controllers make what they should, and an
// upgrade keeps the cluster CA and tokens (a new CA would orphan every node certificate
// and the Raft data).
func TestHelmChartInstalls(t *testing.T) {
	cp := needKube(t)
	ns := "fw-install"
	helm(t, cp, "install", "fw", chartDir, "--namespace", ns, "--create-namespace", "--set", "server.replicas=3")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = cp.Helm(ctx, "uninstall", "fw", "--namespace", ns)
		_, _ = cp.Kubectl(ctx, "", "delete", "namespace", ns, "--wait=false")
	})
	var secret struct {
		Data map[string]string `json:"data"`
	}
	kubeJSON(t, cp, &secret, "-n", ns, "get", "secret", "fw-fireworks-secrets")
	for _, k := range []string{"ca.pem", "ca-key.pem", "admin-token", "ingress-token", "controller-token"} {
		if secret.Data[k] == "" {
			t.Errorf("the chart's Secret has no %s", k)
		}
	}
	// The agents join with their pods' tokens: no join token is made, and the agents get
	// the CA's certificate alone, from a ConfigMap (their pods reference no Secret).
	if secret.Data["join-token"] != "" {
		t.Error("the chart made a join token")
	}
	var caMap struct {
		Data map[string]string `json:"data"`
	}
	kubeJSON(t, cp, &caMap, "-n", ns, "get", "configmap", "fw-fireworks-ca")
	if strings.TrimSpace(caMap.Data["ca.pem"]) != strings.TrimSpace(string(decodeB64(t, secret.Data["ca.pem"]))) {
		t.Errorf("the agents' CA ConfigMap holds %q, not the Secret's ca.pem", caMap.Data["ca.pem"])
	}
	// A node's kubelet may read the Secrets its pods reference: only the servers
	// reference the one with the CA's key and the admin token; the edge and the controller
	// each their own token's alone; the agents none.
	for _, c := range []struct{ kind, may string }{{"daemonset/fw-fireworks-agent", ""}, {"deployment/fw-fireworks-edge", "fw-fireworks-edge"},
		{"deployment/fw-fireworks-controller", "fw-fireworks-controller"}} {
		pods := kubectl(t, cp, "", "-n", ns, "get", c.kind, "-o", "json")
		var obj struct {
			Spec struct {
				Template struct {
					Spec corev1.PodSpec `json:"spec"`
				} `json:"template"`
			} `json:"spec"`
		}
		if err := json.Unmarshal([]byte(pods), &obj); err != nil {
			t.Fatal(err)
		}
		for _, name := range secretsOf(obj.Spec.Template.Spec) {
			if name != c.may {
				t.Errorf("%s's pods reference the Secret %s", c.kind, name)
			}
		}
	}
	var edgeSecret struct {
		Data map[string]string `json:"data"`
	}
	kubeJSON(t, cp, &edgeSecret, "-n", ns, "get", "secret", "fw-fireworks-edge")
	if len(edgeSecret.Data) != 1 || edgeSecret.Data["ingress-token"] != secret.Data["ingress-token"] {
		t.Errorf("the edge's Secret holds %v, want the ingress token alone", slices.Collect(maps.Keys(edgeSecret.Data)))
	}
	var sts struct {
		Spec struct {
			Replicas    int    `json:"replicas"`
			ServiceName string `json:"serviceName"`
		} `json:"spec"`
	}
	kubeJSON(t, cp, &sts, "-n", ns, "get", "statefulset", "fw-fireworks-server")
	if sts.Spec.Replicas != 3 || sts.Spec.ServiceName != "fw-fireworks-server-peers" {
		t.Errorf("server StatefulSet: %+v", sts.Spec)
	}
	// The StatefulSet controller makes its three pods and their data claims at once
	// (Parallel), whatever nodes there are.
	eventuallyWithin(t, time.Minute, "3 server pods and 3 data claims", func() (bool, string) {
		out := kubectl(t, cp, "", "-n", ns, "get", "pods,pvc", "-o", "name")
		pods, pvcs := strings.Count(out, "pod/fw-fireworks-server-"), strings.Count(out, "persistentvolumeclaim/data-fw-fireworks-server-")
		return pods == 3 && pvcs == 3, out
	})
	for _, kind := range []string{"daemonset/fw-fireworks-agent", "deployment/fw-fireworks-edge", "poddisruptionbudget/fw-fireworks-server",
		"service/fw-fireworks-server-peers", "service/fw-fireworks-edge", "deployment/fw-fireworks-controller", "clusterrole/fw-fireworks-controller"} {
		kubectl(t, cp, "", "-n", ns, "get", kind)
	}
	helm(t, cp, "upgrade", "fw", chartDir, "--namespace", ns, "--set", "edge.replicas=3")
	var after struct {
		Data map[string]string `json:"data"`
	}
	kubeJSON(t, cp, &after, "-n", ns, "get", "secret", "fw-fireworks-secrets")
	for k, v := range secret.Data {
		if after.Data[k] != v {
			t.Errorf("helm upgrade changed the Secret's %s", k)
		}
	}
}

// runKubeController starts `fireworks kube-controller` against the control plane and
// the e2e dev server (its admin token, from the CLI config); it ends with the test.
func runKubeController(t *testing.T, cp *kubetest.ControlPlane) {
	t.Helper()
	logf, err := os.Create(filepath.Join(world.root, "kube-controller.log"))
	if err != nil {
		t.Fatal(err)
	}
	// The test registry is on loopback, which the node pulls from over plain HTTP for any
	// token (dev runs with --registry-allow 127.0.0.1/32).
	cmd := exec.Command(world.bin, "kube-controller", "--kubeconfig", cp.Kubeconfig, "--tokens-namespace", "default",
		"--health-addr", "0", "--log-level", "debug")
	cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+world.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("kube-controller log (tail):\n%s", b)
		}
	})
}

// sandboxStatus is what the tests read of a Sandbox's status.
type sandboxStatus struct {
	Metadata struct {
		Finalizers []string          `json:"finalizers"`
		Labels     map[string]string `json:"labels"`
	} `json:"metadata"`
	Status struct {
		SandboxID   string   `json:"sandboxID"`
		NodeName    string   `json:"nodeName"`
		ServiceFQDN string   `json:"serviceFQDN"`
		PodIPs      []string `json:"podIPs"`
		Conditions  []struct {
			Type, Status, Reason, Message string
		} `json:"conditions"`
	} `json:"status"`
}

func (s sandboxStatus) cond(typ string) (status, reason, msg string) {
	for _, c := range s.Status.Conditions {
		if c.Type == typ {
			return c.Status, c.Reason, c.Message
		}
	}
	return "", "", ""
}

func waitSandboxCond(t *testing.T, cp *kubetest.ControlPlane, ns, name, typ, want string, timeout time.Duration) sandboxStatus {
	t.Helper()
	var s sandboxStatus
	eventuallyWithin(t, timeout, fmt.Sprintf("Sandbox %s/%s %s=%s", ns, name, typ, want), func() (bool, string) {
		s = sandboxStatus{}
		out, err := cp.Kubectl(context.Background(), "", "-n", ns, "get", "sandboxes.agents.x-k8s.io", name, "-o", "json")
		if err != nil {
			return false, err.Error()
		}
		if err := json.Unmarshal([]byte(out), &s); err != nil {
			return false, err.Error()
		}
		st, reason, msg := s.cond(typ)
		return st == want, fmt.Sprintf("%s=%s (%s: %s)", typ, st, reason, msg)
	})
	return s
}

// agent-sandbox's API, served by Fireworks against a real API server: its example
// manifests' fields (hello-world's Sandbox; a SandboxTemplate, SandboxWarmPool and
// SandboxClaim as in its aider example) applied with kubectl become microVMs, their
// status is written back, Suspended pauses and Running resumes with the state kept,
// the scale subresource sizes the warm pool, a claim takes a warm VM, shutdownTime ends
// a sandbox, and every delete leaves nothing behind in Fireworks.
func TestAgentSandboxCRDs(t *testing.T) {
	cp := needKube(t)
	kubectl(t, cp, "", "apply", "--server-side", "-f", filepath.Join(chartDir, "crds"))
	kubectl(t, cp, "", "wait", "--for=condition=Established", "--timeout=60s",
		"crd/sandboxes.agents.x-k8s.io", "crd/sandboxtemplates.extensions.agents.x-k8s.io",
		"crd/sandboxwarmpools.extensions.agents.x-k8s.io", "crd/sandboxclaims.extensions.agents.x-k8s.io")
	runKubeController(t, cp)
	const ns = "agents"
	kubectl(t, cp, "", "create", "namespace", ns)
	kubectl(t, cp, "", "-n", ns, "create", "secret", "generic", "greet", "--from-literal=word=hi")
	img := image("busybox:latest")

	// hello-world, with a command that leaves a mark and an env from a Secret.
	hello := fmt.Sprintf(`apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata:
  name: hello-world
spec:
  podTemplate:
    spec:
      containers:
      - name: my-container
        image: %s
        command: ["sh", "-c", "echo hello > /tmp/hello; exec sleep 3600"]
        env:
        - name: GREETING
          valueFrom: {secretKeyRef: {name: greet, key: word}}
        resources: {limits: {cpu: "1", memory: 256Mi}}
      restartPolicy: Never
`, img)
	kubectl(t, cp, hello, "-n", ns, "apply", "-f", "-")
	s := waitSandboxCond(t, cp, ns, "hello-world", "Ready", "True", 3*time.Minute)
	id := s.Status.SandboxID
	if id == "" || s.Status.NodeName == "" || s.Status.ServiceFQDN != id+".fireworks.localhost" || len(s.Status.PodIPs) != 1 {
		t.Errorf("Ready Sandbox's status: %+v", s.Status)
	}
	if !strings.Contains(strings.Join(s.Metadata.Finalizers, ","), "fireworks.dev/sandbox") {
		t.Errorf("the Sandbox has no finalizer: %v", s.Metadata.Finalizers)
	}
	// From Fireworks' side: a microVM that runs the container's command with its env and
	// shape, and names its object.
	waitFile := func(path, want string) {
		t.Helper()
		eventuallyWithin(t, time.Minute, "the sandbox's "+path, func() (bool, string) {
			r := world.cli(context.Background(), nil, "exec", id, "--", "sh", "-c", "cat "+path+"; echo $GREETING")
			return r.stdout == want, r.stdout + r.stderr
		})
	}
	waitFile("/tmp/hello", "hello\nhi\n")
	sb := inspect(t, id)
	// Whoever may read Secrets in the namespace gets the microVM's access token (what
	// opens its private ports at the edge and its in-sandbox API, TestIngress and the
	// envd tests show): in a Secret the Sandbox owns.
	var access struct {
		Type     string `json:"type"`
		Metadata struct {
			OwnerReferences []struct{ Kind, Name string } `json:"ownerReferences"`
		} `json:"metadata"`
		Data map[string]string `json:"data"`
	}
	eventuallyWithin(t, time.Minute, "the Sandbox's access Secret", func() (bool, string) {
		out, err := cp.Kubectl(context.Background(), "", "-n", ns, "get", "secret", "hello-world-fireworks-access", "-o", "json")
		return err == nil && json.Unmarshal([]byte(out), &access) == nil, out
	})
	if access.Type != "fireworks.dev/sandbox-access" || len(access.Metadata.OwnerReferences) != 1 || access.Metadata.OwnerReferences[0].Kind != "Sandbox" ||
		access.Metadata.OwnerReferences[0].Name != "hello-world" || string(decodeB64(t, access.Data["token"])) != str(sb, "access_token") ||
		string(decodeB64(t, access.Data["sandbox-id"])) != id || string(decodeB64(t, access.Data["host"])) != s.Status.ServiceFQDN {
		t.Errorf("the access Secret: %+v; want type fireworks.dev/sandbox-access, owned by the Sandbox, with the token, ID and host of %s", access, id)
	}
	// It belongs to the namespace's own user token, which the controller made and keeps
	// in a Secret, not to the controller's admin token.
	toks := fw(t, 0, "token", "ls").stdout
	nsTok := ""
	for _, line := range strings.Split(toks, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[1] == "k8s-ns-"+ns && f[2] == "user" {
			nsTok = f[0]
		}
	}
	if nsTok == "" || str(sb, "owner") != nsTok {
		t.Errorf("the microVM's owner is %q, want the user token k8s-ns-%s (%q):\n%s", str(sb, "owner"), ns, nsTok, toks)
	}
	var tokSecret struct {
		Data map[string]string `json:"data"`
	}
	kubeJSON(t, cp, &tokSecret, "-n", "default", "get", "secret", "fireworks-namespace-tokens")
	nsUID := strings.TrimSpace(kubectl(t, cp, "", "get", "namespace", ns, "-o", "jsonpath={.metadata.uid}"))
	if tokSecret.Data[ns+"."+nsUID] == "" {
		t.Errorf("the namespace tokens' Secret has no key %s.%s (the namespace's name and UID): %v", ns, nsUID, slices.Collect(maps.Keys(tokSecret.Data)))
	}
	spec, _ := sb["spec"].(map[string]any)
	if meta, _ := spec["metadata"].(map[string]any); meta["k8s.name"] != "hello-world" || meta["k8s.namespace"] != ns {
		t.Errorf("the microVM's metadata does not name its object: %v", spec["metadata"])
	}
	if spec["memory_mib"] != float64(256) || spec["vcpus"] != float64(1) {
		t.Errorf("the microVM's shape is not the container's limits: vcpus %v memory %v", spec["vcpus"], spec["memory_mib"])
	}

	// operatingMode Suspended pauses the microVM; Running resumes it with its files.
	kubectl(t, cp, "", "-n", ns, "patch", "sandboxes.agents.x-k8s.io", "hello-world", "--type=merge", "-p", `{"spec":{"operatingMode":"Suspended"}}`)
	waitSandboxCond(t, cp, ns, "hello-world", "Suspended", "True", 2*time.Minute)
	if st := str(inspect(t, id), "status"); st != "paused" {
		t.Errorf("a Suspended Sandbox's microVM is %s, want paused", st)
	}
	kubectl(t, cp, "", "-n", ns, "patch", "sandboxes.agents.x-k8s.io", "hello-world", "--type=merge", "-p", `{"spec":{"operatingMode":"Running"}}`)
	waitSandboxCond(t, cp, ns, "hello-world", "Ready", "True", 2*time.Minute)
	waitFile("/tmp/hello", "hello\nhi\n")

	// Deleting the object removes the microVM before the object goes.
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxes.agents.x-k8s.io", "hello-world", "--timeout=2m")
	if r := world.cli(context.Background(), nil, "inspect", id); r.code == 0 {
		t.Errorf("the deleted Sandbox's microVM %s still exists: %s", id, r.stdout)
	}
	eventuallyWithin(t, time.Minute, "the access Secret collected with its Sandbox", func() (bool, string) {
		_, err := cp.Kubectl(context.Background(), "", "-n", ns, "get", "secret", "hello-world-fireworks-access")
		return err != nil, "still there"
	})

	// What a microVM cannot run as written is refused with a reason, not half-run.
	two := fmt.Sprintf(`apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: two}
spec:
  podTemplate:
    spec:
      containers:
      - {name: a, image: %[1]s}
      - {name: b, image: %[1]s}
`, img)
	kubectl(t, cp, two, "-n", ns, "apply", "-f", "-")
	eventuallyWithin(t, time.Minute, "the two-container Sandbox refused", func() (bool, string) {
		var s sandboxStatus
		kubeJSON(t, cp, &s, "-n", ns, "get", "sandboxes.agents.x-k8s.io", "two")
		st, reason, msg := s.cond("Ready")
		return st == "False" && strings.Contains(msg, "2 containers") && s.Status.SandboxID == "", st + " " + reason + " " + msg
	})
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxes.agents.x-k8s.io", "two", "--timeout=1m")

	// shutdownTime with shutdownPolicy Delete: the microVM and the object go at that time.
	soon := time.Now().Add(20 * time.Second).UTC().Format(time.RFC3339)
	short := fmt.Sprintf(`apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: short}
spec:
  shutdownTime: %s
  shutdownPolicy: Delete
  podTemplate:
    spec:
      containers:
      - {name: c, image: %s, command: [sleep, "3600"]}
`, soon, img)
	kubectl(t, cp, short, "-n", ns, "apply", "-f", "-")
	shortID := waitSandboxCond(t, cp, ns, "short", "Ready", "True", 3*time.Minute).Status.SandboxID
	eventuallyWithin(t, 2*time.Minute, "the expired Sandbox deleted", func() (bool, string) {
		out, _ := cp.Kubectl(context.Background(), "", "-n", ns, "get", "sandboxes.agents.x-k8s.io", "short", "--ignore-not-found", "-o", "name")
		return strings.TrimSpace(out) == "", out
	})
	if r := world.cli(context.Background(), nil, "inspect", shortID); r.code == 0 {
		t.Errorf("the expired Sandbox's microVM %s still exists", shortID)
	}

	// A template, a warm pool of it, and a claim that takes a warm microVM.
	objs := fmt.Sprintf(`apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxTemplate
metadata: {name: shell-template}
spec:
  envVarsInjectionPolicy: Allowed
  podTemplate:
    spec:
      containers:
      - name: shell
        image: %s
        command: [sh, -c, "echo ready > /tmp/ready; exec sleep 3600"]
        resources: {requests: {cpu: 500m, memory: 200Mi}}
  networkPolicy:
    egress:
    - to: [{ipBlock: {cidr: %s/32}}]
      ports: [{protocol: TCP, port: 8080}]
---
apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxWarmPool
metadata: {name: shell-pool}
spec:
  replicas: 1
  sandboxTemplateRef: {name: shell-template}
`, img, outsideAddr)
	kubectl(t, cp, objs, "-n", ns, "apply", "-f", "-")
	shellTemplate := waitTemplateRegistered(t, cp, ns, "shell-template")
	// Templates are their owner's: the namespace's token lists it.
	nsTokenEnv := []string{"FIREWORKS_TOKEN=" + string(decodeB64(t, tokSecret.Data[ns+"."+nsUID]))}
	templates := func() string {
		return world.cliEnv(context.Background(), nsTokenEnv, nil, "template", "ls").stdout
	}
	if out := templates(); !strings.Contains(out, shellTemplate) {
		t.Errorf("template ls with the namespace's token lacks %s:\n%s", shellTemplate, out)
	}
	waitPool(t, img, func(s poolState) bool { return s.Ready >= 1 })
	// The controller's pools say they are its (and are pulled as users' pulls are).
	if m := poolManager(t, img); m != "agent-sandbox" {
		t.Errorf("the controller's pool of %s is managed by %q, want agent-sandbox", img, m)
	}
	readyReplicas := func() int {
		var wp struct {
			Status struct {
				Replicas      int `json:"replicas"`
				ReadyReplicas int `json:"readyReplicas"`
			} `json:"status"`
		}
		kubeJSON(t, cp, &wp, "-n", ns, "get", "sandboxwarmpools.extensions.agents.x-k8s.io", "shell-pool")
		return wp.Status.ReadyReplicas
	}
	eventuallyWithin(t, time.Minute, "the SandboxWarmPool's readyReplicas", func() (bool, string) {
		n := readyReplicas()
		return n == 1, fmt.Sprint(n)
	})
	claim := `apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxClaim
metadata: {name: user-session}
spec:
  warmPoolRef: {name: shell-pool}
  env: [{name: GREETING, value: claimed}]
`
	kubectl(t, cp, claim, "-n", ns, "apply", "-f", "-")
	cs := waitSandboxCond(t, cp, ns, "user-session", "Ready", "True", 3*time.Minute)
	if cs.Metadata.Labels["agents.x-k8s.io/launch-type"] != "warm" {
		t.Errorf("the claim's Sandbox labels: %v", cs.Metadata.Labels)
	}
	var claimSt struct {
		Status struct {
			Sandbox struct {
				Name string `json:"name"`
			} `json:"sandbox"`
		} `json:"status"`
	}
	eventuallyWithin(t, time.Minute, "the claim's status names its Sandbox", func() (bool, string) {
		kubeJSON(t, cp, &claimSt, "-n", ns, "get", "sandboxclaims.extensions.agents.x-k8s.io", "user-session")
		return claimSt.Status.Sandbox.Name == "user-session", claimSt.Status.Sandbox.Name
	})
	claimID := cs.Status.SandboxID
	if mode := str(details(t, inspect(t, claimID)), "start_mode"); mode != "warm" {
		t.Errorf("the claim's microVM started %q, want warm (from the pool)", mode)
	}
	id = claimID
	waitFile("/tmp/ready", "ready\nclaimed\n")
	// The template's networkPolicy is the microVM's eBPF egress policy: the outside
	// host's port 8080 and nothing else.
	setUpOutside(t)
	if got := fetch(t, claimID, outsideAddr, 8080); got != "outside-8080" {
		t.Errorf("the claim's microVM to %s:8080, which its template allows: %q", outsideAddr, got)
	}
	if got := fetch(t, claimID, outsideAddr, 9090); got != "" {
		t.Errorf("the claim's microVM reached %s:9090, which its template does not allow: %q", outsideAddr, got)
	}

	// The scale subresource sizes the Fireworks pool.
	kubectl(t, cp, "", "-n", ns, "scale", "sandboxwarmpools.extensions.agents.x-k8s.io", "shell-pool", "--replicas=2")
	waitPool(t, img, func(s poolState) bool { return s.Target == 2 })

	// A newcomer of the same image and another shape (named to sort first) gets
	// ShapeConflict: the pool keeps the shape of the SandboxWarmPools it serves.
	kubectl(t, cp, templateAndPool("aaa-newcomer", 1, fmt.Sprintf(`{containers: [{name: c, image: %q, resources: {limits: {memory: 128Mi}}}]}`, img)), "-n", ns, "apply", "-f", "-")
	waitWarmPoolRefused(t, cp, ns, "aaa-newcomer-pool", "shape")
	var pools struct {
		Pools []struct {
			Image     string `json:"image"`
			MemoryMib int    `json:"memory_mib"`
			Size      int    `json:"size"`
		} `json:"pools"`
	}
	if err := json.Unmarshal([]byte(fw(t, 0, "pool", "ls", "--json").stdout), &pools); err != nil {
		t.Fatal(err)
	}
	for _, p := range pools.Pools {
		if p.Image == img && (p.MemoryMib != 200 || p.Size != 2) {
			t.Errorf("the pool of %s after a newcomer of another shape: %d MiB, size %d; want shell-pool's 200 MiB, 2", img, p.MemoryMib, p.Size)
		}
	}
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxwarmpools.extensions.agents.x-k8s.io", "aaa-newcomer-pool", "--timeout=1m")
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxtemplates.extensions.agents.x-k8s.io", "aaa-newcomer-template", "--timeout=1m")

	// Deleting the claim deletes its Sandbox (the garbage collector) and so its microVM.
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxclaims.extensions.agents.x-k8s.io", "user-session", "--timeout=1m")
	eventuallyWithin(t, 2*time.Minute, "the claim's microVM removed", func() (bool, string) {
		r := world.cli(context.Background(), nil, "inspect", claimID)
		return r.code != 0, "inspect still finds it: " + str(map[string]any{"s": r.stdout}, "s")
	})
	// Deleting the pool and the template removes the Fireworks pool and template.
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxwarmpools.extensions.agents.x-k8s.io", "shell-pool", "--timeout=1m")
	eventuallyWithin(t, time.Minute, "the Fireworks pool removed", func() (bool, string) {
		_, found := poolOf(t, img)
		return !found, "still listed"
	})
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxtemplates.extensions.agents.x-k8s.io", "shell-template", "--timeout=1m")
	if out := templates(); strings.Contains(out, shellTemplate) {
		t.Errorf("template ls still lists %s:\n%s", shellTemplate, out)
	}

	// A warm pool is set with the controller's admin token, but only of an image the
	// namespace's own token may pull: one on a private address is refused, and no pool
	// is set for it.
	private := outsideAddr + ":5000/busybox:latest"
	kubectl(t, cp, templateAndPool("private", 1, fmt.Sprintf(`{containers: [{name: c, image: %q}]}`, private)), "-n", ns, "apply", "-f", "-")
	waitWarmPoolRefused(t, cp, ns, "private-pool", "pulled as namespace "+ns)
	if _, found := poolOf(t, private); found {
		t.Errorf("a Fireworks pool was set for %s, which the namespace may not pull", private)
	}
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxwarmpools.extensions.agents.x-k8s.io", "private-pool", "--timeout=1m")
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxtemplates.extensions.agents.x-k8s.io", "private-template", "--timeout=1m")

	// What users bring: a Debian root (debootstrap's, with its device nodes, setuid files
	// and hardlinks) as a Sandbox, run as the pod's runAsUser, with runAsNonRoot (the
	// restricted pod security level's rule), which the guest checks.
	debian := debianImage(t)
	kubectl(t, cp, fmt.Sprintf(`apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: debian}
spec:
  podTemplate:
    spec:
      securityContext: {runAsUser: 1000, runAsGroup: 1000, runAsNonRoot: true}
      containers: [{name: c, image: %q, command: [sleep, "3600"]}]
`, debian), "-n", ns, "apply", "-f", "-")
	debianID := waitSandboxCond(t, cp, ns, "debian", "Ready", "True", 3*time.Minute).Status.SandboxID
	if got := fw(t, 0, "exec", debianID, "--", "sh", "-c", ". /etc/os-release; echo $ID $VERSION_ID; id -u; stat -c %a /usr/bin/passwd; test -c /dev/full && echo dev-full").stdout; got != "debian 12\n1000\n4755\ndev-full\n" {
		t.Errorf("the Debian Sandbox: %q, want Debian 12, uid 1000, setuid passwd and /dev/full", got)
	}
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxes.agents.x-k8s.io", "debian", "--timeout=2m")
	// runAsNonRoot on an image whose user is root: its command is not run, and the
	// Sandbox says why.
	rootImg := world.registry + "/root-user:2"
	testimage.Push(t, world.registry, "root-user:2", testimage.Busybox(t))
	kubectl(t, cp, fmt.Sprintf(`apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: rootless}
spec:
  podTemplate:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: %q, command: [sh, -c, "echo ran-as-root > /tmp/x"], securityContext: {runAsNonRoot: true}}]
`, rootImg), "-n", ns, "apply", "-f", "-")
	eventuallyWithin(t, 3*time.Minute, "the runAsNonRoot Sandbox of a root image refused", func() (bool, string) {
		var s sandboxStatus
		kubeJSON(t, cp, &s, "-n", ns, "get", "sandboxes.agents.x-k8s.io", "rootless")
		st, reason, msg := s.cond("Ready")
		return st == "False" && strings.Contains(msg, "runAsNonRoot"), fmt.Sprintf("Ready=%s (%s: %s)", st, reason, msg)
	})
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxes.agents.x-k8s.io", "rootless", "--timeout=2m")

	// A Sandbox whose image is not there yet says its microVM failed and why (not an exit
	// code it never had); once the image comes, Fireworks starts it again (restartPolicy
	// Always) and the status follows it back to Ready.
	lateImg := world.registry + "/late:1"
	kubectl(t, cp, fmt.Sprintf(`apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: late}
spec:
  podTemplate:
    spec:
      containers: [{name: c, image: %q, command: [sleep, "3600"]}]
`, lateImg), "-n", ns, "apply", "-f", "-")
	eventuallyWithin(t, 2*time.Minute, "the late Sandbox's failed pull reported", func() (bool, string) {
		var s sandboxStatus
		out, err := cp.Kubectl(context.Background(), "", "-n", ns, "get", "sandboxes.agents.x-k8s.io", "late", "-o", "json")
		if err != nil || json.Unmarshal([]byte(out), &s) != nil {
			return false, fmt.Sprint(err)
		}
		st, reason, msg := s.cond("Ready")
		return st == "False" && reason == "PodFailed" && strings.Contains(msg, "the microVM failed: ") && strings.Contains(msg, "late:1") && !strings.Contains(msg, "exit code"),
			fmt.Sprintf("%s (%s: %s)", st, reason, msg)
	})
	testimage.Push(t, world.registry, "late:1", testimage.Busybox(t))
	waitSandboxCond(t, cp, ns, "late", "Ready", "True", 3*time.Minute)
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxes.agents.x-k8s.io", "late", "--timeout=2m")

	// An operator's pool is the operator's: a namespace's SandboxWarmPool of its image
	// neither resizes nor removes it, and says so. (The controller's own pools say they
	// are its, and are pulled as users' pulls are.)
	opImg := world.registry + "/operators-own:1"
	testimage.Push(t, world.registry, "operators-own:1", testimage.Busybox(t))
	fw(t, 0, "pool", "set", opImg, "--size", "0", "--max", "1")
	kubectl(t, cp, templateAndPool("ops", 3, fmt.Sprintf(`{containers: [{name: c, image: %q}]}`, opImg)), "-n", ns, "apply", "-f", "-")
	waitWarmPoolRefused(t, cp, ns, "ops-pool", "is the operator's")
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxwarmpools.extensions.agents.x-k8s.io", "ops-pool", "--timeout=1m")
	if out := fw(t, 0, "pool", "ls").stdout; !strings.Contains(out, opImg) {
		t.Errorf("the operator's pool of %s went with a namespace's SandboxWarmPool of it:\n%s", opImg, out)
	}
	if m := poolManager(t, opImg); m != "" {
		t.Errorf("the operator's pool of %s is now managed by %q", opImg, m)
	}
	fw(t, 0, "pool", "rm", opImg)
	// A SandboxWarmPool asking more than a pool may hold is refused by the API server.
	if _, err := cp.Kubectl(context.Background(), `apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxWarmPool
metadata: {name: too-big}
spec:
  replicas: 65
  sandboxTemplateRef: {name: ops-template}
`, "-n", ns, "apply", "-f", "-"); err == nil || !strings.Contains(err.Error(), "64") {
		t.Errorf("a SandboxWarmPool of 65 replicas: %v, want refused (at most 64)", err)
	}

	// A claim whose sandbox finished goes ttlSecondsAfterFinished later (shutdownPolicy
	// Delete), as agent-sandbox's own controller does it.
	kubectl(t, cp, templateAndPool("once", 0, fmt.Sprintf(`{restartPolicy: Never, containers: [{name: c, image: %q, command: ["true"]}]}`, img)), "-n", ns, "apply", "-f", "-")
	waitTemplateRegistered(t, cp, ns, "once-template")
	kubectl(t, cp, `apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxClaim
metadata: {name: once}
spec:
  warmPoolRef: {name: once-pool}
  lifecycle: {ttlSecondsAfterFinished: 2, shutdownPolicy: Delete}
`, "-n", ns, "apply", "-f", "-")
	eventuallyWithin(t, 3*time.Minute, "the finished claim deleted after its TTL", func() (bool, string) {
		out, err := cp.Kubectl(context.Background(), "", "-n", ns, "get", "sandboxclaims.extensions.agents.x-k8s.io", "once", "-o", "jsonpath={.status.conditions}")
		return err != nil && strings.Contains(err.Error(), "NotFound"), out + fmt.Sprint(err)
	})
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxwarmpools.extensions.agents.x-k8s.io", "once-pool", "--timeout=1m")
	kubectl(t, cp, "", "-n", ns, "delete", "sandboxtemplates.extensions.agents.x-k8s.io", "once-template", "--timeout=1m")

	// The namespace deleted (its objects' finalizers run first, with its token): its token
	// is revoked and forgotten, so a namespace made again under the name (by anyone) starts
	// with a token of its own, not this one's templates, snapshots and volumes.
	kubectl(t, cp, "", "delete", "namespace", ns, "--timeout=3m")
	eventuallyWithin(t, time.Minute, "the deleted namespace's token revoked", func() (bool, string) {
		toks := fw(t, 0, "token", "ls").stdout
		var sec struct {
			Data map[string]string `json:"data"`
		}
		kubeJSON(t, cp, &sec, "-n", "default", "get", "secret", "fireworks-namespace-tokens")
		for k := range sec.Data {
			if strings.HasPrefix(k, ns+".") || k == ns {
				return false, "still in the Secret: " + k
			}
		}
		return !strings.Contains(toks, "k8s-ns-"+ns+" "), toks
	})
}

// poolManager is who manages the warm pool of img ("" = an operator), as pool ls says.
func poolManager(t *testing.T, img string) string {
	t.Helper()
	var resp struct {
		Pools []struct {
			Image     string `json:"image"`
			ManagedBy string `json:"managed_by"`
		} `json:"pools"`
	}
	out := fw(t, 0, "pool", "ls", "--json").stdout
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("pool ls --json: %v\n%s", err, out)
	}
	for _, p := range resp.Pools {
		if p.Image == img {
			return p.ManagedBy
		}
	}
	t.Fatalf("no pool of %s:\n%s", img, out)
	return ""
}

// templateAndPool is a SandboxTemplate <name>-template of podSpec (a YAML flow mapping)
// and a SandboxWarmPool <name>-pool of it.
func templateAndPool(name string, replicas int, podSpec string) string {
	return fmt.Sprintf(`apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxTemplate
metadata: {name: %[1]s-template}
spec:
  podTemplate:
    spec: %[3]s
---
apiVersion: extensions.agents.x-k8s.io/v1beta1
kind: SandboxWarmPool
metadata: {name: %[1]s-pool}
spec:
  replicas: %[2]d
  sandboxTemplateRef: {name: %[1]s-template}
`, name, replicas, podSpec)
}

// waitTemplateRegistered waits for SandboxTemplate ns/name to be a Fireworks template and
// returns that template's name.
func waitTemplateRegistered(t *testing.T, cp *kubetest.ControlPlane, ns, name string) string {
	t.Helper()
	var tmpl struct {
		Status struct {
			Template string `json:"template"`
		} `json:"status"`
	}
	eventuallyWithin(t, time.Minute, "SandboxTemplate "+name+" registered", func() (bool, string) {
		kubeJSON(t, cp, &tmpl, "-n", ns, "get", "sandboxtemplates.extensions.agents.x-k8s.io", name)
		return tmpl.Status.Template != "", "no status.template"
	})
	return tmpl.Status.Template
}

// waitWarmPoolRefused waits for SandboxWarmPool ns/name to say Ready=False with a message
// containing want.
func waitWarmPoolRefused(t *testing.T, cp *kubetest.ControlPlane, ns, name, want string) {
	t.Helper()
	eventuallyWithin(t, 2*time.Minute, name+" says "+want, func() (bool, string) {
		var wp struct {
			Status struct {
				Conditions []struct{ Type, Status, Message string } `json:"conditions"`
			} `json:"status"`
		}
		kubeJSON(t, cp, &wp, "-n", ns, "get", "sandboxwarmpools.extensions.agents.x-k8s.io", name)
		for _, c := range wp.Status.Conditions {
			if c.Type == "Ready" && c.Status == "False" && strings.Contains(c.Message, want) {
				return true, ""
			}
		}
		b, _ := json.Marshal(wp.Status)
		return false, string(b)
	})
}

// secretsOf lists the Secrets a pod spec references (volumes, env, envFrom).
func secretsOf(ps corev1.PodSpec) []string {
	var out []string
	for _, v := range ps.Volumes {
		if v.Secret != nil {
			out = append(out, v.Secret.SecretName)
		}
		if v.Projected != nil {
			for _, src := range v.Projected.Sources {
				if src.Secret != nil {
					out = append(out, src.Secret.Name)
				}
			}
		}
	}
	for _, c := range append(ps.InitContainers, ps.Containers...) {
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				out = append(out, e.ValueFrom.SecretKeyRef.Name)
			}
		}
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				out = append(out, e.SecretRef.Name)
			}
		}
	}
	return out
}
