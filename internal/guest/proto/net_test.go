package proto

import (
	"strings"
	"testing"
)

func TestNetConfigValidate(t *testing.T) {
	for _, ok := range []NetConfig{
		{Address: "169.254.0.21/30", Gateway: "169.254.0.22"},
		{Address: "10.0.0.2/24", Gateway: "10.0.0.1", MTU: 1400},
		{Address: "10.0.0.0/31", Gateway: "10.0.0.1"}, // RFC 3021: both ends are hosts
		{Address: "192.168.7.5/24"},                   // no default route
	} {
		if err := ok.Validate(); err != nil {
			t.Errorf("%+v refused: %v", ok, err)
		}
	}
	for _, c := range []struct {
		n    NetConfig
		want string
	}{
		{NetConfig{Address: "169.254.0.21", Gateway: "169.254.0.22"}, `"169.254.0.21"`},
		{NetConfig{Address: "169.254.0.300/30"}, "169.254.0.300/30"},
		{NetConfig{Address: ""}, `""`},
		{NetConfig{Address: "fd00::2/64", Gateway: "fd00::1"}, "IPv4"},
		{NetConfig{Address: "::ffff:10.0.0.2/120"}, "IPv4"},
		{NetConfig{Address: "10.0.0.2/32"}, "prefix length"},
		{NetConfig{Address: "10.0.0.2/0"}, "prefix length"},
		{NetConfig{Address: "127.0.0.2/8"}, "unicast"},
		{NetConfig{Address: "224.0.0.5/24"}, "unicast"},
		{NetConfig{Address: "169.254.0.20/30"}, "broadcast"},
		{NetConfig{Address: "169.254.0.23/30"}, "broadcast"},
		{NetConfig{Address: "169.254.0.21/30", Gateway: "10.0.0.1"}, "outside"},
		{NetConfig{Address: "169.254.0.21/30", Gateway: "169.254.0.21"}, "own address"},
		{NetConfig{Address: "169.254.0.21/30", Gateway: "169.254.0.23"}, "unicast"},
		{NetConfig{Address: "169.254.0.21/30", Gateway: "fe80::1"}, `"fe80::1"`},
		{NetConfig{Address: "169.254.0.21/30", Gateway: "gw"}, `"gw"`},
		{NetConfig{Address: "169.254.0.21/30", MTU: 20}, "MTU 20"},
		{NetConfig{Address: "169.254.0.21/30", MTU: 70000}, "MTU 70000"},
	} {
		err := c.n.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want an error mentioning %s", c.n, err, c.want)
		}
	}
	var none *NetConfig
	if err := none.Validate(); err != nil {
		t.Errorf("no network config refused: %v", err)
	}
}

func TestValidateNameservers(t *testing.T) {
	if err := ValidateNameservers([]string{"1.1.1.1", "10.0.0.53", "127.0.0.53"}); err != nil {
		t.Errorf("good nameservers refused: %v", err)
	}
	if err := ValidateNameservers(nil); err != nil {
		t.Errorf("no nameservers refused: %v", err)
	}
	for _, c := range []struct {
		in   []string
		want string
	}{
		{[]string{"1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"}, "4 nameservers"},
		{[]string{"2606:4700:4700::1111"}, "IPv4"},
		{[]string{"::ffff:1.1.1.1"}, "IPv4"},
		{[]string{"dns.example"}, "dns.example"},
		{[]string{"1.1.1.1\nsearch evil"}, "not an IP"},
		{[]string{"0.0.0.0"}, "unicast"},
		{[]string{"255.255.255.255"}, "unicast"},
		{[]string{""}, `""`},
	} {
		err := ValidateNameservers(c.in)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: got %v, want an error mentioning %s", c.in, err, c.want)
		}
	}
}
