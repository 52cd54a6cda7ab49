// Package cluster tests a real Fireworks cluster from the outside: three `fireworks
// server` processes and three `fireworks agent` processes, each in its own network
// namespace as its own host on a test bridge, driven with the real CLI. Sandboxes boot
// real guests (under TCG here), so the scenarios keep VMs few.
package cluster

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/hostnet"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

const minute = 60 * time.Second

const (
	bridge     = "fwtbr0"
	subnet     = "10.99.0"
	bridgeIP   = subnet + ".1"
	apiPort    = "7766"
	raftPort   = "7767"
	nodePort   = "7768"
	heartbeat  = "6s" // TTL: a killed agent is declared down quickly
	pprofPort  = "6060"
	maxStale   = "10s"
	nodeMemory = "700"
)

// proc is a fireworks process running in a host.
type proc struct {
	h       *hostnet.Host
	bin     string // the fireworks binary it runs ("": w.bin)
	args    []string
	log     string
	cmd     *exec.Cmd
	exited  chan struct{}
	dataDir string
}

type world struct {
	root, bin, initBin, caDir string
	registry                  string
	net                       *hostnet.Net
	servers, agents           []*proc
	token                     string
	skip                      string
	mu                        sync.Mutex
	// netnsBefore is /run/netns before the cluster started: the sandbox namespaces of
	// agents killed midway (and never adopted again) are what appeared since.
	netnsBefore map[string]bool
	// pinsBefore is /sys/fs/bpf/fireworks before: the agents' pin directories are what
	// appeared since.
	pinsBefore map[string]bool
}

var w world

func TestMain(m *testing.M) {
	code := func() int {
		if os.Geteuid() != 0 {
			w.skip = "cluster tests need root (network namespaces, VM disks)"
			return m.Run()
		}
		for _, tool := range []string{"ip", "qemu-system-x86_64", "mkfs.ext4"} {
			if _, err := exec.LookPath(tool); err != nil {
				w.skip = tool + " not found (run ./scripts/install-deps.sh)"
				return m.Run()
			}
		}
		root, err := os.MkdirTemp("", "fwcl")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(root)
		w.root = root
		w.netnsBefore = netnsNames()
		w.pinsBefore = pinDirs()
		defer w.teardown()
		if err := w.setup(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster setup:", err)
			w.dumpLogs()
			return 1
		}
		rc := m.Run()
		if rc != 0 {
			w.dumpLogs()
		}
		return rc
	}()
	os.Exit(code)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func (w *world) setup() error {
	var err error
	if w.bin, w.initBin, err = testutil.BuildBinaries(w.root); err != nil {
		return err
	}
	// The guest kernel is fetched here, in the machine's own network namespace, into the
	// cache every agent links as its assets: an agent inside its host's namespace has no
	// route to the package mirror, and no test may rely on an earlier run's cache.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if _, err := assets.EnsureKernel(ctx, testutil.AssetCache()); err != nil {
		return fmt.Errorf("fetch the guest kernel into %s: %w", testutil.AssetCache(), err)
	}
	// The bridge joins the hosts; the test process (root namespace) sits on it too.
	if w.net, err = hostnet.Make(bridge, subnet, "fwt", 6); err != nil {
		return err
	}

	// Test images come from an in-process registry on the bridge address.
	ln, err := net.Listen("tcp", bridgeIP+":0")
	if err != nil {
		return err
	}
	reg := httptest.NewUnstartedServer(registry.New(registry.Logger(nopLogger())))
	reg.Listener.Close()
	reg.Listener = ln
	reg.Start()
	w.registry = ln.Addr().String()
	img, err := testimage.BuildBusybox()
	if err != nil {
		return err
	}
	ref, _ := name.ParseReference(w.registry+"/busybox:latest", name.Insecure)
	if err := remote.Write(ref, img); err != nil {
		return fmt.Errorf("push test image: %w", err)
	}

	w.caDir = filepath.Join(w.root, "ca")
	if out, err := exec.Command(w.bin, "ca", "create", w.caDir).CombinedOutput(); err != nil {
		return fmt.Errorf("ca create: %v: %s", err, out)
	}
	w.token = "fwk_00000000000000aa_" + strings.Repeat("ab", 32)
	for i := range 3 {
		w.servers = append(w.servers, &proc{h: w.net.Hosts[i], dataDir: filepath.Join(w.root, fmt.Sprintf("s%d", i)), log: filepath.Join(w.root, fmt.Sprintf("s%d.log", i))})
	}
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range w.servers {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = w.startServer(i) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := w.waitAPI(30 * time.Second); err != nil {
		return err
	}
	join, err := w.fw(nil, "token", "create", "--role", "join", "--name", "test-agents", "--uses", "16")
	if err != nil {
		return fmt.Errorf("create join token: %w", err)
	}
	labels := []string{"zone=b,host=a0", "zone=b,host=a1", "zone=c,host=a2"}
	for i := range 3 {
		p := &proc{h: w.net.Hosts[3+i], dataDir: filepath.Join(w.root, fmt.Sprintf("a%d", i)), log: filepath.Join(w.root, fmt.Sprintf("a%d.log", i))}
		if err := os.MkdirAll(p.dataDir, 0o700); err != nil {
			return err
		}
		if err := os.MkdirAll(testutil.AssetCache(), 0o755); err != nil {
			return err
		}
		if err := os.Symlink(testutil.AssetCache(), filepath.Join(p.dataDir, "assets")); err != nil {
			return err
		}
		p.args = []string{"agent", "--server", w.serverList(), "--join-token", strings.TrimSpace(join),
			"--data-dir", p.dataDir, "--node", fmt.Sprintf("a%d", i), "--listen", p.h.IP + ":" + nodePort,
			"--label", labels[i], "--memory", nodeMemory, "--init-binary", w.initBin, "--log-level", "debug"}
		w.agents = append(w.agents, p)
		if err := w.start(p); err != nil {
			return err
		}
	}
	return w.waitNodes(3, "ready", 5*time.Minute)
}

func (w *world) serverList() string {
	var s []string
	for _, p := range w.servers {
		s = append(s, p.h.IP+":"+apiPort)
	}
	return strings.Join(s, ",")
}

func (w *world) startServer(i int) error {
	p := w.servers[i]
	var peers []string
	for j, s := range w.servers {
		peers = append(peers, fmt.Sprintf("s%d=%s:%s", j, s.h.IP, raftPort))
	}
	p.args = []string{"server", "--node-id", fmt.Sprintf("s%d", i), "--data-dir", p.dataDir,
		"--listen", p.h.IP + ":" + apiPort, "--raft-listen", p.h.IP + ":" + raftPort, "--peers", strings.Join(peers, ","),
		"--ca-dir", w.caDir, "--bootstrap-token", w.token, "--heartbeat-ttl", heartbeat, "--max-stale", maxStale, "--log-level", "debug"}
	return w.start(p)
}

// start runs p's command in its host's namespace.
func (w *world) start(p *proc) error {
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	// nsenter, not `ip netns exec`: only the network namespace changes. `ip netns exec`
	// also gives the process a mount namespace of its own with a fresh /sys, so the bpffs
	// an agent pins its sandboxes' policy programs in would die with the process, and a
	// restarted agent could not take them back (on a real host the agent shares the
	// host's /sys/fs/bpf).
	args := p.args
	if p.bin == "" {
		// Runtime profiles on the host's own loopback (TestSoak counts goroutines); an
		// earlier release (TestRollingUpgrade) may not have the flag.
		args = append(slices.Clone(args), "--pprof-listen", "127.0.0.1:"+pprofPort)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + p.h.NS, "--", cmp.Or(p.bin, w.bin)}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	p.cmd, p.exited = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(p.exited) }()
	return nil
}

