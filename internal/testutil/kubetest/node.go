package kubetest

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The node's network: a veth pair between the tests' network namespace (HostLinkIP, where
// the API server listens) and the node's (NodeIP). Pods get addresses in PodCIDR on the
// node's bridge; the node's DNS (CoreDNS) answers at NodeIP.
const (
	HostLinkIP = "10.231.200.254"
	NodeIP     = "10.231.200.1"
	PodCIDR    = "10.244.0.0/24"
	// ServiceCIDR is the API server's --service-cluster-ip-range.
	ServiceCIDR = "10.96.0.0/16"
	// ClusterCIDR holds every node's pod range (one node here).
	ClusterCIDR = "10.244.0.0/16"
	// PauseImage is every pod's sandbox container (containerd's sandbox_image).
	PauseImage = "fireworks.test/pause:1"
	// NodeTaint keeps pods off the node unless they tolerate it (NoSchedule): tests that
	// install a chart with no node in mind leave pods pending, not running here.
	NodeTaint = "kubetest.fireworks.dev/node"
	// hostLink is the veth's name on the tests' side.
	hostLink = "fwkube0"
)

// Node is a Kubernetes node running for real: containerd (Debian's) with runc and the CNI
// bridge plugin, the kubelet, kube-proxy (nftables) and CoreDNS, in a network and mount
// namespace of their own. Pods run as containers on this machine.
type Node struct {
	Name string
	Dir  string
	cp   *ControlPlane
	// holder keeps the node's namespaces alive; every component enters them.
	holder *exec.Cmd
	sock   string // containerd's
	cgroup string // the kubelet's cgroup root (cgroup v1 and v2 alike)
	procs  procGroup
}

// StartNode runs one node named name under dir and waits until it is Ready. images are
// docker-archive tars imported into the node's containerd before the kubelet starts (so
// pods with imagePullPolicy IfNotPresent run them). One node per control plane: its
// addresses are fixed.
func (cp *ControlPlane) StartNode(ctx context.Context, name, dir string, images ...string) (_ *Node, err error) {
	n := &Node{Name: name, Dir: dir, cp: cp, sock: filepath.Join(dir, "containerd.sock"), cgroup: "/fwkube-" + name, procs: procGroup{logDir: dir}}
	defer func() {
		if err != nil {
			n.Stop()
		}
	}()
	for _, tool := range []string{"containerd", "ctr", "runc", "unshare", "nsenter", "nft", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found (scripts/install-deps.sh installs containerd, runc and containernetworking-plugins): %w", tool, err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := n.makeNamespaces(ctx); err != nil {
		return nil, err
	}
	if err := n.writeConfigs(); err != nil {
		return nil, err
	}
	if err := n.start("containerd", "containerd", "--config", filepath.Join(dir, "containerd.toml")); err != nil {
		return nil, err
	}
	if err := n.waitContainerd(ctx); err != nil {
		return nil, err
	}
	pause := filepath.Join(dir, "pause.tar")
	if err := writePauseImage(pause); err != nil {
		return nil, err
	}
	for _, img := range append([]string{pause}, images...) {
		if out, err := n.ctr(ctx, "images", "import", img); err != nil {
			return nil, fmt.Errorf("import %s into the node's containerd: %w\n%s", img, err, out)
		}
	}
	if err := n.makeCgroupRoot(); err != nil {
		return nil, err
	}
	if err := n.start("kubelet", filepath.Join(cp.Tools, "kubelet"), "--config="+filepath.Join(dir, "kubelet.yaml"),
		"--kubeconfig="+filepath.Join(dir, "kubelet.kubeconfig"), "--root-dir="+filepath.Join(dir, "kubelet"),
		"--hostname-override="+name, "--node-ip="+NodeIP, "--v=1"); err != nil {
		return nil, err
	}
	if err := n.start("kube-proxy", filepath.Join(cp.Tools, "kube-proxy"), "--config="+filepath.Join(dir, "kube-proxy.yaml"), "--v=1"); err != nil {
		return nil, err
	}
	if err := n.start("coredns", filepath.Join(cp.Tools, "coredns"), "-conf", filepath.Join(dir, "Corefile")); err != nil {
		return nil, err
	}
	if err := n.waitReady(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

// makeNamespaces starts the holder (new network and mount namespaces; mounts in the
// latter are shared among the node's components, so a pod's Bidirectional mount works,
// and private to the machine) and wires the veth pair.
func (n *Node) makeNamespaces(ctx context.Context) error {
	n.holder = exec.Command("unshare", "--net", "--mount", "--propagation", "shared", "--", "sleep", "infinity")
	n.holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := n.holder.Start(); err != nil {
		return fmt.Errorf("start the node's namespace holder: %w", err)
	}
	// unshare has made the namespaces once its exec of sleep is done.
	pid := strconv.Itoa(n.holder.Process.Pid)
	self, _ := os.Readlink("/proc/self/ns/net")
	for i := 0; ; i++ {
		if l, _ := os.Readlink("/proc/" + pid + "/ns/net"); l != "" && l != self {
			if exe, _ := os.Readlink("/proc/" + pid + "/exe"); strings.HasSuffix(exe, "/sleep") {
				break
			}
		}
		if i > 100 {
			return errors.New("the node's namespace holder did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = exec.Command("ip", "link", "delete", hostLink).Run() // a previous run's
	steps := [][]string{
		{"ip", "link", "add", hostLink, "type", "veth", "peer", "name", "eth0", "netns", pid},
		{"ip", "addr", "add", HostLinkIP + "/24", "dev", hostLink},
		{"ip", "link", "set", hostLink, "up"},
		// The tests reach pods directly too (their replies come back this way).
		{"ip", "route", "replace", ClusterCIDR, "via", NodeIP},
		{"nsenter", "-t", pid, "--net", "ip", "addr", "add", NodeIP + "/24", "dev", "eth0"},
		{"nsenter", "-t", pid, "--net", "ip", "link", "set", "eth0", "up"},
		{"nsenter", "-t", pid, "--net", "ip", "link", "set", "lo", "up"},
		// Services' addresses are routed like a real node's default route would (kube-proxy
		// rewrites them after the route is chosen). No default route otherwise: a packet
		// to an address nobody has fails at once.
		{"nsenter", "-t", pid, "--net", "ip", "route", "add", ServiceCIDR, "via", HostLinkIP},
		{"nsenter", "-t", pid, "--net", "sysctl", "-qw", "net.ipv4.ip_forward=1"},
		// The node's own bpffs, which the agent's pod mounts as the host's.
		{"nsenter", "-t", pid, "--mount", "mount", "-t", "bpf", "bpf", "/sys/fs/bpf"},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(s, " "), err, out)
		}
	}
	return nil
}

func (n *Node) writeConfigs() error {
	d := n.Dir
	kubeletCert, kubeletKey, err := n.cp.issueClientCert("system:node:"+n.Name, []string{"system:nodes"})
	if err != nil {
		return err
	}
	files := map[string]string{
		"containerd.toml": fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[4]q
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which a test machine in a
  # container may lack: runc then fails to start the pause container.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[5]q
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
`, filepath.Join(d, "containerd/root"), filepath.Join(d, "containerd/state"), n.sock, PauseImage, filepath.Join(d, "cni")),
		"cni/10-fwkube.conflist": fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "fwkube", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
`, filepath.Join(d, "cni-ipam"), PodCIDR),
		"kubelet.crt": string(kubeletCert),
		"kubelet.key": string(kubeletKey),
		"resolv.conf": "# the node has no upstream resolver: pods use the cluster's DNS\n",
		"kubelet.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %[1]s
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[2]q}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://%[3]s
cgroupDriver: cgroupfs
cgroupRoot: %[4]s
# The test machines run cgroup v1 and have swap.
failCgroupV1: false
failSwapOn: false
clusterDNS: [%[1]s]
clusterDomain: cluster.local
resolvConf: %[5]q
podLogsDir: %[6]q
# The test machine's disk is shared with everything else: no evictions for its use.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
serializeImagePulls: false
registerWithTaints: [{key: %[7]q, effect: NoSchedule}]
`, NodeIP, n.cp.CAFile, n.sock, n.cgroup, filepath.Join(d, "resolv.conf"), filepath.Join(d, "pod-logs"), NodeTaint),
		"kube-proxy.yaml": fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
hostnameOverride: %s
mode: nftables
clusterCIDR: %s
# Pods reach Services on their own bridge: without masquerading, the reply would skip
# the node's connection tracking.
nftables: {masqueradeAll: true}
# The conntrack limits are the machine's, not a network namespace's to set.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`, filepath.Join(d, "admin.kubeconfig"), n.Name, ClusterCIDR),
		"Corefile": fmt.Sprintf(`.:53 {
    errors
    health %[1]s:8180
    ready %[1]s:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig %[2]s
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
`, NodeIP, filepath.Join(d, "admin.kubeconfig")),
	}
	for _, sub := range []string{"cni", "cni-ipam", "pod-logs", "kubelet", "containerd"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return err
		}
	}
	for f, body := range files {
		if err := os.WriteFile(filepath.Join(d, f), []byte(body), 0o600); err != nil {
			return err
		}
	}
	// The node reaches the API server at HostLinkIP. kube-proxy and CoreDNS use the admin's
	// credentials (a test cluster's shortcut: in a real one each has its own).
	api := fmt.Sprintf("https://%s:%d", HostLinkIP, n.cp.port)
	pki := filepath.Join(n.cp.Dir, "pki")
	return errors.Join(
		writeKubeconfig(filepath.Join(d, "kubelet.kubeconfig"), api, n.cp.CAFile, filepath.Join(d, "kubelet.crt"), filepath.Join(d, "kubelet.key")),
		writeKubeconfig(filepath.Join(d, "admin.kubeconfig"), api, n.cp.CAFile, filepath.Join(pki, "admin.crt"), filepath.Join(pki, "admin.key")))
}

