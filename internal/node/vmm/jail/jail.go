// Package jail runs a VMM the way Firecracker's jailer does: as an unprivileged user of
// its own, in mount, IPC, UTS and network namespaces of its own, in a root that holds only
// what it needs (the system's read-only /usr, a few device nodes, and the files of its
// own VM), inside cgroups that bound its CPU, memory and processes.
//
// The setup runs in a helper: the calling binary re-executed (/proc/self/exe) with
// helperEnv set, already in the new namespaces (clone flags). Its init hook (this
// package's init) builds the root, enters the cgroups, drops to the VMM's user and execs
// the VMM, so the VMM keeps the helper's PID and the descriptors it was given. Every
// binary that launches jailed VMMs imports this package (through the VMM driver), so the
// hook is there in the agent and in tests alike.
package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// helperEnv carries the Spec (JSON) to the helper.
const helperEnv = "FIREWORKS_JAIL_SPEC"

// Mount is a file or directory bound into the jail at the same path it has outside.
type Mount struct {
	Path     string `json:"path"`
	Writable bool   `json:"writable,omitempty"`
}

// Spec is one jailed process.
type Spec struct {
	// Root is an empty directory (the jail's root is a tmpfs mounted on it, visible only
	// inside the jail).
	Root string `json:"root"`
	// UID and GID the VMM runs as (never 0); Groups are its supplementary groups.
	UID    int   `json:"uid"`
	GID    int   `json:"gid"`
	Groups []int `json:"groups,omitempty"`
	// Mounts are the VM's own files; System is added to them.
	Mounts []Mount `json:"mounts"`
	// Devices are device nodes bound into /dev (e.g. /dev/kvm).
	Devices []string `json:"devices,omitempty"`
	// Cgroups are cgroup directories (already made, limits set) the VMM joins.
	Cgroups []string `json:"cgroups,omitempty"`
	// Caps are capabilities (CAP_* numbers) the process keeps though it is not root
	// (ambient: they survive the exec); every other one leaves even the bounding set.
	Caps []uintptr `json:"caps,omitempty"`
	// Proc mounts a /proc of the jail's own PID namespace with its processes only
	// (subset=pid: none of the system's files, such as /proc/bus or /proc/sys), for a
	// program that names its own descriptors.
	Proc bool `json:"proc,omitempty"`
	// NoDevices binds none of the base devices (/dev/null and the like): a process with
	// file capabilities could change the node's own device nodes through them.
	NoDevices bool `json:"no_devices,omitempty"`
	// NoSystem binds none of the node's system directories (/usr, /lib, ...): for a
	// static program that needs none, and holds a capability that would reach through
	// any of the node's mounts it can name (CAP_DAC_READ_SEARCH opens any file of a
	// mount's filesystem by handle). Its Mounts are then all it sees.
	NoSystem bool `json:"no_system,omitempty"`
	// Dir is the working directory; Path and Args the program (Args[0] included).
	Dir  string   `json:"dir"`
	Path string   `json:"path"`
	Args []string `json:"args"`
}

// systemDirs are bound read-only into every jail when they are directories: the program,
// its libraries and QEMU's firmware live under them. Top-level symlinks of a merged-/usr
// system (/lib -> usr/lib) are recreated as they are.
var systemDirs = []string{"/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"}

// systemFiles are bound read-only when they exist (the dynamic linker's cache).
var systemFiles = []string{"/etc/ld.so.cache"}

// baseDevices are bound into every jail's /dev.
var baseDevices = []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}

