package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
)

// The e2e run has a network namespace of its own (see netns_test.go): it is the node.
// outside is another namespace the test makes, wired to the node like a host on the
// internet would be (sandboxes reach it through the node's NAT). It serves HTTP on
// outsideAddr:8080 and :9090, and on the metadata address 169.254.169.254:80 (the node
// routes that address to it, as a cloud would). The node itself serves on nodeAddr:7001.
const (
	outsideNS   = "fwe2e-outside"
	nodeAddr    = "10.231.100.1"
	outsideAddr = "10.231.100.2"
	metadata    = "169.254.169.254"
)

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v %s", strings.Join(args, " "), err, out)
	}
}

// serveHTTP answers "<name>" on addr from inside the network namespace at nsPath ("" =
// the node's own), until the test ends.
func serveHTTP(t *testing.T, nsPath, addr, name string) {
	t.Helper()
	var ln net.Listener
	listen := func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		err = network.Do(nsPath, listen)
	}
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, name) })}
	go srv.Serve(ln) // ends when the test's cleanup closes it
	t.Cleanup(func() { srv.Close() })
}

// setUpOutside makes the outside host (once per test that needs it).
func setUpOutside(t *testing.T) {
	t.Helper()
	_ = exec.Command("ip", "netns", "delete", outsideNS).Run()
	ipCmd(t, "netns", "add", outsideNS)
	t.Cleanup(func() {
		_ = exec.Command("ip", "netns", "delete", outsideNS).Run()
		_ = exec.Command("ip", "link", "delete", "fwe2e-o0").Run()
	})
	ipCmd(t, "link", "add", "fwe2e-o0", "type", "veth", "peer", "name", "eth0", "netns", outsideNS)
	ipCmd(t, "addr", "add", nodeAddr+"/24", "dev", "fwe2e-o0")
	ipCmd(t, "link", "set", "fwe2e-o0", "up")
	ipCmd(t, "-n", outsideNS, "addr", "add", outsideAddr+"/24", "dev", "eth0")
	ipCmd(t, "-n", outsideNS, "addr", "add", metadata+"/32", "dev", "eth0")
	ipCmd(t, "-n", outsideNS, "link", "set", "eth0", "up")
	ipCmd(t, "-n", outsideNS, "link", "set", "lo", "up")
	ipCmd(t, "-n", outsideNS, "route", "add", "default", "via", nodeAddr)
	ipCmd(t, "route", "replace", metadata+"/32", "via", outsideAddr)
	ns := filepath.Join("/run/netns", outsideNS)
	serveHTTP(t, ns, outsideAddr+":8080", "outside-8080")
	serveHTTP(t, ns, outsideAddr+":9090", "outside-9090")
	serveHTTP(t, ns, metadata+":80", "metadata")
	serveHTTP(t, "", nodeAddr+":7001", "node")
}

// startServer runs a detached sandbox serving "hello-<tag>" on guest port 8080.
func startServer(t *testing.T, tag string, extra ...string) (id string, sb map[string]any) {
	t.Helper()
	args := append([]string{"run", "-d"}, extra...)
	args = append(args, image("busybox:latest"), "--", "sh", "-c",
		"mkdir -p /tmp/www && echo hello-"+tag+" > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www")
	id = strings.TrimSpace(fw(t, 0, args...).stdout)
	t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", id) })
	return id, waitStatus(t, id, "running")
}

// fetch asks for / at addr:port from inside sandbox id (busybox nc) and returns the body
// line, or "" when the connection failed.
func fetch(t *testing.T, id, addr string, port int) string {
	t.Helper()
	r := fw(t, 0, "exec", id, "--", "sh", "-c",
		fmt.Sprintf(`printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 %s %d 2>/dev/null | tail -n 1; true`, addr, port))
	return strings.TrimSpace(r.stdout)
}

