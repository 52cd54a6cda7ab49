// Package volume serves one volume's directory over NFSv3 to the sandboxes that mount
// it, each on the gateway address of its own network namespace. The guest is hostile
// and writes the volume: every path is resolved by the kernel beneath the volume's root
// (openat2 RESOLVE_BENEATH), never by joining strings, so that no symlink a guest made,
// and no rename it races, leads the server out of the volume.
package volume

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-git/go-billy/v5"
	nfsfile "github.com/willscott/go-nfs/file"
	"golang.org/x/sys/unix"
)

// resolve is how every path is looked up: beneath the root, no /proc magic links, no
// other mount.
const resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// beneath is a billy.Filesystem (and billy.Change) over a directory, held open, in which
// every path is resolved by the kernel beneath it.
type beneath struct {
	root *os.File // the volume's directory

	// files are the files handed out and not closed yet: Close closes them (go-nfs does
	// not close a file whose write failed, and a volume must be unmountable once it is
	// no longer served).
	mu    sync.Mutex
	files map[*file]struct{}
}

func openBeneath(dir string) (*beneath, error) {
	f, err := os.OpenFile(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open volume directory %s: %w", dir, err)
	}
	return &beneath{root: f, files: map[*file]struct{}{}}, nil
}

// Close closes the volume's directory and every file still open in it.
func (b *beneath) Close() error {
	b.mu.Lock()
	files := b.files
	b.files = map[*file]struct{}{}
	b.mu.Unlock()
	for f := range files {
		_ = f.File.Close()
	}
	return b.root.Close()
}

// rel turns a billy path ("/a/b", "a/b", "") into one relative to the root ("." for
// the root itself).
func rel(p string) string {
	p = strings.TrimPrefix(path.Clean("/"+p), "/")
	if p == "" {
		return "."
	}
	return p
}

// open opens p beneath the root.
func (b *beneath) open(p string, flags int, mode uint32) (*os.File, error) {
	if flags&(unix.O_CREAT|unix.O_TMPFILE) == 0 {
		mode = 0 // openat2 refuses a mode it would not use
	}
	fd, err := unix.Openat2(int(b.root.Fd()), rel(p), &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolve})
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	return os.NewFile(uintptr(fd), p), nil
}

// parent opens the directory p is in (beneath the root) and returns it with p's last
// element, for the *at calls that must not follow a last symlink.
func (b *beneath) parent(p string) (*os.File, string, error) {
	r := rel(p)
	if r == "." {
		return nil, "", &fs.PathError{Op: "lookup", Path: p, Err: unix.EINVAL}
	}
	dir, base := path.Split(r)
	d, err := b.open(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", err
	}
	return d, base, nil
}

func (b *beneath) Create(filename string) (billy.File, error) {
	return b.OpenFile(filename, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o666)
}

func (b *beneath) Open(filename string) (billy.File, error) {
	return b.OpenFile(filename, os.O_RDONLY, 0)
}

func (b *beneath) OpenFile(filename string, flag int, perm os.FileMode) (billy.File, error) {
	f, err := b.open(filename, flag, uint32(perm.Perm()))
	if err != nil {
		return nil, err
	}
	bf := &file{File: f, fs: b}
	b.mu.Lock()
	b.files[bf] = struct{}{}
	b.mu.Unlock()
	return bf, nil
}

func (b *beneath) Stat(filename string) (os.FileInfo, error) {
	// Follows a last symlink, beneath the root only.
	f, err := b.open(filename, unix.O_PATH, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstatat(int(f.Fd()), "", &st, unix.AT_EMPTY_PATH); err != nil {
		return nil, &fs.PathError{Op: "stat", Path: filename, Err: err}
	}
	return fileInfo(path.Base(rel(filename)), &st), nil
}

func (b *beneath) Lstat(filename string) (os.FileInfo, error) {
	if rel(filename) == "." {
		return b.Stat(filename)
	}
	d, base, err := b.parent(filename)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	var st unix.Stat_t
	if err := unix.Fstatat(int(d.Fd()), base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return nil, &fs.PathError{Op: "lstat", Path: filename, Err: err}
	}
	return fileInfo(base, &st), nil
}

func (b *beneath) Rename(oldpath, newpath string) error {
	od, obase, err := b.parent(oldpath)
	if err != nil {
		return err
	}
	defer od.Close()
	nd, nbase, err := b.parent(newpath)
	if err != nil {
		return err
	}
	defer nd.Close()
	if err := unix.Renameat(int(od.Fd()), obase, int(nd.Fd()), nbase); err != nil {
		return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: err}
	}
	return nil
}

