package volume

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Store keeps the volumes whose data lives on this node. Each is a sparse ext4 image of
// its size, mounted (loop, nodev, nosuid, noexec) while the node serves it: the size is
// the filesystem's, so a full volume answers ENOSPC to whoever writes it, and what one
// volume holds cannot take space from another or from the node beyond its size.
type Store struct {
	// mu serialises mounts, unmounts and removals: two mounts of one image at once could
	// attach it to two loop devices.
	mu   sync.Mutex
	root string // images/<id>.ext4, mnt/<id>
	// uid and gid own each new volume's root: the user volume servers run as (guests see
	// it as root, see swapID).
	uid, gid int
}

// Volume sizes a Store accepts, MiB.
const (
	MinSizeMiB = 16
	MaxSizeMiB = 1 << 20 // 1 TiB
)

var validID = regexp.MustCompile(`^[0-9a-f]{16}$`)

func checkID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("volume ID %q: want 16 hex digits", id)
	}
	return nil
}

// NewStore keeps volumes under root; new volumes' roots belong to uid:gid, the user their
// servers run as.
func NewStore(root string, uid, gid int) (*Store, error) {
	for _, d := range []string{"images", "mnt"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("volume store %s: %w", root, err)
		}
	}
	return &Store{root: root, uid: uid, gid: gid}, nil
}

func (s *Store) image(id string) string { return filepath.Join(s.root, "images", id+".ext4") }

// Dir is where volume id is mounted while the node serves it.
func (s *Store) Dir(id string) string { return filepath.Join(s.root, "mnt", id) }

// Create makes volume id of sizeMiB (sparse: it takes what is written) and mounts it.
func (s *Store) Create(ctx context.Context, id string, sizeMiB int) error {
	if err := checkID(id); err != nil {
		return err
	}
	if sizeMiB < MinSizeMiB || sizeMiB > MaxSizeMiB {
		return fmt.Errorf("volume size %d MiB: want %d MiB to %d MiB", sizeMiB, MinSizeMiB, MaxSizeMiB)
	}
	img := s.image(id)
	s.mu.Lock()
	// Images are sparse, but each may fill to its size: together they may not promise
	// more than the disk they are on holds, or one volume's writes would fail for want of
	// the space another took (and a user could fill the node's disk).
	if err := s.fits(int64(sizeMiB) << 20); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("volume %s: %w", id, err)
	}
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// Its root is open to everyone (as a new directory would be to its owner): what the
		// guests write there is theirs, under their own uids.
		// A journal (small: its blocks are written at once), so that a write error of
		// the node's disk (full) leaves a consistent filesystem.
		journal := "4"
		if sizeMiB >= 1024 {
			journal = "64"
		}
		err = run(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-J", "size="+journal, "-E", fmt.Sprintf("root_owner=%d:%d,lazy_itable_init=1", s.uid, s.gid), img)
	}
	if err == nil {
		err = s.Mount(ctx, id)
	}
	if err == nil {
		err = os.Chmod(s.Dir(id), 0o777|os.ModeSticky)
	}
	if err == nil {
		// mkfs's lost+found is root's: a guest would see it as the servers' user's. Its
		// fsck recreates it should it ever need it.
		err = os.Remove(filepath.Join(s.Dir(id), "lost+found"))
	}
	if err != nil {
		_ = s.Remove(context.WithoutCancel(ctx), id)
		return fmt.Errorf("create volume %s: %w", id, err)
	}
	return nil
}

// ErrNoSpace: the node's disk cannot hold another volume of that size.
var ErrNoSpace = errors.New("not enough disk for the volume")

// fits says whether the volumes' sizes with size more still fit in the disk they are on.
func (s *Store) fits(size int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Join(s.root, "images"), &st); err != nil {
		return err
	}
	capacity := int64(st.Blocks) * st.Bsize
	var promised int64
	entries, err := os.ReadDir(filepath.Join(s.root, "images"))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() {
			promised += fi.Size()
		}
	}
	if promised+size > capacity {
		return fmt.Errorf("%w: the node's volumes take up to %d MiB of its %d MiB disk, %d MiB more do not fit", ErrNoSpace, promised>>20, capacity>>20, size>>20)
	}
	return nil
}

