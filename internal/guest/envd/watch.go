package envd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
	"unsafe"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	fspb "github.com/fireworks-sandbox/fireworks/internal/guest/envd/filesystempb"
)

// Watching a directory: inotify on it (and, recursive, on each directory under it, added
// as they appear), each kernel event turned into the SDK's.

// maxWatchers bounds a sandbox's polled watchers; maxQueued the events one keeps until
// polled (older ones go: a watcher nobody polls must not grow).
const (
	maxWatchers = 256
	maxQueued   = 10_000
	maxWatches  = 8192 // directories one recursive watch follows
)

type watcher struct {
	file    *os.File
	root    string
	entries bool // include each event's entry

	mu        sync.Mutex
	wds       map[int]string // watch descriptor → directory
	recursive bool
	queue     []*fspb.FilesystemEvent
	notify    chan struct{}
	closed    bool
	done      chan struct{}
}

func newWatcher(dir string, recursive, entries bool) (*watcher, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", dir)
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	w := &watcher{file: os.NewFile(uintptr(fd), "inotify"), root: dir, entries: entries, wds: map[int]string{}, recursive: recursive,
		notify: make(chan struct{}, 1), done: make(chan struct{})}
	if err := w.add(dir); err != nil {
		w.file.Close()
		return nil, err
	}
	go w.run()
	return w, nil
}

const watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_ATTRIB | unix.IN_DELETE_SELF

// add watches dir, and with recursive every directory under it.
func (w *watcher) add(dir string) error {
	rc, err := w.file.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	// addOne watches d; false once the watch follows as many directories as it may.
	addOne := func(d string) bool {
		w.mu.Lock()
		full := len(w.wds) >= maxWatches
		w.mu.Unlock()
		if full {
			return false
		}
		_ = rc.Control(func(fd uintptr) {
			wd, err := unix.InotifyAddWatch(int(fd), d, watchMask)
			if err != nil {
				if d == dir {
					werr = err
				}
				return
			}
			w.mu.Lock()
			w.wds[wd] = d
			w.mu.Unlock()
		})
		return true
	}
	addOne(dir)
	if werr != nil || !w.recursive {
		return werr
	}
	_ = filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err == nil && de.IsDir() && p != dir && !addOne(p) {
			return filepath.SkipAll
		}
		return nil
	})
	return nil
}

func (w *watcher) run() {
	defer close(w.done)
	buf := make([]byte, 64<<10)
	for {
		n, err := w.file.Read(buf)
		if err != nil {
			return // closed
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := ""
			if ev.Len > 0 {
				end := off + unix.SizeofInotifyEvent + int(ev.Len)
				if end > n {
					break
				}
				raw := buf[off+unix.SizeofInotifyEvent : end]
				for i, c := range raw {
					if c == 0 {
						raw = raw[:i]
						break
					}
				}
				name = string(raw)
			}
			off += unix.SizeofInotifyEvent + int(ev.Len)
			w.mu.Lock()
			dir, ok := w.wds[int(ev.Wd)]
			w.mu.Unlock()
			if !ok || name == "" {
				continue
			}
			path := filepath.Join(dir, name)
			if ev.Mask&unix.IN_ISDIR != 0 && ev.Mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0 && w.recursive {
				_ = w.add(path)
			}
			t := eventType(ev.Mask)
			if t == fspb.EventType_EVENT_TYPE_UNSPECIFIED {
				continue
			}
			rel, err := filepath.Rel(w.root, path)
			if err != nil {
				rel = name
			}
			fe := &fspb.FilesystemEvent{Name: rel, Type: t}
			if w.entries && t != fspb.EventType_EVENT_TYPE_REMOVE && t != fspb.EventType_EVENT_TYPE_RENAME {
				if e, err := entryOf(path); err == nil {
					fe.Entry = e
				}
			}
			w.push(fe)
		}
	}
}

func eventType(mask uint32) fspb.EventType {
	switch {
	case mask&unix.IN_CREATE != 0, mask&unix.IN_MOVED_TO != 0:
		return fspb.EventType_EVENT_TYPE_CREATE
	case mask&(unix.IN_MODIFY|unix.IN_CLOSE_WRITE) != 0:
		return fspb.EventType_EVENT_TYPE_WRITE
	case mask&unix.IN_DELETE != 0:
		return fspb.EventType_EVENT_TYPE_REMOVE
	case mask&unix.IN_MOVED_FROM != 0:
		return fspb.EventType_EVENT_TYPE_RENAME
	case mask&unix.IN_ATTRIB != 0:
		return fspb.EventType_EVENT_TYPE_CHMOD
	}
	return fspb.EventType_EVENT_TYPE_UNSPECIFIED
}

