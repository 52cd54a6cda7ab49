package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// DefaultSandboxCIDR is where a node's sandbox addresses come from unless configured.
const DefaultSandboxCIDR = "10.201.0.0/16"

// bpffsRoot is where policy programs are pinned, so they stay attached across agent
// restarts (a restart must never leave a running sandbox's network open).
const bpffsRoot = "/sys/fs/bpf"

// netManager owns the node's sandbox networks: address blocks, namespaces (veth pair to
// the host, tap for the guest, address translation), and the policy and guard programs.
// Each network has an owner name: `n-<rand>` for networks made ahead (the VM's run
// directory records it, see netOwnerFile), `t-<key>` for a template build's.
type netManager struct {
	log         *slog.Logger
	tag         string // this agent's mark on its namespaces, pins and host table
	rng         netip.Prefix
	ipam        *network.IPAM
	pins        string // bpffs directory of this agent's pins
	nameservers []string
	extra       []netip.Prefix // operator-protected ranges (--deny-cidr)

	mu     sync.Mutex
	nets   map[string]*sbNet // by owner
	spares []*sbNet          // made ahead, closed, for acquire
	wake   chan struct{}     // wakes keepSpares
	// starting counts sandbox starts in flight: making a spare network (~60 ms of CPU)
	// waits for them rather than compete with them for the CPUs.
	starting atomic.Int32
}

// sbNet is one VM's network.
type sbNet struct {
	m       *netManager
	owner   string
	ns      network.Namespace
	enf     *netpolicy.Enforcer
	guard   *netpolicy.Guard
	applyMu sync.Mutex         // one policy change at a time
	pol     NetPolicy          // the user's policy in force (guarded by m.mu)
	set     netpolicy.Enforced // everything enforced: the node's rules and pol (guarded by m.mu)
	closed  bool               // lets nothing through until a sandbox's policy is applied (guarded by m.mu)
	peers   []Peer             // the sandbox's group's other members (guarded by m.mu)
	removed bool               // Remove ran (guarded by applyMu)
}

