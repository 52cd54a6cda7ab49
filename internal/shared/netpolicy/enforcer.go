package netpolicy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Counters are packets a program let through and dropped.
type Counters struct{ Allowed, Dropped uint64 }

// value layout of the LPM map: count, then MaxRulesPerCIDR entries of
// {proto u8, action u8, pad u16, portLo u16, portHi u16} (8 bytes each).
const (
	entrySize = 8
	valueSize = 8 + MaxRulesPerCIDR*entrySize
)

// MaxFlows bounds the flows remembered per sandbox (an LRU map: the oldest go first).
const MaxFlows = 4096

// direction is one attached program and its maps.
type direction struct {
	protect, rules, config, counters *ebpf.Map
	link                             link.Link
	current, protected               map[netip.Prefix]bool // prefixes in rules, in protect
}

// Enforcer is a sandbox's policy: two programs on the host end of its veth pair sharing
// a flow map. It may be pinned to a bpffs directory, so the programs stay attached when
// the process holding it exits (an agent restart must not open a sandbox's network), and
// loaded again from there.
type Enforcer struct {
	out, in direction
	flows   *ebpf.Map
	pinned  string
}

// Attach loads the programs and attaches them to the host-side veth end ifname with s in
// force: the egress rules on the end's tcx ingress (what the sandbox sends), the ingress
// rules on its tcx egress (what is sent to the sandbox).
func Attach(ifname string, s Enforced) (*Enforcer, error) {
	if err := s.Validate(); err != nil {
		return nil, fmt.Errorf("network policy: %w", err)
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("attach network policy to %s: %w", ifname, err)
	}
	e, err := build(s)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			e.detach()
		}
	}()
	for _, d := range []struct {
		dir    Direction
		d      *direction
		attach ebpf.AttachType
	}{{FromSandbox, &e.out, ebpf.AttachTCXIngress}, {ToSandbox, &e.in, ebpf.AttachTCXEgress}} {
		prog, err := e.program(d.dir)
		if err != nil {
			return nil, err
		}
		d.d.link, err = link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: prog, Attach: d.attach})
		prog.Close() // the link holds it
		if err != nil {
			return nil, fmt.Errorf("attach policy program to %s (tcx %s): %w", ifname, d.attach, err)
		}
	}
	ok = true
	return e, nil
}

// build makes the maps with s in them (nothing attached).
func build(s Enforced) (*Enforcer, error) {
	e := &Enforcer{}
	ok := false
	defer func() {
		if !ok {
			e.detach()
		}
	}()
	var err error
	if e.flows, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_flows", Type: ebpf.LRUHash, KeySize: flowKeySize, ValueSize: 8, MaxEntries: MaxFlows}); err != nil {
		return nil, fmt.Errorf("create flow map: %w", err)
	}
	for _, d := range []struct {
		d       *direction
		p       Policy
		protect []Rule
	}{{&e.out, s.Egress, s.Protect.Egress}, {&e.in, s.Ingress, s.Protect.Ingress}} {
		if err := d.d.create(); err != nil {
			return nil, err
		}
		if err := d.d.apply(d.p, d.protect); err != nil {
			return nil, err
		}
	}
	ok = true
	return e, nil
}

// program loads the filter of one direction (not attached).
func (e *Enforcer) program(dir Direction) (*ebpf.Program, error) {
	d := &e.out
	if dir == ToSandbox {
		d = &e.in
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "fw_policy", Type: ebpf.SchedCLS, License: "Apache-2.0",
		Instructions: program(dir, d.protect.FD(), d.rules.FD(), d.config.FD(), d.counters.FD(), e.flows.FD())})
	if err != nil {
		return nil, fmt.Errorf("load policy program: %w", err)
	}
	return prog, nil
}

