package volume

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/go-git/go-billy/v5"
	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"
)

// Server serves one volume's directory over NFSv3 (MOUNT and NFS on one port: a guest
// mounts it with no helper, see the package tests). Its file handles are the kernel's
// own handles of the files (inode and generation), so that they stay valid across a
// restart of the server, another server of the same directory (the one in a migrated
// sandbox's new namespace), and a block copy of the volume's filesystem: a client that
// reconnects goes on with the handles it has.
type Server struct {
	fs *beneath
	// readOnly: the mount is read-only, whatever the guest asks (NFS3ERR_ROFS, EROFS in
	// the guest).
	readOnly bool
	// dir is the volume's directory as this process resolves it (for checking that a
	// handle names a file in it).
	dir string
	// mountID is the kernel's ID of the mount the volume is on (handles are per mount).
	mountID int
	// export is the mount's number among its sandbox's (written into its handles, so
	// that the lock manager, one for all of them, knows whose file a handle names).
	export uint32
}

// handleMagic starts every handle: a version of their format (magic, export, the
// kernel's handle type, the kernel's handle).
const handleMagic = 0x66770002

// NewServer opens the volume at dir (a directory the caller made and keeps), to be served
// read-only if readOnly.
func NewServer(dir string, readOnly bool) (*Server, error) {
	abs, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, fmt.Errorf("volume directory %s: %w", dir, err)
	}
	b, err := openBeneath(abs)
	if err != nil {
		return nil, err
	}
	// The kernel's handle of the root tells which mount the volume is on.
	_, mnt, err := unix.NameToHandleAt(int(b.root.Fd()), "", unix.AT_EMPTY_PATH)
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("volume directory %s: its filesystem gives no file handles: %w", abs, err)
	}
	return &Server{fs: b, dir: abs, mountID: mnt, readOnly: readOnly}, nil
}

// Close releases the volume's directory.
func (s *Server) Close() error { return s.fs.Close() }

// Serve answers NFS calls on ln until it is closed.
func (s *Server) Serve(ln net.Listener) error { return nfs.Serve(ln, s) }

// Mount answers every MOUNT call with the volume (the namespace it is served in decides
// who may call).
func (s *Server) Mount(ctx context.Context, conn net.Conn, req nfs.MountRequest) (nfs.MountStatus, billy.Filesystem, []nfs.AuthFlavor) {
	return nfs.MountStatusOk, s.filesystem(), []nfs.AuthFlavor{nfs.AuthFlavorNull}
}

// filesystem is the volume as clients get it: without write capability when read-only,
// which go-nfs answers with NFS3ERR_ROFS before it touches anything.
func (s *Server) filesystem() billy.Filesystem {
	if s.readOnly {
		return readOnlyFS{s.fs}
	}
	return s.fs
}

// readOnlyFS is a volume served read-only: it says so, and opens nothing for writing
// should a call not ask first.
type readOnlyFS struct{ *beneath }

func (r readOnlyFS) Capabilities() billy.Capability {
	return billy.ReadCapability | billy.SeekCapability
}

func (r readOnlyFS) OpenFile(name string, flag int, perm os.FileMode) (billy.File, error) {
	if flag&(os.O_WRONLY|os.O_RDWR|os.O_CREATE|os.O_TRUNC|os.O_APPEND) != 0 {
		return nil, &os.PathError{Op: "open", Path: name, Err: unix.EROFS}
	}
	return r.beneath.OpenFile(name, flag, perm)
}

func rofs(op, name string) error { return &os.PathError{Op: op, Path: name, Err: unix.EROFS} }

func (r readOnlyFS) Create(name string) (billy.File, error) { return nil, rofs("create", name) }
func (r readOnlyFS) TempFile(dir, _ string) (billy.File, error) {
	return nil, rofs("tempfile", dir)
}
func (r readOnlyFS) Rename(from, _ string) error               { return rofs("rename", from) }
func (r readOnlyFS) Remove(name string) error                  { return rofs("remove", name) }
func (r readOnlyFS) MkdirAll(name string, _ os.FileMode) error { return rofs("mkdir", name) }
func (r readOnlyFS) Symlink(_, link string) error              { return rofs("symlink", link) }

// Change lets clients set attributes (none on a read-only volume).
func (s *Server) Change(billy.Filesystem) billy.Change {
	if s.readOnly {
		return nil
	}
	return s.fs
}

