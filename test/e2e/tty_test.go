package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// tmuxSession runs one command in a detached tmux session of a private tmux server: a real
// pseudo-terminal of a known size, typed into with send-keys and read with capture-pane.
type tmuxSession struct {
	t      *testing.T
	socket string
	name   string
}

func newTmux(t *testing.T, cols, rows int, command string) *tmuxSession {
	t.Helper()
	if _, err := exec.LookPath("tmux"); err != nil {
		testutil.Skipf(t, "tmux not found (scripts/install-deps.sh installs it)")
	}
	s := &tmuxSession{t: t, socket: filepath.Join(t.TempDir(), "tmux.sock"), name: "fw"}
	s.tmux("new-session", "-d", "-s", s.name, "-x", fmt.Sprint(cols), "-y", fmt.Sprint(rows), command)
	t.Cleanup(func() { _ = exec.Command("tmux", "-f", "/dev/null", "-S", s.socket, "kill-server").Run() })
	return s
}

func (s *tmuxSession) tmux(args ...string) string {
	s.t.Helper()
	// -f /dev/null: no configuration of the machine's or the user's changes the terminal.
	out, err := exec.Command("tmux", append([]string{"-f", "/dev/null", "-S", s.socket}, args...)...).CombinedOutput()
	if err != nil {
		s.t.Fatalf("tmux %v: %v: %s", args, err, out)
	}
	return string(out)
}

func (s *tmuxSession) keys(keys ...string) {
	s.tmux(append([]string{"send-keys", "-t", s.name}, keys...)...)
}

func (s *tmuxSession) screen() string { return s.tmux("capture-pane", "-p", "-t", s.name) }

// waitScreen waits until the pane shows want, and returns the screen.
func (s *tmuxSession) waitScreen(want string, d time.Duration) string {
	s.t.Helper()
	var scr string
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if scr = s.screen(); strings.Contains(scr, want) {
			return scr
		}
	}
	s.t.Fatalf("the terminal never showed %q; it shows:\n%s", want, scr)
	return ""
}

// waitPrompt waits until the guest shell shows its prompt ("$" ends the last line that is
// not empty) and the screen has stayed so for a moment: it reads what is typed next.
func (s *tmuxSession) waitPrompt() {
	s.t.Helper()
	last := func(scr string) string {
		lines := strings.Split(strings.TrimRight(scr, "\n "), "\n")
		return strings.TrimSpace(lines[len(lines)-1])
	}
	var scr string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		scr = s.screen()
		if !strings.HasSuffix(last(scr), "$") {
			continue
		}
		time.Sleep(200 * time.Millisecond)
		if again := s.screen(); again == scr {
			return
		}
	}
	s.t.Fatalf("the guest shell's prompt never came back; the terminal shows:\n%s", scr)
}

// ttyScript is typed into the guest's shell: each answer is marked so that the echo of
// the typed line itself never matches.
const ttyProbe = `echo "T""TY=$(tty) SIZE=$(stty size) ISATTY=$([ -t 0 ] && echo yes)"`

// `run -it` and `exec -it` under a real pseudo-terminal: the guest sees a terminal of the
// window's size, a resize reaches it, Ctrl-C interrupts the guest's foreground process
// (not the CLI), and the exit code comes back through the CLI.
func TestTTYEndToEnd(t *testing.T) {
	need(t)
	exitFile := filepath.Join(t.TempDir(), "exit")
	cli := fmt.Sprintf("env FIREWORKS_CONFIG=%s %s", world.config, world.bin)
	for _, c := range []struct {
		name  string
		setup func(t *testing.T) string // returns the fireworks arguments
	}{
		{"run -it", func(t *testing.T) string {
			t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", "tty-run") })
			return "run -it --name tty-run " + image("busybox:latest") + " -- sh"
		}},
		{"exec -it", func(t *testing.T) string {
			id := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "tty-exec", image("busybox:latest"), "--", "sleep", "600").stdout)
			waitStatus(t, id, "running")
			t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", id) })
			return "exec -it " + id + " -- sh"
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			os.Remove(exitFile)
			args := c.setup(t)
			s := newTmux(t, 100, 30, fmt.Sprintf("%s %s; echo $? > %s; sleep 600", cli, args, exitFile))
			s.waitScreen("~ $", 2*time.Minute) // busybox ash, as app in its home
			s.waitPrompt()
			s.keys(ttyProbe, "Enter")
			// The output's "TTY=/dev/...", not the typed command's "ISATTY=": a screen
			// caught while the command is echoed but not yet run has that too.
			scr := s.waitScreen("TTY=/dev/", time.Minute)
			if !strings.Contains(scr, "TTY=/dev/pts/") || !strings.Contains(scr, "SIZE=30 100") || !strings.Contains(scr, "ISATTY=yes") {
				t.Errorf("the guest does not see a 100x30 terminal:\n%s", scr)
			}
			// Each line is typed once the shell waits at its prompt: busybox's line editor
			// drops what was typed ahead while a command ran (seen in CI: the head of a
			// line gone).
			s.waitPrompt()
			s.tmux("resize-window", "-t", s.name, "-x", "120", "-y", "40")
			// The new size reaches the guest asynchronously: ask until it is there.
			var seen string
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
				s.waitPrompt()
				s.keys(`clear; stty size | sed 's/^/S''Z=/'`, "Enter")
				time.Sleep(300 * time.Millisecond)
				if seen = s.screen(); strings.Contains(seen, "SZ=40 120") {
					break
				}
			}
			if !strings.Contains(seen, "SZ=40 120") {
				t.Errorf("after resizing the window to 120x40 the guest says:\n%s", seen)
			}
			// Ctrl-C reaches the guest's foreground process: sleep dies of SIGINT, and the
			// guest shell (and the CLI) go on in the same session. Waited for by its
			// output, not its echo.
			s.waitPrompt()
			s.keys(`clear; echo "sle""eping"; sleep 1000`, "Enter")
			s.waitScreen("sleeping", time.Minute)
			time.Sleep(time.Second)
			s.keys("C-c")
			s.waitPrompt()
			s.keys(`echo "after""-ctrl-c:$?"`, "Enter")
			s.waitScreen("after-ctrl-c:130", time.Minute)
			s.waitPrompt()
			s.keys("exit 7", "Enter")
			var code string
			for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline) && code == ""; time.Sleep(200 * time.Millisecond) {
				b, _ := os.ReadFile(exitFile)
				code = strings.TrimSpace(string(b))
			}
			if code != "7" {
				t.Errorf("the CLI exited %q after the guest shell's exit 7; terminal:\n%s", code, s.screen())
			}
		})
	}
}

// -it with stdin that is not a terminal is refused, as Docker refuses it: the guest's
// terminal would echo the piped input and never see its end.
func TestTTYRefusedWithoutTerminal(t *testing.T) {
	need(t)
	for _, args := range [][]string{
		{"run", "-it", image("busybox:latest"), "--", "cat"},
		{"exec", "-it", "no-such-sandbox", "--", "cat"},
	} {
		r := world.cli(context.Background(), []byte("hi\n"), args...)
		if r.code == 0 || !strings.Contains(r.stderr, "not a TTY") {
			t.Errorf("fireworks %v with piped stdin: exit %d stderr %q, want a refusal", args, r.code, r.stderr)
		}
	}
	// -i alone takes piped input and ends with it.
	if r := world.cli(context.Background(), []byte("hi\n"), "run", "-i", image("busybox:latest"), "--", "cat"); r.code != 0 || r.stdout != "hi\n" {
		t.Errorf("run -i with piped stdin: exit %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
}