func (w *watcher) push(e *fspb.FilesystemEvent) {
	w.mu.Lock()
	if len(w.queue) >= maxQueued {
		w.queue = w.queue[1:]
	}
	w.queue = append(w.queue, e)
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// take returns and forgets the queued events.
func (w *watcher) take() []*fspb.FilesystemEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	q := w.queue
	w.queue = nil
	return q
}

func (w *watcher) close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.mu.Unlock()
	w.file.Close()
	<-w.done
}

// keepAliveEvery is how often a stream says it is alive: the SDK's
// Keepalive-Ping-Interval header (seconds), else 50 s.
func keepAliveEvery(h map[string][]string) time.Duration {
	if v := connectHeader(h, "Keepalive-Ping-Interval"); v != "" {
		if n, err := strconv.Atoi(v); err == nil && n > 0 && n <= 3600 {
			return time.Duration(n) * time.Second
		}
	}
	return 50 * time.Second
}

func connectHeader(h map[string][]string, k string) string {
	if v := h[k]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func (f *filesystemService) WatchDir(ctx context.Context, req *connect.Request[fspb.WatchDirRequest], stream *connect.ServerStream[fspb.WatchDirResponse]) error {
	path, err := f.s.resolvePath(req.Header(), req.Msg.GetPath())
	if err != nil {
		return err
	}
	var w *watcher
	if err := f.s.asUser(req.Header(), func(User) error {
		w, err = newWatcher(path, req.Msg.GetRecursive(), req.Msg.GetIncludeEntry())
		return err
	}); err != nil {
		return fsError(err)
	}
	defer w.close()
	if err := stream.Send(&fspb.WatchDirResponse{Event: &fspb.WatchDirResponse_Start{Start: &fspb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	tick := time.NewTicker(keepAliveEvery(req.Header()))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if err := stream.Send(&fspb.WatchDirResponse{Event: &fspb.WatchDirResponse_Keepalive{Keepalive: &fspb.WatchDirResponse_KeepAlive{}}}); err != nil {
				return err
			}
		case <-w.notify:
			for _, e := range w.take() {
				if err := stream.Send(&fspb.WatchDirResponse{Event: &fspb.WatchDirResponse_Filesystem{Filesystem: e}}); err != nil {
					return err
				}
			}
		}
	}
}

func (f *filesystemService) CreateWatcher(ctx context.Context, req *connect.Request[fspb.CreateWatcherRequest]) (*connect.Response[fspb.CreateWatcherResponse], error) {
	path, err := f.s.resolvePath(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	f.s.watchMu.Lock()
	n := len(f.s.watchers)
	f.s.watchMu.Unlock()
	if n >= maxWatchers {
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("%d watchers: remove one first", n))
	}
	var w *watcher
	if err := f.s.asUser(req.Header(), func(User) error {
		w, err = newWatcher(path, req.Msg.GetRecursive(), req.Msg.GetIncludeEntry())
		return err
	}); err != nil {
		return nil, fsError(err)
	}
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	f.s.watchMu.Lock()
	f.s.watchers[id] = w
	f.s.watchMu.Unlock()
	return connect.NewResponse(&fspb.CreateWatcherResponse{WatcherId: id}), nil
}

func (f *filesystemService) watcher(id string) (*watcher, error) {
	f.s.watchMu.Lock()
	defer f.s.watchMu.Unlock()
	w := f.s.watchers[id]
	if w == nil {
		return nil, connect.NewError(connect.CodeNotFound, errors.New("no such watcher"))
	}
	return w, nil
}

func (f *filesystemService) GetWatcherEvents(ctx context.Context, req *connect.Request[fspb.GetWatcherEventsRequest]) (*connect.Response[fspb.GetWatcherEventsResponse], error) {
	w, err := f.watcher(req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&fspb.GetWatcherEventsResponse{Events: w.take()}), nil
}

func (f *filesystemService) RemoveWatcher(ctx context.Context, req *connect.Request[fspb.RemoveWatcherRequest]) (*connect.Response[fspb.RemoveWatcherResponse], error) {
	w, err := f.watcher(req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	f.s.watchMu.Lock()
	delete(f.s.watchers, req.Msg.GetWatcherId())
	f.s.watchMu.Unlock()
	w.close()
	return connect.NewResponse(&fspb.RemoveWatcherResponse{}), nil
}
