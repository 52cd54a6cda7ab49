package e2e

import (
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// pushTestImages puts the images the e2e tests run into the in-process registry:
// busybox:latest runs as the unprivileged app user (so the tests see the image's USER
// honoured), hostile:latest carries a layer that climbs out of its root.
func pushTestImages(host string) error {
	busybox, err := testimage.BuildBusybox(testimage.User(testimage.AppUser))
	if err != nil {
		return err
	}
	hostile, err := testimage.BuildHostile(testimage.HostileDotDot)
	if err != nil {
		return err
	}
	for tag, img := range map[string]v1.Image{"busybox:latest": busybox, "hostile:latest": hostile} {
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

// hostileLeftovers lists what a hostile layer managed to leave behind: any file it named
// "pwned" anywhere in the data dir (its ../ escape aims beside the unpack root), and
// unpack staging directories that were not cleaned up.
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
	if _, err := os.Lstat(testimage.HostileAbsolutePath); err == nil {
		found = append(found, testimage.HostileAbsolutePath)
	}
	return found
}