func (d *direction) create() (err error) {
	d.current, d.protected = map[netip.Prefix]bool{}, map[netip.Prefix]bool{}
	if d.rules, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_rules", Type: ebpf.LPMTrie, KeySize: 8, ValueSize: valueSize,
		MaxEntries: mapPrefixes, Flags: 1 /* BPF_F_NO_PREALLOC, required for LPM tries */}); err != nil {
		return fmt.Errorf("create rules map: %w", err)
	}
	if d.protect, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_protect", Type: ebpf.LPMTrie, KeySize: 8, ValueSize: valueSize,
		MaxEntries: mapPrefixes, Flags: 1}); err != nil {
		return fmt.Errorf("create protected rules map: %w", err)
	}
	if d.config, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_config", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}); err != nil {
		return fmt.Errorf("create config map: %w", err)
	}
	if d.counters, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_counters", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2}); err != nil {
		return fmt.Errorf("create counters map: %w", err)
	}
	return nil
}

// Apply replaces the rules in force, both directions. A set that does not validate
// changes nothing.
func (e *Enforcer) Apply(s Enforced) error {
	if err := s.Validate(); err != nil {
		return fmt.Errorf("network policy: %w", err)
	}
	if e.out.protect == nil || e.in.protect == nil {
		return errors.New("network policy: these programs predate protected rules (an older agent's): replace them")
	}
	if err := e.out.apply(s.Egress, s.Protect.Egress); err != nil {
		return err
	}
	return e.in.apply(s.Ingress, s.Protect.Ingress)
}

// apply writes the protected rules first, then the policy's: while it runs, the new
// protected rules are already in force in front of either policy.
func (d *direction) apply(p Policy, protect []Rule) error {
	var err error
	if d.protected, err = writeRules(d.protect, protect, d.protected); err != nil {
		return fmt.Errorf("protected rules: %w", err)
	}
	if d.current, err = writeRules(d.rules, p.Rules, d.current); err != nil {
		return err
	}
	// config: default action (u32), allowed source address (network order; 0 = any).
	cfg := make([]byte, 8)
	binary.LittleEndian.PutUint32(cfg, uint32(p.Default))
	if p.Source.IsValid() {
		a := p.Source.As4()
		copy(cfg[4:], a[:])
	}
	if err := d.config.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("write default action: %w", err)
	}
	return nil
}

// writeRules puts rules in LPM map m, where the prefixes in current are, and returns the
// prefixes now there.
func writeRules(m *ebpf.Map, rules []Rule, current map[netip.Prefix]bool) (map[netip.Prefix]bool, error) {
	byCIDR := map[netip.Prefix][]Rule{}
	for _, r := range rules {
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
		if err := m.Put(lpmKey(cidr), v); err != nil {
			return current, fmt.Errorf("write rule for %s: %w", cidr, err)
		}
	}
	// Rules that went away, after the new ones are in (no window without them).
	for cidr := range current {
		if _, keep := byCIDR[cidr]; !keep {
			if err := m.Delete(lpmKey(cidr)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return current, fmt.Errorf("remove rule for %s: %w", cidr, err)
			}
		}
	}
	now := map[netip.Prefix]bool{}
	for cidr := range byCIDR {
		now[cidr] = true
	}
	return now, nil
}

// Counters reads the packets allowed and dropped: what the sandbox sent (egress) and
// what was sent to it (ingress).
func (e *Enforcer) Counters() (egress, ingress Counters, err error) {
	if egress, err = readCounters(e.out.counters); err != nil {
		return
	}
	ingress, err = readCounters(e.in.counters)
	return
}

func readCounters(m *ebpf.Map) (Counters, error) {
	var c Counters
	if err := m.Lookup(uint32(0), &c.Allowed); err != nil {
		return c, fmt.Errorf("read counters: %w", err)
	}
	if err := m.Lookup(uint32(1), &c.Dropped); err != nil {
		return c, fmt.Errorf("read counters: %w", err)
	}
	return c, nil
}

// Pin keeps the programs attached and the maps alive beyond this process, under dir (on
// a bpffs mount; made if missing).
func (e *Enforcer) Pin(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pin network policy: %w", err)
	}
	for name, p := range e.objects() {
		if err := p.Pin(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("pin network policy %s in %s: %w", name, dir, err)
		}
	}
	e.pinned = dir
	return nil
}

