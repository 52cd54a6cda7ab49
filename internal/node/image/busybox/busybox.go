// Package busybox builds a minimal OCI image from the host's busybox-static
// (Debian's package): the demo image of the quickstart and the base of every
// test image. Everything is deterministic (fixed timestamps), so the same
// options give the same digests on every run.
package busybox

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BusyboxPath is the static busybox the image is built from (Debian's
// busybox-static package).
const BusyboxPath = "/bin/busybox"

// The unprivileged user in the image.
const (
	AppUser = "app"
	AppUID  = 1000
	AppGID  = 1000
)

// DefaultPath and FooEnv are the image's environment.
const (
	DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	FooEnv      = "FOO=from-image"
	WorkingDir  = "/home/app"
)

// Epoch is the modification time of every entry testimage writes.
var Epoch = time.Unix(1_700_000_000, 0).UTC()

// Option changes the image config.
type Option func(*v1.Config)

// Entrypoint sets the image's ENTRYPOINT.
func Entrypoint(args ...string) Option { return func(c *v1.Config) { c.Entrypoint = args } }

// Cmd sets the image's CMD.
func Cmd(args ...string) Option { return func(c *v1.Config) { c.Cmd = args } }

// User sets the image's USER (a name, uid, or uid:gid).
func User(u string) Option { return func(c *v1.Config) { c.User = u } }

// Env appends KEY=VALUE pairs to the image's environment.
func Env(kv ...string) Option { return func(c *v1.Config) { c.Env = append(c.Env, kv...) } }

// Workdir sets the image's WORKDIR.
func Workdir(dir string) Option { return func(c *v1.Config) { c.WorkingDir = dir } }

// Entry is one tar entry of a layer built with Layer or Tar.
type Entry struct {
	Name string
	// Type is a tar type flag; zero means a regular file.
	Type byte
	// Mode is the permission bits (with set-id and sticky bits); zero means
	// 0644 for files, 0755 for directories and 0777 for symlinks.
	Mode     int64
	Body     string
	Link     string // symlink target or hardlink name
	UID, GID int
	// Size, when non-zero, is written in the header instead of len(Body),
	// and no body follows: a header-only lie, for hostile layers.
	Size             int64
	Devmajor, Devmin int64
	// Xattrs are extended attributes, written as SCHILY.xattr.* PAX records the way
	// GNU tar --xattrs and Docker write them.
	Xattrs map[string]string
}

// Tar returns an uncompressed tar stream of entries, in order.
func Tar(entries ...Entry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{
			Name: e.Name, Typeflag: e.Type, Mode: e.Mode, Linkname: e.Link,
			Uid: e.UID, Gid: e.GID, ModTime: Epoch, Format: tar.FormatPAX,
			Devmajor: e.Devmajor, Devminor: e.Devmin,
		}
		for k, v := range e.Xattrs {
			if hdr.PAXRecords == nil {
				hdr.PAXRecords = map[string]string{}
			}
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
		if hdr.Typeflag == 0 {
			hdr.Typeflag = tar.TypeReg
		}
		if hdr.Mode == 0 {
			switch hdr.Typeflag {
			case tar.TypeDir:
				hdr.Mode = 0o755
			case tar.TypeSymlink:
				hdr.Mode = 0o777
			default:
				hdr.Mode = 0o644
			}
		}
		if hdr.Typeflag == tar.TypeReg {
			hdr.Size = int64(len(e.Body))
		}
		if e.Size != 0 {
			// The tar writer insists on the body it was promised, so write
			// the header alone and end the archive by hand.
			hdr.Size = e.Size
			if err := tw.WriteHeader(hdr); err != nil {
				return nil, fmt.Errorf("tar header %s: %w", e.Name, err)
			}
			buf.Write(make([]byte, 1024))
			return buf.Bytes(), nil
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", e.Name, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, e.Body); err != nil {
				return nil, fmt.Errorf("tar body %s: %w", e.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	return buf.Bytes(), nil
}

// LayerFromTar wraps an uncompressed tar stream as a gzip OCI layer.
func LayerFromTar(b []byte) (v1.Layer, error) {
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("build layer: %w", err)
	}
	return l, nil
}

var (
	baseOnce  sync.Once
	baseLayer v1.Layer
	baseErr   error
)

// busyboxLayer is built once per process: reading busybox and compressing
// it is the slow part, and the result is the same every time.
func busyboxLayer() (v1.Layer, error) {
	baseOnce.Do(func() {
		baseLayer, baseErr = buildBusyboxLayer()
	})
	return baseLayer, baseErr
}

func buildBusyboxLayer() (v1.Layer, error) {
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("read busybox (install busybox-static): %w", err)
	}
	out, err := exec.Command(BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", BusyboxPath, err)
	}
	entries := []Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Mode: 0o755, Body: string(bin)},
		{Name: "bin/notexec", Mode: 0o644, Body: "#!/bin/sh\necho this file is not executable\n"},
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
		{Name: "etc/group", Body: "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"},
		{Name: "home/", Type: tar.TypeDir},
		{Name: "home/app/", Type: tar.TypeDir, UID: AppUID, GID: AppGID},
		{Name: "root/", Type: tar.TypeDir, Mode: 0o700},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "usr/", Type: tar.TypeDir},
		{Name: "usr/bin/", Type: tar.TypeDir},
		{Name: "var/", Type: tar.TypeDir},
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		entries = append(entries, Entry{Name: "bin/" + applet, Type: tar.TypeSymlink, Link: "busybox"})
	}
	b, err := Tar(entries...)
	if err != nil {
		return nil, err
	}
	return LayerFromTar(b)
}

// Image returns the busybox image: one layer with /bin/busybox and a symlink
// per applet, /etc/passwd and /etc/group with root and app (1000:1000),
// /home/app, /tmp (1777), /bin/notexec (0644); Env PATH and FOO=from-image,
// WorkingDir /home/app; manifest and config with OCI media types, platform
// linux/amd64. opts change the config.
func Image(opts ...Option) (v1.Image, error) {
	layer, err := busyboxLayer()
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.AppendLayers(img, layer)
	if err != nil {
		return nil, fmt.Errorf("append busybox layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("busybox image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: Epoch}
	cf.Config.Env = []string{DefaultPath, FooEnv}
	cf.Config.WorkingDir = WorkingDir
	for _, o := range opts {
		o(&cf.Config)
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("set busybox image config: %w", err)
	}
	return img, nil
}