// SetPeers makes the other members of the sandbox's group reachable at their group
// addresses (translated to their addresses on the node) and lets them through its policy.
func (n *sbNet) SetPeers(peers []Peer) error {
	n.applyMu.Lock()
	defer n.applyMu.Unlock()
	if n.removed {
		return nil // going: nothing to reach
	}
	// The policy first: a peer that went must stop being let through even if the
	// routes cannot be changed (its address may go to another sandbox).
	n.m.mu.Lock()
	n.peers = append([]Peer(nil), peers...)
	pol, closed := n.pol, n.closed
	n.m.mu.Unlock()
	var perr error
	if !closed && n.enf != nil {
		perr = n.applyLocked(pol)
	}
	var routes []network.GroupRoute
	for _, p := range peers {
		routes = append(routes, network.GroupRoute{Group: p.Group, Addr: p.Addr})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return errors.Join(perr, network.SetGroupRoutes(ctx, n.ns, routes))
}

func peerAddrs(peers []Peer) []netip.Addr {
	out := make([]netip.Addr, 0, len(peers))
	for _, p := range peers {
		out = append(out, p.Addr)
	}
	return out
}

// policyOf is the policy a sandbox's spec asks for.
func policyOf(spec state.SandboxSpec) NetPolicy {
	return NetPolicy{Text: spec.Policy, Admin: spec.PolicyAdmin}
}

// newNetManager prepares the node's side of sandbox networking. The data directory's
// hash tags this agent's namespaces, pins and host table apart from another agent's on
// the same host.
func newNetManager(ctx context.Context, log *slog.Logger, dataDir string, rng netip.Prefix, nameservers []string, extra []netip.Prefix) (*netManager, error) {
	sum := sha256.Sum256([]byte(dataDir))
	m := &netManager{log: log, tag: hex.EncodeToString(sum[:])[:6], rng: rng.Masked(), nameservers: nameservers, extra: extra,
		nets: map[string]*sbNet{}, wake: make(chan struct{}, 1)}
	var err error
	if m.ipam, err = network.OpenIPAM(filepath.Join(dataDir, "network", "ipam.json"), m.rng); err != nil {
		return nil, err
	}
	if err := ensureBPFFS(); err != nil {
		return nil, err
	}
	m.pins = filepath.Join(bpffsRoot, "fireworks", m.tag)
	if err := network.SetupHost(ctx, m.tag, m.rng); err != nil {
		return nil, fmt.Errorf("prepare the host for sandbox networks: %w", err)
	}
	return m, nil
}

// ensureBPFFS mounts the BPF filesystem at its usual place if nothing is there yet.
func ensureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(bpffsRoot, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if out, err := exec.Command("mount", "-t", "bpf", "bpf", bpffsRoot).CombinedOutput(); err != nil {
		return fmt.Errorf("mount the BPF filesystem on %s (policy programs are pinned there): %w: %s", bpffsRoot, err, strings.TrimSpace(string(out)))
	}
	// A mount made in a mount namespace of the agent's own (`ip netns exec`, a container
	// without the host's /sys/fs/bpf) goes away with the process, and the pins with it:
	// the next agent could not take its sandboxes' policies back.
	own, err1 := os.Readlink("/proc/self/ns/mnt")
	host, err2 := os.Readlink("/proc/1/ns/mnt")
	if err1 == nil && err2 == nil && own != host {
		slog.Warn("mounted a BPF filesystem in the agent's own mount namespace: sandbox policies will not survive an agent restart (share the host's /sys/fs/bpf with the agent)", "path", bpffsRoot)
	}
	return nil
}

func (m *netManager) nsOwner(owner string) string { return m.tag + "-" + owner }

// protected lists what sandboxes may not reach unless an admin's policy opens it: the
// link-local range (cloud metadata services, some cloud DNS), the node's own addresses
// and their broadcast addresses, limited broadcast and multicast, "this network" and
// loopback, the sandbox range (other sandboxes, and the node's ends of every sandbox's
// veth pair), and what the operator added (--deny-cidr).
func (m *netManager) Protected() []netip.Prefix {
	ps := append(netpolicy.FixedProtected(), m.rng)
	ps = append(ps, m.extra...)
	addrs, err := network.HostAddrs()
	if err != nil {
		m.log.Warn("list the node's addresses for the sandbox policy", "err", err)
	}
	for _, p := range addrs {
		if m.rng.Contains(p.Addr()) {
			continue // a sandbox's host end: the sandbox range covers it
		}
		ps = append(ps, netip.PrefixFrom(p.Addr(), 32))
		if b, ok := network.Broadcast(p); ok {
			ps = append(ps, netip.PrefixFrom(b, 32))
		}
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr())*64 + a.Bits() - b.Bits() })
	return slices.Compact(ps)
}

// baseSet is the node's rules for a sandbox at block b:
//   - what it sends: it may send only from its own address and not into the protected
//     ranges, except to the guests' nameservers on port 53 (DNS on a node address or in
//     169.254/16, as clouds have it);
//   - what reaches it: nothing from the sandbox range but the node itself (its end of the
//     veth pair: port-forward and ingress come from there), so that reaching another
//     sandbox needs both sandboxes' policies to agree.
//
// Everything else may pass both ways.
//
// A sandbox group's members (peers, by their addresses on the node) reach each other
// whatever their policies: the group's network is theirs.
func (m *netManager) baseSet(b network.Block, protected []netip.Prefix, peers []netip.Addr) netpolicy.Set {
	rule := func(p netip.Prefix, proto uint8, port uint16, a netpolicy.Action) netpolicy.Rule {
		return netpolicy.Rule{CIDR: p, Proto: proto, PortLo: port, PortHi: port, Action: a}
	}
	eg := netpolicy.Policy{Default: netpolicy.Allow, Source: b.Sandbox()}
	for _, p := range protected {
		eg.Rules = append(eg.Rules, rule(p, netpolicy.AnyProto, 0, netpolicy.Deny))
	}
	for _, ns := range m.nameservers {
		a, err := netip.ParseAddr(ns)
		if err != nil || !slices.ContainsFunc(protected, func(p netip.Prefix) bool { return p.Contains(a) }) {
			continue // an ordinary address: nothing to open
		}
		p := netip.PrefixFrom(a, 32)
		eg.Rules = slices.DeleteFunc(eg.Rules, func(r netpolicy.Rule) bool { return r.CIDR == p })
		eg.Rules = append(eg.Rules, rule(p, netpolicy.UDP, 53, netpolicy.Allow), rule(p, netpolicy.TCP, 53, netpolicy.Allow),
			rule(p, netpolicy.AnyProto, 0, netpolicy.Deny))
	}
	in := netpolicy.Policy{Default: netpolicy.Allow, Rules: []netpolicy.Rule{
		rule(m.rng, netpolicy.AnyProto, 0, netpolicy.Deny),
		rule(netip.PrefixFrom(b.Host(), 32), netpolicy.AnyProto, 0, netpolicy.Allow),
	}}
	for _, p := range peers {
		if !m.rng.Contains(p) || p == b.Sandbox() {
			continue // only other sandboxes of this node
		}
		pp := netip.PrefixFrom(p, 32)
		eg.Rules = append(eg.Rules, rule(pp, netpolicy.AnyProto, 0, netpolicy.Allow))
		in.Rules = append(in.Rules, rule(pp, netpolicy.AnyProto, 0, netpolicy.Allow))
	}
	return netpolicy.Set{Egress: eg, Ingress: in}
}

