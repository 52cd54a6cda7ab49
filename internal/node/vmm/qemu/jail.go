package qemu

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
)

// JailConfig runs every QEMU as a user of its own (UIDBase + a free slot below UIDCount)
// in a jail that holds only its VM's files (see package jail), in cgroups bounding its
// CPU, memory and processes.
type JailConfig struct {
	UIDBase, UIDCount int
	// GID is every VMM's group: files several VMMs read (kernel, initramfs, image disks)
	// or map (a template's memory) are made readable to it, not to everyone.
	GID int
	// CgroupName names this driver's cgroup directory (default "fireworks-vmm-<slot>"):
	// relative, under the agent's own cgroup; absolute, from the top of the hierarchy (see
	// jail.Place).
	CgroupName string
	// CgroupRoot is where the cgroup filesystem is mounted (default /sys/fs/cgroup).
	CgroupRoot string
}

// cgroupPlace is where the driver's VM cgroups go.
func (j *JailConfig) cgroupPlace() jail.Place {
	return jail.Place{Root: j.CgroupRoot, Parent: j.CgroupName}
}

// DefaultJail is JailFor("").
func DefaultJail() *JailConfig { return JailFor("") }

// JailFor is the jail of the driver of one agent, named by its data directory: a range of
// 65,536 users and a cgroup of its own, so two agents on a host never hand out the same
// user (one VMM could then trace the other's). The VMMs' group is the host's one.
func JailFor(owner string) *JailConfig {
	h := fnv.New32a()
	h.Write([]byte(owner))
	slot := int(h.Sum32() % 4096)
	return &JailConfig{UIDBase: 1_800_000_000 + slot<<16, UIDCount: 1 << 16, GID: 1_799_999_999,
		CgroupName: fmt.Sprintf("fireworks-vmm-%03x", slot)}
}

// ShareSocket implements vmm.SocketSharer: the host's end of a guest channel, writable
// to the VMMs' group (a jailed QEMU reaches only its own VM's sockets anyway).
func (d *Driver) ShareSocket(path string) error {
	if d.cfg.Jail == nil {
		return nil
	}
	if err := setOwner(path, unix.S_IFSOCK, 0, d.cfg.Jail.GID, 0o660); err != nil {
		return fmt.Errorf("share %s with the VMMs: %w", path, err)
	}
	return nil
}

// setOwner gives the file at path (which must be of type typ, an S_IF* value) owner
// uid:gid and permissions mode (mode < 0: unchanged). It never follows a symlink: a run
// directory belongs to its VMM's user, and a VMM taken over by its guest could put a
// symlink where the host expects its socket or log, to have the host chown something
// else. The change is made through a descriptor of the very file checked.
func setOwner(path string, typ uint32, uid, gid, mode int) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != typ {
		return fmt.Errorf("%s is not what the VMM's file should be (mode %o)", path, st.Mode)
	}
	if err := unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH); err != nil {
		return err
	}
	if mode >= 0 {
		// chmod has no AT_EMPTY_PATH; the descriptor's /proc link names the same inode.
		if err := unix.Chmod("/proc/self/fd/"+strconv.Itoa(fd), uint32(mode)); err != nil {
			return err
		}
	}
	return nil
}

// uids hands out the jail users of live VMs.
type uids struct {
	mu   sync.Mutex
	used map[int]bool
	next int
}

func (u *uids) take(cfg *JailConfig) (int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.used == nil {
		u.used = map[int]bool{}
	}
	for range cfg.UIDCount {
		uid := cfg.UIDBase + u.next%cfg.UIDCount
		u.next++
		if !u.used[uid] && uid != cfg.GID {
			u.used[uid] = true
			return uid, nil
		}
	}
	return 0, errors.New("jail: every VMM user is taken")
}

func (u *uids) mark(uid int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.used == nil {
		u.used = map[int]bool{}
	}
	u.used[uid] = true
}

func (u *uids) give(uid int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.used, uid)
}

// jailFiles is what a VM's jail binds: its run directory, and every file its command
// line names.
type jailFiles struct {
	ro, rw []string
}

