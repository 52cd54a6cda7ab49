package agent

import (
	"context"
	"net/netip"
	"os"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
)

// Networks is the node's side of sandbox networks: the seam between the agent and the
// host's network. The agent makes the real one (namespaces, address translation, eBPF
// policy and guard programs) unless its config brings another; tests of the agent's
// logic bring agenttest.Networks, a test double that touches nothing on the host.
//
// A VM's network is recorded in its run directory, which names it: adoption by a restarted
// agent and the sweep of what a crash left go by run directories.
type Networks interface {
	// Acquire gives the VM in runDir a network with pol in force or, closed, one that
	// lets nothing through until Open (a VM made ahead of its sandbox). It records the
	// network in runDir.
	Acquire(ctx context.Context, runDir string, pol NetPolicy, closed bool) (SandboxNet, error)
	// Adopt takes back the network recorded in runDir, which an earlier agent process
	// made, with pol in force. A runDir without one is an error.
	Adopt(runDir string, pol NetPolicy) (SandboxNet, error)
	// Sweep removes what earlier runs left (networks, address blocks, pinned programs)
	// except the networks recorded in keep, run directories of VMs that live on.
	Sweep(ctx context.Context, keep []string)
	// Protected lists what sandboxes may not reach unless an admin's policy opens it.
	Protected() []netip.Prefix
	// Run does the networks' background work (networks made ahead, policies applied
	// again when the node's addresses change) until ctx ends.
	Run(ctx context.Context)
	// StartBegins says a sandbox start is in flight (background work yields to it) until
	// the returned func is called.
	StartBegins() (ends func())
	// Close removes what the node keeps for its networks that no live network uses.
	Close()
}

// SandboxNet is one VM's network.
type SandboxNet interface {
	// Tap opens the guest's end for the VMM (the caller closes it once the VMM has it).
	Tap() (*os.File, error)
	// Open gives a network made closed to a sandbox: counters start at zero (what it
	// dropped while closed is not the sandbox's), pol goes in force.
	Open(pol NetPolicy) error
	// Apply puts pol in force; one that does not parse or validate, or opens what only an
	// admin may, changes nothing.
	Apply(pol NetPolicy) error
	Stats() (NetStats, error)
	// Address is the sandbox's address on the node (what port-forward and the ingress
	// dial); Namespace names its network namespace.
	Address() netip.Addr
	Namespace() string
	// Flows lists the guest's outbound TCP connections that the network translates
	// (network.GuestFlows); Nudge makes the guest learn that such connections, which a
	// live migration brought from another network, are gone (network.NudgeFlows).
	Flows() ([]network.Flow, error)
	Nudge(flows []network.Flow) error
	// SetPeers makes the other members of the sandbox's group reachable from the guest
	// at their group addresses, and lets them through its policy (both ways); nil
	// removes them.
	SetPeers(peers []Peer) error
	// Remove takes the network down; missing pieces are not an error.
	Remove() error
}

// Peer is another member of a sandbox's group: the address the guest dials (its
// group address) and its address on the node.
type Peer struct {
	Group netip.Addr
	Addr  netip.Addr
}

// NetPolicy is a sandbox's policy file text ("" = the node's defaults only) and whether
// an admin gave it (only an admin's policy may open what the node protects).
type NetPolicy struct {
	Text  string
	Admin bool
	// Strict refuses a user's allow rules inside protected ranges, for a policy a user
	// applies now (it tells them at once that the rule cannot work). Otherwise (a policy
	// in force being applied again after the node's addresses or --deny-cidr changed, a
	// re-adoption, a start) such rules are kept and have no effect: the node's rules are
	// decided first. Refusing then would leave the sandbox without the node's new rules,
	// or end it.
	Strict bool
}
