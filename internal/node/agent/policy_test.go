package agent

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
)

// A user's allow inside a protected range is refused when the user applies it, and kept
// (dead: the node's rules come first) when a policy in force is applied again, e.g. after
// the node gained that address: refusing then would leave the sandbox without the node's
// new rules.
func TestPolicyAppliedAgainKeepsNodeRules(t *testing.T) {
	m := &netManager{log: slog.Default(), rng: netip.MustParsePrefix("10.201.0.0/16")}
	b := network.Block{Prefix: netip.MustParsePrefix("10.201.0.4/30")}
	text := "default allow\nallow 169.254.169.254 tcp 80\n"
	if _, err := m.policySet(b, NetPolicy{Text: text, Strict: true}, nil); err == nil || !strings.Contains(err.Error(), "only an admin") {
		t.Errorf("a user's policy applied now: %v, want refused", err)
	}
	e, err := m.policySet(b, NetPolicy{Text: text}, nil)
	if err != nil {
		t.Fatalf("the policy in force applied again: %v", err)
	}
	protected := false
	for _, r := range e.Protect.Egress {
		protected = protected || r.CIDR == netip.MustParsePrefix("169.254.0.0/16")
	}
	if !protected {
		t.Errorf("the node's rules are not in front of the policy: %+v", e.Protect.Egress)
	}
}
