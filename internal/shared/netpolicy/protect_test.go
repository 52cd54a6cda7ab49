package netpolicy

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// packet builds an Ethernet + IPv4 frame from src to dst with a TCP SYN, a UDP datagram or
// an ICMP echo request (proto 6, 17 or 1) to port dport.
func packet(src, dst netip.Addr, proto uint8, dport uint16) []byte {
	l4 := map[uint8]int{TCP: 20, UDP: 8, 1: 8}[proto]
	b := make([]byte, 14+20+l4)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(ip[2:], uint16(20+l4))
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	l := ip[20:]
	switch proto {
	case TCP:
		binary.BigEndian.PutUint16(l[0:], 40000)
		binary.BigEndian.PutUint16(l[2:], dport)
		l[12], l[13] = 0x50, 0x02 // data offset 5, SYN
	case UDP:
		binary.BigEndian.PutUint16(l[0:], 40000)
		binary.BigEndian.PutUint16(l[2:], dport)
		binary.BigEndian.PutUint16(l[4:], 8)
	default:
		l[0] = 8 // echo request
	}
	return b
}

// verdicts runs each packet through the programs of an unattached enforcer with s in
// force (BPF_PROG_TEST_RUN) and reports which passed.
func verdicts(t *testing.T, s Enforced, pkts []probe) []bool {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "BPF maps and programs need root")
	}
	e, err := build(s)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	progs := map[Direction]*ebpf.Program{}
	for _, d := range []Direction{FromSandbox, ToSandbox} {
		if progs[d], err = e.program(d); err != nil {
			t.Fatal(err)
		}
		defer progs[d].Close()
	}
	out := make([]bool, len(pkts))
	for i, p := range pkts {
		ret, err := progs[p.dir].Run(&ebpf.RunOptions{Data: packet(p.src, p.dst, p.proto, p.port)})
		if err != nil {
			t.Fatalf("run the program on %s: %v", p, err)
		}
		out[i] = ret == 0 // TC_ACT_OK; TC_ACT_SHOT is 2
	}
	return out
}

type probe struct {
	name     string
	dir      Direction
	src, dst netip.Addr
	proto    uint8
	port     uint16
}

func (p probe) String() string { return p.name }

// The node's protected rules decide before the policy, whatever the policy says: the
// rules a review found opening the metadata service, the node and the sandbox range (a
// deny of an unrelated port at the protected prefix used to replace the node's rule and
// leave the packet to the policy's default), at longer and shorter prefixes, with allow
// and deny, in both directions, for TCP, UDP and ICMP.
func TestProtectedRulesComeFirst(t *testing.T) {
	a := netip.MustParseAddr
	sandbox, hostEnd, other := a("10.201.0.2"), a("10.201.0.1"), a("10.201.0.6")
	node, meta, outside := a("10.231.100.1"), a("169.254.169.254"), a("10.231.100.2")
	rule := func(p string, proto uint8, port uint16, act Action) Rule {
		return Rule{CIDR: netip.MustParsePrefix(p), Proto: proto, PortLo: port, PortHi: port, Action: act}
	}
	// The node's rules as the agent makes them for what a sandbox sends (agent.baseSet),
	// and, to check the ingress program's protected map too, its rule for what reaches one.
	protect := Protected{
		Egress: []Rule{rule("169.254.0.0/16", 0, 0, Deny), rule("10.201.0.0/16", 0, 0, Deny),
			rule("10.231.100.1/32", 0, 0, Deny), rule("224.0.0.0/4", 0, 0, Deny)},
		Ingress: []Rule{rule("10.201.0.0/16", 0, 0, Deny), rule("10.201.0.1/32", 0, 0, Allow)},
	}
	var blocked []probe
	for _, proto := range []uint8{TCP, UDP, 1} {
		for _, dst := range []netip.Addr{meta, node, hostEnd, other, a("169.254.1.1"), a("224.0.0.251")} {
			blocked = append(blocked, probe{fmt.Sprintf("to %s (protocol %d)", dst, proto), FromSandbox, sandbox, dst, proto, 80})
		}
		blocked = append(blocked, probe{fmt.Sprintf("from another sandbox (protocol %d)", proto), ToSandbox, other, sandbox, proto, 8080})
	}
	open := []probe{
		{"to the outside", FromSandbox, sandbox, outside, TCP, 8080},
		{"from the node's end of the link", ToSandbox, hostEnd, sandbox, TCP, 8080},
	}
	policies := map[string]string{
		"deny at the metadata /16":         "default allow\ndeny 169.254.0.0/16 udp 1",
		"deny at the metadata /32":         "default allow\ndeny 169.254.169.254/32 tcp 1",
		"deny at a /17 inside":             "default allow\ndeny 169.254.0.0/17 udp 1",
		"deny at the node /32":             "default allow\ndeny 10.231.100.1/32 udp 1",
		"deny at the sandbox range":        "default allow\ndeny 10.201.0.0/16 udp 1",
		"deny at the node's end":           "default allow\ndeny 10.201.0.1/32 udp 1\ndeny 10.201.0.0/24 tcp 1",
		"deny around them":                 "default allow\ndeny 0.0.0.0/0 udp 1\ndeny 128.0.0.0/1 udp 1\ndeny 10.0.0.0/8 tcp 1",
		"allow them outright":              "default allow\nallow 169.254.0.0/16\nallow 10.201.0.0/16\nallow 10.231.100.1\nallow 0.0.0.0/0\nallow 224.0.0.0/3",
		"in: allow the sandbox range":      "default allow\ndefault in allow\nallow in 10.201.0.0/16\nallow in 10.201.0.6\ndeny in 10.201.0.0/16 udp 1",
		"in: deny around, default allow":   "default allow\ndefault in allow\ndeny in 0.0.0.0/0 udp 1\ndeny in 10.201.0.6/32 tcp 1",
		"default allow, nothing else":      "default allow",
		"the pin and a wide allow in both": "default allow\ndefault in allow\nallow 0.0.0.0/1\nallow 128.0.0.0/1\nallow in 0.0.0.0/0",
	}
	for name, text := range policies {
		t.Run(name, func(t *testing.T) {
			user, err := ParsePolicy(text)
			if err != nil {
				t.Fatal(err)
			}
			user.Egress.Source = sandbox
			got := verdicts(t, Enforced{Set: user, Protect: protect}, append(append([]probe{}, blocked...), open...))
			for i, p := range blocked {
				if got[i] {
					t.Errorf("%s passed under a user's policy %q", p, text)
				}
			}
			for i, p := range open {
				if !got[len(blocked)+i] {
					t.Errorf("%s was dropped under %q (default allow)", p, text)
				}
			}
		})
	}
	// The same rules merged into the policy's own map, as they were before protected
	// rules had maps of their own, let the review's packet through: this test tells the
	// two mechanisms apart.
	user, err := ParsePolicy("default allow\ndeny 169.254.0.0/16 udp 1")
	if err != nil {
		t.Fatal(err)
	}
	merged := Set{Egress: Merge(Policy{Default: Allow, Rules: protect.Egress}, user.Egress), Ingress: user.Ingress}
	if got := verdicts(t, Enforced{Set: merged}, []probe{{"metadata", FromSandbox, sandbox, meta, TCP, 80}}); !got[0] {
		t.Error("merged into the policy, the review's rule did not open the metadata address: the test above proves nothing")
	}
}

