package volume

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/shared/sunrpc"
)

// The lock manager (NLM version 4, RFC 1813's companion protocol) of one sandbox's
// volume server, for all its mounts: a guest's flock and fcntl locks on a volume become
// open-file-description locks on the node (F_OFD_SETLK), one open file per lock owner
// and file, so that they conflict with every other owner's, in this sandbox or another
// (each sandbox's server holds its own). They last as long as the server: a sandbox that
// ends, pauses or moves lets go of its locks (its guest's lock daemon is told nothing;
// see the README).
//
// A blocking request that cannot be granted at once is retried here for a while
// (blockWait: below the 10 seconds after which the guest's kernel would send the call
// again), then answered "blocked": the guest's kernel asks again every 30 seconds (the
// server cannot call the guest back to say the lock is free: it has no network of its
// own).

// NLM numbers.
const (
	nlmProg = 100021
	nlmVers = 4

	nlmProcNull    = 0
	nlmProcTest    = 1
	nlmProcLock    = 2
	nlmProcCancel  = 3
	nlmProcUnlock  = 4
	nlmProcShare   = 20
	nlmProcUnshare = 21
	nlmProcFreeAll = 23

	nlm4Granted       = 0
	nlm4Denied        = 1
	nlm4DeniedNoLocks = 2
	nlm4Blocked       = 3
	nlm4Rofs          = 6
	nlm4StaleFH       = 7
	nlm4FBig          = 8
	nlm4Failed        = 9
)

// Bounds on what a guest may make the lock manager hold.
const (
	maxLockOwners = 4096 // open files held for locks
	// maxLockCalls bounds the lock calls granted on one owner's file since it last
	// unlocked the whole file: each may add a range the kernel keeps and walks, under a
	// lock, for every lock call on that file, another sandbox's included.
	maxLockCalls = 1024
	maxNameLen   = 1024 // caller names and owner handles
	blockWait    = 7 * time.Second
	blockPoll    = 20 * time.Millisecond
)

type lockKey struct {
	export uint32
	fh     string
	owner  string
}

type lockManager struct {
	exports []*Server
	mu      sync.Mutex
	held    map[lockKey]*os.File
	callers map[lockKey]string // the caller name of each held key (FREE_ALL)
	calls   map[lockKey]int    // lock calls granted on each held key (maxLockCalls)
}

func newLockManager(exports []*Server) *lockManager {
	return &lockManager{exports: exports, held: map[lockKey]*os.File{}, callers: map[lockKey]string{}, calls: map[lockKey]int{}}
}

// nlmLock is an nlm4_lock.
type nlmLock struct {
	caller      string
	fh, oh      []byte
	svid        uint32
	offset, len uint64
}

func readLock(r *sunrpc.Reader) nlmLock {
	return nlmLock{caller: r.String(maxNameLen), fh: r.Opaque(64), oh: r.Opaque(maxNameLen), svid: r.Uint32(), offset: r.Uint64(), len: r.Uint64()}
}

// serve answers NLM calls.
func (m *lockManager) serve(c sunrpc.Call) sunrpc.Reply {
	if c.Prog != nlmProg {
		return sunrpc.Reply{Status: sunrpc.ProgUnavail}
	}
	if c.Vers != nlmVers {
		return sunrpc.Reply{Status: sunrpc.ProgMismatch, Low: nlmVers, High: nlmVers}
	}
	r, w := c.Args, &sunrpc.Writer{}
	switch c.Proc {
	case nlmProcNull:
	case nlmProcTest:
		cookie, excl, l := r.Opaque(maxNameLen), r.Bool(), readLock(r)
		if r.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		w.Opaque(cookie)
		m.test(w, excl, l)
	case nlmProcLock:
		cookie, block, excl, l := r.Opaque(maxNameLen), r.Bool(), r.Bool(), readLock(r)
		r.Bool()   // reclaim
		r.Uint32() // state
		if r.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		w.Opaque(cookie)
		w.Uint32(m.lock(block, excl, l))
	case nlmProcCancel:
		cookie := r.Opaque(maxNameLen)
		if r.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		// No request waits here (a blocked one is answered, then asked again): nothing
		// to cancel.
		w.Opaque(cookie)
		w.Uint32(nlm4Granted)
	case nlmProcUnlock:
		cookie, l := r.Opaque(maxNameLen), readLock(r)
		if r.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		w.Opaque(cookie)
		w.Uint32(m.unlock(l))
	case nlmProcShare, nlmProcUnshare:
		// DOS share reservations: no Linux client asks; granted, reserving nothing.
		cookie := r.Opaque(maxNameLen)
		if r.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		w.Opaque(cookie)
		w.Uint32(nlm4Granted)
		w.Uint32(0)
	case nlmProcFreeAll:
		name := r.String(maxNameLen)
		if r.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		m.freeAll(name)
	default:
		return sunrpc.Reply{Status: sunrpc.ProcUnavail}
	}
	return sunrpc.Reply{Results: w.Bytes()}
}

// resolve finds the server of the lock's file and its key.
func (m *lockManager) resolve(l nlmLock) (lockKey, *Server, bool) {
	for i, s := range m.exports {
		if _, ok := s.kernelHandle(l.fh); ok {
			return lockKey{export: uint32(i), fh: string(l.fh), owner: fmt.Sprintf("%s\x00%d\x00%x", l.caller, l.svid, l.oh)}, s, true
		}
	}
	return lockKey{}, nil, false
}

// flock is the lock's range as fcntl takes it (false if it does not fit).
func (l nlmLock) flock(typ int16) (unix.Flock_t, bool) {
	if l.offset > math.MaxInt64 || l.len > math.MaxInt64 || l.len != 0 && l.offset > math.MaxInt64-l.len {
		return unix.Flock_t{}, false
	}
	return unix.Flock_t{Type: typ, Whence: 0, Start: int64(l.offset), Len: int64(l.len)}, true
}