// counters reads a sandbox's network counters from inspect.
func counters(t *testing.T, id string) map[string]uint64 {
	t.Helper()
	n, _ := inspect(t, id)["network"].(map[string]any)
	if n == nil {
		t.Fatalf("inspect %s has no network status", id)
	}
	out := map[string]uint64{}
	for _, k := range []string{"egress_allowed", "egress_dropped", "ingress_allowed", "ingress_dropped", "spoofed_dropped"} {
		switch v := n[k].(type) {
		case string:
			out[k], _ = strconv.ParseUint(v, 10, 64)
		case float64:
			out[k] = uint64(v)
		}
	}
	return out
}

func writePolicy(t *testing.T, text string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "policy")
	if err := os.WriteFile(f, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// A sandbox reaches the outside through NAT, but not the node's own addresses or the
// metadata address; a policy applied to the running sandbox takes effect at once (same
// VM), a malformed one is refused and the old one stays, and what was blocked by default
// passes once allowed. Dropped packets are counted.
func TestNetworkPolicy(t *testing.T) {
	need(t)
	setUpOutside(t)
	id, sb := startServer(t, "a")
	pid := str(details(t, sb), "pid")

	if got := fetch(t, id, outsideAddr, 8080); got != "outside-8080" {
		t.Fatalf("outside:8080 from the sandbox: %q", got)
	}
	if got := fetch(t, id, outsideAddr, 9090); got != "outside-9090" {
		t.Fatalf("outside:9090 from the sandbox: %q", got)
	}
	before := counters(t, id)
	if got := fetch(t, id, nodeAddr, 7001); got != "" {
		t.Errorf("the node's own address answered the sandbox: %q", got)
	}
	if got := fetch(t, id, metadata, 80); got != "" {
		t.Errorf("the metadata address answered the sandbox: %q", got)
	}
	after := counters(t, id)
	if after["egress_dropped"] <= before["egress_dropped"] {
		t.Errorf("egress drops did not rise: %v -> %v", before, after)
	}

	// A live change: 9090 denied, the rest allowed.
	fw(t, 0, "policy", "apply", id, writePolicy(t, "default allow\ndeny 10.231.100.2 tcp 9090\n"))
	if got := fetch(t, id, outsideAddr, 9090); got != "" {
		t.Errorf("outside:9090 answered after it was denied: %q", got)
	}
	if got := fetch(t, id, outsideAddr, 8080); got != "outside-8080" {
		t.Errorf("outside:8080 after denying 9090: %q", got)
	}
	// Malformed: refused with the line, old policy stays.
	r := fw(t, 125, "policy", "apply", id, writePolicy(t, "default allow\nallow 10.0.0.0/8 tcp 99999\n"))
	if !strings.Contains(r.stderr, "line 2") {
		t.Errorf("malformed policy error does not name the line: %s", r.stderr)
	}
	if got := fetch(t, id, outsideAddr, 9090); got != "" {
		t.Errorf("outside:9090 answered after a refused policy (the old one must stay): %q", got)
	}
	show := fw(t, 0, "policy", "show", id).stdout
	// Directed broadcast to the node's subnet, limited broadcast and multicast are
	// protected like the node's own addresses (node services bound to 0.0.0.0 hear them).
	for _, want := range []string{"deny out 10.231.100.255/32", "deny out 255.255.255.255/32", "deny out 224.0.0.0/4", "deny out " + nodeAddr + "/32"} {
		if !strings.Contains(show, want) {
			t.Errorf("policy show does not enforce %q:\n%s", want, show)
		}
	}
	if !strings.Contains(show, "deny 10.231.100.2/32 tcp 9090") && !strings.Contains(show, "deny 10.231.100.2 tcp 9090") {
		t.Errorf("policy show does not list the rule in force:\n%s", show)
	}
	// The metadata block is a policy default: allowing it opens it.
	fw(t, 0, "policy", "apply", id, writePolicy(t, "default allow\nallow 169.254.169.254\n"))
	if got := fetch(t, id, metadata, 80); got != "metadata" {
		t.Errorf("metadata address after allowing it: %q", got)
	}
	fw(t, 0, "policy", "apply", id, writePolicy(t, "default allow\nallow 10.231.100.1 tcp 7001\n"))
	if got := fetch(t, id, nodeAddr, 7001); got != "node" {
		t.Errorf("the node's address after an admin allowed it: %q", got)
	}
	if got := str(details(t, inspect(t, id)), "pid"); got != pid {
		t.Errorf("the VM changed (pid %s -> %s): policies must apply without a restart", pid, got)
	}
}

// udpSink collects the DNS query names the outside host receives on addr (busybox has no
// UDP netcat, but its nslookup sends a query naming what we choose).
func udpSink(t *testing.T, addr string) func() string {
	t.Helper()
	var pc net.PacketConn
	if err := network.Do(filepath.Join("/run/netns", outsideNS), func() error {
		var err error
		pc, err = net.ListenPacket("udp4", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	var mu sync.Mutex
	var got []string
	go func() { // ends when the socket closes
		buf := make([]byte, 2048)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if n > 13 { // a DNS header (12 bytes), then the first label's length and text
				l := int(buf[12])
				name := string(buf[13 : 13+min(l, n-13)])
				mu.Lock()
				if !slices.Contains(got, name) { // nslookup retries
					got = append(got, name)
				}
				mu.Unlock()
			}
		}
	}()
	return func() string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(got, ",")
	}
}

// The guest cannot send from an address or MAC that is not its own: such frames are
// dropped at its tap and counted, and nothing of them reaches the outside.
func TestNetworkAntiSpoofing(t *testing.T) {
	need(t)
	setUpOutside(t)
	received := udpSink(t, outsideAddr+":53")
	id, _ := startServer(t, "s")
	send := func(msg string) {
		t.Helper()
		fw(t, 0, "exec", id, "--", "sh", "-c", "timeout 3 nslookup "+msg+" "+outsideAddr+" >/dev/null 2>&1; true")
	}
	send("real-1")
	before := counters(t, id)
	// Another source address for the outside's subnet.
	fw(t, 0, "exec", "-u", "root", id, "--", "sh", "-c", "ip addr add 10.99.0.5/32 dev eth0 && ip route add 10.231.100.0/24 via 169.254.0.22 src 10.99.0.5")
	send("spoofed-address")
	mid := counters(t, id)
	if mid["spoofed_dropped"] <= before["spoofed_dropped"] {
		t.Errorf("spoofed-address frames not counted: %v -> %v", before, mid)
	}
	fw(t, 0, "exec", "-u", "root", id, "--", "sh", "-c", "ip route del 10.231.100.0/24 && ip addr del 10.99.0.5/32 dev eth0")
	send("real-2")
	// Another MAC.
	fw(t, 0, "exec", "-u", "root", id, "--", "ip", "link", "set", "eth0", "address", "02:fc:00:00:00:09")
	send("spoofed-mac")
	if end := counters(t, id); end["spoofed_dropped"] <= mid["spoofed_dropped"] {
		t.Errorf("spoofed-MAC frames not counted: %v -> %v", mid, end)
	}
	time.Sleep(time.Second) // anything in flight lands
	if got := received(); got != "real-1,real-2" {
		t.Errorf("the outside received %q, want only real-1,real-2", got)
	}
}

// Two sandboxes cannot reach each other by default, and can once a policy allows it; a
// policy given at `run` is in force from the start.
func TestNetworkSandboxesIsolated(t *testing.T) {
	need(t)
	setUpOutside(t)
	a, sa := startServer(t, "a")
	aAddr := str(details(t, sa), "address")
	if aAddr == "" {
		t.Fatalf("sandbox %s has no address in its details: %v", a, details(t, sa))
	}
	b, _ := startServer(t, "b", "--policy", writePolicy(t, "default allow\ndeny 10.231.100.2 tcp 8080\n"))
	if got := fetch(t, b, outsideAddr, 8080); got != "" {
		t.Errorf("outside:8080 answered a sandbox started with a policy denying it: %q", got)
	}
	if got := fetch(t, b, outsideAddr, 9090); got != "outside-9090" {
		t.Errorf("outside:9090 from a sandbox whose policy allows it: %q", got)
	}
	if got := fetch(t, b, aAddr, 8080); got != "" {
		t.Errorf("sandbox b reached sandbox a (%s) by default: %q", aAddr, got)
	}
	// Hosts outside the node cannot open connections to a sandbox (the node routes the
	// sandbox range, but forwards only answers to what sandboxes opened).
	if out, err := exec.Command("ip", "-n", outsideNS, "route", "replace", "10.201.0.0/16", "via", nodeAddr).CombinedOutput(); err != nil {
		t.Fatalf("route the sandbox range from the outside host via the node: %v: %s", err, out)
	}
	out, err := exec.Command("ip", "netns", "exec", outsideNS, "sh", "-c",
		fmt.Sprintf(`printf 'GET / HTTP/1.0\r\n\r\n' | busybox nc -w 3 %s 8080`, aAddr)).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case strings.Contains(string(out), "hello-a"):
		t.Errorf("a host outside the node opened a connection to sandbox a: %q", out)
	case err == nil:
		t.Errorf("the outside host's connection to sandbox a succeeded (output %q)", out)
	case !errors.As(err, &ee) || ee.ExitCode() == 127:
		t.Fatalf("could not run the outside host's probe: %v: %s", err, out)
	}
	// b's policy alone does not open a: a must let b in too.
	bAddr := str(details(t, inspect(t, b)), "address")
	fw(t, 0, "policy", "apply", b, writePolicy(t, "default allow\nallow "+aAddr+" tcp 8080\n"))
	if got := fetch(t, b, aAddr, 8080); got != "" {
		t.Errorf("sandbox b reached sandbox a with only b's policy allowing it: %q", got)
	}
	fw(t, 0, "policy", "apply", a, writePolicy(t, "default allow\nallow in "+bAddr+" tcp 8080\n"))
	if got := fetch(t, b, aAddr, 8080); got != "hello-a" {
		t.Errorf("sandbox b to sandbox a after both allowed it: %q", got)
	}
	// a's policy does not let it out to b (and b does not let it in).
	if got := fetch(t, a, bAddr, 8080); got != "" {
		t.Errorf("sandbox a reached sandbox b without a policy allowing it: %q", got)
	}
}

// forwardPort runs `fireworks port-forward` from a free local port to guest port guest
// of sandbox id; stop (also run at the test's end) ends it.
func forwardPort(t *testing.T, id string, guest int) (local int, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	local = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	pf := exec.CommandContext(ctx, world.bin, "port-forward", id, fmt.Sprintf("%d:%d", local, guest))
	pf.Env = append(os.Environ(), "FIREWORKS_CONFIG="+world.config)
	if err := pf.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); _ = pf.Wait() }) }
	t.Cleanup(stop)
	return local, stop
}

