package vmmtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// The test network: a /30 between the guest and the host end of its tap.
const (
	GuestCIDR = "169.254.0.21/30"
	GuestAddr = "169.254.0.21"
	HostCIDR  = "169.254.0.22/30"
	HostAddr  = "169.254.0.22"
	// OffLinkAddr is another address of the host end's namespace, outside the /30: the
	// guest reaches it only through its default route.
	OffLinkAddr = "192.0.2.1"
	// HostBody is what the host end's web server (HostAddr:HostPort) answers.
	HostBody = "hello-from-the-host"
	HostPort = "8080"
	// GuestPort is where the tests start a web server in the guest.
	GuestPort = "8081"
)

// HostTapMAC is the host end's hardware address, the same on every tap: a guest restored
// from a snapshot still has the gateway's MAC in its neighbour cache, and frames to any
// other address would be dropped by the fresh tap until that entry expires.
var HostTapMAC = net.HardwareAddr{0x02, 0xfc, 0, 0, 0, 0x22}

// GuestMAC is the MAC the test VMs' NIC gets.
var GuestMAC = net.HardwareAddr{0x02, 0xfc, 0, 0, 0, 0x21}

// HostNet makes the calling test goroutine "the host" of a guest network: a private
// network namespace with a persistent tap (HostCIDR, HostTapMAC), a web server on
// HostPort of HostAddr and OffLinkAddr, and the tap opened for a VMM (vmm.NIC.Tap). The caller closes the
// tap after Start. The goroutine stays in the namespace (so must the dialing in the
// tests); the VMM does not need to be there: it gets the tap's descriptor.
func HostNet(t *testing.T) *os.File {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		testutil.Skipf(t, "/dev/net/tun is missing (modprobe tun): cannot give a VM a network interface")
	}
	testutil.PrivateNetNS(t)
	for _, args := range [][]string{
		{"tuntap", "add", "dev", "tap0", "mode", "tap"},
		{"link", "set", "tap0", "address", HostTapMAC.String()},
		{"addr", "add", HostCIDR, "dev", "tap0"},
		{"link", "set", "tap0", "up"},
		{"addr", "add", OffLinkAddr + "/32", "dev", "lo"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	tap, err := network.OpenTap("tap0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tap.Close() })
	ln, err := net.Listen("tcp4", ":"+HostPort) // every address of the private namespace
	if err != nil {
		t.Fatalf("listen on the tap's address: %v", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, HostBody)
	}), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-served
	})
	return tap
}

// checkTraffic proves packets flow both ways between the guest and the host end: the
// guest fetches from the host's web server (on the link and via its default route), and the host (the calling goroutine, in the
// namespace) fetches from the guest's.
func checkTraffic(t *testing.T, g *guest) {
	t.Helper()
	for _, addr := range []string{HostAddr, OffLinkAddr} {
		if got := g.mustCall("fetch http://" + net.JoinHostPort(addr, HostPort) + "/"); got != HostBody {
			t.Errorf("guest fetching from the host (%s) got %q, want %q", addr, got, HostBody)
		}
	}
	body, err := HostFetch(net.JoinHostPort(GuestAddr, GuestPort))
	if err != nil {
		t.Errorf("host fetching from the guest: %v", err)
	} else if !strings.Contains(body, ServeBody) {
		t.Errorf("host fetching from the guest got %q, want %q", body, ServeBody)
	}
}

// HostFetch does a plain HTTP/1.0 GET. It dials on the calling goroutine, which is in the
// test's namespace (http.Client would dial from another goroutine, i.e. another thread and
// possibly another namespace).
func HostFetch(addr string) (string, error) {
	var lastErr error
	for range 50 {
		c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err != nil {
			// The guest's server may still be starting; refusals are answered at once.
			lastErr = err
			time.Sleep(100 * time.Millisecond)
			continue
		}
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		_, err = fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
		var b []byte
		if err == nil {
			b, err = io.ReadAll(io.LimitReader(c, 1<<16))
		}
		c.Close()
		return string(b), err
	}
	return "", lastErr
}

