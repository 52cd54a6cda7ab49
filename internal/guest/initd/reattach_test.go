package initd_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/initd"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// waitFor polls cond until it holds, failing the test after a generous
// deadline (a liveness bound, not a timing assertion).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func exists(path string) func() bool {
	return func() bool { _, err := os.Stat(path); return err == nil }
}

// gone reports whether pid was reaped (the tests' guest runs on the host).
func gone(pid int) func() bool {
	return func() bool { return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) }
}

// collect drains both streams of s and waits for its exit.
func collect(t *testing.T, ctx context.Context, s *client.Session) result {
	t.Helper()
	var out, errb bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _, _ = io.Copy(&out, s.Stdout()) }()
	go func() { defer wg.Done(); _, _ = io.Copy(&errb, s.Stderr()) }()
	st, err := s.Wait(ctx)
	if err != nil {
		t.Fatalf("wait for session %d: %v", s.ID(), err)
	}
	wg.Wait()
	return result{out.String(), errb.String(), st}
}

func seqLines(from, to int) string {
	var b strings.Builder
	for i := from; i <= to; i++ {
		fmt.Fprintf(&b, "%d\n", i)
	}
	return b.String()
}

// startDetachable starts script on a fresh connection, reads its first
// line ("hello") there, then drops the connection and waits until the
// guest has detached the session. It returns the session's id and pid.
func startDetachable(t *testing.T, g *guest, req proto.ExecRequest) (uint32, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c1, served := g.connectServe(t)
	s, err := c1.Exec(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 6)
	// A TTY makes it "hello\r\n"; the rest does not matter here.
	if _, err := io.ReadFull(s.Stdout(), line); err != nil || !strings.HasPrefix(string(line), "hello") {
		t.Fatalf("first line on the first connection: %q %v", line, err)
	}
	c1.Close()
	<-served
	return s.ID(), s.Pid()
}