// port-forward carries a local port to a guest port; a sandbox's network is gone when
// the sandbox is; --network none gives a VM without a network interface.
func TestPortForwardAndNetworkLifecycle(t *testing.T) {
	need(t)
	id, sb := startServer(t, "pf")
	netns := str(details(t, sb), "netns")
	if _, err := os.Stat(filepath.Join("/run/netns", netns)); netns == "" || err != nil {
		t.Fatalf("network namespace %q of a running sandbox: %v", netns, err)
	}
	port, stop := forwardPort(t, id, 8080)
	var body string
	for i := 0; i < 100; i++ {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = strings.TrimSpace(string(b))
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if body != "hello-pf" {
		t.Errorf("through port-forward: %q", body)
	}
	stop()

	// DNS: the guest's resolv.conf names the node's resolvers.
	if r := fw(t, 0, "exec", id, "--", "cat", "/etc/resolv.conf"); !strings.Contains(r.stdout, "nameserver ") {
		t.Errorf("guest resolv.conf has no nameserver:\n%s", r.stdout)
	}
	fw(t, 0, "rm", "-f", id)
	if _, err := os.Stat(filepath.Join("/run/netns", netns)); err == nil {
		t.Errorf("network namespace %s still there after the sandbox was removed", netns)
	}

	r := fw(t, 0, "run", "--network", "none", "-u", "root", image("busybox:latest"), "--", "sh", "-c", "ls /sys/class/net; ping -c1 -W1 127.0.0.1 >/dev/null && echo lo-ok")
	if got := strings.Fields(r.stdout); len(got) != 2 || got[0] != "lo" || got[1] != "lo-ok" {
		t.Errorf("--network none: interfaces and loopback %q, want only a working lo", r.stdout)
	}
	r = fw(t, 125, "run", "--network", "none", "-p", "8080", image("busybox:latest"), "--", "true")
	if !strings.Contains(r.stderr, "need a network") {
		t.Errorf("--network none with a published port: %s", r.stderr)
	}
}

// metricsAddr is where the e2e dev server serves Prometheus metrics (the whole run has
// a network namespace of its own, so a fixed port cannot collide).
const metricsAddr = "127.0.0.1:9464"

// scrape reads one sandbox's packet counters from the node's Prometheus metrics.
func scrape(t *testing.T, id string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse metrics: %v", err)
	}
	out := map[string]float64{}
	for _, m := range families["fireworks_sandbox_network_packets_total"].GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["sandbox"] == id {
			out[labels["direction"]+"_"+labels["verdict"]] = m.GetCounter().GetValue()
		}
	}
	for _, m := range families["fireworks_sandbox_network_spoofed_frames_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "sandbox" && l.GetValue() == id {
				out["spoofed"] = m.GetCounter().GetValue()
			}
		}
	}
	return out
}

