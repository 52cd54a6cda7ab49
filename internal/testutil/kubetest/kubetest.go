// Package kubetest runs a real Kubernetes control plane for tests: etcd (Debian's),
// kube-apiserver, kube-controller-manager and kube-scheduler built from the Go module
// proxy by scripts/kube-tools.sh, all on loopback, with certificates of their own.
package kubetest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ToolsDir builds (or finds cached) the Kubernetes tools with scripts/kube-tools.sh under
// repo and returns the directory holding them.
func ToolsDir(ctx context.Context, repo string) (string, error) {
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(repo, "scripts/kube-tools.sh"))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("scripts/kube-tools.sh: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1], nil
}

// ControlPlane is a running control plane.
type ControlPlane struct {
	Dir        string // certificates, kubeconfig, data and logs
	Kubeconfig string // an admin's kubeconfig (system:masters)
	URL        string // https://127.0.0.1:port
	Rest       *rest.Config
	Tools      string
	// CAFile and CAKeyFile are the cluster CA's (a kubelet's client certificate is
	// issued from them).
	CAFile, CAKeyFile string

	port   int
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	issued int64 // serial numbers of certificates issued

	mu    sync.Mutex // guards issued
	procs procGroup
}

// Option changes how Start runs the control plane.
type Option func(*options)

type options struct{ bind string }

// ForNodes makes the API server listen on every address, not only loopback, so that a
// node (StartNode) reaches it at HostLinkIP: for tests in a network namespace of their
// own.
func ForNodes() Option { return func(o *options) { o.bind = "0.0.0.0" } }

// Start runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler with
// everything under dir, and waits for the API server to be ready. Stop ends them.
func Start(ctx context.Context, tools, dir string, opts ...Option) (_ *ControlPlane, err error) {
	o := options{bind: "127.0.0.1"}
	for _, f := range opts {
		f(&o)
	}
	cp := &ControlPlane{Dir: dir, Tools: tools, procs: procGroup{logDir: dir}}
	defer func() {
		if err != nil {
			cp.Stop()
		}
	}()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	pki, err := cp.makePKI()
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	etcdClient := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	etcdPeer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	etcdBin, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("etcd not found (Debian's etcd-server; scripts/install-deps.sh installs it): %w", err)
	}
	if err := cp.start("etcd", etcdBin, "--name=default", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdClient, "--advertise-client-urls="+etcdClient,
		"--listen-peer-urls="+etcdPeer, "--initial-advertise-peer-urls="+etcdPeer,
		"--initial-cluster=default="+etcdPeer, "--log-level=warn",
		// The tests write little; etcd's default 2 GiB quota and fsync per write are for
		// production. Keep writes cheap on a shared disk.
		"--unsafe-no-fsync"); err != nil {
		return nil, err
	}
	cp.URL = fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	cp.port = ports[2]
	// It advertises HostLinkIP: pods on a node (StartNode) reach the `kubernetes` Service
	// through kube-proxy to there.
	if err := cp.start("kube-apiserver", filepath.Join(tools, "kube-apiserver"),
		"--etcd-servers="+etcdClient,
		"--bind-address="+o.bind, "--advertise-address="+HostLinkIP, "--secure-port="+strconv.Itoa(ports[2]),
		"--tls-cert-file="+pki["apiserver.crt"], "--tls-private-key-file="+pki["apiserver.key"],
		"--client-ca-file="+pki["ca.crt"],
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pki["sa.pub"], "--service-account-signing-key-file="+pki["sa.key"],
		"--service-cluster-ip-range="+ServiceCIDR,
		"--authorization-mode=Node,RBAC", "--allow-privileged=true",
		"--kubelet-client-certificate="+pki["admin.crt"], "--kubelet-client-key="+pki["admin.key"],
		// Nodes by their InternalIP, not by a name the machine's resolver does not know.
		"--kubelet-preferred-address-types=InternalIP",
		"--enable-priority-and-fairness=false", "--v=0"); err != nil {
		return nil, err
	}
	cp.Kubeconfig = filepath.Join(dir, "admin.kubeconfig")
	if err := writeKubeconfig(cp.Kubeconfig, cp.URL, pki["ca.crt"], pki["admin.crt"], pki["admin.key"]); err != nil {
		return nil, err
	}
	if cp.Rest, err = clientcmd.BuildConfigFromFlags("", cp.Kubeconfig); err != nil {
		return nil, err
	}
	if err := cp.waitReady(ctx); err != nil {
		return nil, err
	}
	if err := cp.start("kube-controller-manager", filepath.Join(tools, "kube-controller-manager"),
		"--kubeconfig="+cp.Kubeconfig, "--authentication-kubeconfig="+cp.Kubeconfig, "--authorization-kubeconfig="+cp.Kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
		"--service-account-private-key-file="+pki["sa.key"], "--root-ca-file="+pki["ca.crt"],
		"--cluster-signing-cert-file="+pki["ca.crt"], "--cluster-signing-key-file="+pki["ca.key"],
		"--use-service-account-credentials=true", "--controllers=*", "--v=0"); err != nil {
		return nil, err
	}
	if err := cp.start("kube-scheduler", filepath.Join(tools, "kube-scheduler"),
		"--kubeconfig="+cp.Kubeconfig, "--authentication-kubeconfig="+cp.Kubeconfig, "--authorization-kubeconfig="+cp.Kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--v=0"); err != nil {
		return nil, err
	}
	return cp, nil
}

