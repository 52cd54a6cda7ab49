package initd_test

import (
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/initd"
	"golang.org/x/sys/unix"
)

// children lists the pids whose parent is this process.
func children(t *testing.T) []int {
	t.Helper()
	self := strconv.Itoa(os.Getpid())
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []int
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 2 && f[1] == self {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			out = append(out, pid)
		}
	}
	return out
}

// TestReapAllReapsOrphans runs the server the way PID 1 does: orphans
// re-parented to it must be reaped, while session exit codes still arrive.
func TestReapAllReapsOrphans(t *testing.T) {
	// A child subreaper gets orphans like PID 1 does.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		testutil.Skipf(t, "PR_SET_CHILD_SUBREAPER: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

	g := newGuest(t, initd.Options{ReapAll: true})
	c := g.connect(t)
	r := run(t, c, sh("sleep 0.3 </dev/null >/dev/null 2>&1 & exit 5"), nil)
	if r.status.Code != 5 {
		t.Fatalf("got %+v, want code 5", r.status)
	}
	for i := range 20 {
		r := run(t, c, sh("exit "+strconv.Itoa(i)), nil)
		if r.status.Code != i {
			t.Fatalf("run %d: got %+v", i, r.status)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := children(t)
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("children not reaped: %v", left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
