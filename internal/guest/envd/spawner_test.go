package envd

import (
	"errors"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// hostSpawner starts the tests' processes on the host with fork and exec and waits for
// each itself (the guest's spawner is init's, on its reaper). Every user's home is the
// test's directory; "nobody" is uid 65534, at home in its subdirectory.
type hostSpawner struct{ home string }

func (h hostSpawner) Spawn(c Cmd) (int, <-chan Exit, error) {
	path := c.Path
	if !strings.Contains(path, "/") {
		p, err := exec.LookPath(path)
		if err != nil {
			return 0, nil, err
		}
		path = p
	}
	attr := &syscall.ProcAttr{Dir: c.Dir, Env: c.Env, Files: []uintptr{c.Stdin.Fd(), c.Stdout.Fd(), c.Stderr.Fd()},
		Sys: &syscall.SysProcAttr{Setsid: true, Setctty: c.TTY}}
	pid, err := syscall.ForkExec(path, c.Args, attr)
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan Exit, 1)
	go func() {
		var ws unix.WaitStatus
		for {
			_, err := unix.Wait4(pid, &ws, 0, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			switch {
			case err != nil:
				ch <- Exit{Code: 255}
			case ws.Signaled():
				ch <- Exit{Code: 128 + int(ws.Signal()), Signal: int(ws.Signal())}
			default:
				ch <- Exit{Code: ws.ExitStatus()}
			}
			return
		}
	}()
	return pid, ch, nil
}

func (h hostSpawner) User(name string) (User, error) {
	if name == "nobody" {
		return User{UID: 65534, GID: 65534, Home: filepath.Join(h.home, "nobody")}, nil
	}
	u, err := user.Current()
	if err != nil {
		return User{}, err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return User{UID: uid, GID: gid, Home: h.home}, nil
}
