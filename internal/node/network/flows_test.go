package network

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseFlows(t *testing.T) {
	table := strings.Join([]string{
		// The guest's connection out (kept), translated to the sandbox's address.
		"ipv4     2 tcp      6 431999 ESTABLISHED src=169.254.0.21 dst=93.184.216.34 sport=40000 dport=443 src=93.184.216.34 dst=10.201.0.2 sport=443 dport=40000 [ASSURED] mark=0 zone=0 use=2",
		// One in through the namespace (the guest is its far end): not the guest's out.
		"ipv4     2 tcp      6 431999 ESTABLISHED src=10.201.0.1 dst=10.201.0.2 sport=5555 dport=8000 src=169.254.0.21 dst=10.201.0.1 sport=8000 dport=5555 [ASSURED] mark=0 zone=0 use=2",
		// Not established, not TCP, malformed.
		"ipv4     2 tcp      6 110 SYN_SENT src=169.254.0.21 dst=1.1.1.1 sport=40001 dport=80 [UNREPLIED] src=1.1.1.1 dst=10.201.0.2 sport=80 dport=40001 mark=0 use=1",
		"ipv4     2 udp      17 29 src=169.254.0.21 dst=1.1.1.1 sport=5353 dport=53 src=1.1.1.1 dst=10.201.0.2 sport=53 dport=5353 mark=0 use=1",
		"ipv4     2 tcp      6 431999 ESTABLISHED src=169.254.0.21 dst=nonsense sport=1 dport=2",
		"garbage",
	}, "\n")
	far := time.Now().Add(time.Hour)
	flows, err := parseFlows(strings.NewReader(table), 10, 100, far)
	if err != nil {
		t.Fatal(err)
	}
	want := Flow{Remote: netip.MustParseAddrPort("93.184.216.34:443"), Port: 40000}
	if len(flows) != 1 || flows[0] != want {
		t.Fatalf("flows %v, want [%v]", flows, want)
	}
	many := strings.Repeat(strings.SplitN(table, "\n", 2)[0]+"\n", 5)
	if flows, _ := parseFlows(strings.NewReader(many), 3, 100, far); len(flows) != 3 {
		t.Errorf("%d flows kept past the bound of 3", len(flows))
	}
	// A table the guest filled with other entries is read only so far.
	noise := strings.Repeat("ipv4     2 udp      17 29 src=169.254.0.21 dst=1.1.1.1 sport=5353 dport=53 src=1.1.1.1 dst=10.201.0.2 sport=53 dport=5353 mark=0 use=1\n", 50)
	if flows, _ := parseFlows(strings.NewReader(noise+many), 10, 20, far); len(flows) != 0 {
		t.Errorf("%d flows found past the line budget", len(flows))
	}
	if flows, _ := parseFlows(strings.NewReader(many), 10, 100, time.Now().Add(-time.Second)); len(flows) != 0 {
		t.Errorf("%d flows found past the deadline", len(flows))
	}
}

// The frame a target sends is a well-formed TCP segment from the far end to the guest:
// both checksums verify, and it is an ACK.
func TestNudgeFrame(t *testing.T) {
	fl := Flow{Remote: netip.MustParseAddrPort("93.184.216.34:443"), Port: 40000}
	b := nudgeFrame(fl)
	if len(b) != 54 || binary.BigEndian.Uint16(b[12:14]) != 0x0800 {
		t.Fatalf("frame of %d bytes, type %#x", len(b), binary.BigEndian.Uint16(b[12:14]))
	}
	ip, tcp := b[14:34], b[34:54]
	if checksum(ip, 0) != 0 {
		t.Error("the IPv4 header's checksum does not verify")
	}
	var pseudo uint32
	for _, a := range [][]byte{ip[12:16], ip[16:20]} {
		pseudo += uint32(binary.BigEndian.Uint16(a[0:])) + uint32(binary.BigEndian.Uint16(a[2:]))
	}
	if checksum(tcp, pseudo+6+20) != 0 {
		t.Error("the TCP checksum does not verify")
	}
	if got := netip.AddrFrom4([4]byte(ip[12:16])); got != fl.Remote.Addr() {
		t.Errorf("from %s", got)
	}
	if got := netip.AddrFrom4([4]byte(ip[16:20])); got != GuestAddr {
		t.Errorf("to %s", got)
	}
	if binary.BigEndian.Uint16(tcp[0:2]) != 443 || binary.BigEndian.Uint16(tcp[2:4]) != 40000 || tcp[13] != 0x10 {
		t.Errorf("ports %d→%d flags %#x", binary.BigEndian.Uint16(tcp[0:2]), binary.BigEndian.Uint16(tcp[2:4]), tcp[13])
	}
}
