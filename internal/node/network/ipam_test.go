package network

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIPAMAllocatesPersistsAndNeverDoublesUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ipam.json")
	rng := netip.MustParsePrefix("10.231.0.0/28") // four /30 blocks
	m, err := OpenIPAM(path, rng)
	if err != nil {
		t.Fatal(err)
	}
	a, err := m.Allocate("sb-a")
	if err != nil {
		t.Fatal(err)
	}
	if a.Prefix.String() != "10.231.0.0/30" || a.Host().String() != "10.231.0.1" || a.Sandbox().String() != "10.231.0.2" {
		t.Fatalf("first block %s host %s sandbox %s", a.Prefix, a.Host(), a.Sandbox())
	}
	if again, _ := m.Allocate("sb-a"); again != a {
		t.Errorf("same owner got %s, then %s", a.Prefix, again.Prefix)
	}
	b, _ := m.Allocate("sb-b")

	// A restarted agent reads the same allocations and does not hand them out again.
	m2, err := OpenIPAM(path, rng)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := m2.Allocate("sb-b"); got != b {
		t.Errorf("after reopening, sb-b got %s, had %s", got.Prefix, b.Prefix)
	}
	c, _ := m2.Allocate("sb-c")
	d, _ := m2.Allocate("sb-d")
	seen := map[netip.Prefix]bool{}
	for _, x := range []Block{a, b, c, d} {
		if seen[x.Prefix] {
			t.Fatalf("block %s handed out twice", x.Prefix)
		}
		seen[x.Prefix] = true
	}
	if _, err := m2.Allocate("sb-e"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("fifth allocation in a /28: %v, want ErrExhausted", err)
	}
	// A released block is reused, but only after the others (round robin).
	if err := m2.Release("sb-a"); err != nil {
		t.Fatal(err)
	}
	if e, err := m2.Allocate("sb-e"); err != nil || e.Prefix != a.Prefix {
		t.Errorf("after releasing sb-a: %v %v", e.Prefix, err)
	}
	if got := strings.Join(m2.Owners(), ","); got != "sb-b,sb-c,sb-d,sb-e" {
		t.Errorf("owners %s", got)
	}
}

func TestIPAMRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, bad := range []string{"10.0.0.0/31", "fd00::/64"} {
		if _, err := OpenIPAM(filepath.Join(dir, "x.json"), netip.MustParsePrefix(bad)); err == nil {
			t.Errorf("range %s accepted", bad)
		}
	}
	path := filepath.Join(dir, "ipam.json")
	if _, err := OpenIPAM(path, netip.MustParsePrefix("10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenIPAM(path, netip.MustParsePrefix("10.2.0.0/24")); err == nil || !strings.Contains(err.Error(), "10.1.0.0/24") {
		t.Errorf("reopening for another range: %v", err)
	}
	for name, content := range map[string]string{
		"garbage": "{not json",
		"outside": `{"range":"10.1.0.0/24","owners":{"a":"10.9.0.0/30"}}`,
		"twice":   `{"range":"10.1.0.0/24","owners":{"a":"10.1.0.4/30","b":"10.1.0.4/30"}}`,
		"wide":    `{"range":"10.1.0.0/24","owners":{"a":"10.1.0.0/29"}}`,
	} {
		p := filepath.Join(dir, name+".json")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenIPAM(p, netip.MustParsePrefix("10.1.0.0/24")); err == nil {
			t.Errorf("%s allocations file accepted", name)
		}
	}
	m, _ := OpenIPAM(filepath.Join(dir, "ok.json"), netip.MustParsePrefix("10.1.0.0/24"))
	if _, err := m.Allocate(""); err == nil {
		t.Error("allocation without an owner accepted")
	}
}
