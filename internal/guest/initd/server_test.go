package initd_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/initd"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// fakeSystem records privileged requests instead of mounting anything.
type fakeSystem struct {
	mu       sync.Mutex
	setups   []proto.Setup
	times    []proto.SetTime
	hosts    []string
	dns      [][]string
	killAll  int
	poweroff int
	frozen   bool
	freezes  int
	volumes  []proto.VolumeMount
}

func (f *fakeSystem) Freeze() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.frozen = true
	f.freezes++
	return nil
}

func (f *fakeSystem) Thaw() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.frozen = false
	return nil
}

func (f *fakeSystem) KillAll(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.killAll++
	return nil
}

func (f *fakeSystem) SetHostname(name string, _ []proto.HostEntry) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hosts = append(f.hosts, name)
	return nil
}

func (f *fakeSystem) SetNameservers(servers []string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dns = append(f.dns, servers)
	return nil
}

func (f *fakeSystem) Setup(_ context.Context, s proto.Setup) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.setups = append(f.setups, s)
	return nil
}

func (f *fakeSystem) SetTime(_ context.Context, t proto.SetTime) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.times = append(f.times, t)
	return nil
}

func (f *fakeSystem) MountVolumes(vols []proto.VolumeMount) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.volumes = append(f.volumes, vols...)
	return nil
}

func (f *fakeSystem) PowerOff(context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.poweroff++
}

// socketPair returns the two ends of a unix stream socket pair, the same
// kind of byte stream the host gets from QEMU.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

type guest struct {
	srv *initd.Server
	sys *fakeSystem
	wg  sync.WaitGroup
}

func newGuest(t *testing.T, opts initd.Options) *guest {
	t.Helper()
	g := &guest{sys: &fakeSystem{}}
	if opts.System == nil {
		opts.System = g.sys
	}
	g.srv = initd.NewServer(opts)
	t.Cleanup(func() {
		g.wg.Wait()
		g.srv.Close()
	})
	return g
}

// connect serves a new connection and returns the handshaken client.
func (g *guest) connect(t *testing.T) *client.Client {
	t.Helper()
	c, _ := g.connectServe(t)
	return c
}

// connectServe is connect that also returns a channel closed when the
// guest is done with the connection (its sessions are detached).
func (g *guest) connectServe(t *testing.T) (*client.Client, <-chan struct{}) {
	t.Helper()
	host, guestEnd := socketPair(t)
	g.wg.Add(1)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer g.wg.Done()
		defer close(served)
		_ = g.srv.ServeConn(ctx, guestEnd)
	}()
	hctx, hcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer hcancel()
	c, err := client.Handshake(hctx, host)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		cancel()
	})
	return c, served
}

func startGuest(t *testing.T) (*guest, *client.Client) {
	g := newGuest(t, initd.Options{InitVersion: "test-1"})
	return g, g.connect(t)
}

type result struct {
	stdout, stderr string
	status         proto.ExitStatus
}

// run executes req, feeding stdin if non-nil, and collects everything.
func run(t *testing.T, c *client.Client, req proto.ExecRequest, stdin io.Reader) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if stdin != nil {
		req.Stdin = true
	}
	s, err := c.Exec(ctx, req)
	if err != nil {
		t.Fatalf("exec %v: %v", req.Argv, err)
	}
	var out, errb bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _, _ = io.Copy(&out, s.Stdout()) }()
	go func() { defer wg.Done(); _, _ = io.Copy(&errb, s.Stderr()) }()
	if stdin != nil {
		go func() {
			_, _ = io.Copy(s.Stdin(), stdin)
			_ = s.Stdin().Close()
		}()
	}
	st, err := s.Wait(ctx)
	if err != nil {
		t.Fatalf("wait %v: %v", req.Argv, err)
	}
	wg.Wait()
	return result{out.String(), errb.String(), st}
}

func sh(script string) proto.ExecRequest {
	return proto.ExecRequest{Argv: []string{"/bin/sh", "-c", script}}
}

