package e2e

import (
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/busybox"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// hostileTarget is where the hostile layer tries to write on the host.
var hostileTarget = fmt.Sprintf("/tmp/fireworks-e2e-hostile-%d", os.Getpid())

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// pushTestImages puts the images the e2e tests run into the in-process registry:
// busybox:latest runs as the unprivileged app user (so the tests see the image's USER
// honoured), hostile:latest carries a layer that climbs out of its root.
func pushTestImages(host string) error {
	busyboxImg, err := testimage.BuildBusybox(testimage.User(testimage.AppUser))
	if err != nil {
		return err
	}
	// The hostile layer climbs far enough to reach the host's /tmp from any data dir: a
	// naive extractor would leave a file there that outlives the unpack staging.
	base, err := testimage.BuildBusybox()
	if err != nil {
		return err
	}
	tarball, err := busybox.Tar(busybox.Entry{Name: strings.Repeat("../", 32) + strings.TrimPrefix(hostileTarget, "/"), Body: "pwned\n"})
	if err != nil {
		return err
	}
	layer, err := busybox.LayerFromTar(tarball)
	if err != nil {
		return err
	}
	hostile, err := mutate.AppendLayers(base, layer)
	if err != nil {
		return err
	}
	for tag, img := range map[string]v1.Image{"busybox:latest": busyboxImg, "hostile:latest": hostile} {
		ref, err := name.ParseReference(host+"/"+tag, name.Insecure)
		if err != nil {
			return fmt.Errorf("parse %s: %w", tag, err)
		}
		if err := remote.Write(ref, img); err != nil {
			return fmt.Errorf("push %s: %w", ref, err)
		}
	}
	return nil
}

// hostileLeftovers lists what a hostile layer managed to leave behind: its target in the
// host's /tmp, any file named "pwned" in the data dir, and unpack staging directories that
// were not cleaned up.
func hostileLeftovers() []string {
	var found []string
	_ = filepath.WalkDir(world.dataDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == "pwned" {
			found = append(found, p)
		}
		return nil
	})
	staging, _ := filepath.Glob(filepath.Join(world.dataDir, "images", "tmp", "rootfs-*"))
	found = append(found, staging...)
	if _, err := os.Lstat(hostileTarget); err == nil {
		found = append(found, hostileTarget)
	}
	return found
}
