package netpolicy

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf/asm"
)

// Version names the programs this package makes. Change it with any change to program or
// guardProgram, or to the maps' layout: an agent that finds pinned programs of another
// version replaces them.
const Version = "5"

// Offsets in a __sk_buff the programs read.
const (
	skbLen     = 0
	skbData    = 76
	skbDataEnd = 80
)

// headerBytes is what the policy program reads at most: Ethernet, the longest IPv4
// header, the TCP flags.
const headerBytes = 14 + 60 + 14

// fragmentPort stands for "no ports: a later fragment" (no real port is this large).
const fragmentPort = 0x10000

// Stack layout of the policy program (offsets from the frame pointer).
const (
	stLPM     = -8  // LPM key: prefix length (u32), then the address the rules match
	stPort    = -12 // destination port, host order (0 when there is none)
	stIndex   = -16 // array map index
	stPin     = -20 // the allowed source address from config (0 = any)
	stFlags   = -24 // TCP flags byte (0 when not TCP)
	stReverse = -40 // flow key of the reply direction (16 bytes)
	stForward = -56 // flow key of this packet (16 bytes)
	stOne     = -64 // value written to the flow map
	stDefault = -68 // the default action from config
)

// Flow keys are {saddr, daddr (network order), sport, dport (as on the wire), proto, 0,0,0}.
const flowKeySize = 16