func TestHandshakeReportsGuestInfo(t *testing.T) {
	_, c := startGuest(t)
	info := c.GuestInfo()
	if info.ProtocolVersion != proto.Version || info.InitVersion != "test-1" || info.KernelRelease == "" {
		t.Fatalf("guest info = %+v", info)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestExecSeparatesStreamsAndExitCodes(t *testing.T) {
	_, c := startGuest(t)
	r := run(t, c, sh("echo out; echo err >&2; exit 3"), nil)
	if r.stdout != "out\n" || r.stderr != "err\n" || r.status.Code != 3 || r.status.ErrKind != "" {
		t.Fatalf("got %+v", r)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"true"}}, nil)
	if r.status != (proto.ExitStatus{}) {
		t.Fatalf("true: got %+v", r.status)
	}
}

func TestExecNotFound(t *testing.T) {
	_, c := startGuest(t)
	for _, argv0 := range []string{"fireworks-no-such-command", "/nonexistent/bin/x"} {
		r := run(t, c, proto.ExecRequest{Argv: []string{argv0}}, nil)
		if r.status.ErrKind != proto.ErrKindNotFound || r.status.Code != 127 {
			t.Errorf("%s: got %+v", argv0, r.status)
		}
	}
}

func TestExecNotExecutable(t *testing.T) {
	_, c := startGuest(t)
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("echo hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, argv0 := range []string{plain, dir} {
		r := run(t, c, proto.ExecRequest{Argv: []string{argv0}}, nil)
		if r.status.ErrKind != proto.ErrKindNotExecutable || r.status.Code != 126 {
			t.Errorf("%s: got %+v", argv0, r.status)
		}
	}
	// Found in PATH but not executable is 126 too, like execvp's EACCES.
	r := run(t, c, proto.ExecRequest{Argv: []string{"plain"}, Env: []string{"PATH=" + dir}}, nil)
	if r.status.ErrKind != proto.ErrKindNotExecutable {
		t.Errorf("plain in PATH: got %+v", r.status)
	}
}

func TestExecResolvesPathFromSessionEnv(t *testing.T) {
	_, c := startGuest(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "fw-hello"), []byte("#!/bin/sh\necho \"hello $1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := run(t, c, proto.ExecRequest{Argv: []string{"fw-hello", "world"}, Env: []string{"PATH=/nonexistent:" + dir}}, nil)
	if r.stdout != "hello world\n" || r.status.Code != 0 {
		t.Fatalf("got %+v", r)
	}
}

func TestExecKilledBySignal(t *testing.T) {
	_, c := startGuest(t)
	r := run(t, c, sh("kill -KILL $$"), nil)
	if r.status.Signal != 9 || r.status.Code != 137 {
		t.Fatalf("self-kill: got %+v", r.status)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c.Exec(ctx, sh("echo started; exec sleep 100"))
	if err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 8)
	if _, err := io.ReadFull(s.Stdout(), line); err != nil || string(line) != "started\n" {
		t.Fatalf("reading start line: %q %v", line, err)
	}
	if err := s.Signal(ctx, int(syscall.SIGTERM)); err != nil {
		t.Fatal(err)
	}
	st, err := s.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Signal != int(syscall.SIGTERM) || st.Code != 128+int(syscall.SIGTERM) {
		t.Fatalf("SIGTERM: got %+v", st)
	}
}

func TestExecStdin(t *testing.T) {
	_, c := startGuest(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"cat"}}, strings.NewReader("hello stdin\n"))
	if r.stdout != "hello stdin\n" || r.status.Code != 0 {
		t.Fatalf("got %+v", r)
	}
	// More than the window in both directions at once.
	big := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB
	r = run(t, c, sh("sha256sum"), bytes.NewReader(big))
	want := fmt.Sprintf("%x", sha256.Sum256(big))
	if !strings.HasPrefix(r.stdout, want) {
		t.Fatalf("sha256 of stdin: got %q, want %s", r.stdout, want)
	}
	// Without Stdin the process reads /dev/null.
	r = run(t, c, sh("cat; echo rc=$?"), nil)
	if r.stdout != "rc=0\n" {
		t.Fatalf("no stdin: got %+v", r)
	}
}

func TestExecLargeOutputIntact(t *testing.T) {
	_, c := startGuest(t)
	data := make([]byte, 10<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>11)
	}
	path := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	// Both streams at once, so their windows must be independent.
	r := run(t, c, sh(fmt.Sprintf("cat %s & cat %s >&2; wait", path, path)), nil)
	want := sha256.Sum256(data)
	if sha256.Sum256([]byte(r.stdout)) != want || sha256.Sum256([]byte(r.stderr)) != want {
		t.Fatalf("output differs: stdout %d bytes, stderr %d bytes, want %d", len(r.stdout), len(r.stderr), len(data))
	}
}