// A prefix the node protects with no rule matching the packet drops it (it does not fall
// to the policy's default), and the node's allow rules pass what they name.
func TestProtectedPrefixWithoutMatchDrops(t *testing.T) {
	a := netip.MustParseAddr
	ns := a("169.254.169.253")
	protect := Protected{Egress: []Rule{
		{CIDR: netip.MustParsePrefix("169.254.0.0/16"), Action: Deny},
		{CIDR: netip.PrefixFrom(ns, 32), Proto: UDP, PortLo: 53, PortHi: 53, Action: Allow},
	}}
	s := Enforced{Set: Set{Egress: Policy{Default: Allow}, Ingress: allowAll}, Protect: protect}
	got := verdicts(t, s, []probe{
		{"dns", FromSandbox, a("10.201.0.2"), ns, UDP, 53},
		{"not dns", FromSandbox, a("10.201.0.2"), ns, UDP, 54},
		{"tcp dns", FromSandbox, a("10.201.0.2"), ns, TCP, 53},
	})
	if !got[0] || got[1] || got[2] {
		t.Errorf("verdicts %v: want DNS over UDP to the nameserver only", got)
	}
}

// An ICMP message the node sends to a sandbox (an error about the sandbox's own packet)
// opens no flow: the sandbox cannot then send ICMP to the node's end of its link.
func TestIngressICMPOpensNoFlow(t *testing.T) {
	a := netip.MustParseAddr
	sandbox, hostEnd := a("10.201.0.2"), a("10.201.0.1")
	s := Enforced{Set: Set{Egress: Policy{Default: Allow, Source: sandbox}, Ingress: allowAll},
		Protect: Protected{Egress: []Rule{{CIDR: netip.MustParsePrefix("10.201.0.0/16"), Action: Deny}}}}
	got := verdicts(t, s, []probe{
		{"icmp from the node's end", ToSandbox, hostEnd, sandbox, 1, 0},
		{"icmp to the node's end after it", FromSandbox, sandbox, hostEnd, 1, 0},
		{"udp from the node's end", ToSandbox, hostEnd, sandbox, UDP, 40000},
	})
	if !got[0] || got[1] {
		t.Errorf("verdicts %v: the node's ICMP passes in, and opens nothing back out", got)
	}
}
