package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/unpack"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// RootDisk returns the read-only root disk of img, building it the first
// time: layers are unpacked into a private tree under the store's tmp
// directory (removed afterwards, also on failure) and mkfs turns the tree
// into a disk image, which is renamed into place only when complete. One
// disk exists per manifest digest; concurrent callers for the same image
// wait for a single build. fsType is "erofs" or "ext4" (see WithFSType).
//
// erofs is the default: mkfs.erofs writes the image in one pass from the
// tree, with no size to guess and no free space inside, so it is both faster
// to build and smaller than ext4, and the guest mounts the disk read-only
// anyway (the kernel's erofs module is in the initramfs). Layers are stored
// uncompressed in it: decompressing in a TCG guest would cost more CPU than
// the host disk it saves.
func (s *Store) RootDisk(ctx context.Context, img *Image) (path, fsType string, err error) {
	return s.RootDiskWithin(ctx, img, 0)
}

// RootDiskWithin is RootDisk with the files the image unpacks to bounded by maxFileBytes
// too (0: only the store's limits), for a build on behalf of a token with that much room
// left in its share: a few compressed bytes can unpack to gigabytes.
func (s *Store) RootDiskWithin(ctx context.Context, img *Image, maxFileBytes int64) (path, fsType string, err error) {
	if img == nil || img.Digest == "" {
		return "", "", errors.New("root disk: no image given")
	}
	digest := img.Digest
	unlock, err := s.lockDigest(ctx, digest)
	if err != nil {
		return "", "", fmt.Errorf("root disk of %s: %w", digest, err)
	}
	defer unlock()

	path = s.diskPath(digest, s.fsType)
	if fileExists(path) {
		img.RootDisk = path
		return path, s.fsType, nil
	}
	s.mu.Lock()
	idx, err := s.loadIndex()
	var rec *record
	if err == nil {
		rec = idx.Images[digest]
	}
	s.mu.Unlock()
	if err != nil {
		return "", "", err
	}
	if rec == nil {
		return "", "", fmt.Errorf("root disk of %s: %w", digest, ErrNotFound)
	}
	if err := s.buildDisk(ctx, rec, path, maxFileBytes); err != nil {
		return "", "", fmt.Errorf("root disk of %s (%s): %w", img.Ref, digest, err)
	}
	img.RootDisk = path
	return path, s.fsType, nil
}

func (s *Store) buildDisk(ctx context.Context, rec *record, dst string, maxFileBytes int64) error {
	s.builds.Add(1)
	stage, err := os.MkdirTemp(s.tmpDir(), "rootfs-")
	if err != nil {
		return err
	}
	defer func() {
		if err := os.RemoveAll(stage); err != nil {
			s.log.Warn("cannot remove root disk staging directory", "path", stage, "err", err)
		}
	}()
	tree := filepath.Join(stage, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return err
	}
	start := time.Now()
	if err := s.unpackLayers(ctx, rec, tree, maxFileBytes); err != nil {
		return err
	}
	unpacked := time.Now()
	tmpDisk := filepath.Join(stage, "disk."+s.fsType)
	switch s.fsType {
	case FSTypeExt4:
		err = mkfsExt4(ctx, tree, tmpDisk)
	default:
		err = mkfsErofs(ctx, tree, tmpDisk)
	}
	if err != nil {
		return err
	}
	s.log.Info("built root disk", "digest", rec.Digest, "fs", s.fsType,
		"unpack", unpacked.Sub(start).Round(time.Millisecond), "mkfs", time.Since(unpacked).Round(time.Millisecond))
	f, err := os.Open(tmpDisk)
	if err != nil {
		return err
	}
	err = f.Sync()
	f.Close()
	if err != nil {
		return fmt.Errorf("sync root disk: %w", err)
	}
	if err := os.Chmod(tmpDisk, 0o444); err != nil {
		return err
	}
	if err := os.Rename(tmpDisk, dst); err != nil {
		return fmt.Errorf("install root disk: %w", err)
	}
	return nil
}

func (s *Store) unpackLayers(ctx context.Context, rec *record, tree string, maxFileBytes int64) error {
	limits := s.limits
	if maxFileBytes > 0 {
		if limits.MaxTotalBytes <= 0 {
			limits.MaxTotalBytes = unpack.DefaultLimits().MaxTotalBytes
		}
		limits.MaxTotalBytes = min(limits.MaxTotalBytes, maxFileBytes)
	}
	u, err := unpack.New(tree, limits, s.log)
	if err != nil {
		return err
	}
	defer u.Close()
	for i, l := range rec.Layers {
		if err := s.applyLayer(ctx, u, l); err != nil {
			return fmt.Errorf("layer %d (%s): %w", i+1, l.Digest, err)
		}
	}
	return nil
}

