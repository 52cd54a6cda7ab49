package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/release/nodeimage"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/kubetest"
)

// nodeImageEnv carries the node image's docker-archive (built by the outer run, which
// has the machine's network) into the run in the private network namespace;
// nodeImageErrEnv says why there is none.
const (
	nodeImageEnv    = "FIREWORKS_TEST_NODE_IMAGE"
	nodeImageErrEnv = "FIREWORKS_TEST_NODE_IMAGE_ERROR"
	// nodeImageTag is the tag it is imported under (the chart's image.tag).
	nodeImageTag = "e2e"
)

// buildNodeImage builds the node image the way `make image` does, from this checkout.
func buildNodeImage(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "bin")
	if _, _, err := testutil.BuildBinaries(bin); err != nil {
		return "", err
	}
	img, err := nodeimage.Build(ctx, nodeimage.Options{BinDir: bin, CacheDir: "/var/cache/fireworks/nodeimage", Version: nodeImageTag})
	if err != nil {
		return "", fmt.Errorf("build the node image: %w", err)
	}
	path := filepath.Join(dir, "fireworks-image.tar")
	if err := nodeimage.WriteArchive(path, "fireworks:"+nodeImageTag, img); err != nil {
		return "", fmt.Errorf("write the node image: %w", err)
	}
	return path, nil
}