// program assembles the filter of one direction: the node's protected rules (protectFD),
// then the policy's (rulesFD) and its default. Registers: r6 ctx, r7 data,
// r8 data_end, r9 protocol.
//
// A packet that answers a flow this sandbox's programs let through earlier (its reversed
// 5-tuple is in the flow map) passes: policies are stateful, so a sandbox may reach
// what it is allowed to and get the answers, and the host may reach a sandbox (ingress,
// port-forward) without the sandbox being allowed to reach the host. Anything else goes
// through the rules; what they allow records its flow (for TCP only the SYN does, so an
// established connection is judged by the rules on every packet the initiator sends:
// a new deny cuts it off).
func program(dir Direction, protectFD, rulesFD, configFD, countersFD, flowsFD int) asm.Instructions {
	// The address the rules match: the destination of what the sandbox sends, the source
	// of what it receives.
	matchOff := int16(14 + 16)
	if dir == ToSandbox {
		matchOff = 14 + 12
	}
	ins := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.Mov.Imm(asm.R9, 0), // no protocol (yet): nothing to record as a flow
		// The config (default action, source pin), read once onto the stack.
		asm.StoreImm(asm.RFP, stIndex, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, configFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stIndex),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R2, asm.R0, 0, asm.Word),
		asm.StoreMem(asm.RFP, stDefault, asm.R2, asm.Word),
		asm.LoadMem(asm.R2, asm.R0, 4, asm.Word),
		asm.StoreMem(asm.RFP, stPin, asm.R2, asm.Word),
		// Make sure the headers are in the linear part the program can read (a packet
		// whose L4 header is not would otherwise be matched without its ports). Pulling
		// may copy the headers, so only when they are not there already.
		asm.LoadMem(asm.R7, asm.R6, skbData, asm.Word),
		asm.LoadMem(asm.R8, asm.R6, skbDataEnd, asm.Word),
		asm.LoadMem(asm.R2, asm.R6, skbLen, asm.Word),
		asm.JLE.Imm(asm.R2, headerBytes, "want"),
		asm.Mov.Imm(asm.R2, headerBytes),
		asm.Mov.Reg(asm.R3, asm.R8).WithSymbol("want"), // r3 = linear bytes
		asm.Sub.Reg(asm.R3, asm.R7),
		asm.JGE.Reg(asm.R3, asm.R2, "linear"),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnSkbPullData.Call(),
		asm.LoadMem(asm.R7, asm.R6, skbData, asm.Word),
		asm.LoadMem(asm.R8, asm.R6, skbDataEnd, asm.Word),
		// Ethernet header.
		asm.Mov.Reg(asm.R2, asm.R7).WithSymbol("linear"),
		asm.Add.Imm(asm.R2, 14),
		asm.JGT.Reg(asm.R2, asm.R8, "default"),
		asm.LoadMem(asm.R3, asm.R7, 12, asm.Half),
		asm.HostTo(asm.BE, asm.R3, asm.Half),
		asm.JEq.Imm(asm.R3, 0x0806, "pass"), // ARP
		asm.JNE.Imm(asm.R3, 0x0800, "default"),
		// IPv4 header (20 bytes at least).
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Imm(asm.R2, 34),
		asm.JGT.Reg(asm.R2, asm.R8, "default"),
		// Source address check (anti-spoofing) first.
		asm.LoadMem(asm.R2, asm.RFP, stPin, asm.Word),
		asm.JEq.Imm(asm.R2, 0, "checked"),
		asm.LoadMem(asm.R3, asm.R7, 14+12, asm.Word),
		asm.JNE.Reg(asm.R2, asm.R3, "drop"),
		// Flow keys: zeroed, then addresses and protocol.
		asm.Mov.Imm(asm.R1, 0).WithSymbol("checked"),
		asm.StoreMem(asm.RFP, stReverse, asm.R1, asm.DWord),
		asm.StoreMem(asm.RFP, stReverse+8, asm.R1, asm.DWord),
		asm.StoreMem(asm.RFP, stForward, asm.R1, asm.DWord),
		asm.StoreMem(asm.RFP, stForward+8, asm.R1, asm.DWord),
		asm.StoreImm(asm.RFP, stFlags, 0, asm.Word),
		asm.StoreImm(asm.RFP, stPort, 0, asm.Word),
		asm.LoadMem(asm.R9, asm.R7, 14+9, asm.Byte),
		asm.LoadMem(asm.R3, asm.R7, 14+12, asm.Word), // saddr
		asm.LoadMem(asm.R4, asm.R7, 14+16, asm.Word), // daddr
		asm.StoreMem(asm.RFP, stForward, asm.R3, asm.Word),
		asm.StoreMem(asm.RFP, stForward+4, asm.R4, asm.Word),
		asm.StoreMem(asm.RFP, stReverse, asm.R4, asm.Word),
		asm.StoreMem(asm.RFP, stReverse+4, asm.R3, asm.Word),
		asm.StoreMem(asm.RFP, stForward+12, asm.R9, asm.Byte),
		asm.StoreMem(asm.RFP, stReverse+12, asm.R9, asm.Byte),
		// LPM key.
		asm.LoadMem(asm.R3, asm.R7, matchOff, asm.Word),
		asm.StoreImm(asm.RFP, stLPM, 32, asm.Word),
		asm.StoreMem(asm.RFP, stLPM+4, asm.R3, asm.Word),
		// Ports for TCP and UDP: the L4 header at 14 + ihl*4, in the first fragment only.
		// Later fragments carry none: they match their prefix's rules for the protocol
		// whatever the ports (without the first fragment they cannot be reassembled, and
		// the first is judged with its ports).
		asm.JEq.Imm(asm.R9, TCP, "ports"),
		asm.JNE.Imm(asm.R9, UDP, "flows"),
		asm.LoadMem(asm.R3, asm.R7, 14+6, asm.Half).WithSymbol("ports"),
		asm.HostTo(asm.BE, asm.R3, asm.Half),
		asm.And.Imm(asm.R3, 0x1fff),
		asm.JEq.Imm(asm.R3, 0, "l4"),
		asm.StoreImm(asm.RFP, stPort, fragmentPort, asm.Word),
		asm.Ja.Label("flows"),
		asm.LoadMem(asm.R4, asm.R7, 14, asm.Byte).WithSymbol("l4"),
		asm.And.Imm(asm.R4, 0x0f),
		asm.LSh.Imm(asm.R4, 2),
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Reg(asm.R2, asm.R4),
		asm.Add.Imm(asm.R2, 14),
		asm.Mov.Reg(asm.R3, asm.R2),
		asm.Add.Imm(asm.R3, 4),
		asm.JGT.Reg(asm.R3, asm.R8, "flows"),
		asm.LoadMem(asm.R3, asm.R2, 0, asm.Half), // sport, wire order
		asm.LoadMem(asm.R4, asm.R2, 2, asm.Half), // dport, wire order
		asm.StoreMem(asm.RFP, stForward+8, asm.R3, asm.Half),
		asm.StoreMem(asm.RFP, stForward+10, asm.R4, asm.Half),
		asm.StoreMem(asm.RFP, stReverse+8, asm.R4, asm.Half),
		asm.StoreMem(asm.RFP, stReverse+10, asm.R3, asm.Half),
		asm.HostTo(asm.BE, asm.R4, asm.Half),
		asm.StoreMem(asm.RFP, stPort, asm.R4, asm.Word),
		asm.JNE.Imm(asm.R9, TCP, "flows"),
		asm.Mov.Reg(asm.R3, asm.R2),
		asm.Add.Imm(asm.R3, 14),
		asm.JGT.Reg(asm.R3, asm.R8, "flows"),
		asm.LoadMem(asm.R3, asm.R2, 13, asm.Byte), // TCP flags
		asm.StoreMem(asm.RFP, stFlags, asm.R3, asm.Word),
		// An answer to a flow let through earlier passes.
		asm.LoadMapPtr(asm.R1, flowsFD).WithSymbol("flows"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stReverse),
		asm.FnMapLookupElem.Call(),
		asm.JNE.Imm(asm.R0, 0, "pass"),
		// The node's protected prefixes first: one that matches decides.
		asm.LoadMapPtr(asm.R1, protectFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stLPM),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "policy"),
	}
	ins = append(ins, ruleChain("p", "drop")...)
	ins = append(ins,
		// The policy's longest matching prefix, if any.
		asm.LoadMapPtr(asm.R1, rulesFD).WithSymbol("policy"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stLPM),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "default"),
	)
	ins = append(ins, ruleChain("u", "default")...)
	ins = append(ins,
		// The policy's default.
		asm.LoadMem(asm.R2, asm.RFP, stDefault, asm.Word).WithSymbol("default"),
		asm.JEq.Imm(asm.R2, int32(Allow), "allow"),
		// Count and decide.
		asm.StoreImm(asm.RFP, stIndex, 1, asm.Word).WithSymbol("drop"),
		asm.Mov.Imm(asm.R9, 2), // TC_ACT_SHOT
		asm.Ja.Label("count"),
		// Allowed: record the flow (TCP: only a SYN opens one), then pass.
		asm.JEq.Imm(asm.R9, 0, "pass").WithSymbol("allow"),
	)
	if dir == ToSandbox {
		// What reaches the sandbox opens a flow only if it opens a conversation: a TCP SYN
		// or a UDP datagram. ICMP does not: an error the node sends about the sandbox's
		// own packet (time exceeded, unreachable) would otherwise let the sandbox answer
		// with ICMP to the node's end of its link, which the node protects.
		ins = append(ins, asm.JEq.Imm(asm.R9, UDP, "record"), asm.JNE.Imm(asm.R9, TCP, "pass"))
	}
	ins = append(ins,
		asm.JNE.Imm(asm.R9, TCP, "record"),
		asm.LoadMem(asm.R3, asm.RFP, stFlags, asm.Word),
		asm.And.Imm(asm.R3, 0x02), // SYN
		asm.JEq.Imm(asm.R3, 0, "pass"),
		asm.Mov.Imm(asm.R1, 1).WithSymbol("record"),
		asm.StoreMem(asm.RFP, stOne, asm.R1, asm.DWord),
		asm.LoadMapPtr(asm.R1, flowsFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stForward),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, stOne),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnMapUpdateElem.Call(),
		asm.StoreImm(asm.RFP, stIndex, 0, asm.Word).WithSymbol("pass"),
		asm.Mov.Imm(asm.R9, 0), // TC_ACT_OK
		asm.LoadMapPtr(asm.R1, countersFD).WithSymbol("count"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stIndex),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Reg(asm.R0, asm.R9).WithSymbol("out"),
		asm.Return(),
	)
	return ins
}

