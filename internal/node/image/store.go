// Package image is Fireworks' image store: it pulls OCI images (from a
// registry, an OCI layout directory or a `docker save` tarball), caches
// their blobs by digest, and builds one read-only root disk per image
// manifest digest by unpacking the layers (see package unpack) and running
// mkfs on the result.
//
// Layout of the store directory:
//
//	blobs/sha256/<hex>      manifests, configs and compressed layers, verified before they land
//	disks/<hex>.<fstype>    root disks by manifest digest ("erofs" or "ext4")
//	tmp/                    downloads and unpack trees in progress; emptied by Open
//	index.json              refs -> images, with what is needed to build a disk
//
// One Store should own a directory at a time. Within a process a Store is
// safe for concurrent use.
package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/unpack"
)

// ErrNotFound is returned (wrapped) when no local image matches a reference.
var ErrNotFound = errors.New("image not found")

// ErrHostileLayer is returned (wrapped) by RootDisk when a layer is refused
// for what it contains: an escape attempt, a device node, a limit exceeded.
var ErrHostileLayer = unpack.ErrHostileLayer

// ErrTooLarge is returned (wrapped) by RootDiskWithin when the image's files pass the bound.
var ErrTooLarge = unpack.ErrTooLarge

// Limits bound what unpacking one image may write; see unpack.Limits.
type Limits = unpack.Limits

// Root filesystem types RootDisk can build.
const (
	FSTypeErofs = "erofs"
	FSTypeExt4  = "ext4"
)

// maxLayers bounds the layers of one image. Docker's overlay driver stops at
// about 128; anything far above that is not a real image.
const maxLayers = 256

// Config is the part of the image config that decides how a process runs,
// as Docker honours it.
type Config struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"workingDir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// Image is a locally stored image.
type Image struct {
	// Ref is the reference the image was found or pulled by, in canonical
	// form ("index.docker.io/library/busybox:latest", "oci:/abs/dir:tag");
	// empty for an image whose refs all moved to newer pulls.
	Ref string
	// Digest is the image manifest digest ("sha256:..."); for a multi-platform
	// reference it is the chosen platform's manifest.
	Digest string
	Config Config
	// Size is the sum of the compressed layer sizes.
	Size    int64
	Created time.Time
	// RootDisk is the path of the built root disk, empty until RootDisk ran.
	RootDisk string
	// Public says a user's pull (PullOptions.User) resolved it: its content is what
	// anyone may fetch anonymously from a public address.
	Public bool
}

// Progress reports one layer's download.
type Progress struct {
	Layer           string // layer digest
	Complete, Total int64  // bytes
	Done            bool   // downloaded or already cached
}

// PullOptions tune one Pull.
type PullOptions struct {
	// InsecureRegistries are registry hosts ("host:port") reached over plain
	// HTTP. Loopback registries are always plain HTTP.
	InsecureRegistries []string
	// Platform is "os/arch[/variant]"; default "linux/amd64".
	Platform string
	// Progress, if set, is called (never concurrently) as layers download.
	Progress func(Progress)
	// Transport, if set, carries the registry traffic (GuardedTransport for a user's).
	Transport http.RoundTripper
	// User marks a pull a user asked for: it goes anonymously (never with the node's
	// registry credentials), and the cache serves it only images a user's pull resolved
	// (not what an admin pulled from a private registry or a local path).
	User bool
	// Owner, if set, is the API token the image is fetched for: the image counts
	// against that owner's share of the store (see FitOwner). Empty for the
	// operator's pulls, which no owner's limit ever removes.
	Owner string
	// Reserve, if set, is asked for room for the compressed layers (as the manifest
	// declares them) before anything is downloaded; its error fails the pull, and
	// release is called when the download ends. It bounds what pulls in flight take.
	Reserve func(ctx context.Context, bytes int64) (release func(), err error)
}

// Option configures a Store.
type Option func(*Store)

// WithFSType sets the root disk filesystem, FSTypeErofs (default) or FSTypeExt4.
func WithFSType(fsType string) Option { return func(s *Store) { s.fsType = fsType } }

// WithLimits sets the unpack limits; zero fields keep their defaults.
func WithLimits(l Limits) Option { return func(s *Store) { s.limits = l } }

