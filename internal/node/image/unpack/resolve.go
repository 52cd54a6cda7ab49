package unpack

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSymlinks bounds symlink expansion during one resolution, as the kernel's
// MAXSYMLINKS does, so a symlink loop in a layer is an error rather than a hang.
const maxSymlinks = 40

// resolveDir opens the directory that rel names inside the tree at rootFD and
// returns an O_PATH descriptor for it (the caller closes it).
//
// Resolution has the semantics of a chroot at the tree root, done entirely in
// user space with descriptors: every step opens exactly one name relative to
// an already-open directory inside the tree with O_NOFOLLOW, symlinks are read
// with readlinkat and expanded here (absolute targets restart at the tree
// root), and ".." pops a stack of directories we opened ourselves, clamping at
// the root. The kernel never resolves a multi-component path or a symlink for
// us, so no host path outside the tree can be reached, whatever the layer
// contains. This is why absolute symlinks such as var/run -> /run work and
// still land inside the tree.
//
// With create set, missing directories (also the targets of dangling
// symlinks) are made with mode 0755, owned by whoever runs the extraction
// (root), which is what tar does for parents a layer does not list.
func resolveDir(rootFD int, rel []string, create bool) (int, error) {
	var stack []int // directories opened below the root; top is the current one
	defer func() {
		for _, fd := range stack {
			unix.Close(fd)
		}
	}()
	cur := func() int {
		if len(stack) == 0 {
			return rootFD
		}
		return stack[len(stack)-1]
	}
	pop := func() {
		if len(stack) > 0 {
			unix.Close(stack[len(stack)-1])
			stack = stack[:len(stack)-1]
		}
	}

	queue := append([]string(nil), rel...)
	links := 0
	for len(queue) > 0 {
		name := queue[0]
		queue = queue[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			pop()
			continue
		}
		var st unix.Stat_t
		err := unix.Fstatat(cur(), name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) && create {
			if err := unix.Mkdirat(cur(), name, 0o755); err != nil {
				return -1, fmt.Errorf("create directory %q: %w", name, err)
			}
			// Not left to the umask: the guest's users must be able to traverse it.
			if err := unix.Fchmodat(cur(), name, 0o755, 0); err != nil {
				return -1, fmt.Errorf("chmod directory %q: %w", name, err)
			}
			err = unix.Fstatat(cur(), name, &st, unix.AT_SYMLINK_NOFOLLOW)
		}
		if err != nil {
			return -1, fmt.Errorf("look up %q: %w", name, err)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			links++
			if links > maxSymlinks {
				return -1, fmt.Errorf("resolve %q: %w", strings.Join(rel, "/"), unix.ELOOP)
			}
			target, err := readlinkat(cur(), name)
			if err != nil {
				return -1, err
			}
			if strings.HasPrefix(target, "/") {
				for len(stack) > 0 {
					pop()
				}
			}
			queue = append(strings.Split(target, "/"), queue...)
		case unix.S_IFDIR:
			fd, err := unix.Openat(cur(), name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return -1, fmt.Errorf("open directory %q: %w", name, err)
			}
			stack = append(stack, fd)
		default:
			return -1, fmt.Errorf("resolve %q: %q is not a directory: %w", strings.Join(rel, "/"), name, unix.ENOTDIR)
		}
	}
	// Hand out a descriptor of our own so the deferred cleanup can close the stack.
	fd, err := unix.FcntlInt(uintptr(cur()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("dup directory descriptor: %w", err)
	}
	return fd, nil
}

func readlinkat(dirFD int, name string) (string, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Readlinkat(dirFD, name, buf)
		if err != nil {
			return "", fmt.Errorf("read symlink %q: %w", name, err)
		}
		if n < len(buf) {
			return string(buf[:n]), nil
		}
		if len(buf) >= unix.PathMax {
			return "", fmt.Errorf("read symlink %q: target too long", name)
		}
		buf = make([]byte, len(buf)*4)
	}
}

// removeAllAt removes name (recursively if it is a directory) from the
// directory dirFD without ever following a symlink.
func removeAllAt(dirFD int, name string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dirFD, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("stat %q: %w", name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(dirFD, name, 0); err != nil {
			return fmt.Errorf("remove %q: %w", name, err)
		}
		return nil
	}
	if err := clearDirAt(dirFD, name, nil); err != nil {
		return err
	}
	if err := unix.Unlinkat(dirFD, name, unix.AT_REMOVEDIR); err != nil {
		return fmt.Errorf("remove directory %q: %w", name, err)
	}
	return nil
}

// clearDirAt removes every entry of the directory name in dirFD except those
// keep reports true for.
func clearDirAt(dirFD int, name string, keep func(child string) bool) error {
	fd, err := unix.Openat(dirFD, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory %q: %w", name, err)
	}
	d := os.NewFile(uintptr(fd), name)
	defer d.Close()
	// Read every name before removing any: removing while reading a
	// directory stream may skip entries on some filesystems.
	names, err := d.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read directory %q: %w", name, err)
	}
	for _, child := range names {
		if keep != nil && keep(child) {
			continue
		}
		if err := removeAllAt(fd, child); err != nil {
			return fmt.Errorf("in %q: %w", name, err)
		}
	}
	return nil
}
