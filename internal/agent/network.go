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
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/netpolicy"
	"github.com/fireworks-sandbox/fireworks/internal/network"
)

// DefaultSandboxCIDR is where a node's sandbox addresses come from unless configured.
const DefaultSandboxCIDR = "10.201.0.0/16"

// bpffsRoot is where policy programs are pinned, so they stay attached across agent
// restarts (a restart must never leave a running sandbox's network open).
const bpffsRoot = "/sys/fs/bpf"

// netManager owns the node's sandbox networks: address blocks, namespaces (veth pair to
// the host, tap for the guest, address translation), and the policy and guard programs.
// Networks belong to an owner, the name of the VM's run directory (a sandbox ID, or a
// warm VM's, a restore slot's or a template build's directory, which a sandbox may take
// over with the VM).
type netManager struct {
	log         *slog.Logger
	tag         string // this agent's mark on its namespaces, pins and host table
	rng         netip.Prefix
	ipam        *network.IPAM
	pins        string // bpffs directory of this agent's pins
	nameservers []string

	mu     sync.Mutex
	nets   map[string]*sbNet // by owner
	spares []*sbNet          // made ahead, closed, for acquire
	wake   chan struct{}     // wakes keepSpares
}

// sbNet is one VM's network.
type sbNet struct {
	m      *netManager
	owner  string
	ns     network.Namespace
	enf    *netpolicy.Enforcer
	guard  *netpolicy.Guard
	policy string // the user's policy text in force ("" = node defaults)
}