// testNetwork boots a guest with a NIC on a tap in a private namespace, has it configure
// its address and default route, and proves traffic both ways. A snapshot of that guest
// restores, with a fresh tap in a fresh namespace, into a guest whose network still works,
// including its web server started before the save: that is how templates carry a network.
func (s *suite) testNetwork(t *testing.T) {
	tap := HostNet(t)
	mem := filepath.Join(shortDir(t), "mem")
	g := s.boot(t, bootOpts{memFile: mem, nics: []vmm.NIC{{Tap: tap, MAC: GuestMAC}}})
	tap.Close() // the VMM has its own copy

	if got := g.mustCall("ifaces"); got != "eth0" {
		t.Fatalf("guest with one NIC has interfaces %q, want eth0", got)
	}
	if got := g.mustCall("net " + GuestCIDR + " " + HostAddr); got != "ok eth0" {
		t.Fatalf("guest network setup: %s", got)
	}
	if got := g.mustCall("serve " + GuestPort); got != "ok" {
		t.Fatalf("guest web server: %s", got)
	}
	checkTraffic(t, g)
	if out, err := exec.Command("ip", "neigh", "show", GuestAddr).Output(); err != nil || !strings.Contains(string(out), GuestMAC.String()) {
		t.Errorf("the guest's address is not at the MAC the spec gave (%s): %q %v", GuestMAC, out, err)
	}
	if t.Failed() {
		return
	}

	snap, ok := g.vm.(vmm.Snapshotter)
	if !ok {
		testutil.Skipf(t, "the %s driver does not implement vmm.Snapshotter (template snapshots)", s.d.Name())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	state := filepath.Join(filepath.Dir(mem), "state")
	if err := snap.Snapshot(ctx, state); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if err := g.vm.Stop(ctx, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	sn := &vmm.Snapshot{MemoryFile: mem, StateFile: state}
	// Each restore runs in a subtest: its own goroutine, hence its own namespace and tap.
	for _, prestart := range []bool{false, true} {
		name := "RestoredWithFreshTap"
		if prestart {
			name = "PrestartedRestoreWithFreshTap"
		}
		t.Run(name, func(t *testing.T) {
			tap := HostNet(t)
			r := s.boot(t, bootOpts{restore: sn, prestart: prestart, nics: []vmm.NIC{{Tap: tap, MAC: GuestMAC}}})
			tap.Close()
			checkTraffic(t, r)
		})
	}
	t.Run("LiveMigrationKeepsTheNetwork", func(t *testing.T) {
		// On one node the target gets the source's very tap (the same open file: a
		// stopped VM's NIC does not read it, so the two never do at once); after the
		// switch-over the guest's network and its server work as before.
		tap := HostNet(t)
		src := s.boot(t, bootOpts{nics: []vmm.NIC{{Tap: tap, MAC: GuestMAC}}})
		m, ok := src.vm.(vmm.Migrator)
		if !ok {
			testutil.Skipf(t, "the %s driver does not implement vmm.Migrator (live migration)", s.d.Name())
		}
		if got := src.mustCall("net " + GuestCIDR + " " + HostAddr); got != "ok eth0" {
			t.Fatalf("guest network setup: %s", got)
		}
		if got := src.mustCall("serve " + GuestPort); got != "ok" {
			t.Fatalf("guest web server: %s", got)
		}
		checkTraffic(t, src)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		pr, done := migrateOut(ctx, m, vmm.MigrateOptions{})
		dst := s.boot(t, bootOpts{restore: &vmm.Snapshot{Stream: pr}, nics: []vmm.NIC{{Tap: tap, MAC: GuestMAC}}})
		if r := <-done; r.err != nil {
			t.Fatalf("MigrateOut: %v", r.err)
		}
		src.vm.Kill()
		waitEnd(t, src.vm, 30*time.Second)
		tap.Close()
		checkTraffic(t, dst)
	})
	t.Run("RestoreNeedsTheNIC", func(t *testing.T) {
		// A restore without the NIC is a different device set: it must not come up as a
		// guest that silently lost its network.
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		spec := s.spec(t, bootOpts{restore: sn})
		ln, err := net.Listen("unix", spec.AgentSocket)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		vm, err := s.d.Create(ctx, spec)
		if err != nil {
			return // refused up front: fine
		}
		defer func() {
			_ = vm.Kill()
			<-vm.Wait()
		}()
		if err := vm.Start(ctx); err == nil {
			t.Error("a snapshot with a NIC restored into a VM without one")
		} else if errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("the mismatched restore hung: %v", err)
		} else {
			t.Logf("refused: %v", err)
		}
	})
}