// policySet is what is enforced for a sandbox with policy text.
//
// For a user's policy the node's rules for what the sandbox sends go in the programs'
// protected maps, decided before any rule of the policy: no user policy, whatever its
// actions and prefixes, changes their verdict (it does not depend on the policy at all).
// A user's allow rule inside a protected range would be dead, so it is refused with the
// range named rather than accepted and ignored. What reaches the sandbox is its owner's
// to open: the node's rule there (nothing from the sandbox range but the node) is a
// default beneath the policy, which a user's `in` rules may widen; that alone opens
// nothing, since the sender's own egress must allow it too, and only an admin's may.
//
// Only an admin's policy may open what the node protects: it is laid over the node's
// rules (an admin's rules for a prefix replace the node's for it) and nothing is decided
// before it.
func (m *netManager) policySet(b network.Block, pol NetPolicy, peers []netip.Addr) (netpolicy.Enforced, error) {
	text, admin := pol.Text, pol.Admin
	protected := m.Protected()
	base := m.baseSet(b, protected, peers)
	user := netpolicy.Set{Egress: netpolicy.Policy{Default: netpolicy.Allow}, Ingress: netpolicy.Policy{Default: netpolicy.Allow}}
	if text != "" {
		var err error
		if user, err = netpolicy.ParsePolicy(text); err != nil {
			return netpolicy.Enforced{}, err
		}
	}
	e := netpolicy.Enforced{Set: netpolicy.Set{Egress: netpolicy.Merge(base.Egress, user.Egress), Ingress: netpolicy.Merge(base.Ingress, user.Ingress)}}
	if !admin {
		if pol.Strict {
			if err := refuseProtected(user.Egress.Rules, protected); err != nil {
				return netpolicy.Enforced{}, err
			}
		}
		e.Egress, e.Protect.Egress = user.Egress, base.Egress.Rules
	}
	e.Egress.Source = b.Sandbox() // the node's pin, whoever wrote the policy
	return e, e.Validate()
}

// refuseProtected explains why a user's allow rules inside the protected ranges cannot
// work.
func refuseProtected(rules []netpolicy.Rule, protected []netip.Prefix) error {
	var errs []error
	for _, r := range rules {
		if r.Action != netpolicy.Allow {
			continue
		}
		for _, p := range protected {
			if p.Bits() <= r.CIDR.Bits() && p.Contains(r.CIDR.Addr()) {
				errs = append(errs, fmt.Errorf("allow %s: inside %s, which only an admin's policy may open (the node's own addresses, link-local and metadata, broadcast, other sandboxes)", r.CIDR, p))
				break
			}
		}
	}
	return errors.Join(errs...)
}

// guestNet is the network every guest configures (see network.GuestAddr).
func guestNet() *proto.NetConfig {
	return &proto.NetConfig{Address: network.GuestCIDR(), Gateway: network.GuestGateway.String()}
}

// closedSet lets nothing through: the policy of VMs no sandbox has claimed yet.
func closedSet(b network.Block) netpolicy.Enforced {
	return netpolicy.Enforced{Set: netpolicy.Set{Egress: netpolicy.Policy{Default: netpolicy.Deny, Source: b.Sandbox()}, Ingress: netpolicy.Policy{Default: netpolicy.Deny}}}
}

