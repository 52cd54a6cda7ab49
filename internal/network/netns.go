package network

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Names of a sandbox's network objects. Namespaces and host interfaces carry the node's
// prefix so that a sweep finds exactly the ones this node made.
const (
	nsPrefix   = "fw-"   // network namespace: fw-<id>
	hostPrefix = "fwv"   // host end of the veth pair: fwv<hash of id> (15-byte limit)
	nsVeth     = "veth0" // the sandbox end, inside the namespace
	// Tap is the interface inside the namespace that the VMM attaches the guest's NIC to.
	Tap = "tap0"
)

// Namespace is one sandbox's network namespace, wired to the host by a veth pair: the
// host end has the block's host address, the namespace end the sandbox address with a
// default route through the host; a tap waits for the guest's NIC.
type Namespace struct {
	Name   string // network namespace (ip netns name)
	HostIf string // host end of the veth pair
	Block  Block
}

// Path is the namespace's bind mount, for entering it (setns).
func (n Namespace) Path() string { return filepath.Join("/run/netns", n.Name) }

// NamespaceFor names the network objects of sandbox id.
func NamespaceFor(id string, b Block) Namespace {
	sum := sha256.Sum256([]byte(id))
	return Namespace{Name: nsPrefix + id, HostIf: hostPrefix + hex.EncodeToString(sum[:])[:11], Block: b}
}

// Create makes the namespace, the veth pair and the tap, addressed and up. A half-made
// namespace is removed again on error.
func Create(ctx context.Context, n Namespace) (err error) {
	if !validName(strings.TrimPrefix(n.Name, nsPrefix)) || !strings.HasPrefix(n.Name, nsPrefix) {
		return fmt.Errorf("network namespace name %q: want %s<id> with letters, digits, '-' and '_'", n.Name, nsPrefix)
	}
	// Undo only what this call made: a namespace that already existed is not ours.
	if err := ip(ctx, "netns", "add", n.Name); err != nil {
		return fmt.Errorf("create network of %s: %w", n.Name, err)
	}
	defer func() {
		if err != nil {
			_ = Delete(context.WithoutCancel(ctx), n)
		}
	}()
	hostAddr := netipPrefix(n.Block.Host(), 30)
	sbAddr := netipPrefix(n.Block.Sandbox(), 30)
	steps := [][]string{
		{"link", "add", n.HostIf, "type", "veth", "peer", "name", nsVeth, "netns", n.Name},
		{"addr", "add", hostAddr, "dev", n.HostIf},
		{"link", "set", n.HostIf, "up"},
		{"-n", n.Name, "link", "set", "lo", "up"},
		{"-n", n.Name, "addr", "add", sbAddr, "dev", nsVeth},
		{"-n", n.Name, "link", "set", nsVeth, "up"},
		{"-n", n.Name, "route", "add", "default", "via", n.Block.Host().String()},
		{"-n", n.Name, "tuntap", "add", "dev", Tap, "mode", "tap"},
		{"-n", n.Name, "link", "set", Tap, "up"},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			return fmt.Errorf("create network of %s: %w", n.Name, err)
		}
	}
	if err := setupGuestSide(ctx, n); err != nil {
		return fmt.Errorf("create network of %s: %w", n.Name, err)
	}
	return nil
}

// Delete removes the namespace (with everything in it, which takes the veth pair along)
// and the host end if it is still there. Missing pieces are not an error.
func Delete(ctx context.Context, n Namespace) error {
	var errs []error
	if _, err := os.Stat(n.Path()); err == nil {
		if err := ip(ctx, "netns", "delete", n.Name); err != nil {
			errs = append(errs, err)
		}
	}
	if linkExists(n.HostIf) {
		if err := ip(ctx, "link", "delete", n.HostIf); err != nil && linkExists(n.HostIf) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete network of %s: %w", n.Name, err)
	}
	return nil
}

// Sweep removes namespaces whose owner starts with ownerPrefix and that keep reports false
// for (leaked by a crash), and host interfaces of namespaces that are gone, and returns
// what it removed. The prefix keeps one agent from sweeping another's namespaces when
// several share a host's /run/netns (each agent in its own network namespace).
func Sweep(ctx context.Context, ownerPrefix string, keep func(id string) bool) ([]string, error) {
	var removed []string
	var errs []error
	keepLinks := map[string]bool{}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		id, ok := strings.CutPrefix(e.Name(), nsPrefix)
		if !ok || !strings.HasPrefix(id, ownerPrefix) {
			if ok {
				keepLinks[NamespaceFor(id, Block{}).HostIf] = true // another agent's, or not ours to judge
			}
			continue
		}
		if keep(id) {
			keepLinks[NamespaceFor(id, Block{}).HostIf] = true
			continue
		}
		if err := ip(ctx, "netns", "delete", e.Name()); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, e.Name())
	}
	// Host ends whose namespace is gone (deleting a namespace deletes its veth peers,
	// and with them these; a leftover means the namespace was never made).
	links, err := net.Interfaces()
	if err != nil {
		errs = append(errs, fmt.Errorf("list interfaces: %w", err))
	}
	for _, l := range links {
		if !strings.HasPrefix(l.Name, hostPrefix) || keepLinks[l.Name] {
			continue
		}
		if err := ip(ctx, "link", "delete", l.Name); err != nil && linkExists(l.Name) {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, l.Name)
	}
	return removed, errors.Join(errs...)
}

func netipPrefix(a netip.Addr, bits int) string { return netip.PrefixFrom(a, bits).String() }

// linkExists asks the kernel (netlink, in the caller's network namespace; sysfs would show
// the namespace it was mounted in).
func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

func validName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

func ip(ctx context.Context, args ...string) error {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}
