package testimage_test

import (
	"archive/tar"
	"errors"
	"io"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func TestBusyboxImage(t *testing.T) {
	img := testimage.Busybox(t, testimage.Entrypoint("/bin/sh"), testimage.User("app"))
	if mt, _ := img.MediaType(); mt != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %s", mt)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.MediaType != types.OCIConfigJSON {
		t.Errorf("config media type %s", m.Config.MediaType)
	}
	cf, _ := img.ConfigFile()
	if cf.Config.WorkingDir != "/home/app" || cf.Config.User != "app" || len(cf.Config.Entrypoint) != 1 ||
		cf.Config.Env[1] != "FOO=from-image" || cf.Architecture != "amd64" {
		t.Errorf("config %+v", cf.Config)
	}
	// Same options, same digest: tests can compare digests across builds.
	if a, b := digest(t, img), digest(t, testimage.Busybox(t, testimage.Entrypoint("/bin/sh"), testimage.User("app"))); a != b {
		t.Errorf("digests differ: %s %s", a, b)
	}

	layers, _ := img.Layers()
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = h
	}
	for name, want := range map[string]func(*tar.Header) bool{
		"bin/busybox":   func(h *tar.Header) bool { return h.Mode == 0o755 && h.Size > 100_000 },
		"bin/sh":        func(h *tar.Header) bool { return h.Typeflag == tar.TypeSymlink && h.Linkname == "busybox" },
		"bin/sha256sum": func(h *tar.Header) bool { return h.Typeflag == tar.TypeSymlink },
		"bin/notexec":   func(h *tar.Header) bool { return h.Mode == 0o644 },
		"tmp/":          func(h *tar.Header) bool { return h.Mode == 0o1777 },
		"home/app/":     func(h *tar.Header) bool { return h.Uid == 1000 && h.Gid == 1000 },
		"etc/passwd":    func(h *tar.Header) bool { return h.Size > 0 },
		"etc/group":     func(h *tar.Header) bool { return h.Size > 0 },
	} {
		if h, ok := got[name]; !ok || !want(h) {
			t.Errorf("%s: %+v", name, h)
		}
	}
}

func digest(t *testing.T, img interface {
	Digest() (v1.Hash, error)
}) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}
