package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A node's data disk fills up. A guest whose writes the host cannot take gets an I/O
// error and its command goes on (QEMU's default would freeze the VM, and the sandbox
// would hang "running" for ever); a start that finds no room fails saying so; the agent
// stays up, and once room is made, sandboxes run there again.
//
// The agent's run directory (where each VM's sparse scratch disk lives) is put on a
// small tmpfs for the test, with the agent stopped: a2 runs nothing of the other tests.
func TestNodeDataDiskFull(t *testing.T) {
	need(t)
	a := w.agents[2]
	runDir := filepath.Join(a.dataDir, "run")
	if out, _ := w.fw(nil, "ps", "-q"); strings.TrimSpace(out) != "" {
		for _, id := range strings.Fields(out) {
			if sb := inspect(t, id); sb["node"] == "a2" {
				t.Fatalf("a2 runs sandbox %s from another test; this test needs it idle", id)
			}
		}
	}
	// The small filesystem is mounted apart and its run/ bound over a2's: the filler
	// lives beside run/, where the agent (which sweeps what it does not know from its
	// run directory) does not see it.
	small := filepath.Join(filepath.Dir(a.dataDir), "a2-small-disk")
	if err := os.MkdirAll(small, 0o700); err != nil {
		t.Fatal(err)
	}
	w.stop(a, false)
	mounted := []string{}
	t.Cleanup(func() {
		w.stop(a, false)
		_ = exec.Command("pkill", "-9", "-f", "qemu-system-x86_64 .*"+runDir+"/").Run()
		for i := len(mounted) - 1; i >= 0; i-- {
			if out, err := exec.Command("umount", "-l", mounted[i]).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v: %s", mounted[i], err, out)
			}
		}
		w.ensureRunning()
		if err := w.waitNodes(3, "ready", 2*time.Minute); err != nil {
			t.Error(err)
		}
	})
	for _, m := range [][]string{
		{"mount", "-t", "tmpfs", "-o", "size=160m,mode=0700", "fw-diskfull", small},
		{"mkdir", "-p", filepath.Join(small, "run")},
		{"mount", "--bind", filepath.Join(small, "run"), runDir},
	} {
		if out, err := exec.Command(m[0], m[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(m, " "), err, out)
		}
		if m[0] == "mount" {
			mounted = append(mounted, m[len(m)-1])
		}
	}
	if err := w.start(a); err != nil {
		t.Fatal(err)
	}
	if err := w.waitNodes(3, "ready", 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(small, "filler")
	fill := func(leave int64) {
		t.Helper()
		_ = os.Remove(filler)
		var st syscall.Statfs_t
		if err := syscall.Statfs(runDir, &st); err != nil {
			t.Fatal(err)
		}
		size := int64(st.Bavail)*st.Bsize - leave
		if size <= 0 {
			return
		}
		if out, err := exec.Command("fallocate", "-l", fmt.Sprint(size), filler).CombinedOutput(); err != nil {
			t.Fatalf("fallocate %d bytes in %s: %v: %s", size, runDir, err, out)
		}
	}
	runOn := func(name, cmd string, flags ...string) string {
		t.Helper()
		args := append([]string{"run", "-d", "--name", name, "--constraint", "host==a2", "--insecure-registry", w.registry}, flags...)
		return strings.TrimSpace(mustFW(t, append(args, image(), "--", "sh", "-c", cmd)...))
	}
	ended := func(sb map[string]any) bool { return terminal(sb["status"]) }

	// Some room, less than the guest writes: the guest's writes fail, it is not frozen.
	fill(24 << 20)
	id := runOn("disk-full-writes", "echo up; dd if=/dev/zero of=/big bs=1M count=96 conv=fsync 2>&1; echo dd=$?")
	t.Cleanup(func() { _, _ = w.fw(nil, "rm", "-f", id) })
	sb := waitSandbox(t, id, 2*minute, "the end of a guest whose writes the host cannot take", ended)
	out, _ := w.fw(nil, "logs", id)
	if sb["status"] != "exited" || !strings.Contains(out, "up") || strings.Contains(out, "dd=0") || !strings.Contains(out, "dd=") {
		df, _ := exec.Command("df", "-k", runDir).CombinedOutput()
		t.Fatalf("a guest writing past the node's free space: %v (%v), output %q\n%s", sb["status"], sb["reason"], out, df)
	}
	t.Logf("the guest that wrote past the room printed %q", out)
	if b, _ := os.ReadFile(a.log); !strings.Contains(string(b), "the node's disk is full") {
		var lines []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, id) {
				lines = append(lines, l)
			}
		}
		t.Errorf("a2's log does not say its disk is full; its lines on %s:\n%s", id, strings.Join(lines, "\n"))
	}

	// No room at all: a start fails, saying why. (Another shape than the first: a VMM
	// the node launched ahead for the first one's template has its disk made already.)
	fill(0)
	id2 := runOn("disk-full-start", "echo should-not-run", "--memory", "192M")
	t.Cleanup(func() { _, _ = w.fw(nil, "rm", "-f", id2) })
	sb = waitSandbox(t, id2, 2*minute, "the end of a start with no room on the node", ended)
	if sb["status"] != "failed" || !strings.Contains(strings.ToLower(fmt.Sprint(sb["reason"])), "no space left on device") {
		t.Fatalf("a start on a node with a full disk: %v (%v)", sb["status"], sb["reason"])
	}
	if out, _ := w.fw(nil, "logs", id2); strings.Contains(out, "should-not-run") {
		t.Fatalf("the start that had no room ran: %q", out)
	}

	// Room again: the node runs sandboxes, and the agent never went down.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	id3 := runOn("disk-full-after", "echo room-again")
	t.Cleanup(func() { _, _ = w.fw(nil, "rm", "-f", id3) })
	sb = waitSandbox(t, id3, 2*minute, "the end of a sandbox once there is room", ended)
	if out, _ := w.fw(nil, "logs", id3); sb["status"] != "exited" || !strings.Contains(out, "room-again") {
		t.Fatalf("a sandbox on a2 once room was made: %v (%v), output %q", sb["status"], sb["reason"], out)
	}
	select {
	case <-a.exited:
		t.Fatal("a2's agent exited during the test")
	default:
	}
	for _, i := range []string{id, id2, id3} {
		_, _ = w.fw(nil, "rm", "-f", i)
	}
}
