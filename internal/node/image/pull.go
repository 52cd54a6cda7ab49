package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// pullParallelism is how many layers download at once, as Docker does.
const pullParallelism = 3

// progressEvery throttles progress reports to one per this many bytes.
const progressEvery = 1 << 20

// Pull fetches ref (see parseRef for the accepted forms), stores its blobs
// and records it. Blobs already in the store are not downloaded again.
func (s *Store) Pull(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	img, err := s.pull(ctx, ref, opts)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	return img, nil
}

func (s *Store) pull(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	p, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	plat := opts.Platform
	if plat == "" {
		plat = "linux/amd64"
	}
	platform, err := v1.ParsePlatform(plat)
	if err != nil {
		return nil, fmt.Errorf("platform %q: %w", plat, err)
	}
	img, err := resolve(ctx, p, *platform, opts.InsecureRegistries, opts.Transport, opts.User)
	if err != nil {
		return nil, err
	}
	canonical := p.String()

	rawManifest, err := img.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	digest := "sha256:" + sha256Hex(rawManifest)
	if d, err := img.Digest(); err == nil && d.String() != digest {
		return nil, fmt.Errorf("manifest digest mismatch: computed %s, source says %s", digest, d)
	}
	manifest, err := v1.ParseManifest(bytes.NewReader(rawManifest))
	if err != nil {
		return nil, fmt.Errorf("parse manifest %s: %w", digest, err)
	}
	if len(manifest.Layers) > maxLayers {
		return nil, fmt.Errorf("image %s has %d layers, more than the limit of %d", digest, len(manifest.Layers), maxLayers)
	}
	var total int64
	if manifest.Config.Digest.Algorithm != "sha256" {
		return nil, fmt.Errorf("config digest %s: only sha256 is supported", manifest.Config.Digest)
	}
	for _, l := range manifest.Layers {
		if l.Digest.Algorithm != "sha256" {
			return nil, fmt.Errorf("layer digest %s: only sha256 is supported", l.Digest)
		}
		if err := checkLayerType(l.MediaType); err != nil {
			return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		if l.Size < 0 {
			return nil, fmt.Errorf("layer %s: negative size %d", l.Digest, l.Size)
		}
		total += l.Size
	}
	if max := s.limits.MaxTotalBytes; max > 0 && total > max {
		return nil, fmt.Errorf("image %s: %d bytes of compressed layers exceed the limit of %d", digest, total, max)
	}

	need := []string{digest, manifest.Config.Digest.String()}
	for _, l := range manifest.Layers {
		need = append(need, l.Digest.String())
	}
	s.pin(need)
	defer s.unpin(need)

	// Already have it all: just (re)point the ref.
	s.mu.Lock()
	idx, err := s.loadIndex()
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if r, ok := idx.Images[digest]; ok && s.haveBlobs(need) {
		r.Public = r.Public || opts.User
		s.chargeLocked(r, opts)
		out, err := s.tagLocked(idx, r, canonical)
		s.mu.Unlock()
		if err == nil {
			reportCached(opts.Progress, manifest.Layers)
		}
		return out, err
	}
	s.mu.Unlock()

	if opts.Reserve != nil {
		release, err := opts.Reserve(ctx, total)
		if err != nil {
			return nil, err
		}
		defer release()
	}
	cfg, err := s.fetchConfig(img, manifest.Config)
	if err != nil {
		return nil, err
	}
	if cfg.OS != "" && cfg.Architecture != "" && (cfg.OS != platform.OS || cfg.Architecture != platform.Architecture) {
		return nil, fmt.Errorf("image %s is for %s/%s, not %s", digest, cfg.OS, cfg.Architecture, platform)
	}
	if len(cfg.RootFS.DiffIDs) != len(manifest.Layers) {
		return nil, fmt.Errorf("image %s: config lists %d layer diff IDs for %d layers", digest, len(cfg.RootFS.DiffIDs), len(manifest.Layers))
	}

	if err := s.fetchLayers(ctx, img, manifest.Layers, opts.Progress); err != nil {
		return nil, err
	}
	if err := s.putBlob(digest, rawManifest); err != nil {
		return nil, err
	}

	rec := &record{
		Digest:       digest,
		ConfigDigest: manifest.Config.Digest.String(),
		Size:         total,
		Created:      cfg.Created.Time,
		Pulled:       time.Now().UTC(),
		Public:       opts.User,
		Config: Config{
			Entrypoint: cfg.Config.Entrypoint,
			Cmd:        cfg.Config.Cmd,
			Env:        cfg.Config.Env,
			WorkingDir: cfg.Config.WorkingDir,
			User:       cfg.Config.User,
		},
	}
	for i, l := range manifest.Layers {
		rec.Layers = append(rec.Layers, layerRecord{Digest: l.Digest.String(), DiffID: cfg.RootFS.DiffIDs[i].String(),
			Size: l.Size, MediaType: string(l.MediaType)})
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if idx, err = s.loadIndex(); err != nil {
		return nil, err
	}
	if old, ok := idx.Images[digest]; ok {
		rec.Refs = old.Refs // a concurrent pull of another name for it
		rec.Public = rec.Public || old.Public
		rec.Owners, rec.Operator = old.Owners, old.Operator
	}
	s.chargeLocked(rec, opts)
	idx.Images[digest] = rec
	return s.tagLocked(idx, rec, canonical)
}

// tagLocked points ref at r (taking it from any other image) and saves the
// index; s.mu must be held.
func (s *Store) tagLocked(idx *indexFile, r *record, ref string) (*Image, error) {
	for _, o := range idx.Images {
		if o != r {
			o.Refs = slices.DeleteFunc(o.Refs, func(x string) bool { return x == ref })
		}
	}
	if !slices.Contains(r.Refs, ref) {
		r.Refs = append(r.Refs, ref)
		slices.Sort(r.Refs)
	}
	if err := s.saveIndex(idx); err != nil {
		return nil, err
	}
	img := s.toImage(r, ref)
	return &img, nil
}

func (s *Store) haveBlobs(digests []string) bool {
	for _, d := range digests {
		if !s.hasBlob(d) {
			return false
		}
	}
	return true
}

func reportCached(fn func(Progress), layers []v1.Descriptor) {
	if fn == nil {
		return
	}
	for _, l := range layers {
		fn(Progress{Layer: l.Digest.String(), Complete: l.Size, Total: l.Size, Done: true})
	}
}

// checkLayerType accepts tar layers, compressed or not. Foreign (Windows)
// and encrypted layers cannot be unpacked here, so they are refused early.
func checkLayerType(mt types.MediaType) error {
	switch mt {
	case types.OCILayer, types.OCILayerZStd, types.OCIUncompressedLayer,
		types.OCIRestrictedLayer, types.OCIUncompressedRestrictedLayer,
		types.DockerLayer, types.DockerUncompressedLayer:
		return nil
	}
	return fmt.Errorf("unsupported layer media type %q", mt)
}

// maxConfigBytes bounds an image config blob; real ones are a few KiB.
const maxConfigBytes = 8 << 20

func (s *Store) fetchConfig(img v1.Image, desc v1.Descriptor) (*v1.ConfigFile, error) {
	var raw []byte
	if b, err := os.ReadFile(s.blobPath(desc.Digest.String())); err == nil {
		raw = b
	} else {
		if desc.Size > maxConfigBytes {
			return nil, fmt.Errorf("config %s: %d bytes exceeds the limit of %d", desc.Digest, desc.Size, maxConfigBytes)
		}
		if raw, err = img.RawConfigFile(); err != nil {
			return nil, fmt.Errorf("fetch config %s: %w", desc.Digest, err)
		}
		if got := "sha256:" + sha256Hex(raw); got != desc.Digest.String() {
			return nil, fmt.Errorf("config digest mismatch: manifest says %s, got %s", desc.Digest, got)
		}
		if err := s.putBlob(desc.Digest.String(), raw); err != nil {
			return nil, err
		}
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("parse config %s: %w", desc.Digest, err)
	}
	return cfg, nil
}

func (s *Store) putBlob(digest string, b []byte) error {
	if s.hasBlob(digest) {
		return nil
	}
	if err := writeFileAtomic(s.blobPath(digest), b, 0o600); err != nil {
		return fmt.Errorf("store blob %s: %w", digest, err)
	}
	return nil
}

// fetchLayers downloads the layers not in the store, a few at a time; the
// first failure cancels the rest.
func (s *Store) fetchLayers(ctx context.Context, img v1.Image, layers []v1.Descriptor, progress func(Progress)) error {
	var pmu sync.Mutex
	report := func(p Progress) {
		if progress == nil {
			return
		}
		pmu.Lock()
		defer pmu.Unlock()
		progress(p)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, pullParallelism)
	errs := make([]error, len(layers))
	var wg sync.WaitGroup
	for i, l := range layers {
		if s.hasBlob(l.Digest.String()) {
			report(Progress{Layer: l.Digest.String(), Complete: l.Size, Total: l.Size, Done: true})
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := s.fetchLayer(ctx, img, l, report); err != nil {
				errs[i] = err
				cancel()
			}
		}()
	}
	wg.Wait()
	// Report the first real failure rather than the cancellations it caused.
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return ctx.Err()
}

func (s *Store) fetchLayer(ctx context.Context, img v1.Image, desc v1.Descriptor, report func(Progress)) error {
	digest := desc.Digest.String()
	layer, err := img.LayerByDigest(desc.Digest)
	if err != nil {
		return fmt.Errorf("layer %s: %w", digest, err)
	}
	rc, err := layer.Compressed()
	if err != nil {
		return fmt.Errorf("download layer %s: %w", digest, err)
	}
	defer rc.Close()

	f, err := os.CreateTemp(s.tmpDir(), "blob-*")
	if err != nil {
		return fmt.Errorf("download layer %s: %w", digest, err)
	}
	defer os.Remove(f.Name()) // no-op once renamed
	defer f.Close()

	h := sha256.New()
	report(Progress{Layer: digest, Total: desc.Size})
	var n, last int64
	buf := make([]byte, 256<<10)
	// Read one byte past the declared size to notice a source that sends more.
	src := io.LimitReader(rc, desc.Size+1)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		m, rerr := src.Read(buf)
		if m > 0 {
			if _, err := f.Write(buf[:m]); err != nil {
				return fmt.Errorf("download layer %s: %w", digest, err)
			}
			h.Write(buf[:m])
			n += int64(m)
			if n-last >= progressEvery {
				last = n
				report(Progress{Layer: digest, Complete: n, Total: desc.Size})
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("download layer %s: %w", digest, rerr)
		}
	}
	if n != desc.Size {
		return fmt.Errorf("layer %s: got %d bytes, manifest says %d", digest, n, desc.Size)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return fmt.Errorf("layer digest mismatch: manifest says %s, content is %s", digest, got)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("download layer %s: %w", digest, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("download layer %s: %w", digest, err)
	}
	if err := os.Rename(f.Name(), s.blobPath(digest)); err != nil {
		return fmt.Errorf("store layer %s: %w", digest, err)
	}
	report(Progress{Layer: digest, Complete: n, Total: desc.Size, Done: true})
	return nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
