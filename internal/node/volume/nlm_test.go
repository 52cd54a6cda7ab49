package volume

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/shared/sunrpc"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"golang.org/x/sys/unix"
)

// lockCall encodes an NLM call's arguments for proc: what a guest's lock daemon sends.
type lockArgs struct {
	block, excl bool
	owner       string
	fh          []byte
	offset, len uint64
}

func (a lockArgs) encode(w *sunrpc.Writer, proc uint32) {
	w.Opaque([]byte("cookie"))
	if proc == nlmProcLock {
		w.Bool(a.block)
	}
	if proc != nlmProcUnlock {
		w.Bool(a.excl)
	}
	w.String("guest")
	w.Opaque(a.fh)
	w.Opaque([]byte(a.owner))
	w.Uint32(7)
	w.Uint64(a.offset)
	w.Uint64(a.len)
	if proc == nlmProcLock {
		w.Bool(false)
		w.Uint32(1)
	}
}

func call(m *lockManager, proc uint32, a lockArgs) (status uint32, rest *sunrpc.Reader) {
	w := &sunrpc.Writer{}
	a.encode(w, proc)
	rep := m.serve(sunrpc.Call{Prog: nlmProg, Vers: nlmVers, Proc: proc, Args: sunrpc.NewReader(w.Bytes())})
	if rep.Status != sunrpc.Success {
		return 1000 + rep.Status, nil
	}
	r := sunrpc.NewReader(rep.Results)
	r.Opaque(64) // cookie
	return r.Uint32(), r
}

