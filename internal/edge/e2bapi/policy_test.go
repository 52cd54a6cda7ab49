package e2bapi

import (
	"net/netip"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
)

func ptr[T any](v T) *T { return &v }

// E2B's network settings become a policy the nodes enforce with E2B's meaning: an
// address both allowed and denied is allowed; no internet denies what is not allowed.
func TestPolicyOf(t *testing.T) {
	for _, c := range []struct {
		name   string
		n      *networkBody
		public bool
		allow  []string // addresses the policy lets out
		deny   []string
		err    bool
	}{
		{name: "none", n: nil, public: true},
		{name: "no internet", n: &networkBody{AllowInternetAccess: ptr(false)}, public: true, deny: []string{"8.8.8.8", "1.1.1.1"}},
		{name: "deny all but one", n: &networkBody{DenyOut: []string{"0.0.0.0/0"}, AllowOut: []string{"1.1.1.1"}},
			public: true, allow: []string{"1.1.1.1"}, deny: []string{"8.8.8.8"}},
		{name: "deny a range", n: &networkBody{DenyOut: []string{"10.0.0.0/8"}, AllowPublicTraffic: ptr(false)},
			allow: []string{"8.8.8.8"}, deny: []string{"10.1.2.3"}},
		{name: "allowed inside denied", n: &networkBody{DenyOut: []string{"10.0.0.0/8", "10.1.2.3"}, AllowOut: []string{"10.1.2.3"}},
			public: true, allow: []string{"10.1.2.3", "8.8.8.8"}, deny: []string{"10.1.2.4"}},
		{name: "host names", n: &networkBody{AllowOut: []string{"example.com"}}, err: true},
		{name: "ipv6", n: &networkBody{DenyOut: []string{"::/0"}}, err: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			policy, public, err := policyOf(c.n)
			if c.err {
				if err == nil {
					t.Fatalf("accepted: %q", policy)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if public != c.public {
				t.Errorf("public %v, want %v", public, c.public)
			}
			if policy == "" {
				if len(c.deny) > 0 {
					t.Fatal("no policy")
				}
				return
			}
			allow, deny, internet := rulesOf(policy)
			if got, want := len(allow)+len(deny), len(c.n.AllowOut)+len(c.n.DenyOut); !internet && got < want || internet && got != want {
				t.Errorf("read back: allow %v deny %v internet %v, from %+v", allow, deny, internet, c.n)
			}
			set, err := netpolicy.ParsePolicy(policy)
			if err != nil {
				t.Fatal(err)
			}
			for _, a := range c.allow {
				if decide(set.Egress, netip.MustParseAddr(a)) != netpolicy.Allow {
					t.Errorf("%s denied by\n%s", a, policy)
				}
			}
			for _, a := range c.deny {
				if decide(set.Egress, netip.MustParseAddr(a)) != netpolicy.Deny {
					t.Errorf("%s allowed by\n%s", a, policy)
				}
			}
		})
	}
}

// decide is the README's rule for what a policy lets out (the kernel programs implement
// it): the longest prefix that has rules decides, by its first rule that matches; else
// the default.
func decide(p netpolicy.Policy, a netip.Addr) netpolicy.Action {
	best := -1
	verdict := p.Default
	for _, r := range p.Rules {
		if r.CIDR.Contains(a) && r.CIDR.Bits() > best {
			best, verdict = r.CIDR.Bits(), r.Action
		}
	}
	return verdict
}

// The SDK sends {user: 'alice@example.com', 'a b': 'x&y=z'} as E2B's API reads it: each
// key and value encodeURIComponent'd, then the pairs as a query string.
func TestMetadataFilter(t *testing.T) {
	got, err := metadataFilter("user=alice%2540example.com&a%2520b=x%2526y%253Dz")
	if err != nil || got["user"] != "alice@example.com" || got["a b"] != "x&y=z" || len(got) != 2 {
		t.Errorf("%v %v", got, err)
	}
	if _, err := metadataFilter("a=1&a=2"); err == nil {
		t.Error("a key given twice accepted")
	}
	if _, err := metadataFilter("a=%zz"); err == nil {
		t.Error("a bad escape accepted")
	}
}
