package network

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// tapFlags is how a VMM's tap is attached: an ethernet (not IP) device, without the
// 4-byte packet-information prefix, and with a virtio-net header in front of each packet.
// QEMU's tap backend reads the flag back (TUNGETIFF) when handed an fd and then passes the
// guest's checksum and segmentation offloads through instead of doing them in software;
// without it every packet is checksummed and segmented by QEMU, which is what makes
// guest<->host TCP slow under emulation.
const tapFlags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR

// OpenTap attaches to the existing tap interface name in the calling thread's network
// namespace and returns the queue's file, ready to hand to a VMM (vmm.NIC.Tap). It does
// not create interfaces: TUNSETIFF would quietly make a new, non-persistent one for a
// name that does not exist, so a missing interface is an error. Callers that enter a
// sandbox's namespace must do so on a locked OS thread.
func OpenTap(name string) (*os.File, error) {
	if err := ifaceExists(name); err != nil {
		return nil, fmt.Errorf("open tap %q: %w", name, err)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open tap %q: /dev/net/tun: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("open tap %q: %w", name, err)
	}
	ifr.SetUint16(tapFlags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w (is it a tun device, or a tap attached multi-queue?)", name, err)
		}
		return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tap:"+name), nil
}

// ifaceExists asks the kernel for the interface's index through a socket made in the
// calling thread's namespace (sysfs would show the namespace it was mounted in).
func ifaceExists(name string) error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFINDEX, ifr); err != nil {
		if errors.Is(err, unix.ENODEV) {
			return errors.New("no such interface in this network namespace")
		}
		return fmt.Errorf("look up interface: %w", err)
	}
	return nil
}
