package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Every guest sees the same network, whatever sandbox it is: its NIC has GuestAddr (MAC
// GuestMAC), its gateway is the tap in the sandbox's namespace (GuestGateway), and the
// namespace translates between GuestAddr and the sandbox's own address (Block.Sandbox)
// on the veth pair. That is what lets one template snapshot, taken with the network
// already configured, serve every sandbox (the E2B pattern): nothing per-sandbox is
// baked into the guest.
var (
	GuestAddr      = netip.MustParseAddr("169.254.0.21")
	GuestGateway   = netip.MustParseAddr("169.254.0.22")
	GuestPrefixLen = 30
	GuestMAC       = net.HardwareAddr{0x02, 0xfc, 0x00, 0x00, 0x00, 0x01}
	// GatewayMAC is the tap's: fixed too, because a restored guest's neighbour cache
	// already holds the gateway's MAC from when its template was saved.
	GatewayMAC = net.HardwareAddr{0x02, 0xfc, 0x00, 0x00, 0x00, 0x02}
)

// GuestCIDR is the guest's address with its prefix length, as the guest configures it.
func GuestCIDR() string { return netip.PrefixFrom(GuestAddr, GuestPrefixLen).String() }

// Do runs fn on a thread that has entered the network namespace at nsPath (a bind mount,
// e.g. Namespace.Path). Sockets, links and tcx attachments fn makes belong to that
// namespace; processes it starts are born in it. If the thread cannot return to its own
// namespace it is discarded rather than reused.
func Do(nsPath string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return // the thread stays locked and exits with the goroutine
		}
		defer own.Close()
		target, err := os.Open(nsPath)
		if err != nil {
			errc <- fmt.Errorf("open network namespace %s: %w", nsPath, err)
			return
		}
		err = unix.Setns(int(target.Fd()), unix.CLONE_NEWNET)
		target.Close()
		if err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", nsPath, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return from network namespace %s: %w", nsPath, err))
			return // still locked: the runtime ends this thread with the goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// setupGuestSide turns on forwarding in the namespace and installs its address
// translation (Create has given the tap the guest's gateway address):
//   - what the guest sends out of the veth leaves as the sandbox's address,
//   - what arrives for the sandbox's address goes to the guest,
//   - the guest may use no other address (the guard on the tap drops the rest; packets
//     from other addresses are not translated, and the host side's source pin drops them);
//   - the gateway's address (where the node serves the guest: its volumes) is reached
//     from the guest alone: not through the veth, whoever on the node sends there (a
//     local account can bind a socket to the host end of the veth).
func setupGuestSide(ctx context.Context, n Namespace) error {
	ruleset := fmt.Sprintf(`table ip fireworks {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "%[1]s" ip daddr %[2]s dnat to %[3]s
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "%[1]s" ip saddr %[3]s snat to %[2]s
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ip daddr %[4]s iifname != "%[5]s" drop
		ip daddr %[4]s ip saddr != %[3]s drop
	}
}
`, nsVeth, n.Block.Sandbox(), GuestAddr, GuestGateway, Tap)
	return Do(n.Path(), func() error {
		// The guest gets no IPv6 (its guard drops it anyway); the namespace forwards IPv4.
		for file, v := range map[string]string{
			"/proc/sys/net/ipv4/ip_forward":                "1",
			"/proc/sys/net/ipv6/conf/all/disable_ipv6":     "1",
			"/proc/sys/net/ipv6/conf/default/disable_ipv6": "1",
		} {
			if err := os.WriteFile(file, []byte(v), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("sysctl %s in %s: %w", file, n.Name, err)
			}
		}
		return nft(ctx, ruleset)
	})
}

// nft loads a ruleset into the calling thread's network namespace.
func nft(ctx context.Context, ruleset string) error {
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// GroupNet is where a sandbox group's members find each other: member i of the group
// (the main is 0) is GroupAddr(i) to every other member. The guest routes it to its
// gateway (it is not on its /30), and its namespace translates it to the member's
// address on the node. Link-local, like the guest's own address: nothing outside the
// node uses it, and it is the same in every sandbox (a template serves every group).
var GroupNet = netip.MustParsePrefix("169.254.20.0/24")

// GroupAddr is member i's address on its group's network.
func GroupAddr(i int) netip.Addr {
	b := GroupNet.Addr().As4()
	b[3] = byte(10 + i)
	return netip.AddrFrom4(b)
}

// GroupRoute sends what the guest sends to Group to Addr (another sandbox's address on
// the node).
type GroupRoute struct {
	Group, Addr netip.Addr
}

// SetGroupRoutes replaces the group routes of namespace n (none removes them): table
// "ip fireworks_group", one transaction.
func SetGroupRoutes(ctx context.Context, n Namespace, routes []GroupRoute) error {
	var rules strings.Builder
	for _, r := range routes {
		if !GroupNet.Contains(r.Group) || !r.Addr.Is4() {
			return fmt.Errorf("group route %s -> %s: want an address of %s to an IPv4 address", r.Group, r.Addr, GroupNet)
		}
		fmt.Fprintf(&rules, "\t\tiifname %q ip daddr %s dnat to %s\n", Tap, r.Group, r.Addr)
	}
	ruleset := "add table ip fireworks_group\ndelete table ip fireworks_group\n"
	if len(routes) > 0 {
		ruleset += "table ip fireworks_group {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat - 10; policy accept;\n" + rules.String() + "\t}\n}\n"
	}
	return Do(n.Path(), func() error {
		if err := nft(ctx, ruleset); err != nil {
			return fmt.Errorf("group routes of %s: %w", n.Name, err)
		}
		return nil
	})
}
