package initd

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// Build is init's template-build helper (proto.BuildCommand), run as root by an exec in
// a sandbox that builds an E2B template: the steps that must not depend on what the image
// has (a tar, a mkdir that can chown). It runs in the user's own VM, on the user's own
// files: nothing here is a boundary. It returns the process's exit code.
//
//	copy SRC DEST [OWNER [MODE]]   a tar (gzip or not) on stdin: SRC's part of it to DEST
//	workdir DIR [OWNER]            make DIR (relative: to the working directory), print it
//	env                            print the environment, NUL-separated (ENV expands in it)
//	adduser NAME                   make user NAME if there is none (an image without useradd)
func Build(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	var err error
	switch {
	case len(args) >= 3 && len(args) <= 5 && args[0] == "copy":
		owner, mode := "", ""
		if len(args) > 3 {
			owner = args[3]
		}
		if len(args) > 4 {
			mode = args[4]
		}
		err = buildCopy(stdin, args[1], args[2], owner, mode)
	case len(args) >= 2 && len(args) <= 3 && args[0] == "workdir":
		owner := ""
		if len(args) > 2 {
			owner = args[2]
		}
		var dir string
		if dir, err = buildWorkdir(args[1], owner); err == nil {
			fmt.Fprintln(stdout, dir)
		}
	case len(args) == 1 && args[0] == "env":
		for _, e := range os.Environ() {
			fmt.Fprint(stdout, e+"\x00")
		}
	case len(args) == 2 && args[0] == "adduser":
		err = addUser(args[1])
	default:
		err = errors.New("usage: copy SRC DEST [OWNER [MODE]] | workdir DIR [OWNER] | env | adduser NAME")
	}
	if err != nil {
		fmt.Fprintln(stderr, "fireworks-build:", err)
		return 1
	}
	return 0
}

// addUser makes user name, with a group of its own and a home under /home, by adding to
// /etc/passwd and /etc/group (and /etc/shadow if there is one, locked), if no user has
// that name: for an image without useradd or adduser.
func addUser(name string) error {
	if _, err := resolveUser("/", name); err == nil {
		return nil
	}
	if !validUserName(name) {
		return fmt.Errorf("user name %q", name)
	}
	users, _ := readPasswd("/", "/etc/passwd")
	groups, _ := readGroup("/", "/etc/group")
	id := uint32(1000)
	for taken := true; taken; {
		taken = false
		for _, u := range users {
			taken = taken || u.uid == id
		}
		for _, g := range groups {
			taken = taken || g.gid == id
		}
		if taken {
			id++
		}
	}
	home := "/home/" + name
	add := func(file, line string) error {
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(f, line)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}
	if err := add("/etc/group", fmt.Sprintf("%s:x:%d:", name, id)); err != nil {
		return err
	}
	if err := add("/etc/passwd", fmt.Sprintf("%s:x:%d:%d::%s:/bin/sh", name, id, id, home)); err != nil {
		return err
	}
	if _, err := os.Stat("/etc/shadow"); err == nil {
		if err := add("/etc/shadow", name+":!:::::::"); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(home, 0o755); err != nil {
		return err
	}
	return lchown(home, int(id), int(id))
}

// validUserName: what useradd takes by default.
func validUserName(n string) bool {
	if n == "" || len(n) > 32 || !(n[0] == '_' || n[0] >= 'a' && n[0] <= 'z') {
		return false
	}
	for _, c := range n {
		if !(c == '_' || c == '-' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// owned is who copied files and made directories belong to: OWNER as Docker's --chown
// takes it, root if none.
func owned(owner string) (uid, gid int, err error) {
	if owner == "" {
		return 0, 0, nil
	}
	u, err := resolveUser("/", owner)
	if err != nil {
		return 0, 0, fmt.Errorf("owner %q: %w", owner, err)
	}
	return int(u.UID), int(u.GID), nil
}

// mkdirs makes dir and its missing parents, the ones it made owned by uid:gid.
func mkdirs(dir string, uid, gid int) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s exists and is not a directory", dir)
		}
		return nil
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := mkdirs(parent, uid, gid); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return lchown(dir, uid, gid)
}

func lchown(p string, uid, gid int) error {
	if os.Geteuid() != 0 {
		return nil // a unit test's; init runs this as root
	}
	return os.Lchown(p, uid, gid)
}

func buildWorkdir(dir, owner string) (string, error) {
	uid, gid, err := owned(owner)
	if err != nil {
		return "", err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return abs, mkdirs(abs, uid, gid)
}

// buildCopy writes the part of the tar on r that SRC names (a path or a glob of the build
// context, as the SDK made the tar from it) to DEST, as Docker's COPY does: a file to
// DEST (or into it, if DEST ends in '/' or is a directory), a directory's contents into
// DEST, each match of a glob into DEST. A relative DEST is the working directory's.
func buildCopy(r io.Reader, src, dest, owner, mode string) error {
	uid, gid, err := owned(owner)
	if err != nil {
		return err
	}
	var perm os.FileMode
	if mode != "" {
		m, err := strconv.ParseUint(mode, 8, 32)
		if err != nil || m > 0o7777 {
			return fmt.Errorf("mode %q: want octal permissions", mode)
		}
		perm = os.FileMode(m&0o777) | unixModeBits(uint32(m))
	}
	destDir := strings.HasSuffix(dest, "/")
	if dest, err = filepath.Abs(dest); err != nil {
		return err
	}
	if fi, err := os.Stat(dest); err == nil && fi.IsDir() {
		destDir = true
	}
	src = path.Clean(strings.TrimPrefix(src, "./"))
	glob := strings.ContainsAny(src, "*?[")
	if _, err := path.Match(src, ""); glob && err != nil {
		return fmt.Errorf("source pattern %q: %w", src, err)
	}
	br := bufio.NewReader(r)
	var in io.Reader = br
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		gz, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("the uploaded files: %w", err)
		}
		defer gz.Close()
		in = gz
	}
	tr := tar.NewReader(in)
	written := map[string]string{} // entry name → where it went (hard links point there)
	n := 0
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("the uploaded files: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if path.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return fmt.Errorf("the uploaded files: entry %q is outside the context", h.Name)
		}
		root, ok := matchRoot(name, src, glob)
		if !ok {
			continue
		}
		var target string
		switch rel := strings.TrimPrefix(strings.TrimPrefix(name, root), "/"); {
		case root == "." && name != ".":
			target = filepath.Join(dest, name)
		case rel != "" || h.Typeflag == tar.TypeDir:
			target = filepath.Join(dest, filepath.FromSlash(rel)) // a directory's contents
		case destDir || glob:
			target = filepath.Join(dest, path.Base(name))
		default:
			target = dest
		}
		if err := mkdirs(filepath.Dir(target), uid, gid); err != nil {
			return err
		}
		if skip, err := writeEntry(tr, h, target, written, perm, uid, gid); err != nil {
			return fmt.Errorf("%s: %w", target, err)
		} else if skip {
			continue
		}
		written[name] = target
		n++
	}
	if n == 0 {
		return fmt.Errorf("nothing in the uploaded files matches %q", src)
	}
	return nil
}