func lockType(excl bool) int16 {
	if excl {
		return unix.F_WRLCK
	}
	return unix.F_RDLCK
}

// file is the open file key's locks are held on, opened if it is not yet.
func (m *lockManager) file(key lockKey, s *Server, caller string) (*os.File, uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f := m.held[key]; f != nil {
		return f, nlm4Granted
	}
	if len(m.held) >= maxLockOwners {
		return nil, nlm4DeniedNoLocks
	}
	flags := unix.O_RDWR
	if s.readOnly {
		flags = unix.O_RDONLY
	}
	f, err := s.openHandle([]byte(key.fh), flags)
	if err != nil {
		if errors.Is(err, unix.ESTALE) || errors.Is(err, unix.ENOENT) {
			return nil, nlm4StaleFH
		}
		return nil, nlm4Failed
	}
	m.held[key], m.callers[key] = f, caller
	return f, nlm4Granted
}

func (m *lockManager) lock(block, excl bool, l nlmLock) uint32 {
	key, s, ok := m.resolve(l)
	if !ok {
		return nlm4StaleFH
	}
	if excl && s.readOnly {
		return nlm4Rofs
	}
	fl, ok := l.flock(lockType(excl))
	if !ok {
		return nlm4FBig
	}
	f, st := m.file(key, s, l.caller)
	if st != nlm4Granted {
		return st
	}
	m.mu.Lock()
	full := m.calls[key] >= maxLockCalls
	m.mu.Unlock()
	if full {
		return nlm4DeniedNoLocks
	}
	deadline := time.Now().Add(blockWait)
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &fl)
		switch {
		case err == nil:
			m.mu.Lock()
			m.calls[key]++
			m.mu.Unlock()
			return nlm4Granted
		case !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES):
			return nlm4Failed
		case !block:
			return nlm4Denied
		case time.Now().After(deadline):
			return nlm4Blocked
		}
		time.Sleep(blockPoll)
	}
}

func (m *lockManager) unlock(l nlmLock) uint32 {
	key, _, ok := m.resolve(l)
	if !ok {
		return nlm4StaleFH
	}
	fl, ok := l.flock(unix.F_UNLCK)
	if !ok {
		return nlm4FBig
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	f := m.held[key]
	if f == nil {
		return nlm4Granted // nothing held: already unlocked
	}
	if l.offset == 0 && l.len == 0 {
		// The whole file: the owner holds nothing of it any more.
		f.Close()
		delete(m.held, key)
		delete(m.callers, key)
		delete(m.calls, key)
		return nlm4Granted
	}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &fl); err != nil {
		return nlm4Failed
	}
	return nlm4Granted
}

// test answers whether the lock could be had, naming a conflicting one if not (its
// owner is another's: no owner is told of).
func (m *lockManager) test(w *sunrpc.Writer, excl bool, l nlmLock) {
	key, s, ok := m.resolve(l)
	if !ok {
		w.Uint32(nlm4StaleFH)
		return
	}
	fl, ok := l.flock(lockType(excl))
	if !ok {
		w.Uint32(nlm4FBig)
		return
	}
	m.mu.Lock()
	f := m.held[key]
	m.mu.Unlock()
	if f == nil {
		// The owner's own file, if it held one, would be left out of the answer; it
		// holds none, so any open file serves.
		var err error
		if f, err = s.openHandle(l.fh, unix.O_RDONLY); err != nil {
			w.Uint32(nlm4StaleFH)
			return
		}
		defer f.Close()
	}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &fl); err != nil {
		w.Uint32(nlm4Failed)
		return
	}
	if fl.Type == unix.F_UNLCK {
		w.Uint32(nlm4Granted)
		return
	}
	w.Uint32(nlm4Denied)
	w.Bool(fl.Type == unix.F_WRLCK)
	w.Uint32(0)   // svid: another's
	w.Opaque(nil) // its owner handle: not told
	w.Uint64(uint64(fl.Start))
	w.Uint64(uint64(fl.Len))
}

// freeAll lets go of every lock of a caller (its lock daemon restarted).
func (m *lockManager) freeAll(caller string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, c := range m.callers {
		if c == caller {
			m.held[k].Close()
			delete(m.held, k)
			delete(m.callers, k)
			delete(m.calls, k)
		}
	}
}

// portmapper answers the guest's lock daemon's question: where the lock manager is.
func portmapper(nlmPort uint32) sunrpc.Handler {
	return func(c sunrpc.Call) sunrpc.Reply {
		if c.Prog != sunrpc.PmapProg {
			return sunrpc.Reply{Status: sunrpc.ProgUnavail}
		}
		if c.Vers != sunrpc.PmapVers {
			return sunrpc.Reply{Status: sunrpc.ProgMismatch, Low: sunrpc.PmapVers, High: sunrpc.PmapVers}
		}
		w := &sunrpc.Writer{}
		switch c.Proc {
		case sunrpc.PmapProcNull:
		case sunrpc.PmapProcGetport:
			prog, _, prot := c.Args.Uint32(), c.Args.Uint32(), c.Args.Uint32()
			if c.Args.Err() != nil {
				return sunrpc.Reply{Status: sunrpc.GarbageArgs}
			}
			if prog == nlmProg && prot == sunrpc.ProtoTCP {
				w.Uint32(nlmPort)
			} else {
				w.Uint32(0)
			}
		case sunrpc.PmapProcSet, sunrpc.PmapProcUnset:
			w.Bool(false) // nothing registers here
		default:
			return sunrpc.Reply{Status: sunrpc.ProcUnavail}
		}
		return sunrpc.Reply{Results: w.Bytes()}
	}
}
