package initd

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// execUser is the identity a session's process runs as.
type execUser struct {
	UID, GID uint32
	Groups   []uint32 // supplementary groups
	Home     string
}

type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

type groupEntry struct {
	name    string
	gid     uint32
	members []string
}

// maxIDFileSize bounds how much of /etc/passwd or /etc/group is read; real
// files are a few KiB.
const maxIDFileSize = 4 << 20

// resolveUser turns a Docker-style user spec ("", "name", "uid", "uid:gid",
// "name:group", ...) into IDs, reading root's /etc/passwd and /etc/group.
// It follows runc's rules: a numeric user that is not in passwd is allowed
// (gid 0, home "/"), a named one is not; supplementary groups come from
// /etc/group only when no group was given explicitly.
func resolveUser(root, spec string) (execUser, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" {
		if hasGroup {
			return execUser{}, fmt.Errorf("user spec %q has an empty user", spec)
		}
		userPart = "0"
	}
	if hasGroup && groupPart == "" {
		return execUser{}, fmt.Errorf("user spec %q has an empty group", spec)
	}
	_, numericUser := parseID(userPart)
	users, err := readPasswd(root, "/etc/passwd")
	if err != nil {
		if !numericUser {
			return execUser{}, err
		}
		users = nil // a uid needs no passwd entry: run it as one without
	}
	u := execUser{Home: "/"}
	var matched *passwdEntry
	if n, ok := parseID(userPart); ok {
		u.UID = n
		for i := range users {
			if users[i].uid == n {
				matched = &users[i]
				break
			}
		}
	} else {
		for i := range users {
			if users[i].name == userPart {
				matched = &users[i]
				break
			}
		}
		if matched == nil {
			return execUser{}, fmt.Errorf("unable to find user %s: no matching entries in passwd file", userPart)
		}
	}
	if matched != nil {
		u.UID, u.GID = matched.uid, matched.gid
		if matched.home != "" {
			u.Home = matched.home
		}
	}

	if !hasGroup && matched == nil {
		return u, nil
	}
	groups, err := readGroup(root, "/etc/group")
	if err != nil {
		if _, numericGroup := parseID(groupPart); hasGroup && !numericGroup {
			return execUser{}, err
		}
		groups = nil // only supplementary groups are missed
	}
	if hasGroup {
		if n, ok := parseID(groupPart); ok {
			u.GID = n
			return u, nil
		}
		for _, g := range groups {
			if g.name == groupPart {
				u.GID = g.gid
				return u, nil
			}
		}
		return execUser{}, fmt.Errorf("unable to find group %s: no matching entries in group file", groupPart)
	}
	for _, g := range groups {
		for _, m := range g.members {
			if m == matched.name {
				u.Groups = append(u.Groups, g.gid)
				break
			}
		}
	}
	return u, nil
}

// parseID accepts a decimal id that fits in 31 bits, as the kernel's uid_t
// range reserves -1.
func parseID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 31)
	if err != nil {
		return 0, false
	}
	return uint32(n), true
}

// readIDFile calls fn with the colon-separated fields of each line of path, taken inside
// root. A missing file is an empty database, as in a minimal image. The file is the
// image's: one that is not a regular file (a FIFO would block every exec, a device
// would reach a driver) is refused, and nothing outside the root's mount is followed.
func readIDFile(root, path string, fn func(fields []string)) error {
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", root, err)
	}
	defer unix.Close(rootFD)
	f, fi, err := openPlain(rootFD, path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err == nil && !fi.Mode().IsRegular() {
		f.Close()
		err = errNotPlain
	}
	if errors.Is(err, unix.EXDEV) {
		err = errors.New("it leads outside the image's root filesystem")
	}
	if err != nil {
		return fmt.Errorf("reading the image's %s: %w", path, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(&limitedReader{r: f, n: maxIDFileSize})
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fn(strings.Split(line, ":"))
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	return nil
}

func readPasswd(root, path string) ([]passwdEntry, error) {
	var out []passwdEntry
	err := readIDFile(root, path, func(f []string) {
		if len(f) < 4 {
			return
		}
		uid, ok1 := parseID(f[2])
		gid, ok2 := parseID(f[3])
		if !ok1 || !ok2 {
			return
		}
		e := passwdEntry{name: f[0], uid: uid, gid: gid}
		if len(f) > 5 {
			e.home = f[5]
		}
		out = append(out, e)
	})
	return out, err
}

func readGroup(root, path string) ([]groupEntry, error) {
	var out []groupEntry
	err := readIDFile(root, path, func(f []string) {
		if len(f) < 3 {
			return
		}
		gid, ok := parseID(f[2])
		if !ok {
			return
		}
		g := groupEntry{name: f[0], gid: gid}
		if len(f) > 3 && f[3] != "" {
			g.members = strings.Split(f[3], ",")
		}
		out = append(out, g)
	})
	return out, err
}

type limitedReader struct {
	r interface{ Read([]byte) (int, error) }
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, fmt.Errorf("file larger than %d bytes", maxIDFileSize)
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}