func TestExecTTY(t *testing.T) {
	if _, err := os.Stat("/dev/ptmx"); err != nil {
		testutil.Skipf(t, "/dev/ptmx not available")
	}
	_, c := startGuest(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"/bin/sh", "-c", "tty; stty size; echo err >&2; echo TERM=$TERM"}, TTY: true, Rows: 30, Cols: 100}, nil)
	if !strings.Contains(r.stdout, "/dev/pts/") || !strings.Contains(r.stdout, "30 100") ||
		!strings.Contains(r.stdout, "err") || !strings.Contains(r.stdout, "TERM=xterm") || r.stderr != "" {
		t.Fatalf("got %+v", r)
	}

	// Resize, then let the process look.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"/bin/sh", "-c", "read x; stty size"}, TTY: true, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	done := make(chan struct{})
	go func() { defer close(done); _, _ = io.Copy(&out, s.Stdout()) }()
	if err := s.Resize(ctx, 50, 132); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stdin().Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	st, err := s.Wait(ctx)
	<-done
	if err != nil || st.Code != 0 || !strings.Contains(out.String(), "50 132") {
		t.Fatalf("after resize: %q %+v %v", out.String(), st, err)
	}
}

func TestConcurrentSessions(t *testing.T) {
	_, c := startGuest(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := run(t, c, sh(fmt.Sprintf("for j in $(seq 1 2000); do echo s%d-$j; done; exit %d", i, i)), nil)
			var want strings.Builder
			for j := 1; j <= 2000; j++ {
				fmt.Fprintf(&want, "s%d-%d\n", i, j)
			}
			if r.stdout != want.String() || r.status.Code != i {
				errs <- fmt.Errorf("session %d: %d bytes, status %+v", i, len(r.stdout), r.status)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestExecWorkdirAndEnv(t *testing.T) {
	g, c := startGuest(t)
	ctx := context.Background()
	if err := c.Setup(ctx, proto.Setup{Hostname: "h1", Env: []string{"A=base", "B=base"}}); err != nil {
		t.Fatal(err)
	}
	if len(g.sys.setups) != 1 || g.sys.setups[0].Hostname != "h1" {
		t.Fatalf("setup not passed to system: %+v", g.sys.setups)
	}
	dir := t.TempDir()
	r := run(t, c, proto.ExecRequest{Argv: []string{"/bin/sh", "-c", "pwd; echo $A $B; echo ${HOME:-none}"}, Dir: dir, Env: []string{"B=exec"}}, nil)
	if r.stdout != dir+"\nbase exec\n/root\n" && r.stdout != dir+"\nbase exec\n/\n" {
		t.Fatalf("got %q", r.stdout)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"pwd"}, Dir: "/nonexistent-fireworks"}, nil)
	if r.status.ErrKind != proto.ErrKindSetup {
		t.Fatalf("bad workdir: %+v", r.status)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"pwd"}, Dir: "relative"}, nil)
	if r.status.ErrKind != proto.ErrKindSetup {
		t.Fatalf("relative workdir: %+v", r.status)
	}
	newDir := filepath.Join(dir, "a", "b")
	r = run(t, c, proto.ExecRequest{Argv: []string{"pwd"}, Dir: newDir, CreateDir: true}, nil)
	if r.stdout != newDir+"\n" {
		t.Fatalf("create dir: %+v", r)
	}
}

func TestUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "switching users needs root")
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	passwd := "root:x:0:0:root:/root:/bin/sh\nalice:x:1234:1235:Alice:/home/alice:/bin/sh\n"
	group := "root:x:0:\nalice:x:1235:\nstaff:x:1236:bob,alice\nother:x:1237:bob\n"
	if err := os.WriteFile(filepath.Join(root, "etc/passwd"), []byte(passwd), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/group"), []byte(group), 0o644); err != nil {
		t.Fatal(err)
	}
	g := newGuest(t, initd.Options{Root: root})
	c := g.connect(t)
	script := `echo "$(id -u) $(id -g) $(id -G) $HOME"`
	cases := []struct{ user, want string }{
		{"alice", "1234 1235 1235 1236 /home/alice"},
		{"1234", "1234 1235 1235 1236 /home/alice"},
		{"alice:staff", "1234 1236 1236 /home/alice"},
		{"4321", "4321 0 0 /"},
		{"4321:4322", "4321 4322 4322 /"},
		{"", "0 0 0 /root"},
	}
	for _, tc := range cases {
		req := sh(script)
		req.User = tc.user
		r := run(t, c, req, nil)
		if strings.TrimSpace(r.stdout) != tc.want {
			t.Errorf("user %q: got %q (%+v), want %q", tc.user, r.stdout, r.status, tc.want)
		}
	}
	// The working directory is entered before privileges are dropped, as runc does: a
	// user who may not enter it still runs there (`-u 1234 -w /root`), and the process
	// may still use what its permissions allow.
	private := filepath.Join(t.TempDir(), "private")
	if err := os.Mkdir(private, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, user := range []string{"1234:5678", "alice", "4321"} {
		req := proto.ExecRequest{Argv: []string{"/bin/sh", "-c", "pwd; id -u; ls . >/dev/null 2>&1 || echo cannot-list"}, Dir: private, User: user}
		r := run(t, c, req, nil)
		if r.status.Code != 0 || r.status.ErrKind != "" || !strings.HasPrefix(r.stdout, private+"\n") || !strings.HasSuffix(r.stdout, "cannot-list\n") {
			t.Errorf("user %q in a 0700 root directory: %+v stdout %q stderr %q", user, r.status, r.stdout, r.stderr)
		}
	}
	// The process's working directory change stays on the thread that forked: the
	// server's own directory is unchanged.
	if wd, _ := os.Getwd(); wd == private {
		t.Errorf("the server's working directory moved to %s", wd)
	}
	for _, bad := range []string{"bob", "alice:nogroup", ":1", "alice:"} {
		req := sh("true")
		req.User = bad
		if r := run(t, c, req, nil); r.status.ErrKind != proto.ErrKindSetup {
			t.Errorf("user %q: got %+v, want setup error", bad, r.status)
		}
	}
}

func TestIdentity(t *testing.T) {
	g, c := startGuest(t)
	ctx := context.Background()
	var gerr *client.GuestError
	if err := c.Identity(ctx, proto.Identity{Hostname: "x"}); !errors.As(err, &gerr) || !strings.Contains(err.Error(), "before setup") {
		t.Fatalf("identity before setup: got %v, want a guest error", err)
	}
	// A failed identity does not leave the exec sent behind it running.
	marker := filepath.Join(t.TempDir(), "ran")
	if _, err := c.IdentityAndExec(ctx, proto.Identity{Hostname: "x"}, proto.ExecRequest{Argv: []string{"sh", "-c", "sleep 1; touch " + marker}}); !errors.As(err, &gerr) {
		t.Fatalf("identity+exec before setup: got %v, want the identity's guest error", err)
	}
	time.Sleep(1500 * time.Millisecond)
	if _, err := os.Stat(marker); err == nil {
		t.Error("the exec behind a failed identity kept running")
	}
	if err := c.Setup(ctx, proto.Setup{Hostname: "pool", Env: []string{"A=pool"}}); err != nil {
		t.Fatal(err)
	}
	// Identity may be applied more than once (a claimed VM, then e.g. a rename).
	for _, h := range []string{"sb-1", "sb-2"} {
		if err := c.Identity(ctx, proto.Identity{Hostname: h, Env: []string{"A=" + h}, TimeUnixNano: 7, Entropy: []byte{9}}); err != nil {
			t.Fatal(err)
		}
	}
	s, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"sh", "-c", "echo $A"}})
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(s.Stdout())
	if _, err := s.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(out)) != "sb-2" {
		t.Errorf("exec after identity sees A=%q, want sb-2", out)
	}
	// Identity and exec sent back to back: the exec runs with the new identity.
	s, err = c.IdentityAndExec(ctx, proto.Identity{Hostname: "sb-3", Env: []string{"A=sb-3"}}, proto.ExecRequest{Argv: []string{"sh", "-c", "echo $A"}})
	if err != nil {
		t.Fatal(err)
	}
	out, _ = io.ReadAll(s.Stdout())
	if _, err := s.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(out)) != "sb-3" {
		t.Errorf("pipelined exec sees A=%q, want sb-3", out)
	}
	g.sys.mu.Lock()
	defer g.sys.mu.Unlock()
	if len(g.sys.hosts) != 3 || g.sys.hosts[1] != "sb-2" || len(g.sys.times) != 3 || g.sys.times[1].TimeUnixNano != 7 || string(g.sys.times[1].Entropy) != "\x09" {
		t.Errorf("system saw hosts=%v times=%+v", g.sys.hosts, g.sys.times)
	}
}