type pinner interface{ Pin(string) error }

func (e *Enforcer) objects() map[string]pinner {
	return map[string]pinner{
		"flows": e.flows, "out_link": e.out.link, "out_rules": e.out.rules, "out_protect": e.out.protect, "out_config": e.out.config, "out_counters": e.out.counters,
		"in_link": e.in.link, "in_rules": e.in.rules, "in_protect": e.in.protect, "in_config": e.in.config, "in_counters": e.in.counters,
	}
}

// LoadPinned opens a pinned enforcer (after a restart of the process that attached it).
func LoadPinned(dir string) (*Enforcer, error) {
	e := &Enforcer{pinned: dir}
	ok := false
	defer func() {
		if !ok {
			e.Close()
		}
	}()
	var err error
	loadMap := func(name string) *ebpf.Map {
		if err != nil {
			return nil
		}
		var m *ebpf.Map
		if m, err = ebpf.LoadPinnedMap(filepath.Join(dir, name), nil); err != nil {
			err = fmt.Errorf("load pinned network policy %s: %w", filepath.Join(dir, name), err)
		}
		return m
	}
	loadLink := func(name string) link.Link {
		if err != nil {
			return nil
		}
		var l link.Link
		if l, err = link.LoadPinnedLink(filepath.Join(dir, name), nil); err != nil {
			err = fmt.Errorf("load pinned network policy %s: %w", filepath.Join(dir, name), err)
		}
		return l
	}
	// Programs of version 3 and before had no protected maps: such an enforcer loads
	// without them, to be replaced (Apply refuses it).
	optionalMap := func(name string) *ebpf.Map {
		if _, serr := os.Stat(filepath.Join(dir, name)); serr != nil {
			return nil
		}
		return loadMap(name)
	}
	e.flows = loadMap("flows")
	e.out = direction{rules: loadMap("out_rules"), protect: optionalMap("out_protect"), config: loadMap("out_config"), counters: loadMap("out_counters"), link: loadLink("out_link")}
	e.in = direction{rules: loadMap("in_rules"), protect: optionalMap("in_protect"), config: loadMap("in_config"), counters: loadMap("in_counters"), link: loadLink("in_link")}
	if err != nil {
		return nil, err
	}
	for _, d := range []*direction{&e.out, &e.in} {
		if d.current, err = prefixesIn(d.rules); err != nil {
			return nil, fmt.Errorf("read pinned rules in %s: %w", dir, err)
		}
		d.protected = map[netip.Prefix]bool{}
		if d.protect != nil {
			if d.protected, err = prefixesIn(d.protect); err != nil {
				return nil, fmt.Errorf("read pinned protected rules in %s: %w", dir, err)
			}
		}
	}
	ok = true
	return e, nil
}

// prefixesIn lists the prefixes in an LPM rules map.
func prefixesIn(m *ebpf.Map) (map[netip.Prefix]bool, error) {
	out := map[netip.Prefix]bool{}
	var k [8]byte
	var v [valueSize]byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		a := netip.AddrFrom4([4]byte(k[4:8]))
		out[netip.PrefixFrom(a, int(binary.LittleEndian.Uint32(k[:4])))] = true
	}
	return out, it.Err()
}

