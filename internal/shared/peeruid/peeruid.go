// Package peeruid admits loopback TCP connections by the user of the process that opened
// them, as identd would: the kernel lists every TCP socket with its owner's uid in
// /proc/net/tcp{,6} (of the reader's network namespace). It is how `fireworks dev` keeps
// its plain loopback listeners (xDS, the node data path: both carry sandboxes' private
// ports) to the user that runs it, without TLS: any other local user is refused.
package peeruid

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// Listener accepts only connections from processes running as UID.
type Listener struct {
	net.Listener
	UID int
	Log *slog.Logger
}

// SameUser wraps ln to admit only this process's own user.
func SameUser(ln net.Listener, log *slog.Logger) *Listener {
	if log == nil {
		log = slog.Default()
	}
	return &Listener{Listener: ln, UID: os.Geteuid(), Log: log}
}

// Accept returns the next connection from UID; others are closed as they come.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, err := Of(c)
		if err == nil && uid == l.UID {
			return c, nil
		}
		l.Log.Warn("refused a loopback connection from another user", "listener", l.Addr().String(), "peer", c.RemoteAddr().String(), "uid", uid, "err", err)
		c.Close()
	}
}

// Of returns the uid owning the other end of a loopback TCP connection.
func Of(c net.Conn) (int, error) {
	remote, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return -1, fmt.Errorf("peer address %s: %w", c.RemoteAddr(), err)
	}
	if !remote.Addr().Unmap().IsLoopback() {
		return -1, fmt.Errorf("peer %s is not on loopback", remote)
	}
	local, err := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil {
		return -1, fmt.Errorf("local address %s: %w", c.LocalAddr(), err)
	}
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		uid, err := find(table, remote, local)
		if err == nil {
			return uid, nil
		}
	}
	return -1, fmt.Errorf("no connected socket %s -> %s in /proc/net/tcp", remote, local)
}

// same compares two addresses, an IPv4-mapped IPv6 one equal to its IPv4 form.
func same(a, b netip.AddrPort) bool {
	return a.Addr().Unmap() == b.Addr().Unmap() && a.Port() == b.Port()
}

// find looks up the socket from a to b in table: the whole connection, and a socket a
// process holds (an inode). TIME_WAIT and orphaned FIN_WAIT2 entries have no inode and
// are listed with uid 0 whoever owned them, so matching an address alone, or such an
// entry, would let another user who reuses an address (or a connection's 4-tuple) pass
// for root.
func find(table string, a, b netip.AddrPort) (int, error) {
	f, err := os.Open(table)
	if err != nil {
		return -1, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		local, err1 := parse(fields[1])
		remote, err2 := parse(fields[2])
		if err1 != nil || err2 != nil || !same(local, a) || !same(remote, b) {
			continue
		}
		if fields[9] == "0" {
			continue // no process holds it
		}
		return strconv.Atoi(fields[7])
	}
	return -1, fmt.Errorf("not in %s", table)
}

// parse reads /proc/net/tcp's "0100007F:1F90" (the address as the kernel's 32-bit words
// in host order, the port in hex).
func parse(s string) (netip.AddrPort, error) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q", s)
	}
	raw, err := hex.DecodeString(h)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q", s)
	}
	for i := 0; i < len(raw); i += 4 { // each 32-bit word was printed in host (little-endian) order
		binary.BigEndian.PutUint32(raw[i:], binary.LittleEndian.Uint32(raw[i:]))
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q", s)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}
