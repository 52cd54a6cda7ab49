// Package pty allocates pseudo-terminals in the guest without cgo (fireworks-init's
// exec sessions and its envd both give processes terminals).
package pty

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Open allocates a pseudo-terminal without cgo. The master is opened
// non-blocking so the Go poller serves it (reads can then be given
// deadlines and be interrupted by Close); the slave stays blocking since it
// is handed to the child.
func Open(rows, cols uint16) (master, slave *os.File, err error) {
	mfd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("opening /dev/ptmx: %w", err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("unlocking pty: %w", err)
	}
	if rows == 0 || cols == 0 {
		rows, cols = 24, 80
	}
	if err := unix.IoctlSetWinsize(mfd, unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("sizing pty: %w", err)
	}
	// TIOCGPTPEER opens the slave through the master, which works whatever
	// devpts instance /dev/pts is; fall back to the path for old kernels.
	sfd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(mfd), unix.TIOCGPTPEER, uintptr(unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC))
	if errno != 0 {
		if !errors.Is(errno, unix.EINVAL) && !errors.Is(errno, unix.ENOTTY) {
			unix.Close(mfd)
			return nil, nil, fmt.Errorf("opening pty slave: %w", errno)
		}
		n, err := unix.IoctlGetInt(mfd, unix.TIOCGPTN)
		if err != nil {
			unix.Close(mfd)
			return nil, nil, fmt.Errorf("getting pty number: %w", err)
		}
		name := fmt.Sprintf("/dev/pts/%d", n)
		fd, err := unix.Open(name, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Close(mfd)
			return nil, nil, fmt.Errorf("opening %s: %w", name, err)
		}
		sfd = uintptr(fd)
	}
	return os.NewFile(uintptr(mfd), "/dev/ptmx"), os.NewFile(sfd, "pty-slave"), nil
}

// SetSize resizes the terminal of a pty master without switching the
// file to blocking mode (os.File.Fd would).
func SetSize(master *os.File, rows, cols uint16) error {
	rc, err := master.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	}); err != nil {
		return err
	}
	return ierr
}
