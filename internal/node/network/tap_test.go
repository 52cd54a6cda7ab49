package network

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// vnetHdrLen is the size of struct virtio_net_hdr, the default header of a tap attached
// with IFF_VNET_HDR.
const vnetHdrLen = 10

func mustIP(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// TestOpenTapCarriesFrames attaches to a persistent tap and proves both directions with
// real frames in the vnet-header format QEMU expects: the host's ARP request for a guest
// address comes out of the fd, and an ARP reply written into it lands in the host's
// neighbour table.
func TestOpenTapCarriesFrames(t *testing.T) {
	testutil.PrivateNetNS(t)
	mustIP(t, "tuntap", "add", "dev", "tap0", "mode", "tap")
	mustIP(t, "addr", "add", "169.254.0.22/30", "dev", "tap0")
	mustIP(t, "link", "set", "tap0", "up")

	f, err := OpenTap("tap0")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ifr, err := unix.NewIfreq("")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNGETIFF, ifr); err != nil {
		t.Fatalf("TUNGETIFF: %v", err)
	}
	if got := ifr.Uint16(); got&tapFlags != tapFlags {
		t.Errorf("attached with flags %#x, want %#x set", got, tapFlags)
	}
	if ifr.Name() != "tap0" {
		t.Errorf("attached to %q", ifr.Name())
	}

	// Any datagram to the guest's address makes the host ask for its MAC.
	c, err := net.Dial("udp4", "169.254.0.21:9")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	hostMAC := readARPRequest(t, f, net.IPv4(169, 254, 0, 21))

	guestMAC := net.HardwareAddr{0x02, 0xfc, 0, 0, 0, 0x21}
	frame := make([]byte, vnetHdrLen) // all-zero header: no offloads
	frame = append(frame, hostMAC...)
	frame = append(frame, guestMAC...)
	frame = binary.BigEndian.AppendUint16(frame, 0x0806)
	frame = append(frame, 0, 1, 8, 0, 6, 4, 0, 2) // ethernet/IPv4, reply
	frame = append(frame, guestMAC...)
	frame = append(frame, 169, 254, 0, 21)
	frame = append(frame, hostMAC...)
	frame = append(frame, 169, 254, 0, 22)
	if _, err := f.Write(frame); err != nil {
		t.Fatalf("write ARP reply into the tap: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, _ := exec.Command("ip", "neigh", "show", "169.254.0.21", "dev", "tap0").CombinedOutput()
		if strings.Contains(string(out), guestMAC.String()) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the ARP reply written into the tap did not reach the host; neighbours: %s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readARPRequest reads frames from the tap until the host's ARP request for ip, and
// returns the host's MAC from it.
func readARPRequest(t *testing.T, f *os.File, ip net.IP) net.HardwareAddr {
	t.Helper()
	buf := make([]byte, 65536)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLIN}}, 200)
		if err != nil && err != unix.EINTR {
			t.Fatalf("poll tap: %v", err)
		}
		if n == 0 {
			continue
		}
		n, err = f.Read(buf)
		if err != nil {
			t.Fatalf("read tap: %v", err)
		}
		p := buf[:n]
		// vnet header, dst, src, ethertype, then the ARP body: target IP at offset 24.
		if len(p) < vnetHdrLen+14+28 {
			continue
		}
		eth := p[vnetHdrLen:]
		if binary.BigEndian.Uint16(eth[12:]) != 0x0806 {
			continue // e.g. IPv6 router solicitations
		}
		arp := eth[14:]
		if binary.BigEndian.Uint16(arp[6:]) == 1 && bytes.Equal(arp[24:28], ip.To4()) {
			return net.HardwareAddr(append([]byte(nil), eth[6:12]...))
		}
	}
	t.Fatalf("no ARP request for %s came out of the tap", ip)
	return nil
}

func TestOpenTapRefuses(t *testing.T) {
	testutil.PrivateNetNS(t)
	mustIP(t, "tuntap", "add", "dev", "tun0", "mode", "tun")
	for _, c := range []struct{ name, want string }{
		{"nosuch0", "no such interface"},
		{"tun0", "TUNSETIFF"},
		{"lo", "TUNSETIFF"},
		{strings.Repeat("x", 20), strings.Repeat("x", 20)},
	} {
		f, err := OpenTap(c.name)
		if err == nil {
			f.Close()
			t.Errorf("OpenTap(%q) succeeded", c.name)
			continue
		}
		if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.name) {
			t.Errorf("OpenTap(%q): %v, want a mention of %q", c.name, err, c.want)
		}
	}
	// Nothing was created for the missing name.
	if _, err := net.InterfaceByName("nosuch0"); err == nil {
		t.Error("OpenTap created the missing interface")
	}
}
