// Package unpack applies OCI image layers (uncompressed tar streams) to a
// directory tree, confined to that tree.
//
// Layers are untrusted input: an image from any registry may be built to
// attack the host that unpacks it. Every path in a layer is resolved inside
// the tree with chroot semantics (see resolveDir), so absolute symlinks that
// are normal in images (var/run -> /run) keep working and a later entry
// written through one lands inside the tree. On top of that the following are
// refused with an error wrapping ErrHostileLayer, and the caller is expected
// to throw the whole tree away:
//
//   - entry or hardlink names that are absolute or climb out with "..";
//     conforming tools never write them (tar strips a leading "/"), so
//     refusing costs nothing and makes an attack loud instead of silently
//     re-rooted;
//   - hardlinks whose target is not an existing non-directory in the tree;
//   - entries over the size, count and name-length limits;
//   - unknown entry types.
//
// Character and block device nodes and FIFOs are recorded, as Docker and
// containerd record them: debootstrap and `docker import` roots carry
// /dev/null, /dev/full and friends, and a runtime that refuses them refuses
// real images. They are made (mknodat, never opened) in the private staging
// tree only so that mkfs can write them into the guest's root disk; nothing on
// the host opens them, the tree is removed after the build, and in the guest
// they are the guest kernel's devices (the guest's own devtmpfs is mounted
// over /dev). Without the privilege to make them (not root) they are skipped
// with a warning, as rootless Docker does.
//
// Symlink targets are data: they are stored verbatim, whatever they point at,
// and only ever interpreted inside the tree here (and inside the guest later).
package unpack

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrHostileLayer marks a layer refused because of what it contains (an
// escape attempt, a limit exceeded), as opposed to an I/O
// failure on the host.
var ErrHostileLayer = errors.New("hostile layer refused")

// ErrTooLarge is returned (wrapped, with ErrHostileLayer) when the layers' files pass
// Limits.MaxTotalBytes: a limit the caller may have set lower than usual.
var ErrTooLarge = errors.New("files larger than allowed")

// Limits bound what a set of layers may make the host write. The counters
// are cumulative over every layer one Unpacker applies.
type Limits struct {
	// MaxTotalBytes bounds the sum of regular-file sizes over all layers.
	MaxTotalBytes int64
	// MaxFileBytes bounds one regular file.
	MaxFileBytes int64
	// MaxEntries bounds the number of tar entries over all layers.
	MaxEntries int64
	// MaxPathLen bounds an entry name or a link target, in bytes.
	MaxPathLen int
}

// DefaultLimits are generous for real images (the largest common base images
// are a few GiB unpacked and a few hundred thousand files) and still keep a
// hostile image from filling the host's disk or inode table.
func DefaultLimits() Limits {
	return Limits{
		MaxTotalBytes: 8 << 30,
		MaxFileBytes:  4 << 30,
		MaxEntries:    2_000_000,
		MaxPathLen:    4096,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxTotalBytes <= 0 {
		l.MaxTotalBytes = d.MaxTotalBytes
	}
	if l.MaxFileBytes <= 0 {
		l.MaxFileBytes = d.MaxFileBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = d.MaxEntries
	}
	if l.MaxPathLen <= 0 {
		l.MaxPathLen = d.MaxPathLen
	}
	return l
}

// Unpacker applies layers, in order, to one tree. It is not safe for
// concurrent use, and the tree must not be changed by anyone else while it
// works (it is meant to be a private staging directory).
type Unpacker struct {
	root    string
	rootFD  int
	lim     Limits
	log     *slog.Logger
	bytes   int64
	entries int64
	// skipped holds the paths of device nodes and FIFOs left out for want of privilege,
	// so that hardlinks to them are left out too rather than refused.
	skipped map[string]bool
}

// New opens root, an existing directory, for unpacking into. Zero fields of
// lim take their DefaultLimits value. log may be nil.
func New(root string, lim Limits, log *slog.Logger) (*Unpacker, error) {
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open unpack root %s: %w", root, err)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Unpacker{root: root, rootFD: fd, lim: lim.withDefaults(), log: log}, nil
}

// Close releases the tree's descriptor.
func (u *Unpacker) Close() error {
	if u.rootFD < 0 {
		return nil
	}
	err := unix.Close(u.rootFD)
	u.rootFD = -1
	return err
}

// layerState is what one layer's application needs to remember.
type layerState struct {
	// written holds every path this layer created, and all their ancestors,
	// so an opaque whiteout hides only what lower layers put there.
	written map[string]bool
	// dirTimes are applied at the end of the layer: entries written into a
	// directory after its own entry would otherwise reset its mtime.
	dirTimes []dirTime
}

type dirTime struct {
	comps        []string
	atime, mtime time.Time
}

// Apply reads one uncompressed layer tar from r and applies it. It stops at
// the end-of-archive marker; the caller owns whatever follows.
func (u *Unpacker) Apply(ctx context.Context, r io.Reader) error {
	tr := tar.NewReader(r)
	st := &layerState{written: map[string]bool{}}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer tar: %w", err)
		}
		u.entries++
		if u.entries > u.lim.MaxEntries {
			return fmt.Errorf("%w: more than %d entries", ErrHostileLayer, u.lim.MaxEntries)
		}
		if err := u.entry(ctx, tr, hdr, st); err != nil {
			return fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
	}
	for _, dt := range st.dirTimes {
		if err := u.setDirTime(dt); err != nil {
			return err
		}
	}
	return nil
}

func hostile(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrHostileLayer, fmt.Sprintf(format, args...))
}