// The chart on a real node: the kubelet (with containerd, runc, the CNI bridge,
// kube-proxy and CoreDNS) runs the node image, the three servers find each other by
// DNS and form a Raft cluster, the agent joins with its pod's ServiceAccount token and boots microVMs
// (a `fireworks run` through a port-forward, and an agent-sandbox Sandbox through the
// controller in the cluster), and a rolling restart of the servers keeps every sandbox
// record and the running sandbox.
func TestHelmChartOnARealNode(t *testing.T) {
	cp := needKube(t)
	imageTar := os.Getenv(nodeImageEnv)
	if imageTar == "" {
		testutil.Skipf(t, "the node image was not built: %s", os.Getenv(nodeImageErrEnv))
	}
	limit := 25 * time.Minute
	if os.Getenv("FIREWORKS_KUBE_HOLD") != "" {
		limit = 2 * time.Hour // a person's session (go test's -timeout must allow it too)
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	dir := filepath.Join(world.root, "kube-node")
	start := time.Now()
	node, err := cp.StartNode(ctx, "node-1", dir, imageTar)
	if err != nil {
		t.Fatalf("start the node: %v", err)
	}
	t.Cleanup(node.Stop)
	t.Cleanup(stopForwards)
	const ns, release = "fireworks", "fw"
	t.Logf("node Ready in %s", time.Since(start).Round(time.Second))
	defer func() {
		if t.Failed() {
			dumpKubeNode(t, cp, node, ns)
		}
	}()

	// The test images, served where the node reaches them (a private address, allowed to
	// user tokens' pulls by the agents' --registry-allow).
	ln, err := net.Listen("tcp", kubetest.HostLinkIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	regSrv := &http.Server{Handler: world.registryHandler}
	go regSrv.Serve(ln) // ends when the cleanup closes it
	t.Cleanup(func() { regSrv.Close() })
	reg := ln.Addr().String()

	// The servers' volumes: static PersistentVolumes on the node (no provisioner here).
	for i := range 3 {
		pv := filepath.Join(dir, fmt.Sprintf("pv-%d", i))
		if err := os.MkdirAll(pv, 0o777); err != nil {
			t.Fatal(err)
		}
		// The servers run as 65532; a hostPath volume is not chowned by fsGroup.
		if err := os.Chmod(pv, 0o777); err != nil {
			t.Fatal(err)
		}
		kubectl(t, cp, fmt.Sprintf(`apiVersion: v1
kind: PersistentVolume
metadata: {name: fw-node-pv-%d}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Delete
  storageClassName: ""
  # Bound ahead to its server's claim: no other test's claim takes it.
  claimRef: {namespace: %s, name: data-fw-fireworks-server-%d}
  hostPath: {path: %q, type: Directory}
`, i, ns, i, pv), "apply", "-f", "-")
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		_, _ = cp.Helm(ctx, "uninstall", release, "--namespace", ns, "--wait", "--timeout", "90s")
		_, _ = cp.Kubectl(ctx, "", "delete", "namespace", ns, "team-a", "--wait=false")
		_, _ = cp.Kubectl(ctx, "", "delete", "pv", "fw-node-pv-0", "fw-node-pv-1", "fw-node-pv-2", "--wait=false")
	})

	tol := fmt.Sprintf(`[{key: %q, operator: Exists, effect: NoSchedule}]`, kubetest.NodeTaint)
	values := filepath.Join(dir, "values.yaml")
	if err := os.WriteFile(values, []byte(fmt.Sprintf(`image: {tag: %s, pullPolicy: Never}
server: {tolerations: %[2]s}
agent:
  tolerations: %[2]s
  dataDir: %[3]q
  # This test machine has no /lib/modules (its kernel's modules are built in).
  hostModules: false
  # Under the node's own cgroups, so that they end with the node.
  cgroupParent: %[5]s/fireworks
  memoryMiB: 3072
  extraArgs: ["--registry-allow=%[4]s/32"]
edge: {tolerations: %[2]s, replicas: 1}
controller: {tolerations: %[2]s}
# The node autoscaler, on the leader: with one node and min 1 it orders and gives back
# nothing here, but marks the node in use for cluster-autoscaler.
autoscaler: {enabled: true, max: 1}
`, nodeImageTag, tol, filepath.Join(dir, "agent-data"), kubetest.HostLinkIP, node.CgroupRoot())), 0o644); err != nil {
		t.Fatal(err)
	}
	if hold := os.Getenv("FIREWORKS_KUBE_HOLD"); hold != "" {
		holdForAPerson(t, ctx, hold, cp, node, values, reg, imageTar)
		return
	}
	// The README's install, with this node's values.
	helm(t, cp, "install", release, chartDir, "--namespace", ns, "--create-namespace", "-f", values)
	start = time.Now()
	for _, what := range []string{"statefulset/fw-fireworks-server", "daemonset/fw-fireworks-agent", "deployment/fw-fireworks-controller", "deployment/fw-fireworks-edge"} {
		kubectlTimeout(t, cp, 8*time.Minute, "-n", ns, "rollout", "status", what, "--timeout=8m")
	}
	t.Logf("chart rolled out in %s", time.Since(start).Round(time.Second))

	// The CLI as NOTES.txt tells a user: the admin token and CA from the Secret, the API
	// through a port-forward.
	var secret struct {
		Data map[string]string `json:"data"`
	}
	kubeJSON(t, cp, &secret, "-n", ns, "get", "secret", "fw-fireworks-secrets")
	caFile := filepath.Join(dir, "fireworks-ca.pem")
	if err := os.WriteFile(caFile, decodeB64(t, secret.Data["ca.pem"]), 0o600); err != nil {
		t.Fatal(err)
	}
	adminToken := string(decodeB64(t, secret.Data["admin-token"]))
	cli := func(t *testing.T, want int, args ...string) string {
		t.Helper()
		addr := portForward(t, cp, ns, "svc/fw-fireworks-server", 7766)
		env := []string{"FIREWORKS_CONFIG=" + filepath.Join(dir, "no-cli-config.json"), "FIREWORKS_SERVER=https://" + addr,
			"FIREWORKS_CA=" + caFile, "FIREWORKS_TOKEN=" + adminToken}
		r := world.cliEnv(ctx, env, nil, args...)
		if r.code != want {
			t.Fatalf("fireworks %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, want, r.stdout, r.stderr)
		}
		return r.stdout
	}

	// The agent joined with its pod's ServiceAccount token, which the servers checked
	// with the API server: under its Kubernetes node's name, and with no join token (the
	// chart makes none).
	eventuallyWithin(t, 2*time.Minute, "node-1 ready in Fireworks", func() (bool, string) {
		out := cli(t, 0, "node", "ls")
		return regexp.MustCompile(`(?m)^node-1\s+ready\s`).MatchString(out), out
	})
	if out := cli(t, 0, "token", "ls"); regexp.MustCompile(`(?m)\sjoin\s`).MatchString(out) {
		t.Errorf("the chart's cluster holds a join token:\n%s", out)
	}
	// A microVM from inside Kubernetes: the guest's kernel is not the host's.
	img := reg + "/busybox:latest"
	out := cli(t, 0, "run", img, "--", "sh", "-c", "echo hello-from-kubernetes; uname -r")
	hostKernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	if !strings.Contains(out, "hello-from-kubernetes") || strings.Contains(out, strings.TrimSpace(string(hostKernel))) {
		t.Fatalf("fireworks run on the Kubernetes-run cluster: %q (host kernel %s)", out, hostKernel)
	}
	running := strings.TrimSpace(cli(t, 0, "run", "-d", img, "--", "sh", "-c", "echo kept > /tmp/state; exec sleep 3600"))
	eventuallyWithin(t, 2*time.Minute, "the detached sandbox running", func() (bool, string) {
		out := cli(t, 0, "inspect", running)
		var sb map[string]any
		// (protojson varies its whitespace on purpose: parse, never match the text.)
		if err := json.Unmarshal([]byte(out), &sb); err != nil {
			t.Fatalf("inspect %s: %v\n%s", running, err, out)
		}
		return sb["status"] == "running", out
	})

	// An agent-sandbox Sandbox, served by the controller in the cluster with its
	// namespace's own token, pulled from the allowed private registry.
	kubectl(t, cp, fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: agents.x-k8s.io/v1beta1
kind: Sandbox
metadata: {name: hello, namespace: team-a}
spec:
  podTemplate:
    spec:
      containers:
        - name: main
          image: %s
          command: ["sh", "-c", "echo from-a-sandbox-object > /tmp/hello; exec sleep 3600"]
`, img), "apply", "-f", "-")
	var sandboxID string
	eventuallyWithin(t, 3*time.Minute, "the Sandbox Ready", func() (bool, string) {
		var sb struct {
			Status struct {
				SandboxID  string `json:"sandboxID"`
				NodeName   string `json:"nodeName"`
				Conditions []struct {
					Type, Status, Reason, Message string
				} `json:"conditions"`
			} `json:"status"`
		}
		kubeJSON(t, cp, &sb, "-n", "team-a", "get", "sandbox", "hello")
		for _, c := range sb.Status.Conditions {
			if c.Type == "Ready" && c.Status == "True" && sb.Status.NodeName == "node-1" {
				sandboxID = sb.Status.SandboxID
				return true, ""
			}
		}
		b, _ := json.Marshal(sb.Status)
		return false, string(b)
	})
	if got := cli(t, 0, "exec", sandboxID, "--", "cat", "/tmp/hello"); strings.TrimSpace(got) != "from-a-sandbox-object" {
		t.Fatalf("the Sandbox's microVM: /tmp/hello = %q", got)
	}

	// The node autoscaler in the servers reached the Kubernetes API with the chart's
	// RBAC: node-1 is marked as registered and in use (cluster-autoscaler leaves it be).
	eventuallyWithin(t, time.Minute, "node-1 marked by the node autoscaler", func() (bool, string) {
		out := kubectl(t, cp, "", "get", "node", "node-1", "-o",
			`jsonpath={.metadata.labels.fireworks\.dev/registered} {.metadata.annotations.cluster-autoscaler\.kubernetes\.io/scale-down-disabled}`)
		return out == "true true", out
	})

	// Every record, then a rolling restart of the servers (each comes back with its
	// volume; the Raft log and snapshots are on it).
	records := func() map[string]string {
		m := map[string]string{}
		for _, id := range strings.Fields(cli(t, 0, "ps", "-a", "-q")) {
			var sb map[string]any
			if err := json.Unmarshal([]byte(cli(t, 0, "inspect", id)), &sb); err != nil {
				t.Fatal(err)
			}
			m[id] = fmt.Sprint(sb["status"])
		}
		return m
	}
	before := records()
	if len(before) != 3 || before[running] != "running" || before[sandboxID] != "running" {
		t.Fatalf("records before the restart: %v", before)
	}
	var uids []string
	for i := range 3 {
		uids = append(uids, kubectl(t, cp, "", "-n", ns, "get", "pod", fmt.Sprintf("fw-fireworks-server-%d", i), "-o", "jsonpath={.metadata.uid}"))
	}
	start = time.Now()
	kubectl(t, cp, "", "-n", ns, "rollout", "restart", "statefulset/fw-fireworks-server")
	kubectlTimeout(t, cp, 10*time.Minute, "-n", ns, "rollout", "status", "statefulset/fw-fireworks-server", "--timeout=10m")
	t.Logf("rolling restart of the servers took %s", time.Since(start).Round(time.Second))
	stopForwards() // each was to a server that is gone
	for i := range 3 {
		if uid := kubectl(t, cp, "", "-n", ns, "get", "pod", fmt.Sprintf("fw-fireworks-server-%d", i), "-o", "jsonpath={.metadata.uid}"); slices.Contains(uids, uid) {
			t.Fatalf("server %d was not restarted", i)
		}
	}
	if after := records(); !mapsEqual(before, after) {
		t.Fatalf("records changed over the rolling restart:\nbefore %v\nafter  %v", before, after)
	}
	if got := cli(t, 0, "exec", running, "--", "cat", "/tmp/state"); strings.TrimSpace(got) != "kept" {
		t.Fatalf("the running sandbox after the restart: /tmp/state = %q", got)
	}

	// The agent's pod goes (an upgrade of the DaemonSet, a crash): its VMs do not (their
	// cgroups are outside the pod's, the agent is in the host's PID namespace), and the
	// next agent takes them back.
	oldAgent := kubectl(t, cp, "", "-n", ns, "get", "pods", "-l", "app.kubernetes.io/component=agent", "-o", "jsonpath={.items[0].metadata.name}")
	kubectl(t, cp, "", "-n", ns, "delete", "pod", oldAgent, "--timeout=2m")
	kubectlTimeout(t, cp, 5*time.Minute, "-n", ns, "rollout", "status", "daemonset/fw-fireworks-agent", "--timeout=5m")
	eventuallyWithin(t, 2*time.Minute, "the new agent back in the cluster", func() (bool, string) {
		out := cli(t, 0, "node", "ls")
		return regexp.MustCompile(`(?m)^node-1\s+ready\s`).MatchString(out), out
	})
	// An exec right away reaches the sandboxes the new agent took back (one sent while
	// the agent was away waits for it). Once, such an exec hung here for good: a
	// follower's forward of the stream waited for the client, which waited for it.
	for _, c := range []struct{ id, file, want string }{{running, "/tmp/state", "kept"}, {sandboxID, "/tmp/hello", "from-a-sandbox-object"}} {
		if got := cli(t, 0, "exec", c.id, "--", "cat", c.file); strings.TrimSpace(got) != c.want {
			t.Fatalf("exec in %s after the agent's pod was replaced: %s = %q, want %q", c.id, c.file, got, c.want)
		}
	}
	if after := records(); !mapsEqual(before, after) {
		t.Fatalf("records changed over the agent's replacement:\nbefore %v\nafter  %v", before, after)
	}
	cli(t, 0, "rm", "-f", running)
	kubectl(t, cp, "", "-n", "team-a", "delete", "sandbox", "hello", "--timeout=2m")
	eventuallyWithin(t, time.Minute, "the Sandbox's microVM gone", func() (bool, string) {
		out := cli(t, 0, "ps", "-q")
		return !strings.Contains(out, sandboxID), out
	})
}

// holdForAPerson leaves the node, its cluster and the test registry to a person (a
// reviewer trying the README): it writes to the file hold how to reach them, and waits
// until that file is removed (or the test's time is up). Nothing is installed: the
// person does what the README says. (FIREWORKS_KUBE_HOLD=FILE; see HACKING.md.)
func holdForAPerson(t *testing.T, ctx context.Context, hold string, cp *kubetest.ControlPlane, node *kubetest.Node, values, reg, imageTar string) {
	t.Helper()
	info := fmt.Sprintf(`# A Kubernetes cluster with one real node (kubelet, containerd, runc, kube-proxy, CoreDNS),
# held for you by TestHelmChartOnARealNode. Remove this file to end it.
# The e2e run lives in a network namespace of its own: run kubectl, helm and the CLI
# through $IN (e.g. $IN kubectl get nodes); a shell on the node is $NODE_SHELL ...
IN="nsenter -t %d --net --"
export KUBECONFIG=%s
export PATH=%s:$PATH          # kubectl, helm
NODE_SHELL="%s"               # prefix: runs a command on the node, e.g. $NODE_SHELL ctr --address %s -n k8s.io images ls
NODE_IMAGE_TAR=%s             # what `+"`make image`"+` builds, from this checkout (already imported as fireworks:%s)
VALUES=%s                     # the values this node needs (static volumes, taint tolerations, paths); the PersistentVolumes exist
REGISTRY=%s                   # a registry with test images (busybox:latest, ...), reachable from the node
`, os.Getpid(), cp.Kubeconfig, cp.Tools, node.Enter(), node.Containerd(), imageTar, nodeImageTag, values, reg)
	if err := os.WriteFile(hold, []byte(info), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("holding the cluster for a person: see %s; remove it to end", hold)
	for {
		if _, err := os.Stat(hold); err != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func kubectlTimeout(t *testing.T, cp *kubetest.ControlPlane, d time.Duration, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	out, err := cp.Kubectl(ctx, "", args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// portForward runs `kubectl port-forward target :port` for the rest of the test (or
// until the pod behind it goes: then the next call starts another) and returns the
// local address.
func portForward(t *testing.T, cp *kubetest.ControlPlane, ns, target string, port int) string {
	t.Helper()
	key := ns + "/" + target
	if pf, ok := forwards[key]; ok {
		select {
		case <-pf.done:
		default:
			return pf.addr
		}
	}
	cmd := exec.Command(filepath.Join(cp.Tools, "kubectl"), "--kubeconfig="+cp.Kubeconfig, "-n", ns, "port-forward", "--address", "127.0.0.1", target, fmt.Sprintf(":%d", port))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pf := &forward{cmd: cmd, done: make(chan struct{})}
	lines := make(chan string, 16)
	var said strings.Builder // what kubectl said before the address: the reason if it exits
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default: // "Handling connection" lines nobody reads
			}
		}
		_ = cmd.Wait()
		close(pf.done)
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	re := regexp.MustCompile(`Forwarding from (127\.0\.0\.1:\d+) ->`)
	deadline := time.After(30 * time.Second)
	for pf.addr == "" {
		select {
		case l := <-lines:
			if m := re.FindStringSubmatch(l); m != nil {
				pf.addr = m[1]
			}
			said.WriteString(l + "\n")
		case <-pf.done:
			for len(lines) > 0 {
				said.WriteString(<-lines + "\n")
			}
			t.Fatalf("kubectl port-forward %s exited: %s", target, said.String())
		case <-deadline:
			t.Fatalf("kubectl port-forward %s: no address in 30s", target)
		}
	}
	forwards[key] = pf
	return pf.addr
}

type forward struct {
	addr string
	cmd  *exec.Cmd
	done chan struct{}
}

// stopForwards ends every port-forward (their pods went away).
func stopForwards() {
	for k, pf := range forwards {
		_ = pf.cmd.Process.Kill()
		<-pf.done
		delete(forwards, k)
	}
}

// forwards are the port-forwards running, by namespace/target (the tests using them
// run one at a time).
var forwards = map[string]*forward{}

// dumpKubeNode logs what a failing node test needs: the pods, the node's components'
// logs and the Fireworks pods' logs.
func dumpKubeNode(t *testing.T, cp *kubetest.ControlPlane, node *kubetest.Node, ns string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, _ := cp.Kubectl(ctx, "", "get", "pods,pvc,events", "-A", "-o", "wide")
	t.Logf("kubectl get pods,pvc,events -A:\n%s", out)
	for _, c := range []string{"kubelet", "containerd", "kube-proxy", "coredns"} {
		t.Logf("%s log (tail):\n%s", c, node.Log(c, 3000))
	}
	pods, _ := cp.Kubectl(ctx, "", "-n", ns, "get", "pods", "-o", "name")
	for _, p := range strings.Fields(pods) {
		out, _ := cp.Kubectl(ctx, "", "-n", ns, "logs", p, "--tail=40")
		t.Logf("%s:\n%s", p, out)
	}
	t.Logf("controller manager (tail):\n%s", cp.Log("kube-controller-manager", 2000))
}
