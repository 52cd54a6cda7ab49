// Package hostnet makes hosts of one network on this machine: a bridge that the
// caller's own namespace sits on, and network namespaces joined to it by veth pairs,
// each one host (a server, an agent) with its own address. The cluster tests and the
// bench's cluster run their processes in them (nsenter --net).
package hostnet

import (
	"crypto/rand"
	"fmt"
	"os/exec"
	"strings"
)

// Host is one network namespace on the bridge; its interface there is eth0.
type Host struct {
	Name string // h0, h1, ...
	NS   string // the namespace's name (/run/netns/NS)
	Veth string // the bridge's end of its veth pair
	IP   string
}

// Net is a bridge and its hosts.
type Net struct {
	Bridge   string
	BridgeIP string
	Hosts    []*Host
}

// Make creates bridge with address subnet.1/24 and n hosts at subnet.10, subnet.11, ...,
// their namespaces named tag<random>-h<i> and veths tag-v<i>. What an earlier run killed
// midway left under the same bridge and veth names goes first. The namespaces' names are
// random, not the pid: a fresh machine's pids repeat from boot to boot, and a namespace an
// earlier run left in /run/netns made "ip netns add" fail with "File exists" (seen in CI).
// On failure what was made is removed.
func Make(bridge, subnet, tag string, n int) (_ *Net, err error) {
	nt := &Net{Bridge: bridge, BridgeIP: subnet + ".1"}
	defer func() {
		if err != nil {
			nt.Remove()
		}
	}()
	_ = run("ip", "link", "del", bridge)
	for _, s := range [][]string{
		{"ip", "link", "add", bridge, "type", "bridge"},
		{"ip", "addr", "add", nt.BridgeIP + "/24", "dev", bridge},
		{"ip", "link", "set", bridge, "up"},
	} {
		if err := run(s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	for i := range n {
		h := &Host{Name: fmt.Sprintf("h%d", i), NS: fmt.Sprintf("%s%x-h%d", tag, rnd, i),
			Veth: fmt.Sprintf("%sv%d", tag, i), IP: fmt.Sprintf("%s.%d", subnet, 10+i)}
		_ = run("ip", "link", "del", h.Veth)
		nt.Hosts = append(nt.Hosts, h)
		for _, s := range [][]string{
			{"ip", "netns", "add", h.NS},
			{"ip", "link", "add", h.Veth, "type", "veth", "peer", "name", "eth0", "netns", h.NS},
			{"ip", "link", "set", h.Veth, "master", bridge},
			{"ip", "link", "set", h.Veth, "up"},
			{"ip", "-n", h.NS, "addr", "add", h.IP + "/24", "dev", "eth0"},
			{"ip", "-n", h.NS, "link", "set", "eth0", "up"},
			{"ip", "-n", h.NS, "link", "set", "lo", "up"},
		} {
			if err := run(s[0], s[1:]...); err != nil {
				return nil, err
			}
		}
	}
	return nt, nil
}

// Remove deletes the hosts and the bridge (missing pieces are no error).
func (n *Net) Remove() {
	for _, h := range n.Hosts {
		_ = run("ip", "netns", "del", h.NS)
		_ = run("ip", "link", "del", h.Veth)
	}
	_ = run("ip", "link", "del", n.Bridge)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}