// create makes owner's network with policy text in force; closed makes it let nothing
// through until apply (for VMs made ahead of a sandbox). On error nothing is left.
func (m *netManager) create(ctx context.Context, owner string, pol NetPolicy, closed bool) (n *sbNet, err error) {
	blk, err := m.ipam.Allocate(m.nsOwner(owner))
	if err != nil {
		return nil, fmt.Errorf("address for %s: %w", owner, err)
	}
	n = &sbNet{m: m, owner: owner, ns: network.NamespaceFor(m.nsOwner(owner), blk), pol: pol}
	defer func() {
		if err != nil {
			n.Remove()
			n = nil
		}
	}()
	set := closedSet(blk)
	if !closed {
		if set, err = m.policySet(blk, pol, nil); err != nil {
			return n, fmt.Errorf("network policy: %w", err)
		}
	}
	n.set, n.closed = set, closed
	if err = network.Create(ctx, n.ns); err != nil {
		return n, err
	}
	pins := n.pinDir()
	err = network.Do(n.ns.Path(), func() error {
		tap, err := net.InterfaceByName(network.Tap)
		if err != nil {
			return fmt.Errorf("find the tap: %w", err)
		}
		if n.guard, err = netpolicy.AttachGuard(tap.Index, network.GuestMAC, network.GuestAddr); err != nil {
			return err
		}
		return n.guard.Pin(pins)
	})
	if err != nil {
		return n, fmt.Errorf("guard the tap of %s: %w", owner, err)
	}
	if n.enf, err = netpolicy.Attach(n.ns.HostIf, set); err != nil {
		return n, err
	}
	if err = n.enf.Pin(pins); err != nil {
		return n, err
	}
	m.mu.Lock()
	m.nets[owner] = n
	m.mu.Unlock()
	return n, nil
}

func (n *sbNet) pinDir() string { return filepath.Join(n.m.pins, n.owner) }

// Adopt takes back the network recorded in runDir (see Acquire), rewriting the record
// when this agent's programs replaced the earlier agent's.
func (m *netManager) Adopt(runDir string, pol NetPolicy) (SandboxNet, error) {
	owner, version := netOwner(runDir)
	if owner == "" {
		return nil, fmt.Errorf("no %s in %s", netOwnerFile, runDir)
	}
	n, err := m.load(owner, version, pol)
	if err != nil {
		return nil, err
	}
	if version != netpolicy.Version {
		if err := writeNetOwner(runDir, owner); err != nil {
			_ = n.Remove()
			return nil, err
		}
	}
	return n, nil
}

// Run keeps spare networks and follows the node's addresses until ctx ends.
func (m *netManager) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.followNodeAddrs(ctx, 2*time.Second)
	}()
	m.keepSpares(ctx)
	wg.Wait()
}

// StartBegins counts a sandbox start in flight: making a spare network waits for it.
func (m *netManager) StartBegins() func() {
	m.starting.Add(1)
	return func() {
		m.starting.Add(-1)
		m.kick()
	}
}

// Close removes this agent's pin directory, if no running sandbox's pins are in it.
func (m *netManager) Close() { _ = os.Remove(m.pins) }

func (n *sbNet) Address() netip.Addr { return n.ns.Block.Sandbox() }
func (n *sbNet) Namespace() string   { return n.ns.Name }

func (n *sbNet) Flows() ([]network.Flow, error)   { return network.GuestFlows(n.ns.Path()) }
func (n *sbNet) Nudge(flows []network.Flow) error { return network.NudgeFlows(n.ns.Path(), flows) }

// load takes back the network of owner that an earlier agent process made (its
// programs stayed attached through their pins), with policy text in force.
func (m *netManager) load(owner, version string, pol NetPolicy) (*sbNet, error) {
	blk, err := m.ipam.Allocate(m.nsOwner(owner)) // the owner's block, as recorded
	if err != nil {
		return nil, err
	}
	n := &sbNet{m: m, owner: owner, ns: network.NamespaceFor(m.nsOwner(owner), blk)}
	if _, err := os.Stat(n.ns.Path()); err != nil {
		return nil, fmt.Errorf("network namespace of %s: %w", owner, err)
	}
	if n.enf, err = netpolicy.LoadPinned(n.pinDir()); err != nil {
		return nil, err
	}
	if n.guard, err = netpolicy.LoadPinnedGuard(n.pinDir()); err != nil {
		n.enf.Close()
		return nil, err
	}
	if version == netpolicy.Version {
		if err := n.Apply(pol); err != nil {
			n.enf.Close()
			n.guard.Close()
			return nil, err
		}
	} else {
		// An agent with other programs made these: replace them (the new ones are in
		// force before the old ones come off; counters and remembered flows start over).
		// The old ones keep the old policy until then: their maps may not take this
		// agent's rules.
		set, err := m.policySet(blk, pol, nil)
		if err != nil {
			n.enf.Close()
			n.guard.Close()
			return nil, fmt.Errorf("network policy: %w", err)
		}
		n.pol, n.set = pol, set
		if err := n.replacePrograms(); err != nil {
			n.enf.Close()
			n.guard.Close()
			return nil, fmt.Errorf("replace the policy programs of %s (version %q, now %q): %w", owner, version, netpolicy.Version, err)
		}
		m.log.Info("replaced a sandbox's policy programs with this agent's", "owner", owner, "was", version, "now", netpolicy.Version)
	}
	m.mu.Lock()
	m.nets[owner] = n
	m.mu.Unlock()
	return n, nil
}

