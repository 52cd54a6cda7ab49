// Package netpolicy enforces a sandbox's network policy in the kernel: an eBPF program
// (assembled in Go with cilium/ebpf, no C toolchain) attached with tcx to the host end of
// the sandbox's veth pair, with the rules in maps so they change without reattaching.
//
// One program per direction: what the sandbox sends (the host end's tcx ingress, rules
// match the destination) and what it receives (the host end's tcx egress, rules match the
// source; ports are always the destination port). An LPM trie maps a CIDR to up to
// MaxRulesPerCIDR (protocol, port range, action) rules;
// the longest matching prefix decides, its first matching rule wins, otherwise the
// policy's default action applies. ARP always passes (the sandbox must find its gateway).
// A policy may also pin the sandbox's source address (anything else is dropped as
// spoofed). Allowed and dropped packets are counted. Both programs share a flow map, so
// answers to a flow one direction let through pass the other (stateful rules).
//
// A Guard on the guest's tap (inside the sandbox's namespace) drops frames whose source
// MAC or address is not the guest's.
package netpolicy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Action is what a rule does with a packet.
type Action uint8

const (
	Deny  Action = 0
	Allow Action = 1
)

// Protocol numbers a rule can name (0 = any).
const (
	AnyProto = 0
	TCP      = 6
	UDP      = 17
)

// MaxRulesPerCIDR bounds the rules one destination prefix holds (one map value).
const MaxRulesPerCIDR = 8

// MaxPrefixes bounds the distinct prefixes of one direction of a policy file (the rules
// map holds 1024, with room left for the node's defaults merged in).
const MaxPrefixes = 512

// mapPrefixes is what one direction's rules map holds.
const mapPrefixes = 1024

// Rule matches packets to a destination prefix, protocol and destination port range.
type Rule struct {
	CIDR   netip.Prefix
	Proto  uint8  // AnyProto, TCP or UDP
	PortLo uint16 // 0-0 = any port
	PortHi uint16
	Action Action
}

// Policy is a default action and rules.
type Policy struct {
	Default Action
	Rules   []Rule
	// Source, when set, is the only IPv4 source address the sandbox may send from: any
	// other (a spoofed one) is dropped whatever the rules say.
	Source netip.Addr
}

// Validate checks a policy before anything is changed in the kernel.
func (p Policy) Validate() error {
	var errs []error
	if p.Default != Allow && p.Default != Deny {
		errs = append(errs, fmt.Errorf("default action %d: want allow or deny", p.Default))
	}
	if p.Source.IsValid() && (!p.Source.Is4() || p.Source.IsUnspecified()) {
		errs = append(errs, fmt.Errorf("source %s: want an IPv4 address", p.Source))
	}
	per := map[netip.Prefix]int{}
	for i, r := range p.Rules {
		switch {
		case !r.CIDR.IsValid() || !r.CIDR.Addr().Is4():
			errs = append(errs, fmt.Errorf("rule %d: %q is not an IPv4 CIDR", i+1, r.CIDR))
		case r.Proto != AnyProto && r.Proto != TCP && r.Proto != UDP:
			errs = append(errs, fmt.Errorf("rule %d: protocol %d: want any, tcp or udp", i+1, r.Proto))
		case r.PortLo > r.PortHi:
			errs = append(errs, fmt.Errorf("rule %d: port range %d-%d is backwards", i+1, r.PortLo, r.PortHi))
		case r.PortHi != 0 && r.Proto == AnyProto:
			errs = append(errs, fmt.Errorf("rule %d: ports need a protocol (tcp or udp)", i+1))
		case r.Action != Allow && r.Action != Deny:
			errs = append(errs, fmt.Errorf("rule %d: action %d: want allow or deny", i+1, r.Action))
		}
		if r.CIDR.IsValid() {
			per[r.CIDR.Masked()]++
			if per[r.CIDR.Masked()] == MaxRulesPerCIDR+1 {
				errs = append(errs, fmt.Errorf("more than %d rules for %s", MaxRulesPerCIDR, r.CIDR.Masked()))
			}
		}
	}
	if len(per) > mapPrefixes {
		errs = append(errs, fmt.Errorf("%d distinct prefixes: at most %d", len(per), mapPrefixes))
	}
	return errors.Join(errs...)
}

// Direction says which traffic a policy filters.
type Direction int

const (
	// FromSandbox filters what the sandbox sends (rules match the destination).
	FromSandbox Direction = iota
	// ToSandbox filters what reaches the sandbox (rules match the source; ports are the
	// sandbox's own, i.e. the destination port).
	ToSandbox
)

func parseAction(word string) (Action, bool) {
	switch word {
	case "allow":
		return Allow, true
	case "deny":
		return Deny, true
	}
	return Deny, false
}

