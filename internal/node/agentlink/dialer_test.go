package agentlink

import (
	"fmt"
	"slices"
	"testing"
)

// TestLeaderDialerHints: a leader hint is dialled next; hints are bounded (a server
// naming ever new "leaders" cannot grow the list); skip moves on in turn.
func TestLeaderDialerHints(t *testing.T) {
	d := &leaderDialer{addrs: []string{"a:1", "b:1"}}
	d.prefer("b:1")
	if d.next != 1 || len(d.addrs) != 2 {
		t.Fatalf("a known leader: next %d, addrs %v", d.next, d.addrs)
	}
	d.skip()
	if d.next != 0 {
		t.Fatalf("skip from the last address: next %d, want 0", d.next)
	}
	for i := range 3 * maxServerAddrs {
		d.prefer(fmt.Sprintf("hint%d:1", i))
		if got := d.addrs[d.next]; got != fmt.Sprintf("hint%d:1", i) {
			t.Fatalf("after hint %d the next dial goes to %s", i, got)
		}
	}
	if len(d.addrs) != maxServerAddrs {
		t.Fatalf("%d addresses kept, want at most %d", len(d.addrs), maxServerAddrs)
	}
	if !slices.Contains(d.addrs, "a:1") || !slices.Contains(d.addrs, "b:1") {
		t.Fatalf("configured addresses were pushed out by hints: %v", d.addrs)
	}
}
