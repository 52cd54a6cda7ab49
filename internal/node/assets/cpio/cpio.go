// Package cpio writes the "newc" (SVR4, no CRC) cpio archives the Linux kernel unpacks as an
// initramfs. Only what an initramfs needs is supported: directories, regular files,
// symlinks and device nodes. Written here rather than shelling out to cpio(1) so the
// archive is byte-for-byte reproducible (fixed mtimes, owners and inode numbers).
package cpio

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

const (
	magic   = "070701"
	trailer = "TRAILER!!!"

	// File type bits as the kernel's initramfs unpacker expects them (S_IF* values).
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
	modeBlk  = 0o060000
)

// Writer appends entries to a newc archive. Entries are written in call order; parents must
// be added before their children because the kernel creates them in archive order.
type Writer struct {
	w      io.Writer
	ino    uint32
	seen   map[string]bool
	closed bool
	err    error
}

// NewWriter returns a Writer that writes the archive to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w, ino: 1, seen: map[string]bool{}}
}

// clean turns "/a/b/" into "a/b", the form the kernel's unpacker wants (relative paths).
func clean(name string) (string, error) {
	p := strings.TrimPrefix(path.Clean("/"+name), "/")
	if p == "" || p == "." {
		return "", fmt.Errorf("cpio: invalid entry name %q", name)
	}
	return p, nil
}

// Dir adds a directory.
func (cw *Writer) Dir(name string, perm fs.FileMode) error {
	return cw.entry(name, modeDir|uint32(perm.Perm()), 0, 0, nil)
}

// File adds a regular file with the given permission bits and contents.
func (cw *Writer) File(name string, perm fs.FileMode, data []byte) error {
	return cw.entry(name, modeReg|uint32(perm.Perm()), 0, 0, data)
}

// Symlink adds a symbolic link name -> target.
func (cw *Writer) Symlink(name, target string) error {
	return cw.entry(name, modeLink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node; /dev/console must exist in the archive so the
// kernel can open the console for init before devtmpfs is mounted.
func (cw *Writer) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return cw.entry(name, modeChr|uint32(perm.Perm()), major, minor, nil)
}

// BlockDev adds a block device node.
func (cw *Writer) BlockDev(name string, perm fs.FileMode, major, minor uint32) error {
	return cw.entry(name, modeBlk|uint32(perm.Perm()), major, minor, nil)
}

func (cw *Writer) entry(name string, mode, rmajor, rminor uint32, data []byte) error {
	if cw.err != nil {
		return cw.err
	}
	if cw.closed {
		return fmt.Errorf("cpio: write of %q after Close", name)
	}
	p, err := clean(name)
	if err != nil {
		return err
	}
	if cw.seen[p] {
		return fmt.Errorf("cpio: duplicate entry %q", p)
	}
	cw.seen[p] = true
	if err := cw.header(p, mode, rmajor, rminor, data); err != nil {
		cw.err = err
	}
	return cw.err
}

func (cw *Writer) header(name string, mode, rmajor, rminor uint32, data []byte) error {
	if uint64(len(data)) > 0xffffffff {
		return fmt.Errorf("cpio: %q is larger than newc's 4 GiB limit", name)
	}
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	ino := cw.ino
	cw.ino++
	// 13 fields of 8 hex digits after the magic: ino mode uid gid nlink mtime filesize
	// devmajor devminor rdevmajor rdevminor namesize check.
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		magic, ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	if _, err := cw.w.Write(buf); err != nil {
		return fmt.Errorf("cpio: write header of %q: %w", name, err)
	}
	if len(data) > 0 {
		if _, err := cw.w.Write(data); err != nil {
			return fmt.Errorf("cpio: write data of %q: %w", name, err)
		}
		if n := len(data) % 4; n != 0 {
			if _, err := cw.w.Write(make([]byte, 4-n)); err != nil {
				return fmt.Errorf("cpio: pad data of %q: %w", name, err)
			}
		}
	}
	return nil
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// Close writes the trailer entry. It does not close the underlying writer.
func (cw *Writer) Close() error {
	if cw.err != nil {
		return cw.err
	}
	if cw.closed {
		return nil
	}
	cw.closed = true
	cw.ino = 0
	if err := cw.header(trailer, 0, 0, 0, nil); err != nil {
		cw.err = err
		return err
	}
	return nil
}
