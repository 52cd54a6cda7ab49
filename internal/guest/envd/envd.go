// Package envd is the guest side of E2B's in-sandbox API, as the e2b SDK speaks it:
// Connect-RPC process.Process and filesystem.Filesystem, HTTP /files and /health, on
// port 49983 of a sandbox. fireworks-init serves it (no process of its own in the image);
// processes it starts go through init's spawner (init is PID 1 and reaps every child).
//
// The caller's access token (X-Access-Token) is checked when the sandbox has one; the
// user a call acts as comes in an HTTP Basic Authorization header ("user:"), as the SDK
// sends it, and defaults to the image's user.
package envd

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/filesystempb/filesystempbconnect"
	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/processpb/processpbconnect"
)

// Port is where a sandbox serves envd (the SDK's).
const Port = 49983

// Version is the envd version reported to the SDK, which switches behaviour on it (from
// 0.4.0 it sends the user only when asked for one).
const Version = "0.5.7"

// Cmd is a process to start.
type Cmd struct {
	Path string // resolved by the spawner in the process's PATH if it has no slash
	Args []string
	Env  []string
	Dir  string
	// User names the user to run as ("" the image's): a name or uid[:gid].
	User string
	// Stdin, Stdout and Stderr are the process's (the terminal's slave, with TTY).
	Stdin, Stdout, Stderr *os.File
	// TTY: Stdin is a terminal, which becomes the process's controlling terminal in a
	// session of its own.
	TTY bool
}

// Spawner starts processes: init's, which reaps every process of the guest.
type Spawner interface {
	// Spawn starts c and returns its pid and a channel that gets its wait status once.
	Spawn(c Cmd) (pid int, exited <-chan Exit, err error)
	// User resolves a user as Cmd.User names one ("" the image's).
	User(name string) (User, error)
}

// User is who a call acts as: files it makes are theirs, paths are relative to Home.
type User struct {
	UID, GID int
	Home     string
}

// Exit is how a process ended: its exit code, or the signal that ended it.
type Exit struct {
	Code   int
	Signal int
}

// Config configures a Server.
type Config struct {
	Spawner Spawner
	// AccessToken, if set, must come with every call (X-Access-Token).
	AccessToken string
	// Env is the sandbox's environment, every process's base.
	Env []string
	// DefaultUser is the user of calls that name none ("" root).
	DefaultUser string
	// DefaultDir is the working directory of processes started without one ("" the
	// user's home).
	DefaultDir string
	Log        *slog.Logger
}

// Server is a sandbox's envd.
type Server struct {
	accessMu sync.RWMutex
	cfg      Config
	log      *slog.Logger
	procs    *processes
	mux      http.Handler

	watchMu  sync.Mutex
	watchers map[string]*watcher
}

// New makes the server; Handler serves it.
func New(cfg Config) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Log, procs: newProcesses(), watchers: map[string]*watcher{}}
	mux := http.NewServeMux()
	mux.Handle(processpbconnect.NewProcessHandler(&processService{s: s}, connect.WithReadMaxBytes(maxMessage)))
	mux.Handle(filesystempbconnect.NewFilesystemHandler(&filesystemService{s: s}, connect.WithReadMaxBytes(maxMessage)))
	mux.HandleFunc("/files", s.files)
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	s.mux = mux
	return s
}

// maxMessage bounds one RPC message (a SendInput's data, a path).
const maxMessage = 4 << 20

// Handler is the server's HTTP handler: every call but /health needs the access token.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.accessMu.RLock()
		want := s.cfg.AccessToken
		s.accessMu.RUnlock()
		if r.URL.Path != "/health" && want != "" {
			got := r.Header.Get("X-Access-Token")
			signed := got == "" && r.URL.Path == "/files" && r.URL.Query().Has("signature")
			if signed && !validSignature(r, want, time.Now()) {
				http.Error(w, "invalid or expired signature", http.StatusUnauthorized)
				return
			}
			if !signed && subtle.ConstantTimeCompare([]byte(got), []byte(want)) != 1 {
				http.Error(w, "missing or wrong X-Access-Token", http.StatusUnauthorized)
				return
			}
		}
		s.mux.ServeHTTP(w, r)
	})
}

// SetAccess replaces the access token, the default user and working directory and the
// environment (a fork of a sandbox, or a sandbox started from a template's snapshot, is a
// sandbox of its own, with a token and environment of its own).
func (s *Server) SetAccess(token, defaultUser, defaultDir string, env []string) {
	s.accessMu.Lock()
	s.cfg.AccessToken, s.cfg.DefaultUser, s.cfg.DefaultDir, s.cfg.Env = token, defaultUser, defaultDir, slices.Clone(env)
	s.accessMu.Unlock()
}

// Close ends what the server started: its processes (killed) and watchers.
func (s *Server) Close() {
	s.procs.killAll()
	s.watchMu.Lock()
	for id, w := range s.watchers {
		w.close()
		delete(s.watchers, id)
	}
	s.watchMu.Unlock()
}

// userOf is the user a call acts as: the Basic authorization's user name, or the
// sandbox's default.
func (s *Server) userOf(h http.Header) string {
	if a, ok := strings.CutPrefix(h.Get("Authorization"), "Basic "); ok {
		if b, err := base64.StdEncoding.DecodeString(a); err == nil {
			if u, _, _ := strings.Cut(string(b), ":"); u != "" {
				return u
			}
		}
	}
	s.accessMu.RLock()
	defer s.accessMu.RUnlock()
	return s.cfg.DefaultUser
}

// resolvePath is path as a call names it: relative to the user's home, "~" expanded.
func (s *Server) resolvePath(h http.Header, path string) (string, error) {
	if path == "" {
		return "", connect.NewError(connect.CodeInvalidArgument, errors.New("no path given"))
	}
	if len(path) > 4096 || strings.ContainsRune(path, 0) {
		return "", connect.NewError(connect.CodeInvalidArgument, errors.New("not a path"))
	}
	u, err := s.cfg.Spawner.User(s.userOf(h))
	if err != nil {
		return "", connect.NewError(connect.CodeInvalidArgument, err)
	}
	home := u.Home
	if path == "~" {
		return home, nil
	}
	if rest, ok := strings.CutPrefix(path, "~/"); ok {
		path = home + "/" + rest
	}
	if !strings.HasPrefix(path, "/") {
		path = home + "/" + path
	}
	return path, nil
}

var errNotRunning = errors.New("no such process")

// validSignature checks the signature of a file URL the SDK made (uploadUrl,
// downloadUrl): "v1_" and the unpadded base64 SHA-256 of
// "path:operation:user:token[:expiration]", operation "read" for GET and "write" for
// POST, expiration (Unix seconds), if given, not past. Whoever holds the URL may do that
// one operation on that path as that user, until then.
func validSignature(r *http.Request, token string, now time.Time) bool {
	q := r.URL.Query()
	op := "read"
	if r.Method == http.MethodPost {
		op = "write"
	}
	raw := q.Get("path") + ":" + op + ":" + q.Get("username") + ":" + token
	if exp := q.Get("signature_expiration"); exp != "" {
		n, err := strconv.ParseInt(exp, 10, 64)
		if err != nil || now.Unix() > n {
			return false
		}
		raw += ":" + exp
	}
	sum := sha256.Sum256([]byte(raw))
	want := "v1_" + strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "=")
	return subtle.ConstantTimeCompare([]byte(q.Get("signature")), []byte(want)) == 1
}