func TestControlRequests(t *testing.T) {
	g, c := startGuest(t)
	ctx := context.Background()
	if err := c.Setup(ctx, proto.Setup{Hostname: "a"}); err != nil {
		t.Fatal(err)
	}
	var gerr *client.GuestError
	if err := c.Setup(ctx, proto.Setup{Hostname: "b"}); !errors.As(err, &gerr) {
		t.Fatalf("second setup: got %v, want a guest error", err)
	}
	if err := c.SetTime(ctx, proto.SetTime{TimeUnixNano: 42, Entropy: []byte{1, 2}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("connection still open after shutdown")
	}
	g.sys.mu.Lock()
	defer g.sys.mu.Unlock()
	if len(g.sys.setups) != 1 || len(g.sys.times) != 1 || g.sys.times[0].TimeUnixNano != 42 || g.sys.poweroff != 1 {
		t.Fatalf("system saw setups=%d times=%+v poweroff=%d", len(g.sys.setups), g.sys.times, g.sys.poweroff)
	}
}

func TestSessionSurvivesDisconnect(t *testing.T) {
	// Without reattach, output while disconnected must be drained at once,
	// or the process would block.
	g := newGuest(t, initd.Options{ReattachGrace: -1})
	c1 := g.connect(t)
	marker := filepath.Join(t.TempDir(), "marker")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c1.Exec(ctx, sh(fmt.Sprintf("sleep 0.5; head -c 3000000 /dev/zero; touch %s", marker)))
	if err != nil {
		t.Fatal(err)
	}
	c1.Close()
	if _, err := s.Wait(ctx); err == nil {
		t.Fatal("Wait after Close: want an error")
	}

	c2 := g.connect(t)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("detached session did not finish")
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := run(t, c2, sh("echo again"), nil)
	if r.stdout != "again\n" {
		t.Fatalf("after reconnect: %+v", r)
	}
}

func TestAbandonedSessionDoesNotBlock(t *testing.T) {
	_, c := startGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c.Exec(ctx, sh("head -c 5000000 /dev/zero; exit 4"))
	if err != nil {
		t.Fatal(err)
	}
	s.Close() // nobody reads stdout
	st, err := s.Wait(ctx)
	if err != nil || st.Code != 4 {
		t.Fatalf("got %+v %v", st, err)
	}
}

func TestBackgroundChildDoesNotHoldSession(t *testing.T) {
	_, c := startGuest(t)
	// The child keeps stdout open; the session still ends when sh exits.
	r := run(t, c, sh("echo parent; (sleep 3) & exit 0"), nil)
	if r.stdout != "parent\n" || r.status.Code != 0 {
		t.Fatalf("got %+v", r)
	}
}

// TestNetworkRequestsValidated: bad network settings are refused before the guest is
// touched (a refused Setup can be sent again), and Identity touches resolv.conf only when
// it carries nameservers.
func TestNetworkRequestsValidated(t *testing.T) {
	g, c := startGuest(t)
	ctx := context.Background()
	for _, bad := range []proto.Setup{
		{Net: &proto.NetConfig{Address: "169.254.0.21", Gateway: "169.254.0.22"}},
		{Net: &proto.NetConfig{Address: "fd00::2/64", Gateway: "fd00::1"}},
		{Net: &proto.NetConfig{Address: "169.254.0.21/30", Gateway: "10.0.0.1"}},
		{Nameservers: []string{"1.1.1.1", "8.8.8.8", "9.9.9.9", "1.0.0.1"}},
		{Nameservers: []string{"2606:4700:4700::1111"}},
	} {
		err := c.Setup(ctx, bad)
		var gerr *client.GuestError
		if !errors.As(err, &gerr) || !strings.Contains(err.Error(), "setup: ") {
			t.Errorf("setup %+v: got %v, want the guest to refuse it", bad, err)
		}
	}
	good := proto.Setup{Hostname: "n", Net: &proto.NetConfig{Address: "169.254.0.21/30", Gateway: "169.254.0.22"}, Nameservers: []string{"169.254.0.22"}}
	if err := c.Setup(ctx, good); err != nil {
		t.Fatalf("a corrected setup after refused ones: %v", err)
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "a", Nameservers: []string{"not-an-ip"}}); err == nil || !strings.Contains(err.Error(), "not-an-ip") {
		t.Errorf("identity with a bad nameserver: %v", err)
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "b"}); err != nil {
		t.Fatal(err)
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "c", Nameservers: []string{"10.0.0.53"}}); err != nil {
		t.Fatal(err)
	}
	g.sys.mu.Lock()
	defer g.sys.mu.Unlock()
	if len(g.sys.setups) != 1 || g.sys.setups[0].Net == nil || g.sys.setups[0].Net.Gateway != "169.254.0.22" {
		t.Errorf("system saw setups %+v", g.sys.setups)
	}
	if len(g.sys.dns) != 1 || len(g.sys.dns[0]) != 1 || g.sys.dns[0][0] != "10.0.0.53" {
		t.Errorf("system was asked to write nameservers %v, want only the last identity's", g.sys.dns)
	}
	if len(g.sys.hosts) != 2 || g.sys.hosts[0] != "b" {
		t.Errorf("a refused identity changed the hostname: %v", g.sys.hosts)
	}
}