// Close releases this process's hold. A pinned enforcer stays in force; an unpinned one
// is detached.
func (e *Enforcer) Close() error {
	var errs []error
	for _, c := range []interface{ Close() error }{e.out.link, e.in.link, e.flows, e.out.rules, e.out.protect, e.out.config, e.out.counters, e.in.rules, e.in.protect, e.in.config, e.in.counters} {
		if c != nil && !isNil(c) {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// Detach removes the policy for good: unpinned and closed, the programs come off the
// interface.
func (e *Enforcer) Detach() error { return e.detach() }

func (e *Enforcer) detach() error {
	var errs []error
	if e.pinned != "" {
		errs = append(errs, os.RemoveAll(e.pinned))
	}
	errs = append(errs, e.Close())
	return errors.Join(errs...)
}

// isNil reports a typed nil inside an interface (a map or link never created).
func isNil(c interface{ Close() error }) bool {
	switch v := c.(type) {
	case *ebpf.Map:
		return v == nil
	case link.Link:
		return v == nil
	}
	return false
}

func lpmKey(p netip.Prefix) []byte {
	k := make([]byte, 8)
	binary.LittleEndian.PutUint32(k, uint32(p.Bits()))
	a := p.Addr().As4()
	copy(k[4:], a[:])
	return k
}

// Guard is the anti-spoofing program on a guest's tap.
type Guard struct {
	counters *ebpf.Map
	link     link.Link
	pinned   string
}

// AttachGuard attaches the guard to the tap with index ifindex (an index in the calling
// thread's network namespace: callers inside a sandbox's namespace pass its tap), letting
// through only frames from mac and, for IPv4 and ARP, from addr.
func AttachGuard(ifindex int, mac net.HardwareAddr, addr netip.Addr) (*Guard, error) {
	if len(mac) != 6 || !addr.Is4() {
		return nil, fmt.Errorf("guard for %s %s: want a 6-byte MAC and an IPv4 address", mac, addr)
	}
	g := &Guard{}
	var err error
	if g.counters, err = ebpf.NewMap(&ebpf.MapSpec{Name: "fw_guard", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2}); err != nil {
		return nil, fmt.Errorf("create guard counters: %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "fw_guard", Type: ebpf.SchedCLS, License: "Apache-2.0",
		Instructions: guardProgram(mac, addr, g.counters.FD())})
	if err != nil {
		g.counters.Close()
		return nil, fmt.Errorf("load guard program: %w", err)
	}
	defer prog.Close()
	// The guest's frames enter the host stack at the tap: its tcx ingress.
	if g.link, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXIngress}); err != nil {
		g.counters.Close()
		return nil, fmt.Errorf("attach guard to interface %d: %w", ifindex, err)
	}
	return g, nil
}

// Dropped counts frames the guard dropped.
func (g *Guard) Dropped() (uint64, error) {
	c, err := readCounters(g.counters)
	return c.Dropped, err
}

// Pin keeps the guard beyond this process, under dir.
func (g *Guard) Pin(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pin guard: %w", err)
	}
	if err := g.link.Pin(filepath.Join(dir, "guard_link")); err != nil {
		return fmt.Errorf("pin guard in %s: %w", dir, err)
	}
	if err := g.counters.Pin(filepath.Join(dir, "guard_counters")); err != nil {
		return fmt.Errorf("pin guard in %s: %w", dir, err)
	}
	g.pinned = dir
	return nil
}

// LoadPinnedGuard opens a pinned guard.
func LoadPinnedGuard(dir string) (*Guard, error) {
	l, err := link.LoadPinnedLink(filepath.Join(dir, "guard_link"), nil)
	if err != nil {
		return nil, fmt.Errorf("load pinned guard in %s: %w", dir, err)
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "guard_counters"), nil)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("load pinned guard in %s: %w", dir, err)
	}
	return &Guard{counters: m, link: l, pinned: dir}, nil
}

// Close releases this process's hold (a pinned guard stays attached).
func (g *Guard) Close() error { return errors.Join(g.link.Close(), g.counters.Close()) }

// ResetCounters zeroes both directions' counters.
func (e *Enforcer) ResetCounters() error {
	return errors.Join(zeroCounters(e.out.counters), zeroCounters(e.in.counters))
}

// ResetCounters zeroes the guard's counter.
func (g *Guard) ResetCounters() error { return zeroCounters(g.counters) }

func zeroCounters(m *ebpf.Map) error {
	for i := uint32(0); i < 2; i++ {
		if err := m.Put(i, uint64(0)); err != nil {
			return fmt.Errorf("reset counters: %w", err)
		}
	}
	return nil
}
