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
// spoofed). Allowed and dropped packets are counted.
package netpolicy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
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

// Counters are packets the program let through and dropped.
type Counters struct{ Allowed, Dropped uint64 }

// Enforcer is a policy program attached to one interface.
type Enforcer struct {
	prog     *ebpf.Program
	rules    *ebpf.Map
	config   *ebpf.Map
	counters *ebpf.Map
	link     link.Link
	current  map[netip.Prefix]bool
}

// value layout of the LPM map: count, then MaxRulesPerCIDR entries of
// {proto u8, action u8, pad u16, portLo u16, portHi u16} (8 bytes each).
const (
	entrySize = 8
	valueSize = 8 + MaxRulesPerCIDR*entrySize
)

// Attach loads the program and attaches it to the host-side veth end ifname with policy
// p in force: FromSandbox on the end's tcx ingress (what the sandbox sends), ToSandbox on
// its tcx egress (what is sent to the sandbox).
func Attach(ifname string, dir Direction, p Policy) (*Enforcer, error) {
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("network policy: %w", err)
	}
	if dir == ToSandbox && p.Source.IsValid() {
		return nil, errors.New("network policy: a source pin applies to what the sandbox sends (FromSandbox)")
	}
	attach := ebpf.AttachTCXIngress
	if dir == ToSandbox {
		attach = ebpf.AttachTCXEgress
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("attach network policy to %s: %w", ifname, err)
	}
	e := &Enforcer{current: map[netip.Prefix]bool{}}
	ok := false
	defer func() {
		if !ok {
			e.Close()
		}
	}()
	if e.rules, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_rules", Type: ebpf.LPMTrie, KeySize: 8, ValueSize: valueSize,
		MaxEntries: 1024, Flags: 1 /* BPF_F_NO_PREALLOC, required for LPM tries */}); err != nil {
		return nil, fmt.Errorf("create rules map: %w", err)
	}
	if e.config, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_config", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}); err != nil {
		return nil, fmt.Errorf("create config map: %w", err)
	}
	if e.counters, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_counters", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2}); err != nil {
		return nil, fmt.Errorf("create counters map: %w", err)
	}
	if err := e.Apply(p); err != nil {
		return nil, err
	}
	if e.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{Name: "fw_policy", Type: ebpf.SchedCLS, License: "Apache-2.0",
		Instructions: program(dir, e.rules.FD(), e.config.FD(), e.counters.FD())}); err != nil {
		return nil, fmt.Errorf("load policy program: %w", err)
	}
	if e.link, err = link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: e.prog, Attach: attach}); err != nil {
		return nil, fmt.Errorf("attach policy program to %s (tcx %s): %w", ifname, attach, err)
	}
	ok = true
	return e, nil
}

// Apply replaces the rules in force. A policy that does not validate changes nothing.
func (e *Enforcer) Apply(p Policy) error {
	if err := p.Validate(); err != nil {
		return fmt.Errorf("network policy: %w", err)
	}
	byCIDR := map[netip.Prefix][]Rule{}
	for _, r := range p.Rules {
		byCIDR[r.CIDR.Masked()] = append(byCIDR[r.CIDR.Masked()], r)
	}
	for cidr, rs := range byCIDR {
		v := make([]byte, valueSize)
		binary.LittleEndian.PutUint32(v[0:], uint32(len(rs)))
		for i, r := range rs {
			o := 8 + i*entrySize
			v[o], v[o+1] = r.Proto, byte(r.Action)
			binary.LittleEndian.PutUint16(v[o+4:], r.PortLo)
			binary.LittleEndian.PutUint16(v[o+6:], r.PortHi)
		}
		if err := e.rules.Put(lpmKey(cidr), v); err != nil {
			return fmt.Errorf("write rule for %s: %w", cidr, err)
		}
	}
	// Rules that went away, after the new ones are in (no window without them).
	for cidr := range e.current {
		if _, keep := byCIDR[cidr]; !keep {
			if err := e.rules.Delete(lpmKey(cidr)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("remove rule for %s: %w", cidr, err)
			}
		}
	}
	e.current = map[netip.Prefix]bool{}
	for cidr := range byCIDR {
		e.current[cidr] = true
	}
	// config: default action (u32), allowed source address (network order; 0 = any).
	cfg := make([]byte, 8)
	binary.LittleEndian.PutUint32(cfg, uint32(p.Default))
	if p.Source.IsValid() {
		a := p.Source.As4()
		copy(cfg[4:], a[:])
	}
	if err := e.config.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("write default action: %w", err)
	}
	return nil
}