// Files inside the run directory are reached through its bind (they may be made or
// replaced after the VMM was launched ahead of a restore: a bind of their own would
// keep showing the old file); in rwOwn are those of its own the VMM writes.
func filesOf(s vmm.Spec) jailFiles {
	f := jailFiles{rw: []string{s.Dir}}
	inDir := func(p string) bool { return strings.HasPrefix(p, s.Dir+"/") }
	for _, p := range []string{s.Kernel, s.Initrd} {
		if p != "" && !inDir(p) {
			f.ro = append(f.ro, p)
		}
	}
	for _, d := range s.Disks {
		switch {
		case d.ReadOnly && !inDir(d.Path):
			f.ro = append(f.ro, d.Path)
		case d.ReadOnly:
		case !inDir(d.Path):
			f.rw = append(f.rw, d.Path)
		}
	}
	if s.AgentSocket != "" && !inDir(s.AgentSocket) {
		f.rw = append(f.rw, s.AgentSocket)
	}
	if s.MemoryFile != "" && !inDir(s.MemoryFile) {
		f.rw = append(f.rw, s.MemoryFile)
	}
	if s.Restore != nil && s.Restore.MemoryFile != "" && !inDir(s.Restore.MemoryFile) {
		// Opened read-only and mapped privately (readonly=on,rom=off): shared by every VM
		// restored from the template, it is mounted read-only into each jail too.
		f.ro = append(f.ro, s.Restore.MemoryFile)
	}
	return f
}

// prepare makes a VM's files usable by its jail user uid: its own (run directory, scratch
// disks, memory file, sockets) become uid's; shared ones (kernel, image disks, template
// memory) readable to the VMM group, writable by none of them.
func (j *JailConfig) prepare(s vmm.Spec, uid int) error {
	f := filesOf(s)
	own := func(p string, typ uint32, mode int) error {
		if err := setOwner(p, typ, uid, j.GID, mode); err != nil {
			return fmt.Errorf("jail: give %s to the VMM user: %w", p, err)
		}
		return nil
	}
	// The run directory may be a link the agent made (run/<id> to a slot's directory,
	// in a directory only root writes): resolve it, then never follow a link again. It
	// stays root's (searchable by the VMM); only its vmm/ part is the VMM's.
	dir, err := filepath.EvalSymlinks(s.Dir)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := setOwner(dir, unix.S_IFDIR, 0, 0, 0o711); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := own(filepath.Join(dir, vmmDir), unix.S_IFDIR, 0o700); err != nil {
		return err
	}
	// The sockets the host listens on (QEMU connects: it needs write permission on
	// them) and what an earlier QEMU of this directory left.
	for _, p := range []struct {
		path string
		typ  uint32
	}{{s.AgentSocket, unix.S_IFSOCK}, {filepath.Join(s.Dir, consoleLog), unix.S_IFREG}, {filepath.Join(s.Dir, qmpSocket), unix.S_IFSOCK}} {
		if _, err := os.Lstat(p.path); err == nil {
			if err := own(p.path, p.typ, -1); err != nil {
				return err
			}
		}
	}
	if s.MemoryFile != "" {
		if fd, err := os.OpenFile(s.MemoryFile, os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			fd.Close()
		}
		if err := own(s.MemoryFile, unix.S_IFREG, 0o600); err != nil {
			return err
		}
	}
	migrating := sharesDisks(s)
	for _, d := range s.Disks {
		if d.ReadOnly {
			continue
		}
		if migrating {
			// A live migration's target on the source's node opens the disks the source
			// still runs on: their owner stays the source's user (QEMU reopens them as it
			// hands them over), and this user gets access by an ACL entry of its own
			// until it takes over (takeDisks).
			if err := allowUser(d.Path, uid); err != nil {
				return fmt.Errorf("jail: share %s with the migration's target: %w", d.Path, err)
			}
			continue
		}
		if _, err := os.Lstat(d.Path); err == nil { // a restore's comes later: Start again
			// 0600: root wrote through any mode, the VMM's user needs the bits (a copy
			// of a template's read-only scratch disk is 0400).
			if err := own(d.Path, unix.S_IFREG, 0o600); err != nil {
				return err
			}
		}
	}
	if s.Restore != nil && s.Restore.MemoryFile != "" {
		if err := sealed(*s.Restore); err != nil {
			return err
		}
		// Shared by every VM restored from the template: the host's, readable by the
		// VMMs' group, writable by no VMM (see filesOf).
		if err := setOwner(s.Restore.MemoryFile, unix.S_IFREG, 0, j.GID, 0o640); err != nil {
			return fmt.Errorf("jail: template memory for the VMM group: %w", err)
		}
	}
	ro := slices.Clone(f.ro)
	for _, d := range s.Disks {
		if d.ReadOnly && !slices.Contains(ro, d.Path) {
			ro = append(ro, d.Path)
		}
	}
	for _, p := range append(ro, s.Kernel, s.Initrd) {
		if p == "" {
			continue
		}
		if err := groupAccess(p, j.GID, 0o040); err != nil {
			return err
		}
	}
	return nil
}

