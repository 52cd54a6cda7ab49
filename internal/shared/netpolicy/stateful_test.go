package netpolicy

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// listenIn plays the guest: a TCP listener on the guest's address and port inside
// namespace n (where what arrives for the sandbox's address is translated to the
// guest's), accepting until the test ends.
func listenIn(t *testing.T, n network.Namespace, port uint16) {
	t.Helper()
	if out, err := exec.Command("ip", "-n", n.Name, "addr", "add", network.GuestAddr.String()+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("give %s the guest's address: %v %s", n.Name, err, out)
	}
	addr := netip.AddrPortFrom(network.GuestAddr, port)
	type res struct {
		ln  net.Listener
		err error
	}
	c := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is discarded with its namespace
		f, err := os.Open(n.Path())
		if err == nil {
			err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
			f.Close()
		}
		var ln net.Listener
		if err == nil {
			ln, err = net.Listen("tcp", addr.String())
		}
		c <- res{ln, err}
	}()
	r := <-c
	if r.err != nil {
		t.Fatalf("listen in %s: %v", n.Name, r.err)
	}
	acceptAll(t, r.ln)
}

func dialFromHost(addr netip.AddrPort) error {
	c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
	if err == nil {
		c.Close()
	}
	return err
}

// Policies are stateful: with everything the sandbox sends to the host denied, the host
// can still connect to a server in the sandbox (the answers belong to a flow the ingress
// side let through), while the sandbox cannot open a connection to the host.
func TestPolicyIsStateful(t *testing.T) {
	n, b := sandboxNS(t, "10.231.243.0/30", "st")
	srv := netip.AddrPortFrom(b.Sandbox(), 7100)
	listenIn(t, n, srv.Port())
	ln, err := net.Listen("tcp", netip.AddrPortFrom(b.Host(), 7200).String())
	if err != nil {
		t.Fatal(err)
	}
	acceptAll(t, ln)
	// The host is protected (as the node's end of a sandbox's veth pair is): the answers
	// to the host's connection pass all the same.
	e, err := Attach(n.HostIf, Enforced{Set: Set{Egress: allowAll, Ingress: allowAll},
		Protect: Protected{Egress: []Rule{{CIDR: netip.PrefixFrom(b.Host(), 32), Action: Deny}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := connect(n.Name, b.Host(), 7200); err == nil {
		t.Error("the sandbox opened a connection to the host it is denied")
	}
	for i := 0; i < 3; i++ {
		if err := dialFromHost(srv); err != nil {
			t.Fatalf("host to the sandbox's server (answers must pass as part of the flow): %v", err)
		}
	}
	eg, in, err := e.Counters()
	if err != nil || eg.Dropped == 0 || eg.Allowed == 0 || in.Allowed == 0 {
		t.Errorf("counters egress %+v ingress %+v, %v", eg, in, err)
	}
}

// A pinned policy outlives the process's hold on it (an agent restart), can be loaded
// and changed again, and is gone after Detach.
func TestPolicyPinned(t *testing.T) {
	n, b := sandboxNS(t, "10.231.244.0/30", "pin")
	bpffs := t.TempDir()
	if out, err := exec.Command("mount", "-t", "bpf", "bpf", bpffs).CombinedOutput(); err != nil {
		testutil.Skipf(t, "cannot mount a bpf filesystem (needs root and bpffs in the kernel): %v %s", err, out)
	}
	t.Cleanup(func() { _ = unix.Unmount(bpffs, unix.MNT_DETACH) })
	ln, err := net.Listen("tcp", netip.AddrPortFrom(b.Host(), 7300).String())
	if err != nil {
		t.Fatal(err)
	}
	acceptAll(t, ln)
	deny := out(Policy{Default: Allow, Rules: []Rule{{CIDR: netip.PrefixFrom(b.Host(), 32), Proto: TCP, PortLo: 7300, PortHi: 7300, Action: Deny}}})
	e, err := Attach(n.HostIf, deny)
	if err != nil {
		t.Fatal(err)
	}
	dir := bpffs + "/sb"
	if err := e.Pin(dir); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := connect(n.Name, b.Host(), 7300); err == nil {
		t.Error("the policy was lifted when the process's hold was closed")
	}
	e2, err := LoadPinned(dir)
	if err != nil {
		t.Fatal(err)
	}
	if eg, _, _ := e2.Counters(); eg.Dropped == 0 {
		t.Errorf("loaded counters %+v: want the drops from before", eg)
	}
	if err := e2.Apply(out(allowAll)); err != nil {
		t.Fatal(err)
	}
	if err := connect(n.Name, b.Host(), 7300); err != nil {
		t.Errorf("after allowing on the loaded policy: %v", err)
	}
	if err := e2.Apply(deny); err != nil {
		t.Fatal(err)
	}
	if err := e2.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := connect(n.Name, b.Host(), 7300); err != nil {
		t.Errorf("after detaching: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("pins left after detach: %v", err)
	}
}

// The guard passes only frames from the expected MAC and address. It is attached here to
// the host end of a veth pair, whose peer in the namespace plays the guest.
func TestGuard(t *testing.T) {
	n, b := sandboxNS(t, "10.231.245.0/30", "gd")
	ln, err := net.Listen("tcp", netip.AddrPortFrom(b.Host(), 7400).String())
	if err != nil {
		t.Fatal(err)
	}
	acceptAll(t, ln)
	ipn := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", n.Name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	mac := net.HardwareAddr{0x02, 0xfc, 0, 0, 0, 7}
	ipn("link", "set", "veth0", "address", mac.String())
	host, err := net.InterfaceByName(n.HostIf)
	if err != nil {
		t.Fatal(err)
	}
	g, err := AttachGuard(host.Index, mac, b.Sandbox())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := connect(n.Name, b.Host(), 7400); err != nil {
		t.Fatalf("from the right MAC and address: %v", err)
	}
	d0, _ := g.Dropped() // IPv6 neighbour discovery from veth0 is dropped too
	// Another source address.
	ipn("addr", "add", "192.0.2.9/32", "dev", "veth0")
	ipn("route", "replace", b.Prefix.String(), "dev", "veth0", "src", "192.0.2.9")
	if err := connect(n.Name, b.Host(), 7400); err == nil {
		t.Error("a spoofed source address got through the guard")
	}
	d1, _ := g.Dropped()
	if d1 <= d0 {
		t.Error("spoofed-address frames not counted")
	}
	ipn("route", "replace", b.Prefix.String(), "dev", "veth0", "src", b.Sandbox().String())
	if err := connect(n.Name, b.Host(), 7400); err != nil {
		t.Fatalf("back on its own address: %v", err)
	}
	// Another MAC.
	ipn("link", "set", "veth0", "address", "02:fc:00:00:00:08")
	ipn("neigh", "flush", "all")
	if err := connect(n.Name, b.Host(), 7400); err == nil {
		t.Error("a spoofed MAC got through the guard")
	}
	if d2, _ := g.Dropped(); d2 <= d1 {
		t.Errorf("spoofed-MAC frames not counted (%d, then %d)", d1, d2)
	}
	if _, err := AttachGuard(host.Index, net.HardwareAddr{1, 2}, b.Sandbox()); err == nil {
		t.Error("a 2-byte MAC was accepted")
	}
}

// A datagram larger than the MTU leaves the sandbox in fragments: allowed, it arrives
// whole (later fragments carry no ports and must not be judged as port 0); denied, it
// does not.
func TestPolicyFragments(t *testing.T) {
	n, b := sandboxNS(t, "10.231.247.0/30", "fr")
	pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(b.Host(), 5300).String())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	send := func() {
		t.Helper()
		err := network.Do(n.Path(), func() error {
			c, err := net.Dial("udp4", netip.AddrPortFrom(b.Host(), 5300).String())
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write(make([]byte, 3000))
			return err
		})
		if err != nil {
			t.Fatalf("send from the sandbox namespace: %v", err)
		}
	}
	recv := func() int {
		buf := make([]byte, 9000)
		_ = pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			return 0
		}
		return n
	}
	e, err := Attach(n.HostIf, out(Policy{Default: Deny, Rules: []Rule{{CIDR: netip.PrefixFrom(b.Host(), 32), Proto: UDP, PortLo: 5300, PortHi: 5300, Action: Allow}}}))
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	send()
	if got := recv(); got != 3000 {
		t.Errorf("allowed 3000-byte datagram: received %d bytes", got)
	}
	if err := e.Apply(out(Policy{Default: Allow, Rules: []Rule{{CIDR: netip.PrefixFrom(b.Host(), 32), Proto: UDP, PortLo: 5300, PortHi: 5300, Action: Deny}}})); err != nil {
		t.Fatal(err)
	}
	send()
	if got := recv(); got != 0 {
		t.Errorf("denied 3000-byte datagram: received %d bytes", got)
	}
}
