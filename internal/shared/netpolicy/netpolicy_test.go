package netpolicy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// sandboxNS plays a host in a private network namespace and makes one sandbox network
// namespace wired to it, addressed from rng; it is deleted when the test ends.
func sandboxNS(t *testing.T, rng, prefix string) (network.Namespace, network.Block) {
	t.Helper()
	testutil.PrivateNetNS(t)
	m, err := network.OpenIPAM(filepath.Join(t.TempDir(), "ipam.json"), netip.MustParsePrefix(rng))
	if err != nil {
		t.Fatal(err)
	}
	id := prefix + strconv.Itoa(os.Getpid())
	b, err := m.Allocate(id)
	if err != nil {
		t.Fatal(err)
	}
	n := network.NamespaceFor(id, b)
	if err := network.Create(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = network.Delete(context.Background(), n) })
	return n, b
}

// acceptAll accepts and closes connections on ln until the test ends (which closes it).
func acceptAll(t *testing.T, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() { // ends when the listener is closed
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// connect tries a TCP connection from inside namespace ns (busybox nc, 2 s timeout).
func connect(ns string, addr netip.Addr, port int) error {
	out, err := exec.Command("ip", "netns", "exec", ns, "busybox", "nc", "-w", "2", addr.String(), strconv.Itoa(port)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("nc %s:%d from %s: %w: %s", addr, port, ns, err, out)
	}
	return nil
}

// Real packets from a sandbox namespace through the policy program on the host end of
// its veth pair: denied ports are dropped and counted, a new policy takes effect on the
// running program, a malformed one changes nothing, and detaching lets everything pass.
func TestPolicyDropsAndChangesLive(t *testing.T) {
	n, b := sandboxNS(t, "10.231.241.0/30", "pol")
	host := b.Host()
	for _, port := range []int{8080, 9090} {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(host, uint16(port)).String())
		if err != nil {
			t.Fatal(err)
		}
		acceptAll(t, ln)
	}
	if err := connect(n.Name, host, 8080); err != nil {
		t.Fatalf("without a policy: %v", err)
	}

	e, err := Attach(n.HostIf, out(Policy{Default: Allow, Rules: []Rule{{CIDR: netip.PrefixFrom(host, 32), Proto: TCP, PortLo: 8080, PortHi: 8080, Action: Deny}}}))
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := connect(n.Name, host, 9090); err != nil {
		t.Errorf("allowed port: %v", err)
	}
	if err := connect(n.Name, host, 8080); err == nil {
		t.Error("denied port 8080 answered")
	}
	c, _, err := e.Counters()
	if err != nil || c.Dropped == 0 || c.Allowed == 0 {
		t.Errorf("counters %+v, %v: want both allowed and dropped packets", c, err)
	}

	// Default deny, only 8080 allowed: on the running program.
	if err := e.Apply(out(Policy{Default: Deny, Rules: []Rule{{CIDR: netip.PrefixFrom(host, 24).Masked(), Proto: TCP, PortLo: 8000, PortHi: 8100, Action: Allow}}})); err != nil {
		t.Fatal(err)
	}
	if err := connect(n.Name, host, 8080); err != nil {
		t.Errorf("after allowing 8000-8100: %v", err)
	}
	if err := connect(n.Name, host, 9090); err == nil {
		t.Error("9090 answered under default deny")
	}
	// A malformed policy is refused and the old one stays.
	if err := e.Apply(out(Policy{Default: Allow, Rules: []Rule{{CIDR: netip.PrefixFrom(host, 32), Proto: TCP, PortLo: 9, PortHi: 1, Action: Allow}}})); err == nil {
		t.Error("a backwards port range was accepted")
	}
	if err := connect(n.Name, host, 9090); err == nil {
		t.Error("9090 answered after a refused policy (the old one should stay)")
	}
	// Sending from an address that is not the sandbox's is dropped.
	pin := Policy{Default: Allow, Source: b.Sandbox()}
	if err := e.Apply(out(pin)); err != nil {
		t.Fatal(err)
	}
	if err := connect(n.Name, host, 9090); err != nil {
		t.Errorf("from its own address under a source pin: %v", err)
	}
	before, _, _ := e.Counters()
	spoof := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", n.Name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	spoof("addr", "add", "192.0.2.7/32", "dev", "veth0")
	spoof("route", "replace", b.Prefix.String(), "dev", "veth0", "src", "192.0.2.7")
	if err := connect(n.Name, host, 9090); err == nil {
		t.Error("a spoofed source address got through")
	}
	if after, _, _ := e.Counters(); after.Dropped <= before.Dropped {
		t.Errorf("spoofed packets not counted as dropped: %+v -> %+v", before, after)
	}
	spoof("route", "replace", b.Prefix.String(), "dev", "veth0", "src", b.Sandbox().String())
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := connect(n.Name, host, 9090); err != nil {
		t.Errorf("after detaching: %v", err)
	}
}

func TestParseRule(t *testing.T) {
	for in, want := range map[string]Rule{
		"allow 10.0.0.0/8":              {CIDR: netip.MustParsePrefix("10.0.0.0/8"), Action: Allow},
		"deny 169.254.169.254 tcp 80":   {CIDR: netip.MustParsePrefix("169.254.169.254/32"), Proto: TCP, PortLo: 80, PortHi: 80},
		"allow 0.0.0.0/0 udp 5000-6000": {CIDR: netip.MustParsePrefix("0.0.0.0/0"), Proto: UDP, PortLo: 5000, PortHi: 6000, Action: Allow},
	} {
		got, err := ParseRule(in)
		if err != nil || got != want {
			t.Errorf("ParseRule(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "allow", "permit 10.0.0.0/8", "allow nonsense", "allow 10.0.0.0/8 icmp", "allow 10.0.0.0/8 tcp 9-1", "allow 10.0.0.0/8 tcp 0", "allow fd00::/8", "allow 10.0.0.0/8 tcp 80-", "allow 10.0.0.0/8 tcp -80", "allow 10.0.0.0/8 tcp +80", "allow 10.0.0.0/8 tcp 80x", "allow 10.0.0.0/8 tcp 65536"} {
		if _, err := ParseRule(bad); err == nil {
			t.Errorf("ParseRule(%q) accepted", bad)
		}
	}
}

// What reaches a sandbox is filtered by source: the host's connection to a port in the
// sandbox is dropped when denied and passes when allowed.
func TestPolicyToSandbox(t *testing.T) {
	n, b := sandboxNS(t, "10.231.242.0/30", "in")
	listenIn(t, n, 7000)
	dial := func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(b.Sandbox(), 7000).String(), 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := dial(); err != nil {
		t.Fatalf("without a policy: %v", err)
	}
	if _, err := Attach(n.HostIf, Enforced{Set: Set{Egress: allowAll, Ingress: Policy{Default: Allow, Source: b.Sandbox()}}}); err == nil {
		t.Error("a source pin on the ingress direction was accepted")
	}
	e, err := Attach(n.HostIf, Enforced{Set: Set{Egress: allowAll, Ingress: Policy{Default: Allow, Rules: []Rule{{CIDR: netip.PrefixFrom(b.Host(), 32), Proto: TCP, PortLo: 7000, PortHi: 7000, Action: Deny}}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := dial(); err == nil {
		t.Error("denied connection to the sandbox's port 7000 got through")
	}
	if _, c, _ := e.Counters(); c.Dropped == 0 {
		t.Errorf("counters %+v: want drops", c)
	}
	if err := e.Apply(Enforced{Set: Set{Egress: allowAll, Ingress: Policy{Default: Deny, Rules: []Rule{{CIDR: netip.MustParsePrefix("10.231.242.0/30"), Action: Allow}}}}}); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err != nil {
		t.Errorf("after allowing the host's range: %v", err)
	}
}

func TestParsePolicy(t *testing.T) {
	s, err := ParsePolicy("# egress for a build sandbox\ndefault deny\nallow 10.0.0.0/8 tcp 443   # registry\nallow out 8.8.8.8 udp 53\n\ndeny 169.254.0.0/16\ndefault in deny\nallow in 10.0.0.0/8 tcp 8080\n")
	if err != nil {
		t.Fatal(err)
	}
	p := s.Egress
	if p.Default != Deny || len(p.Rules) != 3 || p.Rules[0].PortLo != 443 || p.Rules[1].Proto != UDP || p.Rules[2].Action != Deny {
		t.Errorf("parsed egress %+v", p)
	}
	if s.Ingress.Default != Deny || len(s.Ingress.Rules) != 1 || s.Ingress.Rules[0].PortLo != 8080 {
		t.Errorf("parsed ingress %+v", s.Ingress)
	}
	// Its rendering reads back the same.
	if back, err := ParsePolicy(s.String()); err != nil || back.String() != s.String() {
		t.Errorf("round trip of\n%s: %v\n%s", s, err, back)
	}
	if s, err := ParsePolicy(""); err != nil || s.Egress.Default != Deny || s.Ingress.Default != Allow || len(s.Egress.Rules) != 0 {
		t.Errorf("empty policy: %+v %v (want egress default deny, ingress allow, no rules)", s, err)
	}
	for text, want := range map[string]string{
		"default maybe":                               "line 1",
		"default allow\ndefault deny":                 "line 2: a second default",
		"default in allow\ndefault out deny":          "",
		"allow 10.0.0.0/8\nallow 10.1.0.0/16 tcp 9-1": "line 2",
		"allow ::1":                           "line 1",
		"allow sideways 10.0.0.0/8":           "line 1",
		strings.Repeat("#", MaxPolicyBytes+1): "bytes",
	} {
		_, err := ParsePolicy(text)
		if want == "" {
			if err != nil {
				t.Errorf("ParsePolicy(%.30q): %v", text, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParsePolicy(%.30q): %v, want an error with %q", text, err, want)
		}
	}
	var many strings.Builder
	for i := 0; i <= MaxRulesPerCIDR; i++ {
		fmt.Fprintf(&many, "allow 10.0.0.0/8 tcp %d\n", 100+i)
	}
	if _, err := ParsePolicy(many.String()); err == nil {
		t.Errorf("more than %d rules for one prefix accepted", MaxRulesPerCIDR)
	}
}

func TestMerge(t *testing.T) {
	base := Policy{Default: Allow, Source: netip.MustParseAddr("10.0.0.2"), Rules: []Rule{
		{CIDR: netip.MustParsePrefix("169.254.0.0/16"), Action: Deny},
		{CIDR: netip.MustParsePrefix("10.0.0.0/16"), Action: Deny},
	}}
	user := Policy{Default: Deny, Rules: []Rule{{CIDR: netip.MustParsePrefix("10.0.0.0/16"), Proto: TCP, PortLo: 80, PortHi: 80, Action: Allow}}}
	m := Merge(base, user)
	if m.Default != Deny || m.Source != base.Source || len(m.Rules) != 2 {
		t.Fatalf("merged %+v", m)
	}
	// The user's rules for a prefix replace the base's for it; others stay.
	if m.Rules[0] != user.Rules[0] || m.Rules[1] != base.Rules[0] {
		t.Errorf("merged rules %+v", m.Rules)
	}
}

var allowAll = Policy{Default: Allow}

// out is a set that filters only what the sandbox sends.
func out(p Policy) Enforced { return Enforced{Set: Set{Egress: p, Ingress: allowAll}} }

func TestTooManyPrefixes(t *testing.T) {
	var b strings.Builder
	for i := 0; i <= MaxPrefixes; i++ {
		fmt.Fprintf(&b, "allow 10.%d.%d.0/24\n", i/256, i%256)
	}
	if _, err := ParsePolicy(b.String()); err == nil || !strings.Contains(err.Error(), "distinct prefixes") {
		t.Errorf("%d prefixes: %v", MaxPrefixes+1, err)
	}
}
