package client

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"
)

func TestParseServers(t *testing.T) {
	for in, want := range map[string][]string{
		"http://a:1":              {"http", "a:1"},
		"a:1, b:2,":               {"http", "a:1", "b:2"},
		"https://a:1,http://b:2/": {"https", "a:1", "b:2"},
		"":                        {"http", strings.TrimPrefix(DefaultServer, "http://")},
	} {
		scheme, addrs := parseServers(in)
		if got := append([]string{scheme}, addrs...); !slices.Equal(got, want) {
			t.Errorf("parseServers(%q) = %v, want %v", in, got, want)
		}
	}
}

// The dialer skips a dead server and sticks with the one that answered.
func TestFailoverDialer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	d := &failoverDialer{addrs: []string{deadAddr, ln.Addr().String()}}
	for range 2 {
		c, err := d.DialContext(context.Background(), "tcp", "ignored:1")
		if err != nil {
			t.Fatal(err)
		}
		if c.RemoteAddr().String() != ln.Addr().String() {
			t.Fatalf("dialed %s", c.RemoteAddr())
		}
		c.Close()
	}
	if d.next != 1 {
		t.Errorf("dialer did not remember the live server")
	}
	all := &failoverDialer{addrs: []string{deadAddr}}
	if _, err := all.DialContext(context.Background(), "tcp", "x"); err == nil || !strings.Contains(err.Error(), "no Fireworks server answered") {
		t.Errorf("all dead: %v", err)
	}
}