// Counters reads the allowed and dropped packet counts.
func (e *Enforcer) Counters() (Counters, error) {
	var c Counters
	if err := e.counters.Lookup(uint32(0), &c.Allowed); err != nil {
		return c, fmt.Errorf("read counters: %w", err)
	}
	if err := e.counters.Lookup(uint32(1), &c.Dropped); err != nil {
		return c, fmt.Errorf("read counters: %w", err)
	}
	return c, nil
}

// Close detaches the program and frees its maps.
func (e *Enforcer) Close() error {
	var errs []error
	if e.link != nil {
		errs = append(errs, e.link.Close())
	}
	if e.prog != nil {
		errs = append(errs, e.prog.Close())
	}
	for _, m := range []*ebpf.Map{e.rules, e.config, e.counters} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

func lpmKey(p netip.Prefix) []byte {
	k := make([]byte, 8)
	binary.LittleEndian.PutUint32(k, uint32(p.Bits()))
	a := p.Addr().As4()
	copy(k[4:], a[:])
	return k
}

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
		lo, hi, _ := strings.Cut(f[3], "-")
		if hi == "" {
			hi = lo
		}
		var l, h uint16
		if _, err := fmt.Sscanf(lo+" "+hi, "%d %d", &l, &h); err != nil || l == 0 {
			return Rule{}, fmt.Errorf("rule %q: ports %q: want PORT or PORT-PORT in 1..65535", s, f[3])
		}
		r.PortLo, r.PortHi = l, h
	}
	return r, Policy{Default: Deny, Rules: []Rule{r}}.Validate()
}

// program assembles the filter. Registers: r6 ctx, r7 data, r8 data_end, r9 protocol,
// stack: fp-8 LPM key (prefixlen, daddr), fp-12 destination port (host order), fp-16
// map index, fp-20 source address.
func program(dir Direction, rulesFD, configFD, countersFD int) asm.Instructions {
	// The address the rules match: the destination of what the sandbox sends, the source
	// of what it receives.
	matchOff := int16(14 + 16)
	if dir == ToSandbox {
		matchOff = 14 + 12
	}
	const (
		skbData    = 76
		skbDataEnd = 80
	)
	ins := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, skbData, asm.Word),
		asm.LoadMem(asm.R8, asm.R6, skbDataEnd, asm.Word),
		// Ethernet header.
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Imm(asm.R2, 14),
		asm.JGT.Reg(asm.R2, asm.R8, "default"),
		asm.LoadMem(asm.R3, asm.R7, 12, asm.Half),
		asm.HostTo(asm.BE, asm.R3, asm.Half),
		asm.JEq.Imm(asm.R3, 0x0806, "allow"), // ARP
		asm.JNE.Imm(asm.R3, 0x0800, "default"),
		// IPv4 header (20 bytes at least).
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Imm(asm.R2, 34),
		asm.JGT.Reg(asm.R2, asm.R8, "default"),
		// Source address check (anti-spoofing) first: config[0].source, 0 = none.
		asm.LoadMem(asm.R3, asm.R7, 14+12, asm.Word),
		asm.StoreMem(asm.RFP, -20, asm.R3, asm.Word),
		asm.StoreImm(asm.RFP, -16, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, configFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -16),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R2, asm.R0, 4, asm.Word),
		asm.JEq.Imm(asm.R2, 0, "checked"),
		asm.LoadMem(asm.R3, asm.RFP, -20, asm.Word),
		asm.JNE.Reg(asm.R2, asm.R3, "drop"),
		asm.LoadMem(asm.R9, asm.R7, 14+9, asm.Byte).WithSymbol("checked"),
		asm.LoadMem(asm.R3, asm.R7, matchOff, asm.Word),
		asm.StoreImm(asm.RFP, -8, 32, asm.Word),
		asm.StoreMem(asm.RFP, -4, asm.R3, asm.Word),
		asm.StoreImm(asm.RFP, -12, 0, asm.Word),
		// Destination port for TCP and UDP: 14 + ihl*4 + 2.
		asm.JEq.Imm(asm.R9, TCP, "ports"),
		asm.JNE.Imm(asm.R9, UDP, "lookup"),
		asm.LoadMem(asm.R4, asm.R7, 14, asm.Byte).WithSymbol("ports"),
		asm.And.Imm(asm.R4, 0x0f),
		asm.LSh.Imm(asm.R4, 2),
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Reg(asm.R2, asm.R4),
		asm.Add.Imm(asm.R2, 14),
		asm.Mov.Reg(asm.R3, asm.R2),
		asm.Add.Imm(asm.R3, 4),
		asm.JGT.Reg(asm.R3, asm.R8, "lookup"),
		asm.LoadMem(asm.R3, asm.R2, 2, asm.Half),
		asm.HostTo(asm.BE, asm.R3, asm.Half),
		asm.StoreMem(asm.RFP, -12, asm.R3, asm.Word),
		// Longest prefix match on the destination.
		asm.LoadMapPtr(asm.R1, rulesFD).WithSymbol("lookup"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "default"),
		asm.Mov.Reg(asm.R7, asm.R0), // value; the packet is not read any more
		asm.LoadMem(asm.R8, asm.R7, 0, asm.Word),
		asm.LoadMem(asm.R5, asm.RFP, -12, asm.Word), // port
	}
	// The rules of the prefix, unrolled: first match wins.
	for i := 0; i < MaxRulesPerCIDR; i++ {
		next := fmt.Sprintf("rule%d", i+1)
		o := int16(8 + i*entrySize)
		ins = append(ins,
			asm.JLE.Imm(asm.R8, int32(i), "default").WithSymbol(fmt.Sprintf("rule%d", i)),
			asm.LoadMem(asm.R2, asm.R7, o, asm.Byte), // proto
			asm.JEq.Imm(asm.R2, 0, fmt.Sprintf("ports%d", i)),
			asm.JNE.Reg(asm.R2, asm.R9, next),
			asm.LoadMem(asm.R3, asm.R7, o+6, asm.Half).WithSymbol(fmt.Sprintf("ports%d", i)), // hi
			asm.JEq.Imm(asm.R3, 0, fmt.Sprintf("act%d", i)),
			asm.JGT.Reg(asm.R5, asm.R3, next),
			asm.LoadMem(asm.R3, asm.R7, o+4, asm.Half), // lo
			asm.JLT.Reg(asm.R5, asm.R3, next),
			asm.LoadMem(asm.R2, asm.R7, o+1, asm.Byte).WithSymbol(fmt.Sprintf("act%d", i)),
			asm.JEq.Imm(asm.R2, int32(Allow), "allow"),
			asm.Ja.Label("drop"),
		)
	}
	ins = append(ins,
		asm.Ja.Label("default").WithSymbol(fmt.Sprintf("rule%d", MaxRulesPerCIDR)),
		// The policy's default.
		asm.StoreImm(asm.RFP, -16, 0, asm.Word).WithSymbol("default"),
		asm.LoadMapPtr(asm.R1, configFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -16),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R2, asm.R0, 0, asm.Word),
		asm.JEq.Imm(asm.R2, int32(Allow), "allow"),
		// Count and decide.
		asm.StoreImm(asm.RFP, -16, 1, asm.Word).WithSymbol("drop"),
		asm.Mov.Imm(asm.R9, 2), // TC_ACT_SHOT
		asm.Ja.Label("count"),
		asm.StoreImm(asm.RFP, -16, 0, asm.Word).WithSymbol("allow"),
		asm.Mov.Imm(asm.R9, 0), // TC_ACT_OK
		asm.LoadMapPtr(asm.R1, countersFD).WithSymbol("count"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -16),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Reg(asm.R0, asm.R9).WithSymbol("out"),
		asm.Return(),
	)
	return ins
}