// ParseRule reads "allow|deny CIDR [tcp|udp [PORT[-PORT]]]".
func ParseRule(s string) (Rule, error) {
	f := strings.Fields(s)
	if len(f) < 2 || len(f) > 4 {
		return Rule{}, fmt.Errorf("rule %q: want allow|deny CIDR [tcp|udp [PORT[-PORT]]]", s)
	}
	var r Rule
	var ok bool
	if r.Action, ok = parseAction(f[0]); !ok {
		return Rule{}, fmt.Errorf("rule %q: action %q: want allow or deny", s, f[0])
	}
	p, err := netip.ParsePrefix(f[1])
	if err != nil {
		a, aerr := netip.ParseAddr(f[1])
		if aerr != nil {
			return Rule{}, fmt.Errorf("rule %q: %q is not a CIDR or address", s, f[1])
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	r.CIDR = p
	if len(f) >= 3 {
		switch f[2] {
		case "tcp":
			r.Proto = TCP
		case "udp":
			r.Proto = UDP
		default:
			return Rule{}, fmt.Errorf("rule %q: protocol %q: want tcp or udp", s, f[2])
		}
	}
	if len(f) == 4 {
		lo, hi, ranged := strings.Cut(f[3], "-")
		if !ranged {
			hi = lo
		}
		l, err1 := parsePort(lo)
		h, err2 := parsePort(hi)
		if err1 != nil || err2 != nil {
			return Rule{}, fmt.Errorf("rule %q: ports %q: want PORT or PORT-PORT in 1..65535", s, f[3])
		}
		r.PortLo, r.PortHi = l, h
	}
	return r, Policy{Default: Deny, Rules: []Rule{r}}.Validate()
}

// parsePort reads a port number 1..65535 (digits only).
func parsePort(s string) (uint16, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("port %q: not a number", s)
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q: want 1..65535", s)
	}
	return uint16(n), nil
}

// MaxPolicyBytes bounds a policy file.
const MaxPolicyBytes = 64 << 10

// ParsePolicy reads a policy file: one statement per line, `#` starts a comment.
//
//	default [out|in] allow|deny
//	allow|deny [out|in] CIDR [tcp|udp [PORT[-PORT]]]
//
// `out` (the default) is what the sandbox sends, matched by destination; `in` is what
// reaches it, matched by source (ports are the sandbox's own). Unless the file says
// otherwise, what the sandbox sends is denied (a policy file is an allow list) and what
// reaches it is allowed. Errors name the line.
func ParsePolicy(text string) (Set, error) {
	if len(text) > MaxPolicyBytes {
		return Set{}, fmt.Errorf("policy is over the limit of %d bytes", MaxPolicyBytes)
	}
	s := Set{Egress: Policy{Default: Deny}, Ingress: Policy{Default: Allow}}
	seenDefault := map[string]bool{}
	var errs []error
	for i, line := range strings.Split(text, "\n") {
		if c := strings.IndexByte(line, '#'); c >= 0 {
			line = line[:c]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		dir := "out"
		if len(f) > 1 && (f[1] == "in" || f[1] == "out") {
			dir = f[1]
			f = append(f[:1:1], f[2:]...)
		}
		p := &s.Egress
		if dir == "in" {
			p = &s.Ingress
		}
		if f[0] == "default" {
			a, ok := Deny, false
			if len(f) == 2 {
				a, ok = parseAction(f[1])
			}
			if !ok {
				errs = append(errs, fmt.Errorf("line %d: want `default [out|in] allow` or `default [out|in] deny`", i+1))
				continue
			}
			if seenDefault[dir] {
				errs = append(errs, fmt.Errorf("line %d: a second default for %s", i+1, dir))
			}
			seenDefault[dir], p.Default = true, a
			continue
		}
		r, err := ParseRule(strings.Join(f, " "))
		if err != nil {
			errs = append(errs, fmt.Errorf("line %d: %w", i+1, err))
			continue
		}
		p.Rules = append(p.Rules, r)
	}
	for _, d := range []struct {
		name string
		p    Policy
	}{{"out", s.Egress}, {"in", s.Ingress}} {
		if n := prefixes(d.p); n > MaxPrefixes {
			errs = append(errs, fmt.Errorf("%d distinct prefixes for %s: at most %d", n, d.name, MaxPrefixes))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Set{}, err
	}
	return s, s.Validate()
}

func prefixes(p Policy) int {
	seen := map[netip.Prefix]bool{}
	for _, r := range p.Rules {
		seen[r.CIDR.Masked()] = true
	}
	return len(seen)
}

// Set is a sandbox's whole policy: what it sends and what reaches it.
type Set struct {
	Egress  Policy // rules match destinations
	Ingress Policy // rules match sources
}

// Validate checks both directions.
func (s Set) Validate() error {
	var errs []error
	if err := s.Egress.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("egress: %w", err))
	}
	if err := s.Ingress.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("ingress: %w", err))
	}
	if s.Ingress.Source.IsValid() {
		errs = append(errs, errors.New("ingress: a source pin applies to what the sandbox sends (egress)"))
	}
	return errors.Join(errs...)
}

