package testimage

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"
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

// TarDir writes the tree at dir as an uncompressed layer tar to w the way `docker
// import` of a `tar --xattrs --numeric-owner -C dir .` does: every entry with its owner,
// mode and times, hardlinks as links to their first name, device nodes and FIFOs as
// such, and extended attributes (file capabilities among them) as SCHILY.xattr PAX
// records. Sockets are left out, as tar does.
func TarDir(dir string, w io.Writer) error {
	tw := tar.NewWriter(w)
	seen := map[[2]uint64]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSocket != 0 {
			return nil
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Format = tar.FormatPAX
		hdr.Uname, hdr.Gname = "", ""
		hdr.Name = "./" + filepath.ToSlash(rel)
		if rel == "." {
			hdr.Name = "./"
		} else if fi.IsDir() {
			hdr.Name += "/"
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			if first, ok := seen[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				seen[key] = strings.TrimPrefix(hdr.Name, "./")
			}
		}
		if err := addXattrs(p, hdr); err != nil {
			return err
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if hdr.Typeflag == tar.TypeReg && hdr.Size > 0 {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, bufio.NewReaderSize(f, 1<<20))
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

func addXattrs(p string, hdr *tar.Header) error {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ENOTSUP) || n <= 0 {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list xattrs of %s: %w", p, err)
	}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		val := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, val)
		if err != nil {
			return fmt.Errorf("read xattr %s of %s: %w", name, p, err)
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords["SCHILY.xattr."+name] = string(val[:m])
	}
	return nil
}

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
