package routes

import (
	"strings"
	"testing"
)

// FuzzParseHost reads arbitrary Host headers (what any client sends the edge): no panic;
// what it accepts is a port and a sandbox label under the domain, and a host built from
// them parses back to the same.
func FuzzParseHost(f *testing.F) {
	for _, h := range []string{"8080-0123456789abcdef.sandbox.local", "8080-0123456789ABCDEF.Sandbox.Local.:443",
		"0-x.sandbox.local", "65536-x.sandbox.local", "08080-x.sandbox.local", "-x.sandbox.local", "[::1]:80",
		"8080-a.b.sandbox.local", "sandbox.local", "", ":", "8080-x.sandbox.local:80:80"} {
		f.Add(h, "sandbox.local")
	}
	f.Fuzz(func(t *testing.T, host, domain string) {
		port, sb, ok := ParseHost(host, domain)
		if !ok {
			return
		}
		if port == 0 || sb == "" || strings.Contains(sb, ".") {
			t.Fatalf("ParseHost(%q, %q) = %d %q", host, domain, port, sb)
		}
		if p2, sb2, ok2 := ParseHost(Host(port, sb, domain), domain); !ok2 || p2 != port || sb2 != sb {
			t.Fatalf("Host(%d, %q, %q) parses as %d %q %v", port, sb, domain, p2, sb2, ok2)
		}
	})
}
