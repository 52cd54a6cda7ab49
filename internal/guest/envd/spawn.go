package envd

import (
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

func basicUser(u string) string { return base64.StdEncoding.EncodeToString([]byte(u + ":")) }

// ExecSpawner starts processes with fork and exec and waits for each itself: for a
// process that is not PID 1 (tests on a host, tools). fireworks-init has its own, on its
// reaper.
type ExecSpawner struct{}

// Spawn starts c (as the current user: it changes no credentials).
func (ExecSpawner) Spawn(c Cmd) (int, <-chan Exit, error) {
	path := c.Path
	if !strings.Contains(path, "/") {
		p, err := lookPath(path, c.Env)
		if err != nil {
			return 0, nil, err
		}
		path = p
	}
	attr := &syscall.ProcAttr{Dir: c.Dir, Env: c.Env, Files: []uintptr{c.Stdin.Fd(), c.Stdout.Fd(), c.Stderr.Fd()},
		Sys: &syscall.SysProcAttr{Setsid: true, Setctty: c.TTY, Ctty: 0}}
	if !c.TTY {
		attr.Sys = &syscall.SysProcAttr{Setpgid: true}
	}
	pid, err := syscall.ForkExec(path, c.Args, attr)
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan Exit, 1)
	go func() {
		for {
			var ws unix.WaitStatus
			_, err := unix.Wait4(pid, &ws, 0, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			ch <- exitOf(ws, err)
			return
		}
	}()
	return pid, ch, nil
}

// exitOf is a wait status as an Exit.
func exitOf(ws unix.WaitStatus, err error) Exit {
	switch {
	case err != nil:
		return Exit{Code: 255}
	case ws.Signaled():
		return Exit{Code: 128 + int(ws.Signal()), Signal: int(ws.Signal())}
	}
	return Exit{Code: ws.ExitStatus()}
}

// User resolves name on this host ("" the current user).
func (ExecSpawner) User(name string) (User, error) {
	var u *user.User
	var err error
	if name == "" {
		u, err = user.Current()
	} else if u, err = user.Lookup(name); err != nil {
		u, err = user.LookupId(name)
	}
	if err != nil {
		return User{}, fmt.Errorf("user %q: %w", name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return User{UID: uid, GID: gid, Home: u.HomeDir}, nil
}

// lookPath finds file in env's PATH.
func lookPath(file string, env []string) (string, error) {
	pathVar := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathVar = v
		}
	}
	for _, dir := range strings.Split(pathVar, ":") {
		if dir == "" {
			dir = "."
		}
		p := dir + "/" + file
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w", file, exec.ErrNotFound)
}