// WithLogger sets the logger (nil keeps slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(s *Store) {
		if l != nil {
			s.log = l
		}
	}
}

// Store is an image store rooted at one directory.
type Store struct {
	dir    string
	fsType string
	limits Limits
	log    *slog.Logger

	mu    sync.Mutex               // guards the index file, pins and locks
	pins  map[string]int           // blob digests a pull in flight needs, safe from GC
	locks map[string]chan struct{} // per manifest digest: root disk build / removal

	builds atomic.Int64 // root disks built, for tests

	used      map[string]time.Time     // last use by digest (guarded by mu), for Prune
	ownerUsed map[ownerImage]time.Time // last use by an owner (guarded by mu), for FitOwner
}

// record is one image in index.json.
type record struct {
	Digest       string        `json:"digest"`
	Refs         []string      `json:"refs"`
	Config       Config        `json:"config"`
	Size         int64         `json:"size"`
	Created      time.Time     `json:"created"`
	Pulled       time.Time     `json:"pulled"`
	ConfigDigest string        `json:"configDigest"`
	Layers       []layerRecord `json:"layers"`
	Public       bool          `json:"public,omitempty"` // see Image.Public
	// Owners are the tokens the image was fetched or used for (PullOptions.Owner),
	// with when that was first recorded; Operator says the operator (an admin, a
	// pool) asked for it too. An image no owner holds any more is removed unless
	// the operator asked for it; records from before owners existed count as the
	// operator's.
	Owners   map[string]time.Time `json:"owners,omitempty"`
	Operator bool                 `json:"operator,omitempty"`
}

type layerRecord struct {
	Digest    string `json:"digest"`
	DiffID    string `json:"diffID"`
	Size      int64  `json:"size"`
	MediaType string `json:"mediaType"`
}

type indexFile struct {
	Version int                `json:"version"`
	Images  map[string]*record `json:"images"` // by manifest digest
}

// Open opens (creating if needed) the store at dir. It removes leftovers of
// interrupted work: the tmp directory, and blobs and disks no image refers to.
func Open(dir string, opts ...Option) (*Store, error) {
	s := &Store{dir: dir, fsType: FSTypeErofs, log: slog.Default(),
		pins: map[string]int{}, locks: map[string]chan struct{}{}}
	for _, o := range opts {
		o(s)
	}
	if s.fsType != FSTypeErofs && s.fsType != FSTypeExt4 {
		return nil, fmt.Errorf("open image store %s: root filesystem type %q: want %s or %s", dir, s.fsType, FSTypeErofs, FSTypeExt4)
	}
	if err := os.RemoveAll(s.tmpDir()); err != nil {
		return nil, fmt.Errorf("open image store %s: clear tmp: %w", dir, err)
	}
	for _, d := range []string{s.blobDir(), s.diskDir(), s.tmpDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("open image store %s: %w", dir, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return nil, fmt.Errorf("open image store %s: %w", dir, err)
	}
	s.gcLocked(idx)
	return s, nil
}

// FSType is the filesystem RootDisk builds.
func (s *Store) FSType() string { return s.fsType }

func (s *Store) blobDir() string   { return filepath.Join(s.dir, "blobs", "sha256") }
func (s *Store) diskDir() string   { return filepath.Join(s.dir, "disks") }
func (s *Store) tmpDir() string    { return filepath.Join(s.dir, "tmp") }
func (s *Store) indexPath() string { return filepath.Join(s.dir, "index.json") }

func (s *Store) blobPath(digest string) string {
	return filepath.Join(s.blobDir(), strings.TrimPrefix(digest, "sha256:"))
}

func (s *Store) diskPath(digest, fsType string) string {
	return filepath.Join(s.diskDir(), strings.TrimPrefix(digest, "sha256:")+"."+fsType)
}

func (s *Store) hasBlob(digest string) bool {
	_, err := os.Stat(s.blobPath(digest))
	return err == nil
}

// loadIndex reads index.json; s.mu must be held. The index is re-read for
// every operation: it is small, and it keeps two Stores on one directory
// (an agent restarted in the same process) from clobbering each other's view.
func (s *Store) loadIndex() (*indexFile, error) {
	idx := &indexFile{Version: 1, Images: map[string]*record{}}
	b, err := os.ReadFile(s.indexPath())
	if errors.Is(err, os.ErrNotExist) {
		return idx, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read image index: %w", err)
	}
	if err := json.Unmarshal(b, idx); err != nil {
		// The index only describes cached data: set the broken one aside and
		// start empty rather than keep the agent from starting. The GC that
		// follows in Open reclaims the blobs.
		aside := fmt.Sprintf("%s.corrupt-%d", s.indexPath(), time.Now().Unix())
		s.log.Warn("image index is corrupt; starting with an empty one", "path", s.indexPath(), "moved_to", aside, "err", err)
		if rerr := os.Rename(s.indexPath(), aside); rerr != nil {
			return nil, fmt.Errorf("image index %s is corrupt (%v) and cannot be moved aside: %w", s.indexPath(), err, rerr)
		}
		return &indexFile{Version: 1, Images: map[string]*record{}}, nil
	}
	if idx.Images == nil {
		idx.Images = map[string]*record{}
	}
	for _, r := range idx.Images {
		// An image no token holds is the operator's: one pulled before owners were
		// recorded, or one a token let go of while it was in use. No token's share may
		// remove it (Prune, under the node's budget, still may).
		if len(r.Owners) == 0 {
			r.Operator = true
		}
	}
	return idx, nil
}

// saveIndex writes index.json atomically; s.mu must be held.
func (s *Store) saveIndex(idx *indexFile) error {
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return fmt.Errorf("encode image index: %w", err)
	}
	if err := writeFileAtomic(s.indexPath(), b, 0o600); err != nil {
		return fmt.Errorf("write image index: %w", err)
	}
	return nil
}