// sharesDisks says whether s is a live migration's target that opens its source's very
// disk files (one node), rather than receiving their content (vmm.Snapshot.ReceiveDisks).
func sharesDisks(s vmm.Spec) bool {
	return s.Restore != nil && s.Restore.Stream != nil && s.Restore.ReceiveDisks == nil
}

// takeDisks gives a live migration's target, which has taken over, its writable disks
// (see prepare): its user owns them now, and the ACL that shared them goes.
func (j *JailConfig) takeDisks(s vmm.Spec, uid int) error {
	for _, d := range s.Disks {
		if d.ReadOnly {
			continue
		}
		if err := setOwner(d.Path, unix.S_IFREG, uid, j.GID, 0o600); err != nil {
			return fmt.Errorf("jail: give %s to the VMM user: %w", d.Path, err)
		}
		if err := dropACL(d.Path); err != nil {
			return err
		}
	}
	return nil
}

// dropDiskACLs removes the ACLs a migration's target that did not take over was given.
func dropDiskACLs(s vmm.Spec) {
	for _, d := range s.Disks {
		if !d.ReadOnly {
			_ = dropACL(d.Path)
		}
	}
}

// allowUser adds read-write access for uid to file path by a POSIX ACL (owner rw, the
// owning group and others nothing, uid rw), keeping its owner.
func allowUser(path string, uid int) error {
	const (
		userObj, user, groupObj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
		rw                                   = 6
		undefined                            = 0xffffffff
	)
	entry := func(tag, perm uint16, id uint32) []byte {
		b := make([]byte, 8)
		binary.LittleEndian.PutUint16(b[0:], tag)
		binary.LittleEndian.PutUint16(b[2:], perm)
		binary.LittleEndian.PutUint32(b[4:], id)
		return b
	}
	acl := binary.LittleEndian.AppendUint32(nil, 2) // version
	for _, e := range [][]byte{entry(userObj, rw, undefined), entry(user, rw, uint32(uid)), entry(groupObj, 0, undefined),
		entry(mask, rw, undefined), entry(other, 0, undefined)} {
		acl = append(acl, e...)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fsetxattr(fd, "system.posix_acl_access", acl, 0)
}

// dropACL removes path's access ACL (none is not an error).
func dropACL(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fremovexattr(fd, "system.posix_acl_access"); err != nil && !errors.Is(err, unix.ENODATA) {
		return fmt.Errorf("jail: drop the ACL of %s: %w", path, err)
	}
	return nil
}

// ErrTemplateTampered: a template's memory changed after the template was saved.
var ErrTemplateTampered = errors.New("template memory was written after the template was saved")

// sealed refuses a template whose memory file changed after its state file was written
// (the end of the save). Restored VMMs open it read-only, so nothing should: this is a
// check that what was saved is what is restored (an operator's mistake, a disk error).
func sealed(snap vmm.Snapshot) error {
	mem, err1 := os.Stat(snap.MemoryFile)
	state, err2 := os.Stat(snap.StateFile)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("jail: template: %w", err)
	}
	if mem.ModTime().After(state.ModTime()) {
		return fmt.Errorf("%w: %s modified at %s, saved at %s", ErrTemplateTampered, snap.MemoryFile, mem.ModTime(), state.ModTime())
	}
	return nil
}