// Locks of different owners conflict through the node's kernel (and another process's
// lock on the volume's file too); a test names the conflict; unlock, a waiting lock and
// FREE_ALL let go; a read-only mount takes no exclusive lock; a handle of no mount is
// stale; garbage is refused.
func TestLockManager(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "volume server tests need root (open_by_handle_at)")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	rw, err := NewServer(dir, false)
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	ro, err := NewServer(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	ro.export = 1
	m := newLockManager([]*Server{rw, ro})
	fh := rw.ToHandle(nil, []string{"f"})
	a := lockArgs{excl: true, owner: "one", fh: fh}
	b := lockArgs{excl: true, owner: "two", fh: fh}
	if st, _ := call(m, nlmProcLock, a); st != nlm4Granted {
		t.Fatalf("first lock: %d", st)
	}
	if st, _ := call(m, nlmProcLock, a); st != nlm4Granted {
		t.Errorf("the same owner again: %d", st)
	}
	if st, _ := call(m, nlmProcLock, b); st != nlm4Denied {
		t.Errorf("another owner's lock, not waiting: %d, want denied", st)
	}
	st, r := call(m, nlmProcTest, b)
	if excl := r.Bool(); st != nlm4Denied || !excl {
		t.Errorf("test by another owner: %d exclusive %v", st, excl)
	}
	if st, _ := call(m, nlmProcTest, a); st != nlm4Granted {
		t.Errorf("test by the holder itself: %d", st)
	}
	// Another process on the node sees the lock too (it is the kernel's).
	f, err := os.OpenFile(filepath.Join(dir, "f"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := flockNB(f); err == nil {
		t.Error("a lock on the node ignores the guest's")
	}
	if st, _ := call(m, nlmProcUnlock, a); st != nlm4Granted {
		t.Errorf("unlock: %d", st)
	}
	if st, _ := call(m, nlmProcLock, lockArgs{block: true, excl: true, owner: "two", fh: fh}); st != nlm4Granted {
		t.Errorf("a waiting lock once free: %d", st)
	}
	m.freeAll("guest")
	if st, _ := call(m, nlmProcLock, a); st != nlm4Granted {
		t.Errorf("a lock after FREE_ALL: %d", st)
	}
	// Ranges: a shared lock elsewhere in the file does not conflict.
	if st, _ := call(m, nlmProcLock, lockArgs{owner: "three", fh: fh, offset: 1 << 40, len: 10}); st != nlm4Denied {
		t.Errorf("a shared lock inside the holder's whole-file lock: %d, want denied", st)
	}
	call(m, nlmProcUnlock, a)
	if st, _ := call(m, nlmProcLock, lockArgs{excl: true, owner: "three", fh: fh, offset: 10, len: 5}); st != nlm4Granted {
		t.Errorf("a range lock: %d", st)
	}
	if st, _ := call(m, nlmProcLock, lockArgs{excl: true, owner: "four", fh: fh, offset: 15, len: 5}); st != nlm4Granted {
		t.Errorf("a lock of the next range: %d", st)
	}
	if st, _ := call(m, nlmProcLock, lockArgs{excl: true, owner: "four", fh: fh, offset: 1 << 63, len: 1 << 63}); st != nlm4FBig {
		t.Errorf("a range past the largest offset: %d", st)
	}
	roFH := ro.ToHandle(nil, []string{"f"})
	if st, _ := call(m, nlmProcLock, lockArgs{excl: true, owner: "five", fh: roFH}); st != nlm4Rofs {
		t.Errorf("an exclusive lock on a read-only mount: %d", st)
	}
	if st, _ := call(m, nlmProcLock, lockArgs{owner: "five", fh: roFH, offset: 100, len: 1}); st != nlm4Granted {
		t.Errorf("a shared lock on a read-only mount: %d", st)
	}
	if st, _ := call(m, nlmProcLock, lockArgs{excl: true, owner: "six", fh: []byte("not a handle of ours")}); st != nlm4StaleFH {
		t.Errorf("a foreign handle: %d", st)
	}
	// An owner's ranges on one file are bounded until it unlocks the whole file.
	many := lockArgs{owner: "seven", fh: fh, len: 1}
	granted := 0
	for i := range maxLockCalls + 10 {
		many.offset = uint64(1000 + 2*i)
		if st, _ := call(m, nlmProcLock, many); st == nlm4Granted {
			granted++
		} else if st != nlm4DeniedNoLocks {
			t.Fatalf("range %d: %d", i, st)
		}
	}
	if granted != maxLockCalls {
		t.Errorf("%d ranges granted to one owner, want %d", granted, maxLockCalls)
	}
	many.offset, many.len = 0, 0
	call(m, nlmProcUnlock, many)
	many.offset, many.len = 5000, 1
	if st, _ := call(m, nlmProcLock, many); st != nlm4Granted {
		t.Errorf("a range after the whole file was unlocked: %d", st)
	}
	if rep := m.serve(sunrpc.Call{Prog: nlmProg, Vers: nlmVers, Proc: nlmProcLock, Args: sunrpc.NewReader([]byte{0, 0, 1})}); rep.Status != sunrpc.GarbageArgs {
		t.Errorf("garbage arguments: %d", rep.Status)
	}
	if rep := m.serve(sunrpc.Call{Prog: nlmProg, Vers: 1}); rep.Status != sunrpc.ProgMismatch || rep.Low != 4 {
		t.Errorf("version 1: %+v", rep)
	}
}

// A record larger than sunrpc.MaxRecord ends the connection rather than being read.
func TestRPCRecordBound(t *testing.T) {
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() { sunrpc.ServeConn(a, func(sunrpc.Call) sunrpc.Reply { return sunrpc.Reply{} }); close(done) }()
	_, _ = b.Write([]byte{0x80, 0x10, 0x00, 0x00}) // a last fragment of 1 MiB
	<-done
	if _, err := b.Write([]byte{0}); err == nil {
		t.Error("the connection is still open")
	}
}

func flockNB(f *os.File) error {
	return unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &unix.Flock_t{Type: unix.F_WRLCK})
}

// A guest's stream may not start a fragment larger than maxFragment, however its
// record marks fall across reads.
func TestRecordBound(t *testing.T) {
	mark := func(n uint32, last bool) []byte {
		if last {
			n |= 1 << 31
		}
		return []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	}
	var stream []byte
	stream = append(stream, mark(5, false)...)
	stream = append(stream, "hello"...)
	stream = append(stream, mark(3, true)...)
	stream = append(stream, "abc"...)
	for split := 1; split <= len(stream); split++ {
		r := recordBound{max: 8}
		for i := 0; i < len(stream); i += split {
			if err := r.check(stream[i:min(i+split, len(stream))]); err != nil {
				t.Fatalf("a valid stream read %d bytes at a time: %v", split, err)
			}
		}
	}
	r := recordBound{max: 8}
	if err := r.check(append(mark(4, true), "abcd"...)); err != nil {
		t.Fatal(err)
	}
	big := mark(9, true)
	if err := r.check(big[:2]); err != nil {
		t.Fatal(err)
	}
	if err := r.check(big[2:]); err == nil {
		t.Error("a fragment over the bound passed")
	}
}