// The node exports every sandbox's counters as Prometheus metrics; an agent restart
// keeps the sandbox's policy in force (its programs are pinned) and the agent takes it
// back, counters and all.
func TestNetworkMetricsAndAgentRestart(t *testing.T) {
	need(t)
	setUpOutside(t)
	id, _ := startServer(t, "m")
	fw(t, 0, "policy", "apply", id, writePolicy(t, "default allow\ndeny 10.231.100.2 tcp 9090\n"))
	if got := fetch(t, id, outsideAddr, 9090); got != "" {
		t.Fatalf("outside:9090 answered under a policy denying it: %q", got)
	}
	m := scrape(t, id)
	if m["egress_dropped"] == 0 || m["egress_allowed"] == 0 {
		t.Errorf("metrics for %s: %v, want allowed and dropped egress packets", id, m)
	}
	inspected := counters(t, id)
	if float64(inspected["egress_dropped"]) < m["egress_dropped"] {
		t.Errorf("inspect shows fewer drops (%d) than the earlier scrape (%v)", inspected["egress_dropped"], m["egress_dropped"])
	}

	// A namespace a crashed agent left behind (named like this node's) is swept at start;
	// the running sandbox's is kept.
	netns := str(details(t, inspect(t, id)), "netns")
	tag := strings.Join(strings.SplitN(netns, "-", 3)[:2], "-") // fw-<node tag>
	leaked := tag + "-n-leaked0"
	ipCmd(t, "netns", "add", leaked)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", leaked).Run() })

	restartDev(t)
	waitStatus(t, id, "running")
	if _, err := os.Stat(filepath.Join("/run/netns", leaked)); err == nil {
		t.Errorf("leaked namespace %s survived the agent's start", leaked)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", netns)); err != nil {
		t.Errorf("the running sandbox's namespace %s after the agent's restart: %v", netns, err)
	}
	if got := fetch(t, id, outsideAddr, 9090); got != "" {
		t.Errorf("outside:9090 answered after an agent restart (the policy must stay in force): %q", got)
	}
	if got := fetch(t, id, outsideAddr, 8080); got != "outside-8080" {
		t.Errorf("outside:8080 after an agent restart: %q", got)
	}
	if after := scrape(t, id); after["egress_dropped"] <= m["egress_dropped"] {
		t.Errorf("drops after the restart %v, before %v: counters must carry on", after, m)
	}
	if show := fw(t, 0, "policy", "show", id).stdout; !strings.Contains(show, "tcp 9090") {
		t.Errorf("policy show after an agent restart:\n%s", show)
	}

	// An agent whose programs differ from the pinned ones (an upgrade) replaces them,
	// keeping the policy in force.
	ownerFile := filepath.Join(str(details(t, inspect(t, id)), "run_dir"), "net-owner")
	b, err := os.ReadFile(ownerFile)
	if err != nil {
		t.Fatal(err)
	}
	owner, _, _ := strings.Cut(string(b), "\n")
	if err := os.WriteFile(ownerFile, []byte(owner+"\nold\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Programs of version 3 had no protected maps: take their pins away (the attached
	// programs keep the maps) so the agent meets pins as such an agent left them.
	pins := filepath.Join("/sys/fs/bpf/fireworks", strings.SplitN(netns, "-", 3)[1], owner)
	for _, name := range []string{"out_protect", "in_protect"} {
		if err := os.Remove(filepath.Join(pins, name)); err != nil {
			t.Fatalf("remove a pin to play an older agent's: %v", err)
		}
	}
	restartDev(t)
	waitStatus(t, id, "running")
	if got := fetch(t, id, outsideAddr, 9090); got != "" {
		t.Errorf("outside:9090 answered after the programs were replaced: %q", got)
	}
	if got := fetch(t, id, outsideAddr, 8080); got != "outside-8080" {
		t.Errorf("outside:8080 after the programs were replaced: %q", got)
	}
	if b, _ := os.ReadFile(ownerFile); !strings.HasSuffix(strings.TrimSpace(string(b)), "\n"+netpolicy.Version) {
		t.Errorf("net-owner after the replacement: %q, want version %s", b, netpolicy.Version)
	}
}

// A user's policy cannot open what the node protects (the node, the metadata service,
// other sandboxes): only an admin's can; and a user cannot reach an admin's sandbox even
// by allowing it on their own side.
func TestNetworkUserCannotOpenProtected(t *testing.T) {
	need(t)
	setUpOutside(t)
	ctx := context.Background()
	secret := strings.TrimSpace(fw(t, 0, "token", "create", "--role", "user", "--name", "net-user").stdout)
	user := []string{"FIREWORKS_TOKEN=" + secret}
	admins, sa := startServer(t, "admin")
	adminAddr := str(details(t, sa), "address")

	r := world.cliEnv(ctx, user, nil, "run", "-d", image("busybox:latest"), "--", "sleep", "600")
	if r.code != 0 {
		t.Fatalf("user run: %d %s", r.code, r.stderr)
	}
	mine := strings.TrimSpace(r.stdout)
	t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", mine) })
	waitStatus(t, mine, "running")
	for _, pol := range []string{
		"default allow\nallow 169.254.169.254\n",
		"default allow\nallow " + nodeAddr + " tcp 7001\n",
		"default allow\nallow " + adminAddr + "\n",
		"default allow\nallow 10.201.0.0/16\n",
	} {
		r := world.cliEnv(ctx, user, nil, "policy", "apply", mine, writePolicy(t, pol))
		if r.code == 0 || !strings.Contains(r.stderr, "only an admin") {
			t.Errorf("a user's policy %q: exit %d, %s (want refused: only an admin may open it)", pol, r.code, r.stderr)
		}
	}
	if got := fetch(t, mine, adminAddr, 8080); got != "" {
		t.Errorf("the user's sandbox reached the admin's: %q", got)
	}
	// The admin's sandbox letting everything in does not help a user who may not go out.
	fw(t, 0, "policy", "apply", admins, writePolicy(t, "default allow\ndefault in allow\nallow in 10.201.0.0/16\n"))
	if got := fetch(t, mine, adminAddr, 8080); got != "" {
		t.Errorf("the user's sandbox reached the admin's: %q", got)
	}
	// Deny rules at, inside and around the protected ranges (which used to replace the
	// node's rule for their prefix and leave the rest to the policy's default), and `in`
	// rules, leave the metadata service, the node (its address and its end of the
	// sandbox's own link), and other sandboxes closed to TCP and ICMP, while the outside
	// stays open: the node's rules are decided before the policy.
	serveHTTP(t, "", "0.0.0.0:7002", "node-any")
	hostEnd := netip.MustParseAddr(str(details(t, inspect(t, mine)), "address")).Prev().String()
	closed := []string{metadata + ":80", nodeAddr + ":7001", hostEnd + ":7002", adminAddr + ":8080", "ping " + nodeAddr, "ping " + hostEnd}
	for _, pol := range []string{
		"default allow\ndeny 169.254.0.0/16 udp 1\n",
		"default allow\ndeny 169.254.169.254/32 tcp 1\n",
		"default allow\ndeny 169.254.0.0/17 udp 1\ndeny 128.0.0.0/1 udp 1\n",
		"default allow\ndeny " + nodeAddr + "/32 udp 1\n",
		"default allow\ndeny 10.201.0.0/16 udp 1\n",
		"default allow\ndeny " + hostEnd + "/32 udp 1\ndeny 10.201.0.0/24 tcp 1\n",
		"default allow\ndeny 0.0.0.0/0 udp 1\ndeny 10.0.0.0/8 tcp 1\n",
		"default allow\ndefault in allow\nallow in 10.201.0.0/16\nallow in 0.0.0.0/0\ndeny in 169.254.0.0/16 udp 1\n",
	} {
		if r := world.cliEnv(ctx, user, nil, "policy", "apply", mine, writePolicy(t, pol)); r.code != 0 {
			t.Fatalf("a user's policy %q: exit %d, %s", pol, r.code, r.stderr)
		}
		got := probeAll(t, mine, append([]string{outsideAddr + ":8080", "ping " + outsideAddr}, closed...))
		if got[outsideAddr+":8080"] != "outside-8080" || got["ping "+outsideAddr] != "reply" {
			t.Errorf("under a user's policy %q the outside did not answer (%v): the probes below prove nothing", pol, got)
		}
		for _, c := range closed {
			if got[c] != "" {
				t.Errorf("a user's policy %q opened %s: %q", pol, c, got[c])
			}
		}
	}
	// What the node does not protect, a user may open and close.
	if r := world.cliEnv(ctx, user, nil, "policy", "apply", mine, writePolicy(t, "default deny\nallow 10.231.100.2 tcp 8080\n")); r.code != 0 {
		t.Fatalf("a user's policy for an outside host: %d %s", r.code, r.stderr)
	}
	if got := fetch(t, mine, outsideAddr, 8080); got != "outside-8080" {
		t.Errorf("outside:8080 under the user's policy: %q", got)
	}
	if got := fetch(t, mine, outsideAddr, 9090); got != "" {
		t.Errorf("outside:9090 under a user's default deny: %q", got)
	}
	// The refused policies were never recorded.
	if show := fw(t, 0, "policy", "show", mine).stdout; strings.Contains(show, "169.254.169.254") {
		t.Errorf("a refused policy is recorded:\n%s", show)
	}
	// A user's image reference cannot make the node fetch from the metadata service or the
	// node's own address (an SSRF): the pull is refused before it connects. An admin's
	// pull goes there (and fails there: no registry answers).
	for _, ref := range []string{metadata + "/x/y:latest", nodeAddr + ":7001/x/y:latest"} {
		r := world.cliEnv(ctx, user, nil, "run", ref, "--", "true")
		if r.code == 0 || !strings.Contains(r.stderr, "not public") {
			t.Errorf("a user's run of %s: exit %d, %s (want refused: registry address is not public)", ref, r.code, r.stderr)
		}
		r = world.cliEnv(ctx, user, nil, "image", "pull", ref)
		if r.code == 0 || !strings.Contains(r.stderr, "not public") {
			t.Errorf("a user's pull of %s: exit %d, %s (want refused: registry address is not public)", ref, r.code, r.stderr)
		}
	}
	if r := world.cli(ctx, nil, "image", "pull", metadata+"/x/y:latest"); r.code == 0 || strings.Contains(r.stderr, "not public") {
		t.Errorf("an admin's pull from the metadata address: exit %d, %s (want it tried, and failed by the server there)", r.code, r.stderr)
	}
	// An admin's policy on the same sandbox still opens what the node protects.
	fw(t, 0, "policy", "apply", mine, writePolicy(t, "default allow\nallow 169.254.169.254\nallow "+nodeAddr+" tcp 7001\n"))
	got := probeAll(t, mine, []string{metadata + ":80", nodeAddr + ":7001", hostEnd + ":7002"})
	if got[metadata+":80"] != "metadata" || got[nodeAddr+":7001"] != "node" || got[hostEnd+":7002"] != "" {
		t.Errorf("under an admin's policy opening the metadata address and node:7001: %v", got)
	}
}

// probeAll tries every target at once from inside sandbox id: "ADDR:PORT" asks for / over
// HTTP and gives the body's last line, "ping ADDR" gives "reply" when an ICMP echo is
// answered; an unanswered target gives "".
func probeAll(t *testing.T, id string, targets []string) map[string]string {
	t.Helper()
	var script strings.Builder
	for i, tg := range targets {
		if addr, ok := strings.CutPrefix(tg, "ping "); ok {
			fmt.Fprintf(&script, "(ping -c 1 -W 2 %s >/dev/null 2>&1 && echo '%d reply') &\n", addr, i)
			continue
		}
		host, port, _ := strings.Cut(tg, ":")
		fmt.Fprintf(&script, "(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 %s %s 2>/dev/null | tail -n 1 | sed 's/^/%d /') &\n", host, port, i)
	}
	script.WriteString("wait\n")
	r := fw(t, 0, "exec", "-u", "root", id, "--", "sh", "-c", script.String()) // ping needs root
	out := map[string]string{}
	for _, line := range strings.Split(r.stdout, "\n") {
		n, body, ok := strings.Cut(strings.TrimSpace(line), " ")
		if i, err := strconv.Atoi(n); ok && err == nil && i >= 0 && i < len(targets) {
			out[targets[i]] = strings.TrimSpace(body)
		}
	}
	return out
}

// countingServer accepts TCP connections in the outside namespace on addr and counts
// the bytes it receives.
func countingServer(t *testing.T, addr string) *atomic.Int64 {
	t.Helper()
	var ln net.Listener
	if err := network.Do(filepath.Join("/run/netns", outsideNS), func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() { // ends when the listener closes
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					k, err := c.Read(buf)
					n.Add(int64(k))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return &n
}

// A policy change cuts a connection the sandbox already has open: its packets are
// judged by the rules every time, not only when the connection opens.
func TestNetworkPolicyCutsOpenConnection(t *testing.T) {
	need(t)
	setUpOutside(t)
	got := countingServer(t, outsideAddr+":7777")
	id, _ := startServer(t, "c")
	fw(t, 0, "exec", id, "--", "sh", "-c", "(while true; do echo tick; sleep 0.2; done | nc "+outsideAddr+" 7777 >/dev/null 2>&1 &) ; true")
	waitGrow := func() bool {
		before := got.Load()
		for i := 0; i < 50; i++ {
			time.Sleep(100 * time.Millisecond)
			if got.Load() > before {
				return true
			}
		}
		return false
	}
	if !waitGrow() {
		t.Fatal("the sandbox's stream to the outside never arrived")
	}
	fw(t, 0, "policy", "apply", id, writePolicy(t, "default allow\ndeny 10.231.100.2 tcp 7777\n"))
	time.Sleep(500 * time.Millisecond) // let what was in flight land
	if waitGrow() {
		t.Errorf("the open connection still delivers after its port was denied")
	}
}
