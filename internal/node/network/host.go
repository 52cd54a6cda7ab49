package network

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
)

// SetupHost prepares the node's own network namespace for sandboxes addressed from rng:
// IPv4 forwarding, masquerading of what they send anywhere but to another sandbox's host
// end, and no forwarding of connections from outside the node into sandboxes (only
// answers to theirs): otherwise anyone who can route to the node could open flows to a
// sandbox, and a policy's stateful answers would let the sandbox talk back to a host its
// policy denies. The node's own processes (port-forward, ingress) are not forwarded
// traffic and are not affected; sandbox-to-sandbox traffic is left to their policies.
// Table "ip fireworks_<tag>" is replaced as a whole, so re-running it is safe.
// tag tells this node's table apart from another agent's on the same host.
func SetupHost(ctx context.Context, tag string, rng netip.Prefix) error {
	if !validName(tag) {
		return fmt.Errorf("host network tag %q: want letters, digits, '-' and '_'", tag)
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	table := "fireworks_" + strings.ReplaceAll(tag, "-", "_")
	// "add table" then "delete table" then the definition: one transaction that
	// replaces whatever an earlier run left.
	ruleset := fmt.Sprintf(`add table ip %[1]s
delete table ip %[1]s
table ip %[1]s {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr %[2]s oifname != "%[3]s*" masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "%[3]s*" accept
		oifname "%[3]s*" ct state established,related accept
		oifname "%[3]s*" drop
	}
}
`, table, rng.Masked(), hostPrefix)
	return nft(ctx, ruleset)
}

// HostAddrs lists the IPv4 addresses of the node's interfaces with their prefix
// lengths, in one netlink dump (per-interface lookups would dump every address once per
// interface, and a node has an interface per sandbox). The sandboxes' host ends are
// among them; callers that protect the sandbox range as a whole skip those.
func HostAddrs() ([]netip.Prefix, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("list the node's addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() {
			out = append(out, p)
		}
	}
	return out, nil
}

// Broadcast is the directed broadcast address of an IPv4 interface prefix (none for /31
// and /32).
func Broadcast(p netip.Prefix) (netip.Addr, bool) {
	if !p.Addr().Is4() || p.Bits() >= 31 {
		return netip.Addr{}, false
	}
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// NodeNameservers are the resolvers guests get by default: the node's own from
// /etc/resolv.conf that a guest can reach, or, on a host whose /etc/resolv.conf names only
// systemd-resolved's stub (127.0.0.53), the upstream servers resolved uses.
func NodeNameservers() []string {
	if ns := Nameservers("/etc/resolv.conf"); len(ns) > 0 {
		return ns
	}
	return Nameservers("/run/systemd/resolve/resolv.conf")
}

// Nameservers are the resolvers in resolvConf that a guest can reach through NAT
// (loopback resolvers such as systemd-resolved's 127.0.0.53 cannot be, so they are
// skipped). IPv4 only, at most three.
func Nameservers(resolvConf string) []string {
	b, err := os.ReadFile(resolvConf)
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || !a.Is4() || a.IsLoopback() || a.IsUnspecified() {
			continue
		}
		if len(out) < 3 {
			out = append(out, a.String())
		}
	}
	return out
}