// start runs a component inside the node's namespaces.
func (n *Node) start(name, bin string, args ...string) error {
	cmd := exec.Command("nsenter", append([]string{"-t", strconv.Itoa(n.holder.Process.Pid), "--net", "--mount", "--", bin}, args...)...)
	cmd.Dir = n.Dir
	return n.procs.start(name, cmd)
}

// CgroupRoot is the kubelet's cgroup root (from the top of each hierarchy): what a test
// puts under it is ended with the node.
func (n *Node) CgroupRoot() string { return n.cgroup }

// Enter is the command line that runs a command in the node's namespaces, as a shell on
// the node would (append the command).
func (n *Node) Enter() string {
	return "nsenter -t " + strconv.Itoa(n.holder.Process.Pid) + " --net --mount --"
}

// Containerd is the node's containerd socket (for `ctr --address`).
func (n *Node) Containerd() string { return n.sock }

// Log returns the tail of a node component's log.
func (n *Node) Log(name string, max int) string { return n.procs.logTail(name, max) }

// Exec runs a command in the node's namespaces (the way a host's shell would).
func (n *Node) Exec(ctx context.Context, bin string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(n.holder.Process.Pid), "--net", "--mount", "--", bin}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s on the node: %w\n%s", bin, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (n *Node) ctr(ctx context.Context, args ...string) (string, error) {
	return n.Exec(ctx, "ctr", append([]string{"--address", n.sock, "--namespace", "k8s.io"}, args...)...)
}

