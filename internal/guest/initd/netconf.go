package initd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// nicWait bounds the wait for the NIC's interface: virtio_net is loaded at boot and
// probes the device as it loads, so it is normally there at once.
const nicWait = 5 * time.Second

// configureNet brings lo and the first ethernet interface up, gives the interface n's
// address (and MTU) and adds the default route via n's gateway, all over rtnetlink in the
// calling thread's network namespace (the image may have no ip binary). It returns the
// interface's name.
func configureNet(ctx context.Context, n *proto.NetConfig) (string, error) {
	if err := n.Validate(); err != nil {
		return "", err
	}
	pfx := netip.MustParsePrefix(n.Address)
	nl, err := openRtnl()
	if err != nil {
		return "", err
	}
	defer nl.close()

	ctx, cancel := context.WithTimeout(ctx, nicWait)
	defer cancel()
	var ifc link
	for {
		links, err := nl.links()
		if err != nil {
			return "", err
		}
		var ok bool
		if ifc, ok = firstEthernet(links); ok {
			break
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no ethernet interface appeared (waited up to %s; is virtio_net loaded, and does the VM have a NIC?)", nicWait)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err := nl.setUp(1, 0); err != nil { // lo is always index 1
		return "", fmt.Errorf("bringing lo up: %w", err)
	}
	// The sandbox network is IPv4: without this the kernel sends IPv6 neighbour
	// discovery that the host's guard drops (and counts as spoofed).
	disableIPv6()
	if err := nl.setUp(ifc.index, n.MTU); err != nil {
		return "", fmt.Errorf("bringing %s up (mtu %d): %w", ifc.name, n.MTU, err)
	}
	if err := nl.addAddr(ifc.index, pfx); err != nil {
		return "", fmt.Errorf("adding address %s to %s: %w", pfx, ifc.name, err)
	}
	if n.Gateway != "" {
		gw := netip.MustParseAddr(n.Gateway)
		if err := nl.addDefaultRoute(ifc.index, gw); err != nil {
			return "", fmt.Errorf("adding default route via %s on %s: %w", gw, ifc.name, err)
		}
	}
	return ifc.name, nil
}

type link struct {
	index int
	name  string
	typ   uint16 // ARPHRD_*
	flags uint32
}

// firstEthernet picks the ethernet interface with the lowest index: the VM's first NIC.
// loopbackUp brings lo up: a guest without a network still has localhost.
func loopbackUp() error {
	nl, err := openRtnl()
	if err != nil {
		return err
	}
	defer nl.close()
	return nl.setUp(1, 0)
}

// disableIPv6 turns IPv6 off on every interface, best effort (a kernel without IPv6 has
// nothing to turn off).
func disableIPv6() {
	for _, f := range []string{"/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6"} {
		_ = os.WriteFile(f, []byte("1"), 0o644)
	}
}

func firstEthernet(links []link) (link, bool) {
	slices.SortFunc(links, func(a, b link) int { return a.index - b.index })
	for _, l := range links {
		if l.typ == unix.ARPHRD_ETHER && l.flags&unix.IFF_LOOPBACK == 0 {
			return l, true
		}
	}
	return link{}, false
}

// rtnl is a NETLINK_ROUTE socket for requests that are acknowledged one at a time.
type rtnl struct {
	fd  int
	seq uint32
}

func openRtnl() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("rtnetlink bind: %w", err)
	}
	return &rtnl{fd: fd}, nil
}

func (r *rtnl) close() { unix.Close(r.fd) }

// msg builds a netlink message: header, fixed body, then attributes.
type msg struct{ b []byte }

func newMsg(typ, flags uint16, body []byte) *msg {
	m := &msg{b: make([]byte, unix.NLMSG_HDRLEN, 256)}
	binary.NativeEndian.PutUint16(m.b[4:], typ)
	binary.NativeEndian.PutUint16(m.b[6:], flags|unix.NLM_F_REQUEST)
	m.b = append(m.b, body...)
	return m
}

func (m *msg) attr(typ uint16, data []byte) {
	l := unix.SizeofRtAttr + len(data)
	m.b = binary.NativeEndian.AppendUint16(m.b, uint16(l))
	m.b = binary.NativeEndian.AppendUint16(m.b, typ)
	m.b = append(m.b, data...)
	for len(m.b)%4 != 0 {
		m.b = append(m.b, 0)
	}
}