// clean turns an archive member name into components relative to the root,
// refusing names that are absolute or climb out. An empty result is the root.
func (u *Unpacker) clean(name string) ([]string, error) {
	if len(name) > u.lim.MaxPathLen {
		return nil, hostile("name longer than %d bytes", u.lim.MaxPathLen)
	}
	if strings.HasPrefix(name, "/") {
		return nil, hostile("absolute path %q", name)
	}
	p := path.Clean(name)
	if p == ".." || strings.HasPrefix(p, "../") {
		return nil, hostile("path %q climbs out of the root", name)
	}
	if p == "." {
		return nil, nil
	}
	return strings.Split(p, "/"), nil
}

func (st *layerState) record(comps []string) {
	// From the full path up: once an ancestor is known, so are its own.
	for i := len(comps); i >= 1; i-- {
		k := strings.Join(comps[:i], "/")
		if st.written[k] {
			return
		}
		st.written[k] = true
	}
}

func (u *Unpacker) entry(ctx context.Context, tr *tar.Reader, hdr *tar.Header, st *layerState) error {
	comps, err := u.clean(hdr.Name)
	if err != nil {
		return err
	}
	if len(comps) > 0 && strings.HasPrefix(comps[len(comps)-1], ".wh.") {
		return u.whiteout(comps, st)
	}
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader:
		return nil
	case tar.TypeDir:
		if len(comps) == 0 {
			return u.rootMeta(hdr)
		}
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if len(comps) == 0 {
			return hostile("non-directory entry for the root")
		}
	default:
		return hostile("unsupported entry type %q", hdr.Typeflag)
	}
	st.record(comps)
	if u.skipped != nil {
		delete(u.skipped, strings.Join(comps, "/")) // whatever lands there now replaces it
	}

	parent, err := resolveDir(u.rootFD, comps[:len(comps)-1], true)
	if err != nil {
		return fmt.Errorf("resolve parent: %w", err)
	}
	defer unix.Close(parent)
	base := comps[len(comps)-1]

	switch hdr.Typeflag {
	case tar.TypeDir:
		return u.dir(parent, base, comps, hdr, st)
	case tar.TypeSymlink:
		return u.symlink(parent, base, hdr)
	case tar.TypeLink:
		return u.hardlink(parent, base, hdr)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		return u.node(parent, base, strings.Join(comps, "/"), hdr)
	default:
		return u.file(ctx, parent, base, tr, hdr)
	}
}