func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// gcLocked removes blobs and disks that no image in idx refers to and no
// pull in flight has pinned; s.mu must be held. Failures are logged: a leaked
// cache file costs disk space, not correctness.
func (s *Store) gcLocked(idx *indexFile) {
	keep := map[string]bool{}
	for d := range s.pins {
		keep[strings.TrimPrefix(d, "sha256:")] = true
	}
	disks := map[string]bool{}
	for _, r := range idx.Images {
		keep[strings.TrimPrefix(r.Digest, "sha256:")] = true
		keep[strings.TrimPrefix(r.ConfigDigest, "sha256:")] = true
		for _, l := range r.Layers {
			keep[strings.TrimPrefix(l.Digest, "sha256:")] = true
		}
		disks[strings.TrimPrefix(r.Digest, "sha256:")] = true
	}
	if ents, err := os.ReadDir(s.blobDir()); err == nil {
		for _, e := range ents {
			if !keep[e.Name()] {
				if err := os.Remove(filepath.Join(s.blobDir(), e.Name())); err != nil {
					s.log.Warn("cannot remove unused image blob", "blob", e.Name(), "err", err)
				}
			}
		}
	}
	if ents, err := os.ReadDir(s.diskDir()); err == nil {
		for _, e := range ents {
			hex, _, _ := strings.Cut(e.Name(), ".")
			if !disks[hex] {
				if err := os.Remove(filepath.Join(s.diskDir(), e.Name())); err != nil {
					s.log.Warn("cannot remove unused root disk", "disk", e.Name(), "err", err)
				}
			}
		}
	}
}

func (s *Store) pin(digests []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range digests {
		s.pins[d]++
	}
}

func (s *Store) unpin(digests []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range digests {
		if s.pins[d]--; s.pins[d] <= 0 {
			delete(s.pins, d)
		}
	}
}

// lockDigest serialises root disk builds and removal of one image. It waits
// for the lock or for ctx.
func (s *Store) lockDigest(ctx context.Context, digest string) (unlock func(), err error) {
	s.mu.Lock()
	ch, ok := s.locks[digest]
	if !ok {
		ch = make(chan struct{}, 1)
		s.locks[digest] = ch
	}
	s.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *Store) toImage(r *record, ref string) Image {
	img := Image{Ref: ref, Digest: r.Digest, Config: r.Config, Size: r.Size, Created: r.Created, Public: r.Public}
	if p := s.diskPath(r.Digest, s.fsType); fileExists(p) {
		img.RootDisk = p
	}
	return img
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// Get finds a local image by reference (as given to Pull, or any spelling of
// it: "busybox" finds index.docker.io/library/busybox:latest), by manifest
// digest, or by a unique prefix of one (at least 4 hex digits). It returns an
// error wrapping ErrNotFound when nothing matches.
func (s *Store) Get(ctx context.Context, ref string) (*Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return nil, err
	}
	r, name, err := find(idx, ref)
	if err != nil {
		return nil, err
	}
	if name == "" && len(r.Refs) > 0 {
		name = r.Refs[0]
	}
	img := s.toImage(r, name)
	return &img, nil
}