func TestReattachResumesOutputAndExit(t *testing.T) {
	g := newGuest(t, initd.Options{})
	dir := t.TempDir()
	goFile, mid := filepath.Join(dir, "go"), filepath.Join(dir, "mid")
	// Once detached: a little output that fits the pipe (so the process
	// gets to touch mid), then ~1.3 MB that can only get through once a
	// host reattaches, on both streams.
	id, _ := startDetachable(t, g, sh(fmt.Sprintf(
		"echo hello; while [ ! -e %s ]; do sleep 0.01; done; seq 1 2000; echo detached >&2; touch %s; seq 2001 200000; echo end >&2; exit 7",
		goFile, mid)))
	if err := os.WriteFile(goFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the detached session wrote its first output", exists(mid))

	c2 := g.connect(t)
	if !slices.Contains(c2.GuestInfo().Sessions, id) {
		t.Fatalf("hello reply lists sessions %v, want %d among them", c2.GuestInfo().Sessions, id)
	}
	// A new session on the new connection must not take the old one's id.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	other, err := c2.Exec(ctx, sh("echo again"))
	if err != nil {
		t.Fatal(err)
	}
	if other.ID() == id {
		t.Fatalf("new session got the detached session's id %d", id)
	}
	if r := collect(t, ctx, other); r.stdout != "again\n" {
		t.Fatalf("new session: %+v", r)
	}

	s, err := c2.Reattach(ctx, id)
	if err != nil {
		t.Fatalf("reattach %d: %v", id, err)
	}
	if s.ID() != id || s.Pid() == 0 {
		t.Fatalf("reattached session id %d pid %d", s.ID(), s.Pid())
	}
	r := collect(t, ctx, s)
	if r.status.Code != 7 {
		t.Fatalf("exit after reattach: %+v", r.status)
	}
	if want := seqLines(1, 200000); r.stdout != want {
		t.Fatalf("stdout after reattach: %d bytes, want %d (nothing lost)", len(r.stdout), len(want))
	}
	if r.stderr != "detached\nend\n" {
		t.Fatalf("stderr after reattach: %q", r.stderr)
	}
	// The session is over: it cannot be taken again.
	if _, err := c2.Reattach(ctx, id); err == nil {
		t.Fatal("reattached a finished session")
	}
}

func TestReattachAfterExitWhileDetached(t *testing.T) {
	g := newGuest(t, initd.Options{})
	goFile := filepath.Join(t.TempDir(), "go")
	id, pid := startDetachable(t, g, sh(fmt.Sprintf(
		"echo hello; while [ ! -e %s ]; do sleep 0.01; done; seq 1 5000; echo bye >&2; exit 5", goFile)))
	if err := os.WriteFile(goFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the detached process exited", gone(pid))

	c2 := g.connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c2.Reattach(ctx, id)
	if err != nil {
		t.Fatalf("reattach %d: %v", id, err)
	}
	r := collect(t, ctx, s)
	if r.stdout != seqLines(1, 5000) || r.stderr != "bye\n" || r.status.Code != 5 {
		t.Fatalf("got %d bytes of stdout, stderr %q, status %+v", len(r.stdout), r.stderr, r.status)
	}
}

func TestReattachRefusals(t *testing.T) {
	g := newGuest(t, initd.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c1 := g.connect(t)
	var gerr *client.GuestError
	if _, err := c1.Reattach(ctx, 999); !errors.As(err, &gerr) {
		t.Fatalf("reattach of an unknown id: got %v, want a guest error", err)
	}
	s, err := c1.Exec(ctx, sh("echo hello; exec sleep 100"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c1.Reattach(ctx, s.ID()); err == nil {
		t.Fatal("reattached a session open on the same connection")
	}
	// A second connection while the first is alive may not steal it.
	c2 := g.connect(t)
	if _, err := c2.Reattach(ctx, s.ID()); !errors.As(err, &gerr) {
		t.Fatalf("reattach of a session attached elsewhere: got %v, want a guest error", err)
	}
	// The refusals left the session working where it was.
	line := make([]byte, 6)
	if _, err := io.ReadFull(s.Stdout(), line); err != nil || string(line) != "hello\n" {
		t.Fatalf("first line: %q %v", line, err)
	}
	if err := s.Signal(ctx, int(syscall.SIGTERM)); err != nil {
		t.Fatal(err)
	}
	if st, err := s.Wait(ctx); err != nil || st.Signal != int(syscall.SIGTERM) {
		t.Fatalf("after SIGTERM: %+v %v", st, err)
	}
}

func TestReattachedSessionTakesSignalsAndResize(t *testing.T) {
	if _, err := os.Stat("/dev/ptmx"); err != nil {
		testutil.Skipf(t, "/dev/ptmx not available")
	}
	g := newGuest(t, initd.Options{})
	goFile := filepath.Join(t.TempDir(), "go")
	req := proto.ExecRequest{Argv: []string{"/bin/sh", "-c", fmt.Sprintf(
		"echo hello; while [ ! -e %s ]; do sleep 0.01; done; stty size; trap 'echo term; exit 9' TERM; echo waiting; while :; do sleep 0.01; done", goFile)},
		TTY: true, Rows: 24, Cols: 80}
	id, _ := startDetachable(t, g, req)

	c2 := g.connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c2.Reattach(ctx, id)
	if err != nil {
		t.Fatalf("reattach %d: %v", id, err)
	}
	if err := s.Resize(ctx, 40, 120); err != nil {
		t.Fatalf("resize of a reattached TTY session: %v", err)
	}
	if err := os.WriteFile(goFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	buf := make([]byte, 4096)
	for !strings.Contains(out.String(), "waiting") {
		n, err := s.Stdout().Read(buf)
		out.Write(buf[:n])
		if err != nil {
			t.Fatalf("reading the TTY: %v (got %q)", err, out.String())
		}
	}
	if !strings.Contains(out.String(), "40 120") {
		t.Fatalf("terminal size after resize: %q", out.String())
	}
	if err := s.Signal(ctx, int(syscall.SIGTERM)); err != nil {
		t.Fatal(err)
	}
	st, err := s.Wait(ctx)
	if err != nil || st.Code != 9 {
		t.Fatalf("after SIGTERM: %+v %v", st, err)
	}
	if _, err := s.Stdin().Write([]byte("x")); err == nil {
		t.Fatal("stdin write to a reattached session succeeded")
	}
}

func TestReattachGraceExpires(t *testing.T) {
	g := newGuest(t, initd.Options{ReattachGrace: 100 * time.Millisecond})
	dir := t.TempDir()
	goFile, marker := filepath.Join(dir, "go"), filepath.Join(dir, "marker")
	// Far more than a pipe holds: the process finishes only if its output
	// is discarded once the grace is over.
	id, pid := startDetachable(t, g, sh(fmt.Sprintf(
		"echo hello; while [ ! -e %s ]; do sleep 0.01; done; head -c 3000000 /dev/zero; touch %s; exit 3", goFile, marker)))
	if err := os.WriteFile(goFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the forgotten session's process finished", exists(marker))
	waitFor(t, "the forgotten session's process was reaped", gone(pid))

	c2 := g.connect(t)
	if slices.Contains(c2.GuestInfo().Sessions, id) {
		t.Fatalf("hello reply still lists forgotten session %d", id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var gerr *client.GuestError
	if _, err := c2.Reattach(ctx, id); !errors.As(err, &gerr) {
		t.Fatalf("reattach after the grace: got %v, want a guest error", err)
	}
	// The id is free again.
	r := run(t, c2, sh("echo fresh"), nil)
	if r.stdout != "fresh\n" {
		t.Fatalf("after expiry: %+v", r)
	}
}

// Detach (the host saves the VM and goes away): the session keeps running with its
// output held from the moment the guest answers, its stdin still open; a later connection
// reattaches and gets every line, none twice, and can still write to its stdin.
func TestDetachHoldsOutputForTheNextHost(t *testing.T) {
	g := newGuest(t, initd.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c1, served := g.connectServe(t)
	// Counts forever until its stdin says stop; the count goes on while no host reads.
	s, err := c1.Exec(ctx, proto.ExecRequest{Argv: []string{"sh", "-c", "exec 3<&0; i=0; (read x <&3; echo \"$x\" > stop) & while [ ! -e stop ]; do i=$((i+1)); echo $i; sleep 0.001; done; echo stopped; exit 3"},
		Dir: t.TempDir(), Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	var before testutil.Buffer // read while the copy writes
	readDone := make(chan struct{})
	go func() { defer close(readDone); _, _ = io.Copy(&before, s.Stdout()) }()
	waitFor(t, "some output", func() bool { return strings.Count(before.String(), "\n") > 0 })
	if err := c1.Detach(ctx); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	c1.Close()
	<-served
	<-readDone
	time.Sleep(50 * time.Millisecond) // let it count while nobody listens (liveness only)

	c2 := g.connect(t)
	s2, err := c2.Reattach(ctx, s.ID())
	if err != nil {
		t.Fatalf("reattach after Detach: %v", err)
	}
	if _, err := s2.Stdin().Write([]byte("now\n")); err != nil {
		t.Fatalf("stdin after reattach (it must have stayed open): %v", err)
	}
	r := collect(t, ctx, s2)
	if r.status.Code != 3 {
		t.Fatalf("exit: %+v", r.status)
	}
	all := before.String() + r.stdout
	lines := strings.Split(strings.TrimSuffix(all, "\n"), "\n")
	if lines[len(lines)-1] != "stopped" {
		t.Fatalf("last line %q", lines[len(lines)-1])
	}
	for i, l := range lines[:len(lines)-1] {
		if l != fmt.Sprint(i+1) {
			t.Fatalf("line %d is %q: output lost or repeated across the detach", i+1, l)
		}
	}
}