// matchRoot is the part of entry name that SRC names: SRC itself, or the match of the
// glob that name is or lies under.
func matchRoot(name, src string, glob bool) (string, bool) {
	if src == "." {
		return ".", true
	}
	for p := name; ; {
		if ok, _ := path.Match(src, p); ok && glob || p == src {
			return p, true
		}
		i := strings.LastIndexByte(p, '/')
		if i < 0 {
			return "", false
		}
		p = p[:i]
	}
}

// writeEntry writes one entry at target; skip says it was not a file, directory or link
// (devices and FIFOs are not a build context's).
func writeEntry(tr *tar.Reader, h *tar.Header, target string, written map[string]string, perm os.FileMode, uid, gid int) (skip bool, err error) {
	switch h.Typeflag {
	case tar.TypeDir, tar.TypeReg, tar.TypeSymlink, tar.TypeLink:
	default:
		return true, nil
	}
	mode := h.FileInfo().Mode().Perm() | unixModeBits(uint32(h.Mode))
	if perm != 0 {
		mode = perm
	}
	if fi, err := os.Lstat(target); err == nil && (h.Typeflag != tar.TypeDir || !fi.IsDir()) {
		if err := os.RemoveAll(target); err != nil {
			return false, err
		}
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if err := os.Mkdir(target, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return false, err
		}
	case tar.TypeReg:
		f, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return false, err
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return false, err
		}
	case tar.TypeSymlink:
		if err := os.Symlink(h.Linkname, target); err != nil {
			return false, err
		}
		return false, lchown(target, uid, gid) // its mode is not its own
	case tar.TypeLink:
		to, ok := written[path.Clean(strings.TrimPrefix(h.Linkname, "./"))]
		if !ok {
			return false, fmt.Errorf("hard link to %q, which was not copied", h.Linkname)
		}
		return false, os.Link(to, target) // its owner and mode are its target's
	}
	// Owner first: a chown clears the setuid and setgid bits.
	if err := lchown(target, uid, gid); err != nil {
		return false, err
	}
	return false, os.Chmod(target, mode)
}

// unixModeBits turns the setuid, setgid and sticky bits of a Unix mode into Go's.
func unixModeBits(m uint32) os.FileMode {
	var out os.FileMode
	if m&0o4000 != 0 {
		out |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		out |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		out |= os.ModeSticky
	}
	return out
}