// ruleChain matches a packet against the rules of the map value R0 points at (an LPM
// map's value, see enforcer.go): the first rule whose protocol and port range match
// jumps to "allow" or "drop"; when none does, to noMatch. tag keeps the labels of two
// chains in one program apart. It expects the destination port (or fragmentPort) at
// stPort and the protocol in R9; the packet is not read any more.
func ruleChain(tag, noMatch string) asm.Instructions {
	label := func(what string, i int) string { return fmt.Sprintf("%s%s%d", tag, what, i) }
	ins := asm.Instructions{
		asm.Mov.Reg(asm.R7, asm.R0),
		asm.LoadMem(asm.R8, asm.R7, 0, asm.Word), // how many rules
		asm.LoadMem(asm.R5, asm.RFP, stPort, asm.Word),
	}
	for i := 0; i < MaxRulesPerCIDR; i++ {
		next := label("rule", i+1)
		o := int16(8 + i*entrySize)
		ins = append(ins,
			asm.JLE.Imm(asm.R8, int32(i), noMatch).WithSymbol(label("rule", i)),
			asm.LoadMem(asm.R2, asm.R7, o, asm.Byte), // proto
			asm.JEq.Imm(asm.R2, 0, label("ports", i)),
			asm.JNE.Reg(asm.R2, asm.R9, next),
			asm.JEq.Imm(asm.R5, fragmentPort, label("act", i)).WithSymbol(label("ports", i)),
			asm.LoadMem(asm.R3, asm.R7, o+6, asm.Half), // hi
			asm.JEq.Imm(asm.R3, 0, label("act", i)),
			asm.JGT.Reg(asm.R5, asm.R3, next),
			asm.LoadMem(asm.R3, asm.R7, o+4, asm.Half), // lo
			asm.JLT.Reg(asm.R5, asm.R3, next),
			asm.LoadMem(asm.R2, asm.R7, o+1, asm.Byte).WithSymbol(label("act", i)),
			asm.JEq.Imm(asm.R2, int32(Allow), "allow"),
			asm.Ja.Label("drop"),
		)
	}
	return append(ins, asm.Ja.Label(noMatch).WithSymbol(label("rule", MaxRulesPerCIDR)))
}