func (m *msg) attrU32(typ uint16, v uint32) {
	m.attr(typ, binary.NativeEndian.AppendUint32(nil, v))
}

// do sends m with an acknowledgement requested and returns the kernel's verdict.
func (r *rtnl) do(m *msg) error {
	r.seq++
	seq := r.seq
	binary.NativeEndian.PutUint16(m.b[6:], binary.NativeEndian.Uint16(m.b[6:])|unix.NLM_F_ACK)
	if err := r.send(m, seq); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		msgs, err := r.recv(buf)
		if err != nil {
			return err
		}
		for _, mm := range msgs {
			if mm.Header.Seq != seq || mm.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(mm.Data) < 4 {
				return errors.New("short netlink acknowledgement")
			}
			if code := int32(binary.NativeEndian.Uint32(mm.Data)); code != 0 {
				return syscall.Errno(-code)
			}
			return nil
		}
	}
}

func (r *rtnl) send(m *msg, seq uint32) error {
	binary.NativeEndian.PutUint32(m.b[0:], uint32(len(m.b)))
	binary.NativeEndian.PutUint32(m.b[8:], seq)
	if err := unix.Sendto(r.fd, m.b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("rtnetlink send: %w", err)
	}
	return nil
}

func (r *rtnl) recv(buf []byte) ([]syscall.NetlinkMessage, error) {
	n, _, err := unix.Recvfrom(r.fd, buf, 0)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink receive: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return nil, fmt.Errorf("rtnetlink parse: %w", err)
	}
	return msgs, nil
}

// links lists the interfaces of the namespace.
func (r *rtnl) links() ([]link, error) {
	r.seq++
	seq := r.seq
	m := newMsg(unix.RTM_GETLINK, unix.NLM_F_DUMP, make([]byte, unix.SizeofIfInfomsg))
	if err := r.send(m, seq); err != nil {
		return nil, err
	}
	var out []link
	buf := make([]byte, 32<<10)
	for {
		msgs, err := r.recv(buf)
		if err != nil {
			return nil, err
		}
		for _, mm := range msgs {
			if mm.Header.Seq != seq {
				continue
			}
			switch mm.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(mm.Data) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(mm.Data)); code != 0 {
						return nil, fmt.Errorf("list interfaces: %w", syscall.Errno(-code))
					}
				}
				return nil, errors.New("list interfaces: netlink error")
			case unix.RTM_NEWLINK:
				if len(mm.Data) < unix.SizeofIfInfomsg {
					continue
				}
				l := link{
					typ:   binary.NativeEndian.Uint16(mm.Data[2:]),
					index: int(int32(binary.NativeEndian.Uint32(mm.Data[4:]))),
					flags: binary.NativeEndian.Uint32(mm.Data[8:]),
				}
				attrs, err := syscall.ParseNetlinkRouteAttr(&mm)
				if err == nil {
					for _, a := range attrs {
						if a.Attr.Type == unix.IFLA_IFNAME {
							l.name = strings.TrimRight(string(a.Value), "\x00")
						}
					}
				}
				out = append(out, l)
			}
		}
	}
}

