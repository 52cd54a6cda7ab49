package testimage

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"

	"github.com/fireworks-sandbox/fireworks/internal/release/rootfs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Compression kinds for LayerCompressed.
const (
	Gzip         = "gzip"
	Zstd         = "zstd"
	Uncompressed = "none"
)

// LayerCompressed wraps an uncompressed tar stream as an OCI layer compressed with kind
// (Gzip, Zstd or Uncompressed), with the media type a registry would serve for it.
func LayerCompressed(t testing.TB, raw []byte, kind string) v1.Layer {
	t.Helper()
	var (
		l   v1.Layer
		err error
	)
	open := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }
	switch kind {
	case Gzip:
		l, err = tarball.LayerFromOpener(open, tarball.WithMediaType(types.OCILayer))
	case Zstd:
		l, err = tarball.LayerFromOpener(open, tarball.WithCompression(compression.ZStd), tarball.WithMediaType(types.OCILayerZStd))
	case Uncompressed:
		l = static.NewLayer(raw, types.OCIUncompressedLayer)
	default:
		err = fmt.Errorf("unknown compression %q", kind)
	}
	if err != nil {
		t.Fatalf("%s layer: %v", kind, err)
	}
	return l
}

// TarDir writes the tree at dir as an uncompressed layer tar (rootfs.TarDir).
func TarDir(dir string, w io.Writer) error { return rootfs.TarDir(dir, w) }

// DirImage is a single-layer image of the tree at dir (as `docker import` makes one),
// with the layer gzip-compressed and config applied. The layer tar is written to a file
// in the test's temp dir, so large trees are not held in memory.
func DirImage(t testing.TB, dir string, config v1.Config) v1.Image {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "layer.tar"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := TarDir(dir, f); err != nil {
		t.Fatalf("tar %s: %v", dir, err)
	}
	name := f.Name()
	l, err := tarball.LayerFromFile(name, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), l)
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Config = "amd64", "linux", config
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// GNUTar runs GNU tar to make an uncompressed layer tar of dir with extra flags (e.g.
// --sparse): for what Go's tar writer cannot write, the way image builders that shell
// out to tar write it.
func GNUTar(t testing.TB, dir string, flags ...string) []byte {
	t.Helper()
	args := append([]string{"--format=pax", "--numeric-owner", "--xattrs"}, flags...)
	args = append(args, "-C", dir, "-cf", "-", ".")
	var out, stderr bytes.Buffer
	cmd := exec.Command("tar", args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("tar %v: %v: %s", args, err, stderr.String())
	}
	return out.Bytes()
}
