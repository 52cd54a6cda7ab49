package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// dialVMM connects to a unix socket that the VMM process pid listens on in its run
// directory, and checks that the VMM is what answers. The directory is the jailed VMM's
// own: a VMM taken over by its guest could replace its socket with a link to any socket
// on the host (another VM's QMP, a root daemon's), which this process, root and in the
// host's mount namespace, would follow. The kernel says which process listens on the
// other end (SO_PEERCRED: the listener's credentials, as of its listen); only pid is
// accepted.
func dialVMM(ctx context.Context, path string, pid int) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	if err := peerIs(conn, pid); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return conn, nil
}

// listenForVMM listens on the unix socket path for the VMM to connect to: owned by the
// VMM's jail user if it has one, and open to its owner only (whatever the umask says).
// Callers still check each connection's process (peerIs).
func (v *vm) listenForVMM(path string) (net.Listener, error) {
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	uid := v.uid
	v.mu.Unlock()
	if uid != 0 {
		err = setOwner(path, unix.S_IFSOCK, uid, v.d.cfg.Jail.GID, 0o600)
	} else {
		err = os.Chmod(path, 0o600)
	}
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("the socket %s for the VMM: %w", path, err)
	}
	return ln, nil
}

// peerIs checks that the other end of the unix connection conn is process pid's: the
// listener's when conn was dialed, the connecting process when it was accepted.
func peerIs(conn net.Conn, pid int) error {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("not a unix connection (%T)", conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("read the listener's credentials: %w", cerr)
	}
	if pid <= 0 {
		return errors.New("no VMM process to check the listener against")
	}
	if int(cred.Pid) != pid {
		return fmt.Errorf("served by process %d (uid %d), not the VMM's (%d)", cred.Pid, cred.Uid, pid)
	}
	return nil
}