func (u *Unpacker) whiteout(comps []string, st *layerState) error {
	base := comps[len(comps)-1]
	dirComps := comps[:len(comps)-1]
	dir, err := resolveDir(u.rootFD, dirComps, false)
	if errors.Is(err, unix.ENOENT) {
		return nil // nothing below to hide
	}
	if err != nil {
		return fmt.Errorf("resolve whiteout directory: %w", err)
	}
	defer unix.Close(dir)

	if base == ".wh..wh..opq" {
		return u.opaque(dir, strings.Join(dirComps, "/"), st)
	}
	if strings.HasPrefix(base, ".wh..wh.") {
		return nil // other AUFS metadata (.wh..wh.plnk and friends) carries nothing for us
	}
	name := strings.TrimPrefix(base, ".wh.")
	if name == "" || name == "." || name == ".." {
		return hostile("whiteout for %q", name)
	}
	return removeAllAt(dir, name)
}

// opaque hides everything lower layers put below the directory dirFD, keeping
// what this layer wrote there (an opaque marker may come after its siblings).
func (u *Unpacker) opaque(dirFD int, key string, st *layerState) error {
	return clearLower(dirFD, ".", key, st)
}

// clearLower removes the entries of dir (in parent) that this layer did not
// write; key is dir's path from the root.
func clearLower(parent int, dir, key string, st *layerState) error {
	join := func(name string) string {
		if key == "" {
			return name
		}
		return key + "/" + name
	}
	var kept []string
	err := clearDirAt(parent, dir, func(name string) bool {
		if st.written[join(name)] {
			kept = append(kept, name)
			return true
		}
		return false
	})
	if err != nil || len(kept) == 0 {
		return err
	}
	// A kept directory may have been written by this layer only as the
	// parent of a deeper entry: what lower layers left in it is hidden too.
	fd, err := unix.Openat(parent, dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %q: %w", dir, err)
	}
	defer unix.Close(fd)
	for _, name := range kept {
		var s unix.Stat_t
		if err := unix.Fstatat(fd, name, &s, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("stat %q: %w", name, err)
		}
		if s.Mode&unix.S_IFMT == unix.S_IFDIR {
			if err := clearLower(fd, name, join(name), st); err != nil {
				return err
			}
		}
	}
	return nil
}

func (u *Unpacker) dir(parent int, base string, comps []string, hdr *tar.Header, st *layerState) error {
	var s unix.Stat_t
	err := unix.Fstatat(parent, base, &s, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil && s.Mode&unix.S_IFMT == unix.S_IFDIR:
		// Keep it and its contents; only its metadata changes.
	case err == nil:
		if err := removeAllAt(parent, base); err != nil {
			return err
		}
		fallthrough
	case errors.Is(err, unix.ENOENT):
		if err := unix.Mkdirat(parent, base, 0o700); err != nil {
			return fmt.Errorf("mkdir: %w", err)
		}
	default:
		return fmt.Errorf("stat: %w", err)
	}
	fd, err := unix.Openat(parent, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory: %w", err)
	}
	defer unix.Close(fd)
	if err := u.fdMeta(fd, hdr); err != nil {
		return err
	}
	st.dirTimes = append(st.dirTimes, dirTime{comps: comps, atime: atime(hdr), mtime: hdr.ModTime})
	return nil
}