// setUp sets IFF_UP on interface index, and its MTU when mtu > 0.
func (r *rtnl) setUp(index, mtu int) error {
	body := make([]byte, unix.SizeofIfInfomsg)
	body[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(body[4:], uint32(index))
	binary.NativeEndian.PutUint32(body[8:], unix.IFF_UP)  // flags
	binary.NativeEndian.PutUint32(body[12:], unix.IFF_UP) // change mask
	m := newMsg(unix.RTM_NEWLINK, 0, body)
	if mtu > 0 {
		m.attrU32(unix.IFLA_MTU, uint32(mtu))
	}
	return r.do(m)
}

// addAddr gives interface index the IPv4 address p (with its broadcast address, as
// ip addr add ... brd + does).
func (r *rtnl) addAddr(index int, p netip.Prefix) error {
	body := make([]byte, unix.SizeofIfAddrmsg)
	body[0] = unix.AF_INET
	body[1] = uint8(p.Bits())
	body[3] = unix.RT_SCOPE_UNIVERSE
	binary.NativeEndian.PutUint32(body[4:], uint32(index))
	m := newMsg(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body)
	a := p.Addr().As4()
	m.attr(unix.IFA_LOCAL, a[:])
	m.attr(unix.IFA_ADDRESS, a[:])
	if p.Bits() < 31 {
		v := binary.BigEndian.Uint32(a[:]) | (1<<(32-p.Bits()) - 1)
		m.attr(unix.IFA_BROADCAST, binary.BigEndian.AppendUint32(nil, v))
	}
	return r.do(m)
}

// addDefaultRoute sets the main table's IPv4 default route via gw on interface index.
func (r *rtnl) addDefaultRoute(index int, gw netip.Addr) error {
	body := make([]byte, unix.SizeofRtMsg)
	body[0] = unix.AF_INET
	body[4] = unix.RT_TABLE_MAIN
	body[5] = unix.RTPROT_BOOT
	body[6] = unix.RT_SCOPE_UNIVERSE
	body[7] = unix.RTN_UNICAST
	m := newMsg(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body)
	g := gw.As4()
	m.attr(unix.RTA_GATEWAY, g[:])
	m.attrU32(unix.RTA_OIF, uint32(index))
	return r.do(m)
}

// writeResolvConf replaces <root>/etc/resolv.conf with a regular file naming servers
// (see replaceEtcFile).
func writeResolvConf(root string, servers []string) error {
	if err := proto.ValidateNameservers(servers); err != nil {
		return err
	}
	if len(servers) == 0 {
		return errors.New("no nameservers to write")
	}
	var b strings.Builder
	b.WriteString("# Written by fireworks-init.\n")
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", netip.MustParseAddr(s))
	}
	return replaceEtcFile(root, "resolv.conf", b.String())
}

// writeHostFiles gives the guest the /etc/hostname and /etc/hosts a container gets from
// Docker: the hostname, and localhost plus the hostname at the guest's own address
// (addr; without a network, 127.0.1.1 as Debian does), so `getent hosts $(hostname)` and
// programs that resolve their own name work.
func writeHostFiles(root, hostname string, addr netip.Addr, extra []proto.HostEntry) error {
	if !addr.IsValid() {
		addr = netip.MustParseAddr("127.0.1.1")
	}
	if err := replaceEtcFile(root, "hostname", hostname+"\n"); err != nil {
		return err
	}
	hosts := "# Written by fireworks-init.\n" +
		"127.0.0.1\tlocalhost\n" +
		"::1\tlocalhost ip6-localhost ip6-loopback\n" +
		"fe00::0\tip6-localnet\n" +
		"ff00::0\tip6-mcastprefix\n" +
		"ff02::1\tip6-allnodes\n" +
		"ff02::2\tip6-allrouters\n" +
		addr.String() + "\t" + hostname + "\n"
	for _, h := range extra {
		hosts += h.Addr + "\t" + h.Name + "\n"
	}
	return replaceEtcFile(root, "hosts", hosts)
}

// replaceEtcFile replaces <root>/etc/<name> with a regular file holding content.
// Whatever was there (a file, or a symlink, e.g. resolv.conf to systemd-resolved's stub)
// is replaced, never written through: the new file is renamed over it. /etc is looked up
// as if root were the filesystem root (RESOLVE_IN_ROOT), so no symlink in the image can
// lead the write outside it; a missing /etc is created.
func replaceEtcFile(root, name, content string) error {
	tmpName := "." + name + ".fireworks" // left by an interrupted write, if any
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("writing %s: open root %s: %w", name, root, err)
	}
	defer unix.Close(rootFD)
	how := &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
	etc, err := unix.Openat2(rootFD, "etc", how)
	if errors.Is(err, unix.ENOENT) {
		// A missing /etc is made; a symlink there pointing nowhere inside the root makes
		// Mkdirat fail with EEXIST, and then nothing is written.
		if err = unix.Mkdirat(rootFD, "etc", 0o755); err == nil {
			etc, err = unix.Openat2(rootFD, "etc", how)
		}
	}
	if err != nil {
		return fmt.Errorf("writing %s: /etc in %s: %w", name, root, err)
	}
	defer unix.Close(etc)
	_ = unix.Unlinkat(etc, tmpName, 0)
	fd, err := unix.Openat(etc, tmpName, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), tmpName)
	_, werr := f.WriteString(content)
	if werr == nil {
		werr = f.Chmod(0o644) // whatever the umask
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = unix.Renameat(etc, tmpName, etc, name)
	}
	if werr != nil {
		_ = unix.Unlinkat(etc, tmpName, 0)
		return fmt.Errorf("writing /etc/%s in %s: %w", name, root, werr)
	}
	return nil
}
