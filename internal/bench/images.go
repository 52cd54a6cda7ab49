package bench

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/busybox"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// ImageRow is the first start of an image a node has never seen: pulled from a registry
// (loopback, in-process) and turned into its root disk, then booted. Small is the busybox
// baseline of the same run.
type ImageRow struct {
	Image            string  `json:"image"`
	Files            int     `json:"files"`
	UncompressedMiB  float64 `json:"uncompressed_mib"`
	CompressedMiB    float64 `json:"compressed_mib"`
	PullMs           float64 `json:"pull_ms"`
	RootDiskMs       float64 `json:"root_disk_ms"`
	FirstByteMs      float64 `json:"first_byte_ms"`
	PullMiBps        float64 `json:"pull_mib_per_s"`
	RootDiskMiBps    float64 `json:"root_disk_mib_per_s"`
	StartedBy        string  `json:"started_by"`
	CheckedNotCached bool    `json:"checked_not_cached"`
}

// largeImage describes the generated large image: layers × files × fileMiB of data, half
// pseudo-random (incompressible) and half repetitive text, so gzip does real work, as it
// does on real images (which compress 2–3×).
const (
	largeLayers  = 4
	largeFiles   = 36
	largeFileMiB = 8 // 4 × 36 × 8 MiB = 1152 MiB
)

// measureImages times a first pull + root disk build + boot of a ≥1 GiB image and of a
// small baseline image, both new to the node (removed from its store first, and checked
// to be gone), served by a registry in this process.
func measureImages(ctx context.Context, cfg Config, api *apiClient, rep *Report) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0))), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	host := ln.Addr().String()

	small, err := busybox.Image()
	if err != nil {
		return err
	}
	marker, err := busybox.Tar(busybox.Entry{Name: "bench-image-series", Body: "small baseline"})
	if err != nil {
		return err
	}
	ml, err := busybox.LayerFromTar(marker)
	if err != nil {
		return err
	}
	if small, err = mutate.AppendLayers(small, ml); err != nil {
		return err
	}
	cfg.Log.Info("building the large image", "layers", largeLayers, "size_mib", largeLayers*largeFiles*largeFileMiB)
	large, err := largeImage(small)
	if err != nil {
		return fmt.Errorf("build the large image: %w", err)
	}
	for _, im := range []struct {
		repo, name string
		img        v1.Image
	}{
		{"bench/small", "busybox (small baseline)", small},
		{"bench/large", fmt.Sprintf("generated, %d layers", largeLayers+2), large},
	} {
		row, err := firstStartOf(ctx, cfg, api, host+"/"+im.repo+":latest", im.name, im.img)
		if err != nil {
			return fmt.Errorf("%s: %w", im.name, err)
		}
		rep.Images = append(rep.Images, row)
	}
	return nil
}

