package netpolicy

import (
	"reflect"
	"testing"
)

// FuzzParsePolicy reads arbitrary policy files (a user's input): no panic, and a policy
// it accepts renders (String) to a file that parses back to the same policy.
func FuzzParsePolicy(f *testing.F) {
	for _, s := range []string{
		"default allow\ndeny 169.254.0.0/16 udp 1\n",
		"default deny\nallow 10.0.0.0/8 tcp 443\nallow 8.8.8.8 udp 53\ndeny in 10.1.2.0/24 tcp 22\ndefault in allow\n",
		"allow 0.0.0.0/0 tcp 1-65535 # all\n", "default out deny\ndefault out allow\n", "allow ::1\n", "deny 10.0.0.0/33\n",
		"allow 1.2.3.4 tcp 99999\n", "allow 1.2.3.4 icmp\n", "\x00\n\r\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		s, err := ParsePolicy(text)
		if err != nil {
			return
		}
		again, err := ParsePolicy(s.String())
		if err != nil {
			t.Fatalf("%q parsed, but its rendering %q does not: %v", text, s.String(), err)
		}
		// Rules render with their prefixes masked and in their order.
		for _, p := range []*Policy{&s.Egress, &s.Ingress} {
			for i := range p.Rules {
				p.Rules[i].CIDR = p.Rules[i].CIDR.Masked()
			}
		}
		for _, p := range []*Policy{&again.Egress, &again.Ingress} {
			for i := range p.Rules {
				p.Rules[i].CIDR = p.Rules[i].CIDR.Masked()
			}
		}
		if !reflect.DeepEqual(s, again) {
			t.Fatalf("%q: %+v, rendered and parsed again %+v", text, s, again)
		}
	})
}