// find looks ref up in idx. name is the matching stored ref when ref named
// the image rather than its digest.
func find(idx *indexFile, ref string) (r *record, name string, err error) {
	if strings.TrimSpace(ref) == "" {
		return nil, "", fmt.Errorf("empty image reference: %w", ErrNotFound)
	}
	candidates := []string{ref}
	if p, err := parseRef(ref); err == nil {
		candidates = append(candidates, p.String())
	}
	for _, c := range candidates {
		for _, r := range idx.Images {
			if slices.Contains(r.Refs, c) {
				return r, c, nil
			}
		}
	}
	// name@sha256:... matches the image with that digest even when it was
	// pulled by tag.
	if _, d, ok := strings.Cut(ref, "@"); ok {
		if r, ok := idx.Images[d]; ok {
			return r, "", nil
		}
	}
	hex := strings.TrimPrefix(ref, "sha256:")
	if len(hex) >= 4 && len(hex) <= 64 && isHex(hex) {
		var found []*record
		for d, r := range idx.Images {
			if strings.HasPrefix(strings.TrimPrefix(d, "sha256:"), hex) {
				found = append(found, r)
			}
		}
		switch len(found) {
		case 1:
			return found[0], "", nil
		case 0:
		default:
			return nil, "", fmt.Errorf("image %q: digest prefix matches %d images; give more digits", ref, len(found))
		}
	}
	return nil, "", fmt.Errorf("image %q: %w", ref, ErrNotFound)
}

func isHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Ensure returns the local image for ref, pulling it if there is none.
func (s *Store) Ensure(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	img, err := s.Get(ctx, ref)
	if err == nil && (!opts.User || img.Public) {
		s.touch(img.Digest)
		if err := s.charge(img.Digest, opts); err != nil {
			return nil, err
		}
		return img, nil
	}
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	if img, err = s.Pull(ctx, ref, opts); err == nil {
		s.touch(img.Digest)
	}
	return img, err
}

// List returns every local image, one entry per ref (an image without refs
// appears once with an empty Ref), sorted by Ref then Digest.
func (s *Store) List(ctx context.Context) ([]Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.loadIndex()
	if err != nil {
		return nil, err
	}
	var out []Image
	for _, r := range idx.Images {
		if len(r.Refs) == 0 {
			out = append(out, s.toImage(r, ""))
		}
		for _, ref := range r.Refs {
			out = append(out, s.toImage(r, ref))
		}
	}
	slices.SortFunc(out, func(a, b Image) int {
		if c := strings.Compare(a.Ref, b.Ref); c != 0 {
			return c
		}
		return strings.Compare(a.Digest, b.Digest)
	})
	return out, nil
}

// Remove removes ref. Given a name, it drops that name, and the image with
// it once no name is left; given a digest (or prefix), it removes the image
// and all its names. Blobs and the root disk no remaining image uses are
// deleted (a VM that has the disk open keeps its open file).
func (s *Store) Remove(ctx context.Context, ref string) error {
	s.mu.Lock()
	idx, err := s.loadIndex()
	if err != nil {
		s.mu.Unlock()
		return err
	}
	r, _, err := find(idx, ref)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	digest := r.Digest
	// Wait for a root disk build of this image to finish before deleting.
	unlock, err := s.lockDigest(ctx, digest)
	if err != nil {
		return err
	}
	defer unlock()

	s.mu.Lock()
	defer s.mu.Unlock()
	if idx, err = s.loadIndex(); err != nil {
		return err
	}
	r, name, err := find(idx, ref)
	if err != nil {
		return err
	}
	if name != "" {
		r.Refs = slices.DeleteFunc(r.Refs, func(x string) bool { return x == name })
	}
	if name == "" || len(r.Refs) == 0 {
		delete(idx.Images, r.Digest)
	}
	if err := s.saveIndex(idx); err != nil {
		return err
	}
	s.gcLocked(idx)
	return nil
}
