package envd

import (
	"fmt"
	"net/http"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// asUser runs fn with the filesystem credentials of the call's user: init runs as root,
// and a file operation done as root would follow a symbolic link an unprivileged guest
// user planted (in its home, in /tmp) to any file of the guest, and make what it wrote
// that user's. With the user's fsuid and fsgid (the thread's own: fsuid is per thread)
// the kernel checks every path as for that user and drops root's file capabilities;
// what is made belongs to the user. fn runs on one locked thread: it must not hand
// work to other goroutines.
func (s *Server) asUser(h http.Header, fn func(u User) error) error {
	u, err := s.cfg.Spawner.User(s.userOf(h))
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 || u.UID == 0 {
		return fn(u)
	}
	runtime.LockOSThread()
	_, _ = unix.SetfsgidRetGid(u.GID)
	_, _ = unix.SetfsuidRetUid(u.UID)
	if cur, _ := unix.SetfsuidRetUid(-1); cur != u.UID {
		// Not switched: the thread stays locked (it goes with the goroutine).
		return fmt.Errorf("act as user %d: the filesystem user did not change", u.UID)
	}
	err = fn(u)
	_, _ = unix.SetfsuidRetUid(0)
	_, _ = unix.SetfsgidRetGid(0)
	uid, _ := unix.SetfsuidRetUid(-1)
	gid, _ := unix.SetfsgidRetGid(-1)
	if uid == 0 && gid == 0 {
		runtime.UnlockOSThread()
	} // else the thread is left locked, and ends with the goroutine
	return err
}