func (b *beneath) Remove(filename string) error {
	d, base, err := b.parent(filename)
	if err != nil {
		return err
	}
	defer d.Close()
	err = unix.Unlinkat(int(d.Fd()), base, 0)
	if errors.Is(err, unix.EISDIR) {
		err = unix.Unlinkat(int(d.Fd()), base, unix.AT_REMOVEDIR)
	}
	if err != nil {
		return &fs.PathError{Op: "remove", Path: filename, Err: err}
	}
	return nil
}

func (b *beneath) Join(elem ...string) string { return path.Join(elem...) }

func (b *beneath) TempFile(dir, prefix string) (billy.File, error) {
	for i := 0; i < 100; i++ {
		name := path.Join(dir, prefix+strconv.FormatInt(time.Now().UnixNano()+int64(i), 36))
		f, err := b.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if !errors.Is(err, fs.ErrExist) {
			return f, err
		}
	}
	return nil, &fs.PathError{Op: "tempfile", Path: dir, Err: fs.ErrExist}
}

func (b *beneath) ReadDir(p string) ([]os.FileInfo, error) {
	d, err := b.open(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, &fs.PathError{Op: "readdir", Path: p, Err: err}
	}
	out := make([]os.FileInfo, 0, len(names))
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(int(d.Fd()), n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue // gone meanwhile
		}
		out = append(out, fileInfo(n, &st))
	}
	return out, nil
}

func (b *beneath) MkdirAll(filename string, perm os.FileMode) error {
	r := rel(filename)
	if r == "." {
		return nil
	}
	cur := "."
	for _, part := range strings.Split(r, "/") {
		d, err := b.open(cur, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return err
		}
		err = unix.Mkdirat(int(d.Fd()), part, uint32(perm.Perm()))
		d.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return &fs.PathError{Op: "mkdir", Path: filename, Err: err}
		}
		cur = path.Join(cur, part)
	}
	// What is there must be a directory (not a symlink out, nor a file).
	if fi, err := b.Lstat(filename); err != nil || !fi.IsDir() {
		return &fs.PathError{Op: "mkdir", Path: filename, Err: unix.ENOTDIR}
	}
	return nil
}

func (b *beneath) Symlink(target, link string) error {
	// The target is stored as given: it is resolved beneath the root whenever it is
	// followed here, and a guest's own kernel resolves it in the guest.
	d, base, err := b.parent(link)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Symlinkat(target, int(d.Fd()), base); err != nil {
		return &os.LinkError{Op: "symlink", Old: target, New: link, Err: err}
	}
	return nil
}

func (b *beneath) Readlink(link string) (string, error) {
	d, base, err := b.parent(link)
	if err != nil {
		return "", err
	}
	defer d.Close()
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(int(d.Fd()), base, buf)
	if err != nil {
		return "", &fs.PathError{Op: "readlink", Path: link, Err: err}
	}
	return string(buf[:n]), nil
}

func (b *beneath) Chroot(p string) (billy.Filesystem, error) {
	return nil, &fs.PathError{Op: "chroot", Path: p, Err: unix.ENOTSUP}
}

func (b *beneath) Root() string { return "/" }

