// Package testimage builds small OCI images for tests across the project:
// the busybox image (see package busybox), layers made from explicit tar
// entries, hostile layers, and ways to serve or store an image (an
// in-process registry, an OCI layout directory, a docker save tarball).
package testimage

import (
	"os"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/busybox"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// Re-exported from package busybox so tests need one import.
const (
	BusyboxPath = busybox.BusyboxPath
	AppUser     = busybox.AppUser
	AppUID      = busybox.AppUID
	AppGID      = busybox.AppGID
	DefaultPath = busybox.DefaultPath
	FooEnv      = busybox.FooEnv
	WorkingDir  = busybox.WorkingDir
)

// Epoch is the modification time of every entry testimage writes.
var Epoch = busybox.Epoch

type (
	// Option changes the image config.
	Option = busybox.Option
	// Entry is one tar entry of a layer built with Layer or Tar.
	Entry = busybox.Entry
)

// Config options, see package busybox.
var (
	Entrypoint = busybox.Entrypoint
	Cmd        = busybox.Cmd
	User       = busybox.User
	Env        = busybox.Env
	Workdir    = busybox.Workdir
)

// BuildBusybox is Busybox for callers without a testing.TB (TestMain).
func BuildBusybox(opts ...Option) (v1.Image, error) { return busybox.Image(opts...) }

// Tar returns an uncompressed tar stream of entries, in order.
func Tar(t testing.TB, entries ...Entry) []byte {
	t.Helper()
	b, err := busybox.Tar(entries...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Layer returns a gzip-compressed OCI layer holding entries.
func Layer(t testing.TB, entries ...Entry) v1.Layer {
	t.Helper()
	return LayerFromTar(t, Tar(t, entries...))
}

// LayerFromTar wraps an uncompressed tar stream as a gzip OCI layer.
func LayerFromTar(t testing.TB, b []byte) v1.Layer {
	t.Helper()
	l, err := busybox.LayerFromTar(b)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Busybox returns the busybox test image (see busybox.Image) with opts
// applied. It skips the test when busybox-static is not installed (a failure under
// testutil.RequireAllEnv).
func Busybox(t testing.TB, opts ...Option) v1.Image {
	t.Helper()
	if _, err := os.Stat(BusyboxPath); err != nil {
		testutil.Skipf(t, "%s not found (scripts/install-deps.sh installs busybox-static): %v", BusyboxPath, err)
	}
	img, err := busybox.Image(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// Configure returns img with opts applied to its config.
func Configure(t testing.TB, img v1.Image, opts ...Option) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	cf = cf.DeepCopy()
	for _, o := range opts {
		o(&cf.Config)
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatalf("set config: %v", err)
	}
	return img
}

// WithLayers returns img with layers appended on top.
func WithLayers(t testing.TB, img v1.Image, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		t.Fatalf("append layers: %v", err)
	}
	return img
}