func (n *Node) waitContainerd(ctx context.Context) error {
	return n.poll(ctx, time.Minute, "containerd answering", func() error {
		_, err := n.ctr(ctx, "version")
		return err
	})
}

func (n *Node) waitReady(ctx context.Context) error {
	return n.poll(ctx, 3*time.Minute, "node Ready and DNS answering", func() error {
		out, err := n.cp.Kubectl(ctx, "", "get", "node", n.Name, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "True" {
			return fmt.Errorf("node %s Ready=%q", n.Name, out)
		}
		// CoreDNS is ready once it has synced with the API server.
		resp, err := http.Get("http://" + NodeIP + ":8181/ready")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("CoreDNS /ready: HTTP %d", resp.StatusCode)
		}
		return nil
	})
}

func (n *Node) poll(ctx context.Context, limit time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(limit)
	var last error
	for {
		if err := n.procs.exited(); err != nil {
			return err
		}
		if last = f(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %s: %w", what, limit, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %v)", what, ctx.Err(), last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Stop ends the node: the kubelet first, then every container it ran (by the node's
// cgroups), containerd and its shims, then the namespaces. Pods are not drained: delete
// what should stop cleanly before.
func (n *Node) Stop() {
	n.procs.stopAll(func(name string) {
		if name == "containerd" {
			// The containers first, while containerd can still report on them.
			n.killCgroup()
		}
	})
	n.killCgroup()
	n.killShims()
	if n.holder != nil && n.holder.Process != nil {
		_ = n.holder.Process.Kill()
		_ = n.holder.Wait()
	}
	_ = exec.Command("ip", "link", "delete", hostLink).Run()
	_ = exec.Command("ip", "route", "delete", ClusterCIDR).Run()
	n.removeCgroups()
}

// makeCgroupRoot makes the kubelet's cgroup root in every hierarchy (it must exist), with
// cpuset's CPUs and memory nodes copied from the top (a new cpuset cgroup has none).
func (n *Node) makeCgroupRoot() error {
	ents, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return fmt.Errorf("cgroups: %w", err)
	}
	seen := map[string]bool{}
	for _, e := range ents {
		top, err := filepath.EvalSymlinks(filepath.Join("/sys/fs/cgroup", e.Name()))
		if err != nil || seen[top] {
			continue
		}
		seen[top] = true
		if _, err := os.Stat(filepath.Join(top, "cgroup.procs")); err != nil {
			continue // not a hierarchy (cgroup v2 has cgroup.procs at the top: handled below)
		}
		d := filepath.Join(top, n.cgroup)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("make the node's cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if b, err := os.ReadFile(filepath.Join(top, f)); err == nil {
				if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
					return fmt.Errorf("set %s of %s: %w", f, d, err)
				}
			}
		}
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil { // cgroup v2
		if err := os.MkdirAll(filepath.Join("/sys/fs/cgroup", n.cgroup), 0o755); err != nil {
			return fmt.Errorf("make the node's cgroup: %w", err)
		}
	}
	return nil
}

// cgroupDirs are the node's cgroup trees in every mounted hierarchy.
func (n *Node) cgroupDirs() []string {
	var dirs []string
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range ents {
		p := filepath.Join("/sys/fs/cgroup", e.Name(), n.cgroup)
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			dirs = append(dirs, p)
		}
	}
	if fi, err := os.Stat(filepath.Join("/sys/fs/cgroup", n.cgroup)); err == nil && fi.IsDir() {
		dirs = append(dirs, filepath.Join("/sys/fs/cgroup", n.cgroup))
	}
	return dirs
}

// killCgroup kills every process in the node's cgroups: the pods' containers.
func (n *Node) killCgroup() {
	for range 3 {
		killed := 0
		for _, d := range n.cgroupDirs() {
			_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
				if err != nil || e.IsDir() || e.Name() != "cgroup.procs" {
					return nil
				}
				b, _ := os.ReadFile(p)
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
						_ = syscall.Kill(pid, syscall.SIGKILL)
						killed++
					}
				}
				return nil
			})
		}
		if killed == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// killShims kills the containerd shims of this node's containerd (they outlive it).