// viaFD runs fn on p opened beneath the root without following a last symlink (O_PATH
// then the descriptor's /proc link, which this process opened itself).
func (b *beneath) viaFD(p string, fn func(procPath string) error) error {
	f, err := b.open(p, unix.O_PATH|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return fn("/proc/self/fd/" + strconv.Itoa(int(f.Fd())))
}

func (b *beneath) Chmod(name string, mode os.FileMode) error {
	return b.viaFD(name, func(p string) error { return os.Chmod(p, mode) })
}

func (b *beneath) Lchown(name string, uid, gid int) error {
	if selfUID != 0 && (uint32(uid) == selfUID || uint32(gid) == selfGID) {
		// The server's own ids are the node's root's as a guest sees them (swapID); a
		// chown to them would make a file the node's root's.
		return &fs.PathError{Op: "chown", Path: name, Err: unix.EPERM}
	}
	return b.viaFD(name, func(p string) error {
		return unix.Fchownat(unix.AT_FDCWD, p, int(swapID(uint32(uid), selfUID)), int(swapID(uint32(gid), selfGID)), 0)
	})
}

// The server runs as a user of its own, not as root (see ServerCommand), yet a guest's
// root must see its files as root's: the server's user and root trade places between
// what is on the node and what a guest sees (both ways, so that no guest's chown makes
// a file the node's root's). A server that is root (tests) changes nothing.
var selfUID, selfGID = uint32(os.Getuid()), uint32(os.Getgid())

// swapID is id as the other side sees it: self and 0 trade places.
func swapID(id, self uint32) uint32 {
	switch id {
	case self:
		return 0
	case 0:
		return self
	}
	return id
}

func (b *beneath) Chown(name string, uid, gid int) error { return b.Lchown(name, uid, gid) }

func (b *beneath) Chtimes(name string, atime, mtime time.Time) error {
	return b.viaFD(name, func(p string) error { return os.Chtimes(p, atime, mtime) })
}

// file is an open file of the volume (its os.File's name is its path in the volume).
type file struct {
	*os.File
	fs *beneath
}

func (f *file) Close() error {
	f.fs.mu.Lock()
	delete(f.fs.files, f)
	f.fs.mu.Unlock()
	return f.File.Close()
}

// go-nfs returns on a failed write, seek or read without closing the file: one left
// open after the write that filled the volume would keep an unlinked file's space taken
// (the guest's rm would free nothing). A file closes itself when one of those fails.

func (f *file) Write(b []byte) (int, error) {
	n, err := f.File.Write(b)
	if err != nil {
		_ = f.Close()
	}
	return n, err
}

func (f *file) Seek(off int64, whence int) (int64, error) {
	n, err := f.File.Seek(off, whence)
	if err != nil {
		_ = f.Close()
	}
	return n, err
}

func (f *file) Truncate(size int64) error {
	err := f.File.Truncate(size)
	if err != nil {
		_ = f.Close()
	}
	return err
}

func (f *file) ReadAt(b []byte, off int64) (int, error) {
	n, err := f.File.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		_ = f.Close()
	}
	return n, err
}

func (f *file) Lock() error   { return unix.Flock(int(f.Fd()), unix.LOCK_EX) }
func (f *file) Unlock() error { return unix.Flock(int(f.Fd()), unix.LOCK_UN) }

// statInfo is an os.FileInfo of a stat result; its Sys is what go-nfs reads of a file
// beyond os.FileInfo (owner, links, device, inode).
type statInfo struct {
	name string
	st   unix.Stat_t
}

func fileInfo(name string, st *unix.Stat_t) os.FileInfo { return &statInfo{name: name, st: *st} }

func (i *statInfo) Name() string       { return i.name }
func (i *statInfo) Size() int64        { return i.st.Size }
func (i *statInfo) ModTime() time.Time { return time.Unix(i.st.Mtim.Unix()) }
func (i *statInfo) IsDir() bool        { return i.st.Mode&unix.S_IFMT == unix.S_IFDIR }
func (i *statInfo) Sys() any {
	return nfsfile.FileInfo{Nlink: uint32(i.st.Nlink), UID: swapID(i.st.Uid, selfUID), GID: swapID(i.st.Gid, selfGID),
		Major: unix.Major(i.st.Rdev), Minor: unix.Minor(i.st.Rdev), Fileid: i.st.Ino}
}
func (i *statInfo) Mode() os.FileMode {
	m := os.FileMode(i.st.Mode & 0o777)
	switch i.st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		m |= os.ModeDir
	case unix.S_IFLNK:
		m |= os.ModeSymlink
	case unix.S_IFIFO:
		m |= os.ModeNamedPipe
	case unix.S_IFSOCK:
		m |= os.ModeSocket
	case unix.S_IFCHR:
		m |= os.ModeDevice | os.ModeCharDevice
	case unix.S_IFBLK:
		m |= os.ModeDevice
	}
	if i.st.Mode&unix.S_ISUID != 0 {
		m |= os.ModeSetuid
	}
	if i.st.Mode&unix.S_ISGID != 0 {
		m |= os.ModeSetgid
	}
	if i.st.Mode&unix.S_ISVTX != 0 {
		m |= os.ModeSticky
	}
	return m
}
