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
	// Two `ip -batch` runs (the host's side, then the namespace's) rather than a process
	// per step: starts wait for this, and every exec costs milliseconds.
	host := []string{
		fmt.Sprintf("link add %s type veth peer name %s netns %s", n.HostIf, nsVeth, n.Name),
		fmt.Sprintf("addr add %s dev %s", netipPrefix(n.Block.Host(), 30), n.HostIf),
		fmt.Sprintf("link set %s up", n.HostIf),
	}
	inside := []string{
		"link set lo up",
		fmt.Sprintf("addr add %s dev %s", netipPrefix(n.Block.Sandbox(), 30), nsVeth),
		fmt.Sprintf("link set %s up", nsVeth),
		fmt.Sprintf("route add default via %s", n.Block.Host()),
		fmt.Sprintf("tuntap add dev %s mode tap", Tap),
		// The guest's side: its gateway, with a MAC as fixed as the guest's address.
		fmt.Sprintf("link set %s address %s", Tap, GatewayMAC),
		fmt.Sprintf("addr add %s dev %s", netip.PrefixFrom(GuestGateway, GuestPrefixLen), Tap),
		fmt.Sprintf("link set %s up", Tap),
	}
	if err := ipBatch(ctx, "", false, host); err != nil {
		return fmt.Errorf("create network of %s: %w", n.Name, err)
	}
	if err := ipBatch(ctx, n.Name, false, inside); err != nil {
		return fmt.Errorf("create network of %s: %w", n.Name, err)
	}
	if err := setupGuestSide(ctx, n); err != nil {
		return fmt.Errorf("create network of %s: %w", n.Name, err)
	}
	return nil
}

// Delete removes the host end of the veth pair (which takes its peer along) and the
// namespace (with the tap), in one `ip` run. Missing pieces are not an error.
func Delete(ctx context.Context, n Namespace) error {
	var lines []string
	if linkExists(n.HostIf) {
		lines = append(lines, "link delete "+n.HostIf)
	}
	if _, err := os.Stat(n.Path()); err == nil {
		lines = append(lines, "netns delete "+n.Name)
	}
	if len(lines) == 0 {
		return nil
	}
	err := ipBatch(ctx, "", true, lines)
	// -force runs every line; what matters is what is left.
	_, statErr := os.Stat(n.Path())
	if statErr == nil || linkExists(n.HostIf) {
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

// ipBatch runs ip commands (one per line, without "ip") in one process, inside network
// namespace ns ("" = the caller's). It stops at the first that fails, unless force.
func ipBatch(ctx context.Context, ns string, force bool, lines []string) error {
	args := []string{"-batch", "-"}
	if ns != "" {
		args = append([]string{"-n", ns}, args...)
	}
	if force {
		args = append([]string{"-force"}, args...)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
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