func (n *Node) killShims() {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.Contains(b, []byte("containerd-shim")) && bytes.Contains(b, []byte(n.sock)) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// removeCgroups removes the node's (empty by now) cgroups, deepest first.
func (n *Node) removeCgroups() {
	for _, d := range n.cgroupDirs() {
		var all []string
		_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				all = append(all, p)
			}
			return nil
		})
		for i := len(all) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(all[i])
		}
	}
}

// writePauseImage writes the pods' sandbox image: busybox (Debian's busybox-static)
// sleeping. containerd kills it with SIGKILL when the pod stops.
func writePauseImage(path string) error {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("the pause image is made from busybox-static's /bin/busybox: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "busybox", Mode: 0o755, Size: int64(len(bb)), ModTime: time.Unix(0, 0)}); err != nil {
		return err
	}
	if _, err := tw.Write(bb); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	// ctr import skips an image whose config names no platform.
	cf.Architecture, cf.OS = "amd64", "linux"
	// Named busybox: busybox runs the applet its argv[0] names, unless that is busybox.
	cf.Config = v1.Config{Entrypoint: []string{"/busybox", "sleep", "2147483647"}}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	tag, err := name.NewTag(PauseImage)
	if err != nil {
		return err
	}
	return tarball.WriteToFile(path, tag, img)
}

// issueClientCert issues a client certificate from the control plane's CA.
func (cp *ControlPlane) issueClientCert(cn string, orgs []string) (certPEM, keyPEM []byte, err error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	cp.mu.Lock()
	cp.issued++
	serial := cp.issued
	cp.mu.Unlock()
	now := time.Now()
	t := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, t, cp.ca, k.Public(), cp.caKey)
	if err != nil {
		return nil, nil, err
	}
	kd, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), nil
}