func firstStartOf(ctx context.Context, cfg Config, api *apiClient, ref, label string, img v1.Image) (ImageRow, error) {
	row := ImageRow{Image: label}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return row, err
	}
	cfg.Log.Info("pushing to the in-process registry", "image", label)
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return row, fmt.Errorf("push: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return row, err
	}
	for _, l := range layers {
		cs, _ := l.Size()
		row.CompressedMiB += float64(cs) / (1 << 20)
	}
	row.UncompressedMiB, row.Files, err = layerContents(layers)
	if err != nil {
		return row, err
	}

	// The node must not have it: remove it under every name it has there (a run that
	// died, or one whose registry had another port, may have left it), then check.
	dgst, err := img.Digest()
	if err != nil {
		return row, err
	}
	forget := func(ctx context.Context) (held bool, err error) {
		list, err := api.images.ListImages(ctx, connect.NewRequest(&pb.ListImagesRequest{}))
		if err != nil {
			return false, err
		}
		for _, i := range list.Msg.GetImages() {
			if i.GetDigest() == dgst.String() {
				held = true
				if _, err := api.images.RemoveImage(ctx, connect.NewRequest(&pb.RemoveImageRequest{Ref: i.GetRef()})); err != nil {
					return held, fmt.Errorf("remove %s from the node: %w", i.GetRef(), err)
				}
			}
		}
		return held, nil
	}
	defer func() { _, _ = forget(context.WithoutCancel(ctx)) }()
	if _, err := forget(ctx); err != nil {
		return row, err
	}
	if held, err := forget(ctx); err != nil || held {
		return row, fmt.Errorf("the node still has %s (%s) after removing it (%v): the pull would not be measured", label, dgst, err)
	}
	row.CheckedNotCached = true

	cfg.Log.Info("first start of an image the node does not have", "image", label)
	s, err := api.startSpecOnce(ctx, &pb.SandboxSpec{Image: ref, Cmd: cfg.Command, Boot: "cold", InsecureRegistries: []string{r.Context().RegistryStr()}}, 15*time.Minute)
	if err != nil {
		return row, err
	}
	row.FirstByteMs, row.StartedBy = ms(s.first), s.how
	for _, p := range s.phases {
		switch p.name {
		case "pull":
			row.PullMs = p.ms
		case "rootdisk":
			row.RootDiskMs = p.ms
		}
	}
	if row.StartedBy != "cold" || row.PullMs == 0 || row.RootDiskMs == 0 {
		return row, fmt.Errorf("the node's start phases %v (started %q) lack a pull or a root disk build, or it was not a cold boot: not the path this row names", s.phases, row.StartedBy)
	}
	row.PullMiBps = row.CompressedMiB / (row.PullMs / 1000)
	row.RootDiskMiBps = row.UncompressedMiB / (row.RootDiskMs / 1000)
	return row, nil
}

// layerContents counts the uncompressed bytes of the layers' tar streams, in MiB, and the
// regular files in them.
func layerContents(layers []v1.Layer) (mib float64, files int, err error) {
	var n int64
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			return 0, 0, err
		}
		cr := &countingReader{r: rc}
		tr := tar.NewReader(cr)
		for {
			hdr, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				rc.Close()
				return 0, 0, err
			}
			if hdr.Typeflag == tar.TypeReg {
				files++
			}
		}
		_, err = io.Copy(io.Discard, cr)
		rc.Close()
		if err != nil {
			return 0, 0, err
		}
		n += cr.n
	}
	return float64(n) / (1 << 20), files, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// largeImage is base plus largeLayers layers of generated files. The content is the same
// on every run (a fixed seed), so the image has one digest and a bench run never leaves a
// new gigabyte behind in the node's store.
func largeImage(base v1.Image) (v1.Image, error) {
	img := base
	for l := range largeLayers {
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			pr, pw := io.Pipe()
			go func() { pw.CloseWithError(writeLargeLayer(pw, l)) }()
			return pr, nil
		}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressionLevel(gzip.BestSpeed))
		if err != nil {
			return nil, err
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			return nil, err
		}
	}
	return img, nil
}

func writeLargeLayer(w io.Writer, layer int) error {
	tw := tar.NewWriter(w)
	rng := rand.NewChaCha8([32]byte{byte(layer), 'f', 'w'})
	text := []byte(strings.Repeat("Fireworks bench: a line of text that compresses well. ", 64))
	buf := make([]byte, 1<<20)
	dir := fmt.Sprintf("data/layer%d/", layer)
	if err := tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: busybox.Epoch}); err != nil {
		return err
	}
	for f := range largeFiles {
		size := int64(largeFileMiB) << 20
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("%sfile%03d", dir, f), Mode: 0o644, Size: size, ModTime: busybox.Epoch}); err != nil {
			return err
		}
		for off := int64(0); off < size; off += int64(len(buf)) {
			if (off>>20)%2 == 0 {
				_, _ = rng.Read(buf)
			} else {
				for i := 0; i < len(buf); i += copy(buf[i:], text) {
				}
			}
			if _, err := tw.Write(buf); err != nil {
				return err
			}
		}
	}
	return tw.Close()
}