// MaxPolicyBytes bounds a policy file.
const MaxPolicyBytes = 64 << 10

// ParsePolicy reads a policy file: one statement per line, `#` starts a comment.
//
//	default allow|deny
//	allow|deny CIDR [tcp|udp [PORT[-PORT]]]
//
// The default is deny when the file does not say. Errors name the line.
func ParsePolicy(text string) (Policy, error) {
	if len(text) > MaxPolicyBytes {
		return Policy{}, fmt.Errorf("policy is %d bytes, more than %d", len(text), MaxPolicyBytes)
	}
	p := Policy{Default: Deny}
	seenDefault := false
	var errs []error
	for i, line := range strings.Split(text, "\n") {
		if c := strings.IndexByte(line, '#'); c >= 0 {
			line = line[:c]
		}
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
			continue
		case f[0] == "default":
			a, ok := Deny, false
			if len(f) == 2 {
				a, ok = parseAction(f[1])
			}
			if !ok {
				errs = append(errs, fmt.Errorf("line %d: want `default allow` or `default deny`", i+1))
				continue
			}
			if seenDefault {
				errs = append(errs, fmt.Errorf("line %d: a second default", i+1))
			}
			seenDefault, p.Default = true, a
		default:
			r, err := ParseRule(strings.Join(f, " "))
			if err != nil {
				errs = append(errs, fmt.Errorf("line %d: %w", i+1, err))
				continue
			}
			p.Rules = append(p.Rules, r)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Policy{}, err
	}
	return p, p.Validate()
}
