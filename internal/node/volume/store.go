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
)

// Store keeps the volumes whose data lives on this node. Each is a sparse ext4 image of
// its size, mounted (loop, nodev, nosuid, noexec) while the node serves it: the size is
// the filesystem's, so a full volume answers ENOSPC to whoever writes it, and what one
// volume holds cannot take space from another or from the node beyond its size.
type Store struct {
	root string // images/<id>.ext4, mnt/<id>
}

// Volume sizes a Store accepts, MiB.
const (
	MinSizeMiB = 16
	MaxSizeMiB = 1 << 20 // 1 TiB
)

var validID = regexp.MustCompile(`^[0-9a-f]{16}$`)

// NewStore keeps volumes under root.
func NewStore(root string) (*Store, error) {
	for _, d := range []string{"images", "mnt"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("volume store %s: %w", root, err)
		}
	}
	return &Store{root: root}, nil
}

func (s *Store) image(id string) string { return filepath.Join(s.root, "images", id+".ext4") }

// Dir is where volume id is mounted while the node serves it.
func (s *Store) Dir(id string) string { return filepath.Join(s.root, "mnt", id) }

// Create makes volume id of sizeMiB (sparse: it takes what is written) and mounts it.
func (s *Store) Create(ctx context.Context, id string, sizeMiB int) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("volume ID %q: want 16 hex digits", id)
	}
	if sizeMiB < MinSizeMiB || sizeMiB > MaxSizeMiB {
		return fmt.Errorf("volume size %d MiB: want %d MiB to %d MiB", sizeMiB, MinSizeMiB, MaxSizeMiB)
	}
	img := s.image(id)
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
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
		err = run(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0,lazy_itable_init=1", "-O", "^has_journal", img)
	}
	if err == nil {
		err = s.Mount(ctx, id)
	}
	if err == nil {
		err = os.Chmod(s.Dir(id), 0o777|os.ModeSticky)
	}
	if err != nil {
		_ = s.Remove(context.WithoutCancel(ctx), id)
		return fmt.Errorf("create volume %s: %w", id, err)
	}
	return nil
}

// Mount mounts volume id at Dir(id) unless it is mounted already (after an agent
// restart it is).
func (s *Store) Mount(ctx context.Context, id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("volume ID %q: want 16 hex digits", id)
	}
	dir := s.Dir(id)
	if mounted, err := isMounted(dir); err != nil || mounted {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return run(ctx, "mount", "-t", "ext4", "-o", "loop,nodev,nosuid,noexec", s.image(id), dir)
}

// Remove unmounts volume id and deletes its data. It fails while the volume is in use
// (a server holds it): the caller stops serving it first.
func (s *Store) Remove(ctx context.Context, id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("volume ID %q: want 16 hex digits", id)
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