// maxTrailingBytes bounds what a layer may carry after its tar end marker
// (tar pads to 10 KiB records; anything much longer is not padding).
const maxTrailingBytes = 1 << 20

func (s *Store) applyLayer(ctx context.Context, u *unpack.Unpacker, l layerRecord) error {
	blob := s.blobPath(l.Digest)
	// The blob was verified when it was stored; check again so a file damaged
	// on disk is re-downloaded instead of silently baked into a disk.
	if err := verifyFile(blob, l.Digest); err != nil {
		if rmErr := os.Remove(blob); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) {
			s.log.Warn("cannot remove corrupt blob", "blob", blob, "err", rmErr)
		}
		return fmt.Errorf("cached blob is damaged, pull the image again: %w", err)
	}
	layer, err := partial.CompressedToLayer(&blobLayer{path: blob, digest: l.Digest, size: l.Size, mediaType: types.MediaType(l.MediaType)})
	if err != nil {
		return err
	}
	rc, err := layer.Uncompressed()
	if err != nil {
		return fmt.Errorf("decompress: %w", err)
	}
	defer rc.Close()
	h := sha256.New()
	r := io.TeeReader(rc, h)
	if err := u.Apply(ctx, r); err != nil {
		return err
	}
	n, err := io.Copy(io.Discard, io.LimitReader(r, maxTrailingBytes+1))
	if err != nil {
		return fmt.Errorf("decompress: %w", err)
	}
	if n > maxTrailingBytes {
		return fmt.Errorf("%w: more than %d bytes after the end of the tar archive", ErrHostileLayer, maxTrailingBytes)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != l.DiffID {
		return fmt.Errorf("uncompressed content is %s, the image config says %s", got, l.DiffID)
	}
	return nil
}

func verifyFile(path, digest string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return fmt.Errorf("blob %s has content %s", digest, got)
	}
	return nil
}

// blobLayer is a cached compressed layer, for partial.CompressedToLayer,
// which detects gzip, zstd or no compression from the content.
type blobLayer struct {
	path      string
	digest    string
	size      int64
	mediaType types.MediaType
}

func (b *blobLayer) Digest() (v1.Hash, error)            { return v1.NewHash(b.digest) }
func (b *blobLayer) Compressed() (io.ReadCloser, error)  { return os.Open(b.path) }
func (b *blobLayer) Size() (int64, error)                { return b.size, nil }
func (b *blobLayer) MediaType() (types.MediaType, error) { return b.mediaType, nil }

// maxToolOutput bounds the mkfs output kept for an error message.
const maxToolOutput = 16 << 10

func run(ctx context.Context, name string, args ...string) error {
	path, err := exec.LookPath(name)
	if err != nil {
		pkg := map[string]string{"mkfs.erofs": "erofs-utils", "mkfs.ext4": "e2fsprogs"}[name]
		return fmt.Errorf("%s not found (install %s): %w", name, pkg, err)
	}
	var out limitedBuffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

type limitedBuffer struct{ bytes.Buffer }

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := maxToolOutput - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func mkfsErofs(ctx context.Context, tree, disk string) error {
	// --preserve-mtime keeps each file's own mtime (make and friends in the
	// guest compare them) instead of stamping the build time on all.
	return run(ctx, "mkfs.erofs", "--quiet", "--preserve-mtime", disk, tree)
}

// mkfsExt4 sizes the disk from the tree (blocks in use * 1.2 + 64 MiB, as a
// sparse file, so the headroom costs nothing) with an inode per entry plus
// slack. No journal: the guest mounts it read-only.
func mkfsExt4(ctx context.Context, tree, disk string) error {
	var used, inodes int64
	seen := map[uint64]bool{}
	err := filepath.WalkDir(tree, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if seen[st.Ino] {
				return nil // another name of a hardlinked file
			}
			seen[st.Ino] = true
		}
		inodes++
		used += (fi.Size() + 4095) / 4096 * 4096
		return nil
	})
	if err != nil {
		return fmt.Errorf("measure tree: %w", err)
	}
	size := used + used/5 + inodes*256 + 64<<20
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return err
	}
	n := inodes + inodes/5 + 1024
	return run(ctx, "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", "-N", strconv.FormatInt(n, 10),
		"-E", "root_owner=0:0", "-d", tree, disk)
}
