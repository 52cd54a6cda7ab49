package testimage

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Serve starts an in-process registry (plain HTTP on 127.0.0.1), pushes
// images to it, keyed by "repo:tag" (e.g. "busybox:latest"), and returns the
// registry host ("127.0.0.1:PORT"). Pull them as HOST/repo:tag. The server
// stops when the test ends.
func Serve(t testing.TB, images map[string]v1.Image) string {
	t.Helper()
	return ServeWrapped(t, images, nil)
}

// ServeWrapped is Serve with the registry handler wrapped by wrap (e.g. to
// count or corrupt requests); wrap may be nil.
func ServeWrapped(t testing.TB, images map[string]v1.Image, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	var h http.Handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	for ref, img := range images {
		Push(t, host, ref, img)
	}
	return host
}

// Push writes img to the registry at host as repoTag ("repo:tag").
func Push(t testing.TB, host, repoTag string, img v1.Image) {
	t.Helper()
	ref, err := name.ParseReference(host+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatalf("parse %s: %v", repoTag, err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// PushIndex writes an image index (a multi-platform manifest list) to the
// registry at host as repoTag.
func PushIndex(t testing.TB, host, repoTag string, idx v1.ImageIndex) {
	t.Helper()
	ref, err := name.ParseReference(host+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatalf("parse %s: %v", repoTag, err)
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("push index %s: %v", ref, err)
	}
}

// RefNameAnnotation is the OCI layout annotation naming a manifest's tag.
const RefNameAnnotation = "org.opencontainers.image.ref.name"

// WriteOCILayout writes img into an OCI layout directory dir (created if
// needed, appended to if it exists), tagged tag unless tag is empty.
func WriteOCILayout(t testing.TB, dir string, img v1.Image, tag string) {
	t.Helper()
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			t.Fatalf("create OCI layout %s: %v", dir, err)
		}
	}
	var opts []layout.Option
	if tag != "" {
		opts = append(opts, layout.WithAnnotations(map[string]string{RefNameAnnotation: tag}))
	}
	if err := p.AppendImage(img, opts...); err != nil {
		t.Fatalf("write image to OCI layout %s: %v", dir, err)
	}
}

// WriteDockerArchive writes img as a `docker save` tarball at file, tagged
// tag (e.g. "busybox:latest").
func WriteDockerArchive(t testing.TB, file string, img v1.Image, tag string) {
	t.Helper()
	tg, err := name.NewTag(tag)
	if err != nil {
		t.Fatalf("parse tag %s: %v", tag, err)
	}
	if err := tarball.WriteToFile(file, tg, img); err != nil {
		t.Fatalf("write docker archive %s: %v", file, err)
	}
}
