package initd

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/net/netutil"

	"github.com/fireworks-sandbox/fireworks/internal/guest/envd"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// serveEnvd serves E2B's in-sandbox API (package envd) on the guest's network, port
// envd.Port, with the identity's token; a later identity (a fork's) gives the running
// server its own token.
func (s *Server) serveEnvd(cfg proto.Envd, env []string) error {
	if cfg.Token == "" || len(cfg.Token) > proto.MaxEnvdToken {
		return errors.New("envd: a token of 1 to 256 bytes is needed")
	}
	// Its processes' environment: the sandbox's (its image's and its spec's, as its main
	// process has), over the identity's.
	env = mergeEnv(env, cfg.Env)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.envdNonRoot = cfg.NonRoot
	if s.envd != nil {
		s.envd.SetAccess(cfg.Token, cfg.User, cfg.Dir, env)
		return nil
	}
	addr := s.opts.EnvdAddr
	if addr == "" {
		addr = ":" + strconv.Itoa(envd.Port)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("envd: %w", err)
	}
	s.envdAddr = ln.Addr().String()
	// Whoever reaches the port may try, token or not: what a connection can make PID 1
	// hold before the token is checked is bounded (headers, idle connections, their
	// number), or a peer could exhaust init's memory or descriptors and end the guest.
	ln = netutil.LimitListener(ln, maxEnvdConns)
	// The kernel refuses root a link planted by another user in a sticky directory
	// (/tmp), as distributions set it (envd acts as its callers' users besides).
	for _, f := range []string{"/proc/sys/fs/protected_symlinks", "/proc/sys/fs/protected_hardlinks"} {
		_ = os.WriteFile(f, []byte("1"), 0o644)
	}
	srv := envd.New(envd.Config{Spawner: envdSpawner{s: s}, AccessToken: cfg.Token, Env: env, DefaultUser: cfg.User, DefaultDir: cfg.Dir, Log: s.log})
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 16 << 10, IdleTimeout: time.Minute}
	s.envd = srv
	go func() { _ = hs.Serve(ln) }() // for the guest's life: init never ends
	s.log.Info("envd listening", "port", envd.Port)
	return nil
}

// EnvdAddr is the address envd listens on ("" before it does).
func (s *Server) EnvdAddr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.envdAddr
}

// maxEnvdConns bounds envd's connections at once (more wait in the backlog).
const maxEnvdConns = 128

// envdSpawner starts envd's processes as init starts a session's: through the reaper
// (init is PID 1 and reaps every child), as the user asked for.
type envdSpawner struct{ s *Server }

func (sp envdSpawner) User(name string) (envd.User, error) {
	u, err := sp.resolve(name)
	if err != nil {
		return envd.User{}, err
	}
	return envd.User{UID: int(u.UID), GID: int(u.GID), Home: u.Home}, nil
}

// resolve is the user envd acts as for name; never root in a runAsNonRoot sandbox.
func (sp envdSpawner) resolve(name string) (execUser, error) {
	u, err := resolveUser(sp.s.opts.Root, name)
	if err != nil {
		return u, err
	}
	sp.s.mu.Lock()
	nonRoot := sp.s.envdNonRoot
	sp.s.mu.Unlock()
	if nonRoot && u.UID == 0 {
		return execUser{}, fmt.Errorf("runAsNonRoot: user %q is root (uid 0)", name)
	}
	return u, nil
}

func (sp envdSpawner) Spawn(c envd.Cmd) (int, <-chan envd.Exit, error) {
	u, err := sp.resolve(c.User)
	if err != nil {
		return 0, nil, err
	}
	env := c.Env
	pathList, ok := getEnv(env, "PATH")
	if !ok {
		pathList = defaultPath
		env = append(env, "PATH="+defaultPath)
	}
	dir := c.Dir
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return 0, nil, fmt.Errorf("working directory %s: not a directory", dir)
	}
	path, err := lookPath(c.Path, pathList, dir)
	if err != nil {
		return 0, nil, err
	}
	sys := &syscall.SysProcAttr{Setsid: true, Setctty: c.TTY}
	if os.Geteuid() == 0 {
		sys.Credential = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
	}
	attr := &syscall.ProcAttr{Dir: dir, Env: env, Files: []uintptr{c.Stdin.Fd(), c.Stdout.Fd(), c.Stderr.Fd()}, Sys: sys}
	pid, ws, err := sp.s.reaper.start(func() (int, error) { return syscall.ForkExec(path, c.Args, attr) })
	if err != nil {
		return 0, nil, err
	}
	out := make(chan envd.Exit, 1)
	go func() {
		w := <-ws
		if w.Signaled() {
			out <- envd.Exit{Code: 128 + int(w.Signal()), Signal: int(w.Signal())}
			return
		}
		out <- envd.Exit{Code: w.ExitStatus()}
	}()
	return pid, out, nil
}