func (u *Unpacker) file(ctx context.Context, parent int, base string, tr *tar.Reader, hdr *tar.Header) error {
	if hdr.Size < 0 || hdr.Size > u.lim.MaxFileBytes {
		return hostile("file size %d exceeds the per-file limit of %d bytes", hdr.Size, u.lim.MaxFileBytes)
	}
	if u.bytes+hdr.Size > u.lim.MaxTotalBytes {
		return fmt.Errorf("%w: %w: layers exceed the limit of %d bytes in total", ErrHostileLayer, ErrTooLarge, u.lim.MaxTotalBytes)
	}
	u.bytes += hdr.Size
	if err := removeAllAt(parent, base); err != nil {
		return err
	}
	fd, err := unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	n, err := io.Copy(f, &ctxReader{ctx: ctx, r: io.LimitReader(tr, hdr.Size)})
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if n != hdr.Size {
		return fmt.Errorf("layer truncated: got %d of %d bytes", n, hdr.Size)
	}
	if err := u.fdMeta(fd, hdr); err != nil {
		return err
	}
	return setTimes(parent, base, hdr)
}

func (u *Unpacker) symlink(parent int, base string, hdr *tar.Header) error {
	if hdr.Linkname == "" || len(hdr.Linkname) > u.lim.MaxPathLen {
		return hostile("symlink target of %d bytes", len(hdr.Linkname))
	}
	if err := removeAllAt(parent, base); err != nil {
		return err
	}
	if err := unix.Symlinkat(hdr.Linkname, parent, base); err != nil {
		return fmt.Errorf("symlink: %w", err)
	}
	if err := unix.Fchownat(parent, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	return setTimes(parent, base, hdr)
}

// node records a device node or FIFO. It is made with mknodat and never
// opened: its mode is set by name (it cannot be a symlink, having just been
// made), and its extended attributes are not applied.
func (u *Unpacker) node(parent int, base, key string, hdr *tar.Header) error {
	if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor > 0xfffff {
		return hostile("device number %d:%d out of range", hdr.Devmajor, hdr.Devminor)
	}
	typ, what := uint32(unix.S_IFIFO), "FIFO"
	switch hdr.Typeflag {
	case tar.TypeChar:
		typ, what = unix.S_IFCHR, "character device"
	case tar.TypeBlock:
		typ, what = unix.S_IFBLK, "block device"
	}
	if err := removeAllAt(parent, base); err != nil {
		return err
	}
	dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
	if typ == unix.S_IFIFO {
		dev = 0
	}
	if err := unix.Mknodat(parent, base, typ|0o600, int(dev)); err != nil {
		if errors.Is(err, unix.EPERM) {
			u.log.Warn("skipping "+what+" in image layer: no privilege to make it here", "path", hdr.Name)
			if u.skipped == nil {
				u.skipped = map[string]bool{}
			}
			u.skipped[key] = true
			return nil
		}
		return fmt.Errorf("mknod %s %d:%d: %w", what, hdr.Devmajor, hdr.Devminor, err)
	}
	if err := unix.Fchownat(parent, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("chown %d:%d: %w", hdr.Uid, hdr.Gid, err)
	}
	if err := unix.Fchmodat(parent, base, uint32(hdr.Mode)&0o7777, 0); err != nil {
		return fmt.Errorf("chmod %o: %w", hdr.Mode, err)
	}
	return setTimes(parent, base, hdr)
}

func (u *Unpacker) hardlink(parent int, base string, hdr *tar.Header) error {
	tcomps, err := u.clean(hdr.Linkname)
	if err != nil {
		return fmt.Errorf("hardlink target: %w", err)
	}
	if len(tcomps) == 0 {
		return hostile("hardlink to the root directory")
	}
	if u.skipped[strings.Join(tcomps, "/")] {
		u.log.Warn("skipping hardlink to a node that was skipped", "path", hdr.Name, "target", hdr.Linkname)
		return nil
	}
	tparent, err := resolveDir(u.rootFD, tcomps[:len(tcomps)-1], false)
	if err != nil {
		return hostile("hardlink target %q is not in the tree: %v", hdr.Linkname, err)
	}
	defer unix.Close(tparent)
	tbase := tcomps[len(tcomps)-1]
	var ts unix.Stat_t
	if err := unix.Fstatat(tparent, tbase, &ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return hostile("hardlink target %q is not in the tree: %v", hdr.Linkname, err)
	}
	if ts.Mode&unix.S_IFMT == unix.S_IFDIR {
		return hostile("hardlink to directory %q", hdr.Linkname)
	}
	var ds unix.Stat_t
	if err := unix.Fstatat(parent, base, &ds, unix.AT_SYMLINK_NOFOLLOW); err == nil && ds.Dev == ts.Dev && ds.Ino == ts.Ino {
		return nil // already the same file
	}
	if err := removeAllAt(parent, base); err != nil {
		return err
	}
	// Flags 0: a symlink target is linked itself, never followed.
	if err := unix.Linkat(tparent, tbase, parent, base, 0); err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	return nil
}

// rootMeta applies a "./" entry to the tree root, which Unpacker created
// itself, so plain path calls are safe here.
func (u *Unpacker) rootMeta(hdr *tar.Header) error {
	fd, err := unix.Open(u.root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open root: %w", err)
	}
	defer unix.Close(fd)
	if err := u.fdMeta(fd, hdr); err != nil {
		return err
	}
	ts := []unix.Timespec{unix.NsecToTimespec(atime(hdr).UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	return unix.UtimesNanoAt(unix.AT_FDCWD, u.root, ts, 0)
}

// fdMeta sets owner, mode (after the owner: chown clears set-id bits) and
// the allowed extended attributes on an open file or directory.
func (u *Unpacker) fdMeta(fd int, hdr *tar.Header) error {
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		return fmt.Errorf("chown %d:%d: %w", hdr.Uid, hdr.Gid, err)
	}
	if err := unix.Fchmod(fd, uint32(hdr.Mode)&0o7777); err != nil {
		return fmt.Errorf("chmod %o: %w", hdr.Mode, err)
	}
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || !allowedXattr(name) {
			continue
		}
		if err := unix.Fsetxattr(fd, name, []byte(v), 0); err != nil {
			// Extended attributes are best effort: the store's filesystem may
			// not support a namespace; the file itself is still right.
			u.log.Debug("cannot set xattr from image layer", "path", hdr.Name, "xattr", name, "err", err)
		}
	}
	return nil
}

// allowedXattr keeps file capabilities (ping needs them in Debian images)
// and user attributes. trusted.* is refused because the guest stacks an
// overlayfs on the image, which would honour trusted.overlay.* from a layer.
func allowedXattr(name string) bool {
	return name == "security.capability" || strings.HasPrefix(name, "user.")
}

func atime(hdr *tar.Header) time.Time {
	if hdr.AccessTime.IsZero() {
		return hdr.ModTime
	}
	return hdr.AccessTime
}

func setTimes(parent int, base string, hdr *tar.Header) error {
	ts := []unix.Timespec{unix.NsecToTimespec(atime(hdr).UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	if err := unix.UtimesNanoAt(parent, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

func (u *Unpacker) setDirTime(dt dirTime) error {
	parent, err := resolveDir(u.rootFD, dt.comps[:len(dt.comps)-1], false)
	if err != nil {
		// The layer removed or replaced it after writing it; nothing to date.
		return nil
	}
	defer unix.Close(parent)
	var s unix.Stat_t
	base := dt.comps[len(dt.comps)-1]
	if err := unix.Fstatat(parent, base, &s, unix.AT_SYMLINK_NOFOLLOW); err != nil || s.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil
	}
	ts := []unix.Timespec{unix.NsecToTimespec(dt.atime.UnixNano()), unix.NsecToTimespec(dt.mtime.UnixNano())}
	if err := unix.UtimesNanoAt(parent, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times of %q: %w", strings.Join(dt.comps, "/"), err)
	}
	return nil
}

// ctxReader stops a long copy when the context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