// Command returns the command that runs spec jailed: start it like any exec.Cmd (set
// Stdout, Stderr and ExtraFiles; they reach the VMM unchanged).
func Command(spec Spec) (*exec.Cmd, error) {
	if spec.UID <= 0 || spec.GID <= 0 {
		return nil, fmt.Errorf("jail: uid %d gid %d: a jailed VMM never runs as root", spec.UID, spec.GID)
	}
	if spec.Root == "" || spec.Path == "" || len(spec.Args) == 0 {
		return nil, errors.New("jail: spec needs a root, a program and its arguments")
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{"fireworks-jail"}
	cmd.Env = []string{helperEnv + "=" + string(b)}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// A network namespace of its own with nothing in it: the VMM reaches the guest's
		// network only through the tap descriptor it is given, and nothing else at all. A
		// PID namespace of its own: it sees (and can signal or trace) no other process.
		Cloneflags: unix.CLONE_NEWNS | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWNET | unix.CLONE_NEWPID,
	}
	return cmd, nil
}

func init() {
	s, ok := os.LookupEnv(helperEnv)
	if !ok {
		return
	}
	if os.Getpid() != 1 {
		// Only Command starts the helper, always as the first process of a new PID
		// namespace: the variable found anywhere else is not ours to act on.
		fmt.Fprintln(os.Stderr, "fireworks jail: "+helperEnv+" set outside a jail's start; ignored")
		return
	}
	// The helper: never returns to the binary's main. Capabilities are a thread's: the
	// thread that keeps them is the one that execs.
	runtime.LockOSThread()
	var spec Spec
	err := json.Unmarshal([]byte(s), &spec)
	if err == nil {
		err = enter(spec)
	}
	fmt.Fprintf(os.Stderr, "fireworks jail: %v\n", err)
	os.Exit(127)
}