// replacePrograms attaches this agent's programs with the policy in force, then detaches
// and unpins the loaded ones, and pins the new ones in their place.
func (n *sbNet) replacePrograms() error {
	n.m.mu.Lock()
	set := n.set
	n.m.mu.Unlock()
	enf, err := netpolicy.Attach(n.ns.HostIf, set)
	if err != nil {
		return err
	}
	var guard *netpolicy.Guard
	err = network.Do(n.ns.Path(), func() error {
		tap, err := net.InterfaceByName(network.Tap)
		if err != nil {
			return fmt.Errorf("find the tap: %w", err)
		}
		guard, err = netpolicy.AttachGuard(tap.Index, network.GuestMAC, network.GuestAddr)
		return err
	})
	if err != nil {
		enf.Detach()
		return err
	}
	_ = n.enf.Detach() // unpins the whole directory, guard included
	_ = n.guard.Close()
	n.enf, n.guard = enf, guard
	return errors.Join(enf.Pin(n.pinDir()), guard.Pin(n.pinDir()))
}

// reapply puts the policy in force again (the node's rules changed), read under the
// same lock as Apply takes: a policy applied meanwhile is the one re-applied, never the
// one it replaced. A closed network stays closed.
func (n *sbNet) reapply() error {
	n.applyMu.Lock()
	defer n.applyMu.Unlock()
	n.m.mu.Lock()
	pol, closed := n.pol, n.closed
	n.m.mu.Unlock()
	if closed || n.enf == nil {
		return nil
	}
	return n.applyLocked(pol)
}

// apply puts a policy in force on the running programs; one that does not parse or
// validate (or opens what only an admin may) changes nothing.
func (n *sbNet) Apply(pol NetPolicy) error {
	n.applyMu.Lock()
	defer n.applyMu.Unlock()
	return n.applyLocked(pol)
}

func (n *sbNet) applyLocked(pol NetPolicy) error {
	if n.removed {
		return fmt.Errorf("the network of %s was removed", n.owner)
	}
	n.m.mu.Lock()
	peers := peerAddrs(n.peers)
	n.m.mu.Unlock()
	set, err := n.m.policySet(n.ns.Block, pol, peers)
	if err != nil {
		return fmt.Errorf("network policy: %w", err)
	}
	if err := n.enf.Apply(set); err != nil {
		return err
	}
	n.m.mu.Lock()
	n.pol, n.set, n.closed = pol, set, false
	n.m.mu.Unlock()
	return nil
}