// FSStat reports the volume's filesystem's space.
func (s *Server) FSStat(ctx context.Context, _ billy.Filesystem, st *nfs.FSStat) error {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(s.fs.root.Fd()), &fs); err != nil {
		return err
	}
	bs := uint64(fs.Bsize)
	st.TotalSize, st.FreeSize, st.AvailableSize = fs.Blocks*bs, fs.Bfree*bs, fs.Bavail*bs
	st.TotalFiles, st.FreeFiles, st.AvailableFiles = fs.Files, fs.Ffree, fs.Ffree
	return nil
}

// ToHandle is the file's kernel handle, behind the format's magic and its type.
func (s *Server) ToHandle(_ billy.Filesystem, p []string) []byte {
	name := rel(strings.Join(p, "/"))
	var h unix.FileHandle
	var err error
	if name == "." {
		h, _, err = unix.NameToHandleAt(int(s.fs.root.Fd()), "", unix.AT_EMPTY_PATH)
	} else {
		// A connectable handle (it names the parent directory too): decoded when the
		// file's name is no longer cached (the volume mounted again, memory pressure),
		// the kernel finds the file's path again, which FromHandle needs; a plain one
		// decodes to a file without a path, answered as stale.
		var d *os.File
		var base string
		if d, base, err = s.fs.parent(name); err != nil {
			return nil
		}
		h, _, err = unix.NameToHandleAt(int(d.Fd()), base, atHandleConnectable)
		if err != nil {
			h, _, err = unix.NameToHandleAt(int(d.Fd()), base, 0) // a directory's
		}
		d.Close()
	}
	if err != nil {
		return nil
	}
	out := binary.BigEndian.AppendUint32(nil, handleMagic)
	out = binary.BigEndian.AppendUint32(out, s.export)
	out = binary.BigEndian.AppendUint32(out, uint32(h.Type()))
	return append(out, h.Bytes()...)
}

// atHandleConnectable asks name_to_handle_at for a connectable handle (Linux 6.13;
// golang.org/x/sys has no name for it yet).
const atHandleConnectable = 0x2

// kernelHandle is the kernel's handle in fh, if fh is one of this server's.
func (s *Server) kernelHandle(fh []byte) (unix.FileHandle, bool) {
	if len(fh) < 12 || len(fh) > 64 || binary.BigEndian.Uint32(fh) != handleMagic || binary.BigEndian.Uint32(fh[4:]) != s.export {
		return unix.FileHandle{}, false
	}
	return unix.NewFileHandle(int32(binary.BigEndian.Uint32(fh[8:12])), fh[12:]), true
}

// openHandle opens the regular file fh names (O_RDWR or O_RDONLY by flags), for a lock.
func (s *Server) openHandle(fh []byte, flags int) (*os.File, error) {
	h, ok := s.kernelHandle(fh)
	if !ok {
		return nil, unix.ESTALE
	}
	fd, err := unix.OpenByHandleAt(int(s.fs.root.Fd()), h, flags|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EISDIR) {
			return nil, unix.EINVAL
		}
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "lock")
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, unix.EINVAL
	}
	return f, nil
}

// FromHandle finds the file of a handle: the kernel opens it by its handle, and its path
// is read back and must be in the volume.
func (s *Server) FromHandle(fh []byte) (billy.Filesystem, []string, error) {
	stale := &nfs.NFSStatusError{NFSStatus: nfs.NFSStatusStale}
	h, ok := s.kernelHandle(fh)
	if !ok {
		return nil, nil, stale
	}
	fd, err := unix.OpenByHandleAt(int(s.fs.root.Fd()), h, unix.O_PATH|unix.O_CLOEXEC)
	if err != nil {
		return nil, nil, stale
	}
	defer unix.Close(fd)
	where, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return nil, nil, stale
	}
	r, err := filepath.Rel(s.dir, where)
	if err != nil || r == ".." || strings.HasPrefix(r, "../") || strings.HasSuffix(where, " (deleted)") {
		// Not in the volume (another file of the same filesystem), or gone.
		return nil, nil, stale
	}
	if r == "." {
		return s.filesystem(), []string{}, nil
	}
	return s.filesystem(), strings.Split(r, "/"), nil
}

// InvalidateHandle: handles are the kernel's; nothing is kept to forget.
func (s *Server) InvalidateHandle(billy.Filesystem, []byte) error { return nil }

// HandleLimit: no handle is kept.
func (s *Server) HandleLimit() int { return 1 << 30 }

var _ nfs.Handler = (*Server)(nil)
