package network

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

func ping(ns, addr string) error {
	args := []string{"busybox", "ping", "-c", "1", "-W", "2", addr}
	if ns != "" {
		args = append([]string{"ip", "netns", "exec", ns}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// A sandbox's namespace reaches the host over its veth pair and back, has a tap for the
// guest, and is gone without a trace after Delete; Sweep removes exactly the leaked ones.
func TestNamespaceLifecycle(t *testing.T) {
	// The "host" side is a network namespace of this test's own, not the machine's.
	testutil.PrivateNetNS(t)
	ctx := context.Background()
	m, err := OpenIPAM(filepath.Join(t.TempDir(), "ipam.json"), netip.MustParsePrefix("10.231.240.0/28"))
	if err != nil {
		t.Fatal(err)
	}
	tag := "t" + strconv.Itoa(os.Getpid())
	var made []Namespace
	for _, id := range []string{tag + "-a", tag + "-b", tag + "-leak", "other-" + tag} {
		b, err := m.Allocate(id)
		if err != nil {
			t.Fatal(err)
		}
		n := NamespaceFor(id, b)
		if err := Create(ctx, n); err != nil {
			t.Fatal(err)
		}
		made = append(made, n)
	}
	t.Cleanup(func() {
		for _, n := range made {
			_ = Delete(context.Background(), n)
		}
	})
	a := made[0]
	if err := ping(a.Name, a.Block.Host().String()); err != nil {
		t.Errorf("namespace %s cannot reach its host address %s: %v", a.Name, a.Block.Host(), err)
	}
	out, err := exec.Command("ip", "-n", a.Name, "-o", "addr", "show", Tap).CombinedOutput()
	if err != nil || !strings.Contains(string(out), GuestGateway.String()+"/30") {
		t.Errorf("no tap with the guest's gateway address in %s: %v %s", a.Name, err, out)
	}
	// The translation between the guest's fixed address and the sandbox's own.
	out, err = exec.Command("ip", "netns", "exec", a.Name, "nft", "list", "table", "ip", "fireworks").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "dnat to "+GuestAddr.String()) || !strings.Contains(string(out), "snat to "+a.Block.Sandbox().String()) {
		t.Errorf("address translation in %s: %v\n%s", a.Name, err, out)
	}
	if err := Create(ctx, a); err == nil {
		t.Error("creating an existing namespace again succeeded")
	}
	if err := Create(ctx, Namespace{Name: "fw-../x"}); err == nil {
		t.Error("a namespace name with a path in it was accepted")
	}

	// The leaked one goes; the kept ones (and any unrelated namespace) stay.
	keep := func(id string) bool { return id != tag+"-leak" }
	removed, err := Sweep(ctx, tag, keep)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(removed, made[2].Name) {
		t.Errorf("sweep removed %v, not the leaked %s", removed, made[2].Name)
	}
	for _, n := range append(made[:2:2], made[3]) { // kept, and another agent's
		if _, err := os.Stat(n.Path()); err != nil || !linkExists(n.HostIf) {
			t.Errorf("sweep removed kept %s (%v; removed %v)", n.Name, err, removed)
		}
	}
	if _, err := os.Stat(made[2].Path()); err == nil || linkExists(made[2].HostIf) {
		t.Errorf("leaked %s still there after the sweep", made[2].Name)
	}

	if err := Delete(ctx, a); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(a.Path()); err == nil || linkExists(a.HostIf) {
		t.Errorf("%s left behind after Delete", a.Name)
	}
	if err := Delete(ctx, a); err != nil {
		t.Errorf("deleting twice: %v", err)
	}
}

// The node's own side: forwarding and masquerading, idempotent.
func TestSetupHost(t *testing.T) {
	testutil.PrivateNetNS(t)
	ctx := context.Background()
	rng := netip.MustParsePrefix("10.231.0.0/16")
	for i := 0; i < 2; i++ {
		if err := SetupHost(ctx, "t-1", rng); err != nil {
			t.Fatalf("run %d: %v", i+1, err)
		}
	}
	out, err := exec.Command("nft", "list", "table", "ip", "fireworks_t_1").CombinedOutput()
	if err != nil || strings.Count(string(out), "masquerade") != 1 || !strings.Contains(string(out), `oifname "fwv*" drop`) {
		t.Errorf("host table after two runs: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("ip_forward = %q", b)
	}
	if err := SetupHost(ctx, "bad tag", rng); err == nil {
		t.Error("a tag with a space was accepted")
	}
}

func TestNameservers(t *testing.T) {
	f := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(f, []byte("# c\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nnameserver fe80::1\nsearch x\nnameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := Nameservers(f); !slices.Equal(got, []string{"10.0.0.2", "1.1.1.1", "8.8.8.8"}) {
		t.Errorf("Nameservers = %v", got)
	}
	if got := Nameservers(filepath.Join(t.TempDir(), "missing")); got != nil {
		t.Errorf("missing file: %v", got)
	}
}

func TestBroadcast(t *testing.T) {
	for in, want := range map[string]string{"10.231.100.1/24": "10.231.100.255", "192.168.1.77/20": "192.168.15.255", "10.0.0.1/8": "10.255.255.255"} {
		if got, ok := Broadcast(netip.MustParsePrefix(in)); !ok || got.String() != want {
			t.Errorf("Broadcast(%s) = %s %v, want %s", in, got, ok, want)
		}
	}
	for _, in := range []string{"10.0.0.1/32", "10.0.0.0/31"} {
		if _, ok := Broadcast(netip.MustParsePrefix(in)); ok {
			t.Errorf("Broadcast(%s) has one", in)
		}
	}
}