// Kubectl runs the built kubectl against the control plane.
func (cp *ControlPlane) Kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	return cp.run(ctx, stdin, "kubectl", append([]string{"--kubeconfig=" + cp.Kubeconfig}, args...)...)
}

// Helm runs the built helm against the control plane.
func (cp *ControlPlane) Helm(ctx context.Context, args ...string) (string, error) {
	return cp.run(ctx, "", "helm", append([]string{"--kubeconfig=" + cp.Kubeconfig}, args...)...)
}

func (cp *ControlPlane) run(ctx context.Context, stdin, tool string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(cp.Tools, tool), args...)
	cmd.Stdin = strings.NewReader(stdin)
	// helm keeps caches and its config under HOME: the test's directory, not the user's.
	cmd.Env = append(os.Environ(), "HOME="+filepath.Join(cp.Dir, "home"), "HELM_CACHE_HOME="+filepath.Join(cp.Dir, "home/cache"),
		"HELM_CONFIG_HOME="+filepath.Join(cp.Dir, "home/config"), "HELM_DATA_HOME="+filepath.Join(cp.Dir, "home/data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Log returns the tail of a component's log (for a failing test's message).
func (cp *ControlPlane) Log(name string, n int) string { return cp.procs.logTail(name, n) }

func (cp *ControlPlane) start(name, bin string, args ...string) error {
	return cp.procs.start(name, exec.Command(bin, args...))
}

// Stop ends the components, the last started first.
func (cp *ControlPlane) Stop() { cp.procs.stopAll(nil) }

func (cp *ControlPlane) waitReady(ctx context.Context) error {
	tc, err := rest.TLSConfigFor(cp.Rest)
	if err != nil {
		return err
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}, Timeout: 5 * time.Second}
	deadline := time.Now().Add(2 * time.Minute)
	var last error
	for time.Now().Before(deadline) {
		if err := cp.procs.exited(); err != nil {
			return err
		}
		resp, err := hc.Get(cp.URL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("/readyz: HTTP %d", resp.StatusCode)
		}
		last = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
	return fmt.Errorf("kube-apiserver not ready in 2 minutes: %v\n%s", last, cp.Log("kube-apiserver", 3000))
}

// makePKI writes the control plane's CA, the API server's certificate, an admin's client
// certificate (system:masters) and the service account key pair; it returns their paths.
func (cp *ControlPlane) makePKI() (map[string]string, error) {
	dir := filepath.Join(cp.Dir, "pki")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	paths := map[string]string{}
	write := func(name string, data []byte) error {
		p := filepath.Join(dir, name)
		paths[name] = p
		return os.WriteFile(p, data, 0o600)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubetest-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(cn string, orgs []string, server bool, serial int64) (certPEM, keyPEM []byte, err error) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		t := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: orgs},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		if server {
			t.ExtKeyUsage = append(t.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
			t.DNSNames = []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
			t.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.ParseIP("10.96.0.1"), net.ParseIP(HostLinkIP)}
		}
		der, err := x509.CreateCertificate(rand.Reader, t, ca, k.Public(), caKey)
		if err != nil {
			return nil, nil, err
		}
		kd, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return nil, nil, err
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), nil
	}
	caKeyDER, err := x509.MarshalPKCS8PrivateKey(caKey)
	if err != nil {
		return nil, err
	}
	errs := []error{
		write("ca.crt", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})),
		write("ca.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: caKeyDER})),
	}
	for i, l := range []struct {
		name, cn string
		orgs     []string
		server   bool
	}{{"apiserver", "kube-apiserver", nil, true}, {"admin", "admin", []string{"system:masters"}, false}} {
		c, k, err := leaf(l.cn, l.orgs, l.server, int64(i+2))
		if err != nil {
			return nil, err
		}
		errs = append(errs, write(l.name+".crt", c), write(l.name+".key", k))
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saDER, _ := x509.MarshalPKCS8PrivateKey(saKey)
	saPub, _ := x509.MarshalPKIXPublicKey(saKey.Public())
	errs = append(errs, write("sa.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: saDER})),
		write("sa.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub})))
	cp.CAFile, cp.CAKeyFile = paths["ca.crt"], paths["ca.key"]
	cp.ca, cp.caKey, cp.issued = ca, caKey, 10
	return paths, errors.Join(errs...)
}

func writeKubeconfig(path, server, ca, cert, key string) error {
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kubetest
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: admin
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: kubetest
  context:
    cluster: kubetest
    user: admin
current-context: kubetest
`, server, ca, cert, key)
	return os.WriteFile(path, []byte(cfg), 0o600)
}

func freePorts(n int) ([]int, error) {
	var out []int
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		out = append(out, ln.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}