// stop ends p: SIGTERM (graceful) or SIGKILL of its whole process group (a crash, VMs
// included, as when the host dies).
func (w *world) stop(p *proc, kill bool) {
	if p.cmd == nil {
		return
	}
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
	if kill {
		// VMMs the agent started run in their own process groups: a dead host takes
		// them along.
		_ = exec.Command("pkill", "-9", "-f", p.dataDir+"/run/").Run()
	}
	p.cmd = nil
}

func (w *world) teardown() {
	for _, p := range append(append([]*proc{}, w.agents...), w.servers...) {
		w.stop(p, false)
	}
	// A graceful agent stop leaves its VMs for the next agent to adopt; none comes.
	for _, p := range w.agents {
		_ = exec.Command("pkill", "-9", "-f", "qemu-system-x86_64 .*"+p.dataDir+"/run/").Run()
	}
	// Nor their sandboxes' network namespaces, which no agent sweeps now.
	for n := range netnsNames() {
		if strings.HasPrefix(n, "fw-") && !w.netnsBefore[n] {
			_ = run("ip", "netns", "del", n)
		}
	}
	for d := range pinDirs() {
		if !w.pinsBefore[d] {
			_ = os.RemoveAll(d)
		}
	}
	if w.net != nil {
		w.net.Remove()
	}
}

// pinDirs is the set of the agents' eBPF pin directories (/sys/fs/bpf/fireworks/*).
func pinDirs() map[string]bool {
	m := map[string]bool{}
	dirs, _ := filepath.Glob("/sys/fs/bpf/fireworks/*")
	for _, d := range dirs {
		m[d] = true
	}
	return m
}

