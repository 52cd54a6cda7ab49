package agenttest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
)

// Networks is an agent.Networks test double: its networks touch nothing on the host (no
// namespace, tap or program). It records what the agent asked of each, so that tests see
// which VMs had networks, whether a network made ahead stayed closed until its sandbox
// claimed it, which policy is in force, and that every network went away. Policies are
// parsed as the real networks parse them (a malformed one is refused); nothing enforces
// them.
type Networks struct {
	// FailAcquire, if set, is returned by Acquire.
	FailAcquire error

	mu   sync.Mutex
	nets []*Net
}

// Net is one network of a Networks double.
type Net struct {
	n      *Networks
	RunDir string // the run directory it was acquired for
	addr   netip.Addr

	// Guarded by n.mu.
	closed  bool
	policy  agent.NetPolicy
	removed bool
	opens   int
	Peers   []agent.Peer
}

const recordFile = "agenttest-net"

var _ agent.Networks = (*Networks)(nil)

func (d *Networks) Acquire(_ context.Context, runDir string, pol agent.NetPolicy, closed bool) (agent.SandboxNet, error) {
	if d.FailAcquire != nil {
		return nil, d.FailAcquire
	}
	if !closed {
		if err := parse(pol); err != nil {
			return nil, err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	n := &Net{n: d, RunDir: runDir, addr: netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + len(d.nets)%250)}), closed: closed}
	if !closed {
		n.policy = pol
	}
	if err := os.WriteFile(filepath.Join(runDir, recordFile), []byte(fmt.Sprint(len(d.nets))), 0o600); err != nil {
		return nil, err
	}
	d.nets = append(d.nets, n)
	return n, nil
}

func (d *Networks) Adopt(runDir string, pol agent.NetPolicy) (agent.SandboxNet, error) {
	if _, err := os.Stat(filepath.Join(runDir, recordFile)); err != nil {
		return nil, fmt.Errorf("agenttest: no network recorded in %s", runDir)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, n := range d.nets {
		if n.RunDir == runDir && !n.removed {
			n.policy, n.closed = pol, false
			return n, nil
		}
	}
	return nil, fmt.Errorf("agenttest: the network of %s is gone", runDir)
}

// Sweep removes the networks not recorded in keep.
func (d *Networks) Sweep(_ context.Context, keep []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, n := range d.nets {
		if !slices.Contains(keep, n.RunDir) {
			n.removed = true
		}
	}
}

func (d *Networks) Protected() []netip.Prefix { return netpolicy.FixedProtected() }
func (d *Networks) Run(ctx context.Context)   { <-ctx.Done() }
func (d *Networks) StartBegins() func()       { return func() {} }
func (d *Networks) Close()                    {}

// Live lists the networks not removed.
func (d *Networks) Live() []*Net {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*Net
	for _, n := range d.nets {
		if !n.removed {
			out = append(out, n)
		}
	}
	return out
}

// Of returns the live network whose run directory's base name is name (a VM's ID, or
// the directory a warm VM was made in), or nil.
func (d *Networks) Of(name string) *Net {
	for _, n := range d.Live() {
		if filepath.Base(n.RunDir) == name {
			return n
		}
	}
	return nil
}

// State says whether the network is closed, the policy text in force and how often a
// closed network was opened.
func (n *Net) State() (closed bool, policy string, opens int) {
	n.n.mu.Lock()
	defer n.n.mu.Unlock()
	return n.closed, n.policy.Text, n.opens
}

func (n *Net) Tap() (*os.File, error) { return os.Open(os.DevNull) }

func (n *Net) Open(pol agent.NetPolicy) error {
	if err := n.Apply(pol); err != nil {
		return err
	}
	n.n.mu.Lock()
	n.opens++
	n.n.mu.Unlock()
	return nil
}

func (n *Net) Apply(pol agent.NetPolicy) error {
	if err := parse(pol); err != nil {
		return err
	}
	n.n.mu.Lock()
	defer n.n.mu.Unlock()
	if n.removed {
		return fmt.Errorf("agenttest: network of %s was removed", n.RunDir)
	}
	n.policy, n.closed = pol, false
	return nil
}

func (n *Net) Stats() (agent.NetStats, error) {
	n.n.mu.Lock()
	defer n.n.mu.Unlock()
	return agent.NetStats{Address: n.addr.String(), Policy: n.policy.Text}, nil
}

func (n *Net) Address() netip.Addr { return n.addr }
func (n *Net) Namespace() string   { return "agenttest-" + filepath.Base(n.RunDir) }

// Flows: the double tracks no connections.
func (n *Net) Flows() ([]network.Flow, error) { return nil, nil }
func (n *Net) Nudge([]network.Flow) error     { return nil }

// SetPeers records the group's other members (nothing is routed).
func (n *Net) SetPeers(peers []agent.Peer) error {
	n.n.mu.Lock()
	defer n.n.mu.Unlock()
	n.Peers = append([]agent.Peer(nil), peers...)
	return nil
}

func (n *Net) Remove() error {
	n.n.mu.Lock()
	defer n.n.mu.Unlock()
	n.removed = true
	return nil
}

func parse(pol agent.NetPolicy) error {
	if strings.TrimSpace(pol.Text) == "" {
		return nil
	}
	if _, err := netpolicy.ParsePolicy(pol.Text); err != nil {
		return err
	}
	return nil
}