// newNetManager prepares the node's side of sandbox networking. tagSource (the data
// directory) tells this agent's objects apart from another agent's on the same host.
func newNetManager(ctx context.Context, log *slog.Logger, dataDir string, rng netip.Prefix, nameservers []string) (*netManager, error) {
	sum := sha256.Sum256([]byte(dataDir))
	m := &netManager{log: log, tag: hex.EncodeToString(sum[:])[:6], rng: rng.Masked(), nameservers: nameservers, nets: map[string]*sbNet{}, wake: make(chan struct{}, 1)}
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

// baseSet is the node's policy for a sandbox at block b, before the user's: it may send
// only from its own address, and not to the link-local range (cloud metadata services),
// the node's own addresses or other sandboxes. Everything else may pass both ways.
func (m *netManager) baseSet(b network.Block) netpolicy.Set {
	deny := func(p netip.Prefix) netpolicy.Rule { return netpolicy.Rule{CIDR: p, Action: netpolicy.Deny} }
	eg := netpolicy.Policy{Default: netpolicy.Allow, Source: b.Sandbox(), Rules: []netpolicy.Rule{
		deny(netip.MustParsePrefix("169.254.0.0/16")), deny(m.rng),
	}}
	addrs, err := network.HostAddrs()
	if err != nil {
		m.log.Warn("list the node's addresses for the sandbox policy", "err", err)
	}
	seen := map[netip.Addr]bool{}
	for _, a := range addrs {
		if !seen[a] && !m.rng.Contains(a) {
			seen[a] = true
			eg.Rules = append(eg.Rules, deny(netip.PrefixFrom(a, 32)))
		}
	}
	return netpolicy.Set{Egress: eg, Ingress: netpolicy.Policy{Default: netpolicy.Allow}}
}

// policySet is what is enforced for a sandbox with policy text (validated).
func (m *netManager) policySet(b network.Block, text string) (netpolicy.Set, error) {
	base := m.baseSet(b)
	if text == "" {
		return base, nil
	}
	user, err := netpolicy.ParsePolicy(text)
	if err != nil {
		return netpolicy.Set{}, err
	}
	s := netpolicy.Set{Egress: netpolicy.Merge(base.Egress, user.Egress), Ingress: netpolicy.Merge(base.Ingress, user.Ingress)}
	return s, s.Validate()
}

// guestNet is the network every guest configures (see network.GuestAddr).
func guestNet() *proto.NetConfig {
	return &proto.NetConfig{Address: network.GuestCIDR(), Gateway: network.GuestGateway.String()}
}

// closedSet lets nothing through: the policy of VMs no sandbox has claimed yet.
func closedSet(b network.Block) netpolicy.Set {
	return netpolicy.Set{Egress: netpolicy.Policy{Default: netpolicy.Deny, Source: b.Sandbox()}, Ingress: netpolicy.Policy{Default: netpolicy.Deny}}
}

// create makes owner's network with policy text in force; closed makes it let nothing
// through until apply (for VMs made ahead of a sandbox). On error nothing is left.
func (m *netManager) create(ctx context.Context, owner, text string, closed bool) (n *sbNet, err error) {
	blk, err := m.ipam.Allocate(m.nsOwner(owner))
	if err != nil {
		return nil, fmt.Errorf("address for %s: %w", owner, err)
	}
	n = &sbNet{m: m, owner: owner, ns: network.NamespaceFor(m.nsOwner(owner), blk), policy: text}
	defer func() {
		if err != nil {
			n.remove()
			n = nil
		}
	}()
	set := closedSet(blk)
	if !closed {
		if set, err = m.policySet(blk, text); err != nil {
			return n, fmt.Errorf("network policy: %w", err)
		}
	}
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

// load takes back the network of owner that an earlier agent process made (its
// programs stayed attached through their pins), with policy text in force.
func (m *netManager) load(owner, text string) (*sbNet, error) {
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
	if err := n.apply(text); err != nil {
		n.enf.Close()
		n.guard.Close()
		return nil, err
	}
	m.mu.Lock()
	m.nets[owner] = n
	m.mu.Unlock()
	return n, nil
}

// apply puts policy text in force on the running programs; a policy that does not
// parse or validate changes nothing.
func (n *sbNet) apply(text string) error {
	set, err := n.m.policySet(n.ns.Block, text)
	if err != nil {
		return fmt.Errorf("network policy: %w", err)
	}
	if err := n.enf.Apply(set); err != nil {
		return err
	}
	n.m.mu.Lock()
	n.policy = text
	n.m.mu.Unlock()
	return nil
}

// tapFile opens the tap for the VMM (the caller closes it once the VMM has it).
func (n *sbNet) tapFile() (*os.File, error) {
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
	Effective                      string // everything enforced, node defaults merged in
}

func (n *sbNet) stats() (NetStats, error) {
	eg, in, err := n.enf.Counters()
	if err != nil {
		return NetStats{}, err
	}
	sp, err := n.guard.Dropped()
	if err != nil {
		return NetStats{}, err
	}
	n.m.mu.Lock()
	pol := n.policy
	n.m.mu.Unlock()
	set, err := n.m.policySet(n.ns.Block, pol)
	if err != nil {
		return NetStats{}, err
	}
	return NetStats{Address: n.ns.Block.Sandbox().String(), EgressAllowed: eg.Allowed, EgressDropped: eg.Dropped,
		IngressAllowed: in.Allowed, IngressDropped: in.Dropped, Spoofed: sp, Policy: pol, Effective: set.String()}, nil
}

// remove takes the network down: programs, namespace (with its veth pair and tap) and
// address block. Missing pieces are not an error.
func (n *sbNet) remove() error {
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

// sweep removes what earlier runs left behind for owners keep reports false for:
// namespaces, host ends, pins, address blocks.
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

// SetPolicy puts a network policy (policy file text; "" = the node's defaults only) in
// force on a running sandbox, without restarting it. A policy that does not parse
// changes nothing.
func (a *Agent) SetPolicy(id, text string) error {
	s, err := a.lookup(id)
	if err != nil {
		return err
	}
	s.mu.Lock()
	n := s.net
	s.mu.Unlock()
	if n == nil {
		return fmt.Errorf("sandbox %s has no network", id)
	}
	return n.apply(text)
}

// NetStats reads a running sandbox's network address and packet counters.
func (a *Agent) NetStats(id string) (NetStats, error) {
	s, err := a.lookup(id)
	if err != nil {
		return NetStats{}, err
	}
	s.mu.Lock()
	n := s.net
	s.mu.Unlock()
	if n == nil {
		return NetStats{}, fmt.Errorf("sandbox %s has no network", id)
	}
	return n.stats()
}

// AllNetStats reads the counters of every running sandbox with a network, by sandbox ID
// (for metrics).
func (a *Agent) AllNetStats() map[string]NetStats {
	a.mu.Lock()
	nets := map[string]*sbNet{}
	for id, s := range a.live {
		s.mu.Lock()
		if s.net != nil {
			nets[id] = s.net
		}
		s.mu.Unlock()
	}
	a.mu.Unlock()
	out := map[string]NetStats{}
	for id, n := range nets {
		if st, err := n.stats(); err == nil {
			out[id] = st
		}
	}
	return out
}

// DialSandbox opens a TCP connection to a running sandbox's guest port, through its
// network namespace (the sandbox's address translates to the guest's).
func (a *Agent) DialSandbox(ctx context.Context, id string, port uint16) (net.Conn, error) {
	s, err := a.lookup(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	n := s.net
	s.mu.Unlock()
	if n == nil {
		return nil, fmt.Errorf("sandbox %s has no network", id)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(n.ns.Block.Sandbox(), port).String())
	if err != nil {
		return nil, fmt.Errorf("connect to port %d of sandbox %s: %w", port, id, err)
	}
	return c, nil
}

// spareNets is how many networks the node keeps made ahead (closed), so that a start
// does not wait the ~100 ms a namespace, its address translation and its programs take.
const spareNets = 2

// netOwnerFile, in a VM's run directory, names the owner of the VM's network (a spare
// network's owner differs from the directory's name).
const netOwnerFile = "net-owner"

// acquire hands out a network for the VM in runDir with policy text in force (or closed):
// a spare one if there is one, else a new one. The owner is recorded in runDir for
// adoption and sweeps.
func (m *netManager) acquire(ctx context.Context, runDir, text string, closed bool) (*sbNet, error) {
	m.mu.Lock()
	var n *sbNet
	if len(m.spares) > 0 {
		n, m.spares = m.spares[len(m.spares)-1], m.spares[:len(m.spares)-1]
	}
	m.mu.Unlock()
	m.kick()
	var err error
	if n == nil {
		if n, err = m.create(ctx, "n-"+randHex(6), text, closed); err != nil {
			return nil, err
		}
	} else if !closed {
		if err := n.apply(text); err != nil {
			m.giveBack(n)
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(runDir, netOwnerFile), []byte(n.owner), 0o600); err != nil {
		_ = n.remove()
		return nil, fmt.Errorf("record the network's owner: %w", err)
	}
	return n, nil
}

// giveBack returns an unused network to the spares (closing it again), or removes it.
func (m *netManager) giveBack(n *sbNet) {
	if err := n.enf.Apply(closedSet(n.ns.Block)); err == nil {
		m.mu.Lock()
		if len(m.spares) < spareNets {
			m.spares = append(m.spares, n)
			n = nil
		}
		m.mu.Unlock()
	}
	if n != nil {
		_ = n.remove()
	}
}

// netOwner reads the owner of the network of the VM in runDir ("" if it has none).
func netOwner(runDir string) string {
	b, err := os.ReadFile(filepath.Join(runDir, netOwnerFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
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
			_ = n.remove()
		}
		_ = os.Remove(m.pins) // this agent's pin directory, if no sandbox's pins are left in it
	}()
	for {
		m.mu.Lock()
		missing := len(m.spares) < spareNets
		m.mu.Unlock()
		if missing {
			n, err := m.create(ctx, "n-"+randHex(6), "", true)
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