// groupAccess gives group gid the permission bits perm (0o040 read, 0o060 read-write) on
// path, and the directories above it search permission up to where root's own are.
func groupAccess(path string, gid int, perm os.FileMode) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if perm == 0o040 && fi.Mode().Perm()&0o004 != 0 {
		return nil // everyone may read it already
	}
	if err := setOwner(path, unix.S_IFREG, int(st.Uid), gid, int(fi.Mode().Perm()|perm)); err != nil {
		return fmt.Errorf("jail: %s for the VMM group: %w", path, err)
	}
	return nil
}

// command is the jailed command for spec as user uid, with the cgroups it joins.
func (d *Driver) jailCommand(s vmm.Spec, uid int, cgroups []string) (*exec.Cmd, error) {
	f := filesOf(s)
	var mounts []jail.Mount
	for _, p := range f.ro {
		mounts = append(mounts, jail.Mount{Path: p})
	}
	for _, p := range f.rw {
		mounts = append(mounts, jail.Mount{Path: p, Writable: true})
	}
	var devs []string
	if d.cfg.Accel == "kvm" {
		devs = append(devs, "/dev/kvm")
	}
	if len(s.NICs) > 0 && d.vhostNet() {
		devs = append(devs, "/dev/vhost-net")
	}
	bin, err := exec.LookPath(d.cfg.Binary)
	if err != nil {
		return nil, err
	}
	return jail.Command(jail.Spec{Root: filepath.Join(s.Dir, "jail"), UID: uid, GID: d.cfg.Jail.GID, Mounts: mounts,
		Devices: devs, Cgroups: cgroups, Dir: s.Dir, Path: bin, Args: append([]string{bin}, d.args(s)...)})
}

// cgroupsFor makes the cgroups of VM id, limited to its vCPUs (one more for QEMU's own
// threads: its main loop and I/O must not starve the vCPUs), its memory plus QEMU's
// own (and, under TCG, its translation cache), and a bound on threads; it returns their
// directories (one on cgroup v2, one per controller on v1). No cgroup support: none.
func (d *Driver) cgroupsFor(id string, vcpus, memMiB int) ([]string, error) {
	overhead := 256
	if d.cfg.Accel == "tcg" {
		overhead += cmp.Or(d.cfg.TCGCacheMiB, 1024) // QEMU's translation cache grows up to this
	}
	dirs, missing, err := jail.MakeCgroups(d.cfg.Jail.cgroupPlace(), id, jail.Limits{MemoryBytes: int64(memMiB+overhead) << 20, Pids: 512, CPUs: vcpus + 1})
	for _, ctrl := range missing {
		d.cgroupWarn.Do(func() {
			d.log.Warn("a cgroup controller is not mounted: jailed VMMs run without its limit", "controller", ctrl)
		})
	}
	return dirs, err
}

// cgroupParents are the directories holding this driver's VM cgroups (one on v2, one per
// controller on v1).
func (d *Driver) cgroupParents() []string {
	if d.cfg.Jail == nil {
		return nil
	}
	return jail.CgroupParents(d.cfg.Jail.cgroupPlace())
}

// SweepCgroups implements vmm.CgroupSweeper.
func (d *Driver) SweepCgroups(keep func(vmID string) bool) {
	for _, parent := range d.cgroupParents() {
		ents, _ := os.ReadDir(parent)
		for _, e := range ents {
			if !e.IsDir() || keep(e.Name()) {
				continue
			}
			d.log.Warn("ending what is left in the cgroup of a VM not taken back", "cgroup", filepath.Join(parent, e.Name()))
			jail.RemoveCgroups([]string{filepath.Join(parent, e.Name())})
		}
	}
}
