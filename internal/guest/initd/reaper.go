package initd

import (
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// reaper collects the exit status of session processes.
//
// As PID 1 (all == true) it must also reap orphans re-parented to it, so it
// runs one wait4(-1) loop on SIGCHLD and hands each status to the session
// that owns the pid. Starting a process and registering its pid happen under
// one lock that the loop also takes, so a process that exits at once cannot
// be reaped as an "orphan" before its session knows its pid.
//
// Outside PID 1 (tests) wait4(-1) would steal the status of unrelated
// children, so each process is waited for by pid instead.
type reaper struct {
	all bool
	log *slog.Logger

	mu      sync.Mutex
	waiting map[int]chan unix.WaitStatus

	sigs chan os.Signal
	stop chan struct{}
	done chan struct{}
}

func newReaper(all bool, log *slog.Logger) *reaper {
	r := &reaper{all: all, log: log, waiting: map[int]chan unix.WaitStatus{}, stop: make(chan struct{}), done: make(chan struct{})}
	if !all {
		close(r.done)
		return r
	}
	r.sigs = make(chan os.Signal, 1)
	signal.Notify(r.sigs, syscall.SIGCHLD)
	go r.loop()
	return r
}

func (r *reaper) loop() {
	defer close(r.done)
	for {
		r.reapAll()
		select {
		case <-r.sigs:
		case <-r.stop:
			return
		}
	}
}

func (r *reaper) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		r.mu.Lock()
		ch := r.waiting[pid]
		delete(r.waiting, pid)
		r.mu.Unlock()
		if ch != nil {
			ch <- ws
		} else {
			r.log.Debug("reaped orphan", "pid", pid, "status", int(ws))
		}
	}
}

// start runs fn, which starts a process and returns its pid, and returns a
// channel that receives the process's wait status exactly once.
func (r *reaper) start(fn func() (int, error)) (int, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := fn()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	if r.all {
		r.waiting[pid] = ch
		return pid, ch, nil
	}
	// The waiting goroutine ends when the process does; sessions kill their
	// processes on Server.Close, so it cannot outlive its owner for long.
	go func() {
		for {
			var ws unix.WaitStatus
			_, err := unix.Wait4(pid, &ws, 0, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				// Someone else reaped it; report a plain failure rather than hang.
				ws = unix.WaitStatus(255 << 8)
			}
			ch <- ws
			return
		}
	}()
	return pid, ch, nil
}

func (r *reaper) close() {
	if r.all {
		select {
		case <-r.stop:
		default:
			close(r.stop)
			signal.Stop(r.sigs)
		}
	}
	<-r.done
}
