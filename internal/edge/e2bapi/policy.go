package e2bapi

import (
	"net/http"
	"net/netip"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
)

// maxNetworkRules bounds allowOut and denyOut together.
const maxNetworkRules = 256

// policyOf turns E2B's network settings into a Fireworks policy file (enforced by the
// node's eBPF programs) and says whether the sandbox's ports are public.
//
// E2B's rules: allow_internet_access false, or 0.0.0.0/0 in denyOut, denies what is not
// allowed; denyOut denies addresses; allowOut wins over denyOut. A policy decides by the
// longest matching prefix, so an allowed address inside a denied range is let through
// as E2B does. Only addresses and CIDR ranges are taken: Fireworks filters packets in
// the kernel and has no egress proxy that could match host names.
func policyOf(n *networkBody) (policy string, public bool, err error) {
	if n == nil {
		return "", true, nil
	}
	public = n.AllowPublicTraffic == nil || *n.AllowPublicTraffic
	if len(n.AllowOut)+len(n.DenyOut) > maxNetworkRules {
		return "", false, fail(http.StatusBadRequest, "%d network rules: at most %d", len(n.AllowOut)+len(n.DenyOut), maxNetworkRules)
	}
	deny := n.AllowInternetAccess != nil && !*n.AllowInternetAccess
	var lines []string
	add := func(action string, entries []string) error {
		for _, e := range entries {
			p, err := prefix(e)
			if err != nil {
				return err
			}
			if p.Bits() == 0 {
				if action == "deny" {
					deny = true
				}
				continue // the default says it
			}
			lines = append(lines, action+" "+p.String())
		}
		return nil
	}
	// Allows first: the first matching rule of a prefix wins, and an address both
	// allowed and denied is allowed (E2B's precedence).
	if err := add("allow", n.AllowOut); err != nil {
		return "", false, err
	}
	if err := add("deny", n.DenyOut); err != nil {
		return "", false, err
	}
	if !deny && len(lines) == 0 {
		return "", public, nil
	}
	def := "default allow"
	if deny {
		def = "default deny"
	}
	policy = strings.Join(append([]string{def}, lines...), "\n") + "\n"
	if _, err := netpolicy.ParsePolicy(policy); err != nil {
		return "", false, fail(http.StatusBadRequest, "network: %v", err)
	}
	return policy, public, nil
}

// prefix reads an address or CIDR range (IPv4: what sandboxes have).
func prefix(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if p, err := netip.ParsePrefix(s); err == nil && p.Addr().Is4() {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Is4() {
		return netip.PrefixFrom(a, 32), nil
	}
	return netip.Prefix{}, fail(http.StatusBadRequest,
		"network rule %.64q: only IPv4 addresses and CIDR ranges are supported (Fireworks filters packets in the kernel; it has no egress proxy to match host names)", s)
}

// rulesOf reads back what policyOf wrote: the egress allow and deny ranges and whether
// what no rule names may go out. Lines of other forms (a policy set with the CLI) are
// left out.
func rulesOf(policy string) (allowOut, denyOut []string, internet bool) {
	internet = true
	for line := range strings.Lines(policy) {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "default" && f[1] == "deny":
			internet = false
		case len(f) == 2 && f[0] == "allow":
			allowOut = append(allowOut, f[1])
		case len(f) == 2 && f[0] == "deny":
			denyOut = append(denyOut, f[1])
		}
	}
	if !internet {
		denyOut = append(denyOut, "0.0.0.0/0")
	}
	return allowOut, denyOut, internet
}