// Merge lays the rules of over beneath-base semantics: over's default and rules win;
// base's rules stay for the prefixes over does not name. Only an admin's policy is laid
// over the node's rules this way (an admin may open what the node protects); a user's
// policy goes beneath the node's protected rules (see Enforced).
func Merge(base, over Policy) Policy {
	named := map[netip.Prefix]bool{}
	for _, r := range over.Rules {
		named[r.CIDR.Masked()] = true
	}
	out := Policy{Default: over.Default, Source: over.Source}
	out.Rules = append(out.Rules, over.Rules...)
	for _, r := range base.Rules {
		if !named[r.CIDR.Masked()] {
			out.Rules = append(out.Rules, r)
		}
	}
	if !out.Source.IsValid() {
		out.Source = base.Source
	}
	return out
}

// FixedProtected are the ranges every node protects whatever its addresses: link-local
// (cloud metadata services), limited broadcast, multicast, "this network" and loopback.
func FixedProtected() []netip.Prefix {
	return []netip.Prefix{
		netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("255.255.255.255/32"),
		netip.MustParsePrefix("224.0.0.0/4"), netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("127.0.0.0/8"),
	}
}

// AllowsInside returns the policy's allow rules (what the sandbox sends) that fall inside
// one of ranges, each with the range.
func (s Set) AllowsInside(ranges []netip.Prefix) []string {
	var out []string
	for _, r := range s.Egress.Rules {
		if r.Action != Allow {
			continue
		}
		for _, p := range ranges {
			if p.Bits() <= r.CIDR.Bits() && p.Contains(r.CIDR.Addr()) {
				out = append(out, fmt.Sprintf("allow %s: inside %s", r.CIDR, p))
				break
			}
		}
	}
	return out
}

// Protected is the node's rules for a sandbox, per direction. They live in maps of their
// own that the programs consult before the sandbox's policy: a packet whose address falls
// in a protected prefix gets that prefix's verdict (its first matching rule; no matching
// rule drops it) and never reaches the policy's rules or default. So no policy, with any
// action at any prefix, can change what the node protects: it is not one more check on
// the policy but a separate stage in front of it.
type Protected struct {
	Egress  []Rule // match destinations
	Ingress []Rule // match sources
}

// Enforced is everything a sandbox's programs enforce: the node's protected rules first,
// then the sandbox's policy (Set) for what they do not cover.
type Enforced struct {
	Set
	Protect Protected
}

// Validate checks the policy and the protected rules.
func (e Enforced) Validate() error {
	errs := []error{e.Set.Validate()}
	for _, d := range []struct {
		name  string
		rules []Rule
	}{{"protected egress", e.Protect.Egress}, {"protected ingress", e.Protect.Ingress}} {
		if err := (Policy{Default: Deny, Rules: d.rules}).Validate(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", d.name, err))
		}
	}
	return errors.Join(errs...)
}

// String renders what is enforced: the node's protected rules (as comments: a policy
// file cannot hold them), then the policy in the policy file format.
func (e Enforced) String() string {
	var b strings.Builder
	if len(e.Protect.Egress)+len(e.Protect.Ingress) > 0 {
		b.WriteString("# the node's, decided before the policy (a policy cannot change these):\n")
		for _, d := range []struct {
			word  string
			rules []Rule
		}{{"out", e.Protect.Egress}, {"in", e.Protect.Ingress}} {
			for _, r := range d.rules {
				fmt.Fprintf(&b, "#   %s %s %s\n", r.Action, d.word, r.body())
			}
		}
		b.WriteString("# the policy:\n")
	}
	b.WriteString(e.Set.String())
	return b.String()
}

// String renders the set in the policy file format (ParsePolicy reads it back).
func (s Set) String() string {
	var b strings.Builder
	for _, d := range []struct {
		word string
		p    Policy
	}{{"out", s.Egress}, {"in", s.Ingress}} {
		fmt.Fprintf(&b, "default %s %s\n", d.word, d.p.Default)
		for _, r := range d.p.Rules {
			fmt.Fprintf(&b, "%s %s %s\n", r.Action, d.word, r.body())
		}
	}
	return b.String()
}

func (a Action) String() string {
	if a == Allow {
		return "allow"
	}
	return "deny"
}

// body is a rule without its action: "CIDR [tcp|udp [PORT[-PORT]]]".
func (r Rule) body() string {
	s := r.CIDR.String()
	switch r.Proto {
	case TCP:
		s += " tcp"
	case UDP:
		s += " udp"
	}
	switch {
	case r.PortHi == 0:
	case r.PortLo == r.PortHi:
		s += fmt.Sprintf(" %d", r.PortLo)
	default:
		s += fmt.Sprintf(" %d-%d", r.PortLo, r.PortHi)
	}
	return s
}
