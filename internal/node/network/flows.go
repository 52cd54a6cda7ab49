package network

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A Flow is a TCP connection the guest opened to the outside (through its namespace's
// address translation): its far end, and the guest's port.
type Flow struct {
	Remote netip.AddrPort `json:"r"`
	Port   uint16         `json:"p"`
}

// MaxFlows bounds the flows one migration carries (what GuestFlows returns, what a
// target nudges): a switch-over message holds them.
const MaxFlows = 1000

// The table is read while the guest is stopped for a switch-over, and the guest decides
// how many entries its namespace tracks (up to the kernel's nf_conntrack_max): the read
// stops after flowScanLines lines or flowScanTime, whichever comes first (the flows
// found by then are the ones nudged; the others are reset at the guest's next packet).
const (
	flowScanLines = 1 << 16
	flowScanTime  = 100 * time.Millisecond
)

// GuestFlows lists the guest's outbound TCP connections that the namespace at nsPath
// tracks as established (at most MaxFlows), from its connection tracking table.
//
// A live migration moves the guest to another namespace and node: its connections'
// translations stay behind, so the far ends know them by an address the guest no longer
// sends from. The target nudges each (NudgeFlows) so that the guest learns of it.
func GuestFlows(nsPath string) ([]Flow, error) {
	var flows []Flow
	err := Do(nsPath, func() error {
		// The thread's own namespace's table: /proc/self/net is the process's.
		f, err := os.Open("/proc/thread-self/net/nf_conntrack")
		if err != nil {
			return fmt.Errorf("the namespace's connection table: %w", err)
		}
		defer f.Close()
		// Large reads: the kernel walks its table from the start on each.
		flows, err = parseFlows(bufio.NewReaderSize(f, 1<<20), MaxFlows, flowScanLines, time.Now().Add(flowScanTime))
		return err
	})
	return flows, err
}

// parseFlows reads nf_conntrack lines (at most 4 KiB each, at most maxLines, until
// deadline) and keeps the established TCP connections from GuestAddr, up to max.
func parseFlows(r io.Reader, max, maxLines int, deadline time.Time) ([]Flow, error) {
	var flows []Flow
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 4096)
	for lines := 0; len(flows) < max && lines < maxLines && sc.Scan(); lines++ {
		if lines%1024 == 0 && time.Now().After(deadline) {
			break
		}
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[0] != "ipv4" || f[2] != "tcp" || f[5] != "ESTABLISHED" {
			continue
		}
		// The original direction's tuple comes first: src= dst= sport= dport=.
		tuple := map[string]string{}
		for _, kv := range f[6:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				continue
			}
			if _, seen := tuple[k]; seen {
				break // the reply direction's tuple
			}
			tuple[k] = v
		}
		src, err1 := netip.ParseAddr(tuple["src"])
		dst, err2 := netip.ParseAddr(tuple["dst"])
		sport, err3 := strconv.ParseUint(tuple["sport"], 10, 16)
		dport, err4 := strconv.ParseUint(tuple["dport"], 10, 16)
		if err1 != nil || err2 != nil || err3 != nil || err4 != nil || src != GuestAddr {
			continue
		}
		flows = append(flows, Flow{Remote: netip.AddrPortFrom(dst, uint16(dport)), Port: uint16(sport)})
	}
	return flows, sc.Err()
}

// NudgeFlows sends the guest, through the tap of the namespace at nsPath, one TCP
// segment of each flow as if from its far end, out of the connection's window (random
// sequence numbers): the guest answers each with an acknowledgment, which leaves through
// this namespace's address translation and this node, and the far end, which does not
// know the connection by that address, answers with a reset. A connection the guest only
// waits on is reset then, as one it sends on is at its next packet, instead of hanging.
func NudgeFlows(nsPath string, flows []Flow) error {
	if len(flows) > MaxFlows {
		flows = flows[:MaxFlows]
	}
	if len(flows) == 0 {
		return nil
	}
	return Do(nsPath, func() error {
		tap, err := net.InterfaceByName(Tap)
		if err != nil {
			return fmt.Errorf("the namespace's tap: %w", err)
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0) // send only
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		to := &unix.SockaddrLinklayer{Ifindex: tap.Index, Protocol: htons(unix.ETH_P_IP), Halen: 6}
		copy(to.Addr[:], GuestMAC)
		// One that cannot be sent (a full queue) does not keep the others from going.
		var failed int
		var first error
		for _, fl := range flows {
			if !fl.Remote.Addr().Is4() {
				continue
			}
			if err := unix.Sendto(fd, nudgeFrame(fl), 0, to); err != nil {
				if failed++; first == nil {
					first = fmt.Errorf("nudge the guest's connection to %s: %w", fl.Remote, err)
				}
			}
		}
		if first != nil {
			return fmt.Errorf("%d of %d connections not nudged; the first: %w", failed, len(flows), first)
		}
		return nil
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// nudgeFrame is an Ethernet frame from the guest's gateway to the guest carrying a TCP
// ACK segment from fl's far end to the guest's port, with random sequence and
// acknowledgment numbers.
func nudgeFrame(fl Flow) []byte {
	b := make([]byte, 14+20+20)
	copy(b[0:6], GuestMAC)
	copy(b[6:12], GatewayMAC)
	binary.BigEndian.PutUint16(b[12:14], unix.ETH_P_IP)
	ip := b[14:34]
	ip[0] = 0x45                                // IPv4, 20-byte header
	binary.BigEndian.PutUint16(ip[2:4], 40)     // total length
	binary.BigEndian.PutUint16(ip[6:8], 0x4000) // don't fragment
	ip[8], ip[9] = 64, unix.IPPROTO_TCP         // TTL, protocol
	src, dst := fl.Remote.Addr().As4(), GuestAddr.As4()
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[10:12], checksum(ip, 0))
	tcp := b[34:54]
	binary.BigEndian.PutUint16(tcp[0:2], fl.Remote.Port())
	binary.BigEndian.PutUint16(tcp[2:4], fl.Port)
	_, _ = rand.Read(tcp[4:12]) // sequence and acknowledgment numbers
	tcp[12] = 5 << 4            // 20-byte header
	tcp[13] = 0x10              // ACK
	binary.BigEndian.PutUint16(tcp[14:16], 65535)
	// The pseudo-header's sum: addresses, protocol, TCP length.
	var pseudo uint32
	for i := 0; i < 4; i += 2 {
		pseudo += uint32(binary.BigEndian.Uint16(src[i:])) + uint32(binary.BigEndian.Uint16(dst[i:]))
	}
	pseudo += unix.IPPROTO_TCP + 20
	binary.BigEndian.PutUint16(tcp[16:18], checksum(tcp, pseudo))
	return b
}

// checksum is the Internet checksum of b, starting from sum.
func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