// netnsNames is the set of named network namespaces (/run/netns).
func netnsNames() map[string]bool {
	m := map[string]bool{}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		m[e.Name()] = true
	}
	return m
}

func (w *world) dumpLogs() {
	for _, p := range append(append([]*proc{}, w.servers...), w.agents...) {
		data, _ := os.ReadFile(p.log)
		if len(data) > 6000 {
			data = data[len(data)-6000:]
		}
		fmt.Fprintf(os.Stderr, "---- %s (tail) ----\n%s\n", filepath.Base(p.log), data)
	}
}

// fw runs the CLI against the servers (any of them; it fails over) as the admin.
func (w *world) fw(env []string, args ...string) (string, error) {
	out, errOut, code := w.cli(context.Background(), env, args...)
	if code != 0 {
		return out, fmt.Errorf("fireworks %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out, nil
}

func (w *world) cli(ctx context.Context, env []string, args ...string) (stdout, stderr string, code int) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, w.bin, args...)
	cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+filepath.Join(w.root, "none.json"), "FIREWORKS_SERVER=https://"+w.serverList(),
		"FIREWORKS_TOKEN="+w.token, "FIREWORKS_CA="+filepath.Join(w.caDir, "ca.pem"))
	cmd.Env = append(cmd.Env, env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		return o.String(), err.Error(), -1
	}
	return o.String(), e.String(), code
}

func (w *world) waitAPI(d time.Duration) error {
	deadline := time.Now().Add(d)
	var err error
	for time.Now().Before(deadline) {
		if _, err = w.fw(nil, "info"); err == nil {
			return nil
		}
		time.Sleep(300 * time.Millisecond)
	}
	return fmt.Errorf("cluster API did not answer: %w", err)
}

func (w *world) nodes() (map[string]string, error) {
	out, err := w.fw(nil, "node", "ls")
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) >= 2 {
			m[f[0]] = f[1]
		}
	}
	return m, nil
}

func (w *world) waitNodes(n int, status string, d time.Duration) error {
	deadline := time.Now().Add(d)
	var last map[string]string
	for time.Now().Before(deadline) {
		m, err := w.nodes()
		if err == nil {
			last = m
			count := 0
			for _, s := range m {
				if s == status {
					count++
				}
			}
			if count >= n {
				return nil
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("want %d nodes %s, have %v", n, status, last)
}

// need skips a test, naming what is missing, when the cluster could not be built here.
func need(t *testing.T) {
	t.Helper()
	if w.skip != "" {
		testutil.Skipf(t, "cluster: %s", w.skip)
	}
}

func mustFW(t *testing.T, args ...string) string {
	t.Helper()
	out, err := w.fw(nil, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func inspect(t *testing.T, id string) map[string]any {
	t.Helper()
	var sb map[string]any
	if err := json.Unmarshal([]byte(mustFW(t, "inspect", id)), &sb); err != nil {
		t.Fatalf("inspect %s: %v", id, err)
	}
	return sb
}

// waitSandbox polls inspect until cond holds or d passes.
func waitSandbox(t *testing.T, id string, d time.Duration, what string, cond func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(d)
	var sb map[string]any
	for time.Now().Before(deadline) {
		if out, err := w.fw(nil, "inspect", id); err == nil {
			sb = nil
			if json.Unmarshal([]byte(out), &sb) == nil && cond(sb) {
				return sb
			}
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatalf("sandbox %s: %s did not happen within %s; last: status %v node %v reason %v", id, what, d, sb["status"], sb["node"], sb["reason"])
	return nil
}

func image() string { return w.registry + "/busybox:latest" }

// ensureRunning restarts any server or agent a test stopped, so later tests find the
// whole cluster.
func (w *world) ensureRunning() {
	for _, p := range append(append([]*proc{}, w.servers...), w.agents...) {
		if p.cmd == nil {
			if err := w.start(p); err != nil {
				fmt.Fprintln(os.Stderr, "restart", p.log, err)
			}
		}
	}
}

// vmsOf lists the VMM processes of p's host that run sandbox id: QEMU named after it, or
// using its run directory (which, for a VMM launched ahead, links to the slot's).
func (w *world) vmsOf(p *proc, id string) []string {
	marks := []string{"guest=" + id + " "}
	if dir, err := filepath.EvalSymlinks(filepath.Join(p.dataDir, "run", id)); err == nil {
		marks = append(marks, dir+"/")
	}
	var found []string
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range cmdlines {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.Contains(b, []byte("qemu-system")) || !bytes.Contains(b, []byte(p.dataDir)) {
			continue
		}
		line := string(bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		for _, m := range marks {
			if strings.Contains(line, m) {
				found = append(found, filepath.Base(filepath.Dir(f)))
				break
			}
		}
	}
	return found
}
