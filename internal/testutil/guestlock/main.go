// Command guestlock takes a file lock inside a sandbox, for tests of locks shared through
// volumes: guestlock [-nb] [-fcntl] [-hold D] FILE takes an exclusive lock on FILE (flock,
// or with -fcntl a POSIX record lock on the whole file), prints "locked", holds it for D
// (default 0), prints "released" and exits 0; with -nb a lock held elsewhere makes it
// print "busy" and exit 1 instead of waiting. Tests build it static (see
// testutil.BuildGuestTool) and add it to an image.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	nb := flag.Bool("nb", false, "do not wait: exit 1 if the lock is held elsewhere")
	posix := flag.Bool("fcntl", false, "a POSIX record lock (fcntl) instead of flock")
	hold := flag.Duration("hold", 0, "how long to hold the lock")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: guestlock [-nb] [-fcntl] [-hold D] FILE")
		os.Exit(2)
	}
	f, err := os.OpenFile(flag.Arg(0), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if *posix {
		cmd := unix.F_SETLKW
		if *nb {
			cmd = unix.F_SETLK
		}
		err = unix.FcntlFlock(f.Fd(), cmd, &unix.Flock_t{Type: unix.F_WRLCK})
	} else {
		how := unix.LOCK_EX
		if *nb {
			how |= unix.LOCK_NB
		}
		err = unix.Flock(int(f.Fd()), how)
	}
	switch {
	case err == nil:
	case *nb && (err == unix.EWOULDBLOCK || err == unix.EAGAIN || err == unix.EACCES):
		fmt.Println("busy")
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "lock:", err)
		os.Exit(2)
	}
	fmt.Println("locked")
	time.Sleep(*hold)
	fmt.Println("released")
}