// tapFile opens the tap for the VMM (the caller closes it once the VMM has it).
func (n *sbNet) Tap() (*os.File, error) {
	var f *os.File
	err := network.Do(n.ns.Path(), func() error {
		var err error
		f, err = network.OpenTap(network.Tap)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open the tap of %s: %w", n.owner, err)
	}
	return f, nil
}

// NetStats is a sandbox network's address and packet counts.
type NetStats struct {
	Address                        string
	EgressAllowed, EgressDropped   uint64
	IngressAllowed, IngressDropped uint64
	Spoofed                        uint64 // frames the guard on the tap dropped
	Policy                         string // the user's policy in force
	Effective                      string // everything enforced: the node's rules, then the policy
}

func (n *sbNet) Stats() (NetStats, error) {
	eg, in, err := n.enf.Counters()
	if err != nil {
		return NetStats{}, err
	}
	sp, err := n.guard.Dropped()
	if err != nil {
		return NetStats{}, err
	}
	n.m.mu.Lock()
	pol, set := n.pol, n.set
	n.m.mu.Unlock()
	return NetStats{Address: n.ns.Block.Sandbox().String(), EgressAllowed: eg.Allowed, EgressDropped: eg.Dropped,
		IngressAllowed: in.Allowed, IngressDropped: in.Dropped, Spoofed: sp, Policy: pol.Text, Effective: set.String()}, nil
}

// remove takes the network down: programs, namespace (with its veth pair and tap) and
// address block. Missing pieces are not an error.
func (n *sbNet) Remove() error {
	// No policy change or peer wiring runs into programs being closed (a group's member
	// ending wires the others while one of them is going too).
	n.applyMu.Lock()
	defer n.applyMu.Unlock()
	n.removed = true
	var errs []error
	if n.enf != nil {
		errs = append(errs, n.enf.Close())
	}
	if n.guard != nil {
		errs = append(errs, n.guard.Close())
	}
	errs = append(errs, os.RemoveAll(n.pinDir()))
	ctx, cancel := context.WithTimeout(context.Background(), 30e9)
	defer cancel()
	errs = append(errs, network.Delete(ctx, n.ns), n.m.ipam.Release(n.m.nsOwner(n.owner)))
	n.m.mu.Lock()
	if n.m.nets[n.owner] == n {
		delete(n.m.nets, n.owner)
	}
	n.m.mu.Unlock()
	return errors.Join(errs...)
}

// get returns owner's network, if it has one.
func (m *netManager) get(owner string) *sbNet {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.nets[owner]
}

// Sweep removes what earlier runs left behind (namespaces, host ends, pins, address
// blocks) but the networks recorded in the run directories listed in keep.
func (m *netManager) Sweep(ctx context.Context, keepDirs []string) {
	owners := map[string]bool{}
	for _, d := range keepDirs {
		if o, _ := netOwner(d); o != "" {
			owners[o] = true
		}
	}
	m.sweep(ctx, func(owner string) bool { return owners[owner] })
}

// sweep removes what earlier runs left behind for owners keep reports false for.
func (m *netManager) sweep(ctx context.Context, keep func(owner string) bool) {
	prefix := m.tag + "-"
	removed, err := network.Sweep(ctx, prefix, func(nsOwner string) bool { return keep(strings.TrimPrefix(nsOwner, prefix)) })
	if err != nil {
		m.log.Warn("sweep leftover sandbox networks", "err", err)
	}
	if len(removed) > 0 {
		m.log.Info("swept leftover sandbox networks", "removed", removed)
	}
	for _, o := range m.ipam.Owners() {
		if owner, ok := strings.CutPrefix(o, prefix); ok && !keep(owner) {
			if err := m.ipam.Release(o); err != nil {
				m.log.Warn("release leftover address block", "owner", o, "err", err)
			}
		}
	}
	entries, _ := os.ReadDir(m.pins)
	for _, e := range entries {
		if !keep(e.Name()) {
			_ = os.RemoveAll(filepath.Join(m.pins, e.Name()))
		}
	}
}

// spareNets is how many networks the node keeps made ahead (closed), so that a start
// does not wait the ~100 ms a namespace, its address translation and its programs take.
const spareNets = 2

// netOwnerFile, in a VM's run directory, names the owner of the VM's network (a spare
// network's owner differs from the directory's name).
const netOwnerFile = "net-owner"

// Acquire hands out a network for the VM in runDir with policy text in force (or closed):
// a spare one if there is one, else a new one. The owner is recorded in runDir for
// adoption and sweeps.
func (m *netManager) Acquire(ctx context.Context, runDir string, pol NetPolicy, closed bool) (SandboxNet, error) {
	m.mu.Lock()
	var n *sbNet
	if len(m.spares) > 0 {
		n, m.spares = m.spares[len(m.spares)-1], m.spares[:len(m.spares)-1]
	}
	m.mu.Unlock()
	m.kick()
	var err error
	if n == nil {
		if n, err = m.create(ctx, "n-"+randHex(6), pol, closed); err != nil {
			return nil, err
		}
	} else if !closed {
		if err := n.Open(pol); err != nil {
			m.giveBack(n)
			return nil, err
		}
	}
	if err := writeNetOwner(runDir, n.owner); err != nil {
		_ = n.Remove()
		return nil, err
	}
	return n, nil
}

// giveBack returns an unused network to the spares (closing it again), or removes it.
func (m *netManager) giveBack(n *sbNet) {
	if err := n.enf.Apply(closedSet(n.ns.Block)); err == nil {
		m.mu.Lock()
		n.pol, n.set, n.closed = NetPolicy{}, closedSet(n.ns.Block), true
		if len(m.spares) < spareNets {
			m.spares = append(m.spares, n)
			n = nil
		}
		m.mu.Unlock()
	}
	if n != nil {
		_ = n.Remove()
	}
}

// writeNetOwner records the owner of the network of the VM in runDir, and the version of
// its programs (an agent with other programs replaces them when it takes the VM back).
func writeNetOwner(runDir, owner string) error {
	tmp := filepath.Join(runDir, netOwnerFile+".tmp")
	if err := os.WriteFile(tmp, []byte(owner+"\n"+netpolicy.Version+"\n"), 0o600); err != nil {
		return fmt.Errorf("record the network's owner: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(runDir, netOwnerFile)); err != nil {
		return fmt.Errorf("record the network's owner: %w", err)
	}
	return nil
}

// netOwner reads the owner of the network of the VM in runDir ("" if it has none) and
// the version of the policy programs it was made with.
func netOwner(runDir string) (owner, version string) {
	b, err := os.ReadFile(filepath.Join(runDir, netOwnerFile))
	if err != nil {
		return "", ""
	}
	owner, version, _ = strings.Cut(strings.TrimSpace(string(b)), "\n")
	return owner, strings.TrimSpace(version)
}

// kick wakes the spare keeper.
func (m *netManager) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// keepSpares makes spare networks until ctx ends, then removes them.
func (m *netManager) keepSpares(ctx context.Context) {
	defer func() {
		m.mu.Lock()
		spares := m.spares
		m.spares = nil
		m.mu.Unlock()
		for _, n := range spares {
			_ = n.Remove()
		}
	}()
	for {
		m.mu.Lock()
		have := len(m.spares)
		m.mu.Unlock()
		// Make one when one is missing, but while a start is in flight only if there is
		// none left: making a network (~60 ms of CPU) should not compete with a start
		// that does not need it. A start's end kicks the loop; the tick is a backstop.
		missing := have < spareNets
		if missing && have > 0 && m.starting.Load() > 0 {
			select {
			case <-ctx.Done():
				return
			case <-m.wake:
			case <-time.After(time.Second):
			}
			continue
		}
		if missing {
			n, err := m.create(ctx, "n-"+randHex(6), NetPolicy{}, true)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				m.log.Warn("make a spare sandbox network", "err", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(10 * time.Second):
				}
				continue
			}
			m.mu.Lock()
			m.spares = append(m.spares, n)
			m.mu.Unlock()
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-m.wake:
		}
	}
}

// open gives a network made ahead (closed) to a sandbox: its counters start at zero
// (what it dropped while closed is not the sandbox's) and its policy goes in force.
func (n *sbNet) Open(pol NetPolicy) error {
	n.resetCounters()
	return n.Apply(pol)
}

func (n *sbNet) resetCounters() {
	if err := n.enf.ResetCounters(); err != nil {
		n.m.log.Warn("reset network counters", "owner", n.owner, "err", err)
	}
	if err := n.guard.ResetCounters(); err != nil {
		n.m.log.Warn("reset guard counters", "owner", n.owner, "err", err)
	}
}

// followNodeAddrs re-applies every network's policy when the node's addresses change (a
// new address must be protected from sandboxes started before it appeared), until ctx
// ends.
func (m *netManager) followNodeAddrs(ctx context.Context, every time.Duration) {
	last := fmt.Sprint(m.Protected())
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cur := fmt.Sprint(m.Protected())
		if cur == last {
			continue
		}
		last = cur
		m.mu.Lock()
		var nets []*sbNet
		for _, n := range m.nets {
			nets = append(nets, n)
		}
		m.mu.Unlock()
		m.log.Info("the node's addresses changed; re-applying sandbox policies", "sandboxes", len(nets))
		for _, n := range nets {
			if err := n.reapply(); err != nil {
				m.log.Warn("re-apply a sandbox policy", "owner", n.owner, "err", err)
			}
		}
	}
}