// guardProgram checks every frame the guest sends on its tap: the Ethernet source must be
// the guest's MAC; IPv4 must come from the guest's address; ARP must name both as its
// sender. Everything else (other addresses, other MACs, IPv6, other ethertypes) is
// dropped and counted: the guest cannot pose as anyone else even on its own link. (RARP
// from the guest's MAC passes: QEMU sends it for a restored guest.)
func guardProgram(mac net.HardwareAddr, addr netip.Addr, countersFD int) asm.Instructions {
	a4 := addr.As4()
	macHi := int64(binary.LittleEndian.Uint32(mac[0:4])) // the bytes as a little-endian load sees them
	macLo := int64(binary.LittleEndian.Uint16(mac[4:6]))
	ip := int64(binary.LittleEndian.Uint32(a4[:]))
	return asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, skbData, asm.Word),
		asm.LoadMem(asm.R8, asm.R6, skbDataEnd, asm.Word),
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Imm(asm.R2, 14),
		asm.JGT.Reg(asm.R2, asm.R8, "drop"),
		asm.LoadImm(asm.R4, macHi, asm.DWord),
		asm.LoadImm(asm.R5, macLo, asm.DWord),
		asm.LoadImm(asm.R9, ip, asm.DWord),
		asm.LoadMem(asm.R3, asm.R7, 6, asm.Word),
		asm.JNE.Reg(asm.R3, asm.R4, "drop"),
		asm.LoadMem(asm.R3, asm.R7, 10, asm.Half),
		asm.JNE.Reg(asm.R3, asm.R5, "drop"),
		asm.LoadMem(asm.R3, asm.R7, 12, asm.Half),
		asm.HostTo(asm.BE, asm.R3, asm.Half),
		asm.JEq.Imm(asm.R3, 0x0800, "ipv4"),
		// RARP from the guest's MAC: QEMU announces a restored or migrated guest's
		// location with these; they carry no address of the guest's choosing.
		asm.JEq.Imm(asm.R3, 0x8035, "pass"),
		asm.JNE.Imm(asm.R3, 0x0806, "drop"),
		// ARP (Ethernet/IPv4): sender MAC at 14+8, sender address at 14+14.
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Add.Imm(asm.R2, 14+28),
		asm.JGT.Reg(asm.R2, asm.R8, "drop"),
		asm.LoadMem(asm.R3, asm.R7, 14+8, asm.Word),
		asm.JNE.Reg(asm.R3, asm.R4, "drop"),
		asm.LoadMem(asm.R3, asm.R7, 14+12, asm.Half),
		asm.JNE.Reg(asm.R3, asm.R5, "drop"),
		asm.LoadMem(asm.R3, asm.R7, 14+14, asm.Word),
		asm.JNE.Reg(asm.R3, asm.R9, "drop"),
		asm.Ja.Label("pass"),
		asm.Mov.Reg(asm.R2, asm.R7).WithSymbol("ipv4"),
		asm.Add.Imm(asm.R2, 34),
		asm.JGT.Reg(asm.R2, asm.R8, "drop"),
		asm.LoadMem(asm.R3, asm.R7, 14+12, asm.Word),
		asm.JNE.Reg(asm.R3, asm.R9, "drop"),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("pass"), // TC_ACT_OK
		asm.Return(),
		asm.StoreImm(asm.RFP, -8, 1, asm.Word).WithSymbol("drop"),
		asm.LoadMapPtr(asm.R1, countersFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "shot"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, 2).WithSymbol("shot"), // TC_ACT_SHOT
		asm.Return(),
	}
}