// enter builds the jail and execs the program; it returns only on failure.
func enter(s Spec) error {
	if s.UID <= 0 || s.GID <= 0 {
		return fmt.Errorf("uid %d gid %d: a jailed process never runs as root", s.UID, s.GID)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	if err := unix.Mount("tmpfs", s.Root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=1m"); err != nil {
		return fmt.Errorf("mount the jail's root on %s: %w", s.Root, err)
	}
	in := func(p string) string { return filepath.Join(s.Root, p) }
	sysDirs, sysFiles := systemDirs, systemFiles
	if s.NoSystem {
		sysDirs, sysFiles = nil, nil
	}
	for _, d := range sysDirs {
		fi, err := os.Lstat(d)
		switch {
		case err != nil:
			continue
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(d)
			if err != nil {
				return err
			}
			if err := os.Symlink(target, in(d)); err != nil {
				return fmt.Errorf("link %s: %w", d, err)
			}
		case fi.IsDir():
			if err := bind(d, in(d), false, true); err != nil {
				return err
			}
		}
	}
	for _, f := range sysFiles {
		if _, err := os.Stat(f); err == nil {
			if err := bind(f, in(f), false, false); err != nil {
				return err
			}
		}
	}
	if err := os.MkdirAll(in("/dev"), 0o755); err != nil {
		return err
	}
	devices := slices.Clone(s.Devices)
	if !s.NoDevices {
		devices = append(devices, baseDevices...)
	}
	for _, d := range devices {
		if err := bind(d, in(d), true, false); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(in("/tmp"), 0o1777); err != nil {
		return err
	}
	for _, m := range s.Mounts {
		fi, err := os.Stat(m.Path)
		if err != nil {
			return fmt.Errorf("jail mount %s: %w", m.Path, err)
		}
		if err := bind(m.Path, in(m.Path), m.Writable, fi.IsDir()); err != nil {
			return err
		}
	}
	if s.Proc {
		if err := os.MkdirAll(in("/proc"), 0o555); err != nil {
			return err
		}
		if err := unix.Mount("proc", in("/proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "subset=pid"); err != nil {
			return fmt.Errorf("mount the jail's /proc: %w", err)
		}
	}
	if err := os.Mkdir(in("/.old"), 0o700); err != nil { // where pivot puts the host's root
		return err
	}
	// The VM's files are the only ones it may write, so the root itself is read-only.
	if err := unix.Mount("", s.Root, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("make the jail's root read-only: %w", err)
	}
	for _, cg := range s.Cgroups {
		if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return fmt.Errorf("join cgroup %s: %w", cg, err)
		}
	}
	if err := pivot(s.Root); err != nil {
		return err
	}
	if err := os.Chdir(s.Dir); err != nil {
		return fmt.Errorf("chdir %s: %w", s.Dir, err)
	}
	if err := boundCaps(s.Caps); err != nil {
		return err
	}
	if err := syscall.Setgroups(s.Groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(s.GID, s.GID, s.GID); err != nil {
		return fmt.Errorf("setresgid %d: %w", s.GID, err)
	}
	if err := syscall.Setresuid(s.UID, s.UID, s.UID); err != nil {
		return fmt.Errorf("setresuid %d: %w", s.UID, err)
	}
	if err := ambientCaps(s.Caps); err != nil {
		return err
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return syscall.Exec(s.Path, s.Args, []string{"PATH=/usr/bin:/bin"})
}

// boundCaps drops every capability but keep from the bounding set and, if any is kept,
// asks that the thread keep its permitted ones across the change of user (called as
// root, on the thread that execs).
func boundCaps(keep []uintptr) error {
	for c := uintptr(0); ; c++ {
		if slices.Contains(keep, c) {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil {
			if errors.Is(err, unix.EINVAL) {
				break // past the kernel's last capability
			}
			return fmt.Errorf("drop capability %d: %w", c, err)
		}
	}
	if len(keep) == 0 {
		return nil
	}
	if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("keep capabilities: %w", err)
	}
	return nil
}

// ambientCaps makes keep the thread's only capabilities, effective and ambient, so that
// the program it execs (not root, not setuid) has them and no other.
func ambientCaps(keep []uintptr) error {
	if len(keep) == 0 {
		return nil
	}
	var mask [2]uint32
	for _, c := range keep {
		if c >= 64 {
			return fmt.Errorf("capability %d: out of range", c)
		}
		mask[c/32] |= 1 << (c % 32)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: mask[0], Permitted: mask[0], Inheritable: mask[0]},
		{Effective: mask[1], Permitted: mask[1], Inheritable: mask[1]},
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("set capabilities: %w", err)
	}
	for _, c := range keep {
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, c, 0, 0); err != nil {
			return fmt.Errorf("raise ambient capability %d: %w", c, err)
		}
	}
	return nil
}

// bind mounts src at dst (made as a directory or an empty file), read-only unless
// writable; device nodes keep working only where dev is set.
func bind(src, dst string, writable, dir bool) error {
	if dir {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
	} else {
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s into the jail: %w", src, err)
	}
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NOSUID)
	// What the mount bound already has stays (in a user namespace of its own the jail
	// could not take it away anyway: a remount that drops it is refused).
	var st unix.Statfs_t
	if err := unix.Statfs(dst, &st); err == nil {
		for _, f := range []struct{ st, ms int64 }{{unix.ST_NOEXEC, unix.MS_NOEXEC}, {unix.ST_NODEV, unix.MS_NODEV},
			{unix.ST_NOATIME, unix.MS_NOATIME}, {unix.ST_NODIRATIME, unix.MS_NODIRATIME}, {unix.ST_RELATIME, unix.MS_RELATIME}, {unix.ST_RDONLY, unix.MS_RDONLY}} {
			if st.Flags&f.st != 0 {
				flags |= uintptr(f.ms)
			}
		}
	}
	if !writable {
		flags |= unix.MS_RDONLY
	}
	if !strings.HasPrefix(src, "/dev/") {
		flags |= unix.MS_NODEV
	}
	if err := unix.Mount("", dst, "", flags, ""); err != nil {
		return fmt.Errorf("restrict %s in the jail: %w", src, err)
	}
	return nil
}

// pivot makes root the process's root and drops every other mount.
func pivot(root string) error {
	if err := unix.PivotRoot(root, filepath.Join(root, ".old")); err != nil {
		return fmt.Errorf("pivot_root %s: %w", root, err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.old", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("drop the host's mounts: %w", err)
	}
	return nil
}