// Mount mounts volume id at Dir(id) unless it is mounted already (after an agent
// restart it is).
func (s *Store) Mount(ctx context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := checkID(id); err != nil {
		return err
	}
	dir := s.Dir(id)
	if mounted, err := isMounted(dir); err != nil || mounted {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// Never through a second loop device: an image still attached to one (mounted in
	// another mount namespace: a server from before, or any process that copied the
	// node's mounts) would be two filesystems writing one disk. The device it is attached
	// to is mounted instead: one block device, one filesystem, however many mounts.
	//
	// A device released by the last unmount is detached by the kernel a moment later
	// (autoclear runs asynchronously): one that goes while it is being mounted is looked
	// up again.
	for try := 0; ; try++ {
		dev, err := s.loopDevice(ctx, id)
		if err != nil {
			return err
		}
		if dev == "" {
			return run(ctx, "mount", "-t", "ext4", "-o", "loop,"+mountOptions, s.image(id), dir)
		}
		err = run(ctx, "mount", "-t", "ext4", "-o", mountOptions, dev, dir)
		if err == nil || try == 20 {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// loopDevice is the loop device volume id's image is attached to ("" if none); an image
// attached to several is refused (two filesystems would write one disk).
func (s *Store) loopDevice(ctx context.Context, id string) (string, error) {
	out, err := exec.CommandContext(ctx, "losetup", "-j", s.image(id)).Output()
	if err != nil {
		return "", fmt.Errorf("losetup -j %s: %w", s.image(id), err)
	}
	lines := strings.Fields(strings.TrimSpace(string(out)))
	if len(lines) == 0 {
		return "", nil
	}
	dev := strings.TrimSuffix(lines[0], ":")
	if strings.Count(string(out), "\n") > 1 || !strings.HasPrefix(dev, "/dev/loop") {
		return "", fmt.Errorf("volume %s's image is attached to several loop devices (%s): refusing to use it", id, strings.TrimSpace(string(out)))
	}
	return dev, nil
}

// Export unmounts volume id and returns its image, to be read whole for a move to
// another node: once no loop device holds it, nothing on this node writes it (the caller
// mounts it no more).
func (s *Store) Export(ctx context.Context, id string) (string, error) {
	if err := s.Unmount(ctx, id); err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// The loop device is detached a moment after the unmount (see Mount).
	for try := 0; ; try++ {
		dev, err := s.loopDevice(ctx, id)
		if err != nil {
			return "", err
		}
		if dev == "" {
			break
		}
		if try == 50 {
			return "", fmt.Errorf("volume %s's image is still attached to loop device %s: in use in another mount namespace", id, dev)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := os.Stat(s.image(id)); err != nil {
		return "", fmt.Errorf("volume %s: %w", id, err)
	}
	return s.image(id), nil
}

// Import makes volume id of sizeMiB from another node's image of it: fill writes the
// image into the file it is given (sized already), which is checked (e2fsck) before it
// becomes the volume. The image came over the network from a node: a filesystem the
// kernel mounts is not taken unchecked.
func (s *Store) Import(ctx context.Context, id string, sizeMiB int, fill func(*os.File) error) error {
	if err := checkID(id); err != nil {
		return err
	}
	if sizeMiB < MinSizeMiB || sizeMiB > MaxSizeMiB {
		return fmt.Errorf("volume size %d MiB: want %d MiB to %d MiB", sizeMiB, MinSizeMiB, MaxSizeMiB)
	}
	part := filepath.Join(s.root, "images", "."+id+".part")
	s.mu.Lock()
	if _, err := os.Stat(s.image(id)); err == nil {
		s.mu.Unlock()
		return fmt.Errorf("volume %s is on this node already", id)
	}
	_ = os.Remove(part) // an earlier attempt's
	if err := s.fits(int64(sizeMiB) << 20); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("volume %s: %w", id, err)
	}
	f, err := os.OpenFile(part, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	if err == nil {
		err = fill(f)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		if fi, serr := os.Stat(part); serr != nil || fi.Size() != int64(sizeMiB)<<20 {
			err = fmt.Errorf("the image received is not of the volume's size (%d MiB)", sizeMiB)
		}
	}
	if err == nil {
		err = s.checkImported(ctx, part)
	}
	if err != nil {
		_ = os.Remove(part)
		return fmt.Errorf("import volume %s: %w", id, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Rename(part, s.image(id)); err != nil {
		_ = os.Remove(part)
		return fmt.Errorf("import volume %s: %w", id, err)
	}
	return nil
}

// checkImported checks an image another node sent before the kernel mounts it: a clean
// ext4 (no journal to replay: the sender unmounted it, and a replay is not checked)
// with no feature this node's mkfs would not have made, whose check finds nothing
// (e2fsck -f -n), and whose stored mount options and error behaviour are reset to this
// node's (a stored errors=panic would be the sender's to pull).
func (s *Store) checkImported(ctx context.Context, img string) error {
	got, err := superblock(ctx, img)
	if err != nil {
		return err
	}
	if got["Filesystem state"] != "clean" {
		return fmt.Errorf("the filesystem is not clean (%q): refused", got["Filesystem state"])
	}
	ref := filepath.Join(s.root, "images", ".reference.part")
	_ = os.Remove(ref)
	defer os.Remove(ref)
	if err := os.WriteFile(ref, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(ref, MinSizeMiB<<20); err != nil {
		return err
	}
	if err := run(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-J", "size=4", ref); err != nil {
		return err
	}
	want, err := superblock(ctx, ref)
	if err != nil {
		return err
	}
	allowed := map[string]bool{}
	for _, f := range strings.Fields(want["Filesystem features"]) {
		allowed[f] = true
	}
	for _, f := range strings.Fields(got["Filesystem features"]) {
		if !allowed[f] {
			return fmt.Errorf("the filesystem has feature %q, which this node's volumes do not: refused", f)
		}
	}
	// -n: report, change nothing; -f: check even a clean one.
	if err := run(ctx, "e2fsck", "-f", "-n", img); err != nil {
		return err
	}
	return run(ctx, "tune2fs", "-e", "remount-ro", "-E", "mount_opts=", img)
}

// superblock is what dumpe2fs -h says of img, by field.
func superblock(ctx context.Context, img string) (map[string]string, error) {
	out, err := exec.CommandContext(ctx, "dumpe2fs", "-h", img).Output()
	if err != nil {
		return nil, fmt.Errorf("dumpe2fs -h: %w", err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return fields, nil
}

// mountOptions mount a volume: nothing on it runs or opens a device on the node, and
// an error the filesystem finds makes it read-only, whatever its superblock asks.
const mountOptions = "nodev,nosuid,noexec,errors=remount-ro"

// Unmount unmounts volume id if it is mounted (its data stays).
func (s *Store) Unmount(ctx context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := checkID(id); err != nil {
		return err
	}
	dir := s.Dir(id)
	if mounted, err := isMounted(dir); err != nil || !mounted {
		return err
	}
	return run(ctx, "umount", dir)
}

// Mounted lists the volumes mounted now.
func (s *Store) Mounted() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(s.root, "mnt"))
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if !validID.MatchString(e.Name()) {
			continue
		}
		if ok, err := isMounted(s.Dir(e.Name())); err == nil && ok {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// Remove unmounts volume id and deletes its data. It fails while the volume is in use
// (a server holds it): the caller stops serving it first.
func (s *Store) Remove(ctx context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := checkID(id); err != nil {
		return err
	}
	dir := s.Dir(id)
	if mounted, err := isMounted(dir); err != nil {
		return err
	} else if mounted {
		if err := run(ctx, "umount", dir); err != nil {
			return fmt.Errorf("remove volume %s: %w", id, err)
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove volume %s: %w", id, err)
	}
	if err := os.Remove(s.image(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove volume %s: %w", id, err)
	}
	return nil
}

// isMounted says whether a filesystem is mounted at dir (this mount namespace).
func isMounted(dir string) (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// Field 5 is the mount point (octal escapes for spaces and the like).
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && unescapeMount(fields[4]) == dir {
			return true, nil
		}
	}
	return false, sc.Err()
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