// Init serves envd once an identity asks for it, with that identity's token; a later
// identity (a fork's) replaces the token: the first one opens nothing from then on.
func TestEnvdTokenFollowsIdentity(t *testing.T) {
	g := newGuest(t, initd.Options{InitVersion: "test-1", EnvdAddr: "127.0.0.1:0"})
	c := g.connect(t)
	ctx := context.Background()
	if err := c.Setup(ctx, proto.Setup{Hostname: "pool"}); err != nil {
		t.Fatal(err)
	}
	if g.srv.EnvdAddr() != "" {
		t.Fatal("envd listens before an identity asked for it")
	}
	status := func(token string) int {
		req, _ := http.NewRequest(http.MethodGet, "http://"+g.srv.EnvdAddr()+"/files?path=/etc/hostname", nil)
		req.Header.Set("X-Access-Token", token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "source", Envd: &proto.Envd{Token: "source-token"}}); err != nil {
		t.Fatal(err)
	}
	if got := status("source-token"); got != http.StatusOK {
		t.Fatalf("the source's token: %d", got)
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "fork", Envd: &proto.Envd{Token: "fork-token"}}); err != nil {
		t.Fatal(err)
	}
	if got, got2 := status("source-token"), status("fork-token"); got != http.StatusUnauthorized || got2 != http.StatusOK {
		t.Fatalf("after the fork's identity: the source's token %d (want 401), the fork's %d", got, got2)
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "x", Envd: &proto.Envd{}}); err == nil {
		t.Fatal("an identity with an empty envd token was taken")
	}
}

// runAsNonRoot: a process whose user resolves to uid 0 (none given, "root", "0:0") is not
// started, and says why; another user is.
func TestExecNonRoot(t *testing.T) {
	if os.Getuid() != 0 {
		testutil.Skipf(t, "running as another user needs root (setuid in the test guest)")
	}
	_, c := startGuest(t)
	for _, user := range []string{"", "root", "0:0"} {
		r := run(t, c, proto.ExecRequest{Argv: []string{"id", "-u"}, User: user, NonRoot: true}, nil)
		if r.status.ErrKind != proto.ErrKindSetup || !strings.Contains(r.status.Err, "runAsNonRoot") || r.stdout != "" {
			t.Errorf("user %q with NonRoot: %+v", user, r)
		}
	}
	// Init's built-in that runs as root is refused too.
	if r := run(t, c, proto.ExecRequest{Argv: []string{proto.BuildCommand}, NonRoot: true}, nil); r.status.ErrKind != proto.ErrKindSetup || !strings.Contains(r.status.Err, "runAsNonRoot") {
		t.Errorf("the build built-in with NonRoot: %+v", r)
	}
	r := run(t, c, proto.ExecRequest{Argv: []string{"id", "-u"}, User: "65534", NonRoot: true}, nil)
	if r.status != (proto.ExitStatus{}) || r.stdout != "65534\n" {
		t.Errorf("uid 65534 with NonRoot: %+v", r)
	}
}
