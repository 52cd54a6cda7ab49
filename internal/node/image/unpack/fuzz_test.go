package unpack_test

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/unpack"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// FuzzApplyLayer unpacks arbitrary bytes as a layer (tar headers, names, links, whiteouts
// are all the layer's to choose): it may be refused, but nothing may panic, hang or write
// outside the root, and the limits bound what it writes inside.
func FuzzApplyLayer(f *testing.F) {
	for _, kind := range testimage.HostileKinds() {
		if kind == testimage.HostileGiant {
			continue // its body is large; the fuzzer finds size problems without it
		}
		f.Add(testimage.Tar(f, testimage.HostileEntries(f, kind)...))
	}
	f.Add(testimage.Tar(f,
		E{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		E{Name: "etc/passwd", Body: "root:x:0:0::/root:/bin/sh\n"},
		E{Name: "bin/sh", Body: "#!", Mode: 0o4755},
		E{Name: "bin/link", Type: tar.TypeLink, Link: "bin/sh"},
		E{Name: "lib", Type: tar.TypeSymlink, Link: "usr/lib"},
		E{Name: "dev/null", Type: tar.TypeChar, Devmajor: 1, Devmin: 3},
		E{Name: "etc/.wh.passwd"},
		E{Name: "opt/.wh..wh..opq"},
	))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, layer []byte) {
		root, sentinel := setup(t)
		u, err := unpack.New(root, unpack.Limits{MaxTotalBytes: 8 << 20, MaxEntries: 4096}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = u.Apply(ctx, bytes.NewReader(layer))
		if ctx.Err() != nil {
			t.Fatal("unpacking did not finish in 10 s")
		}
		assertSentinel(t, sentinel)
		if exists(testimage.HostileAbsolutePath) {
			t.Fatalf("%s exists", testimage.HostileAbsolutePath)
		}
		entries, _ := os.ReadDir(filepath.Dir(root))
		if len(entries) != 2 {
			t.Fatalf("something was written beside the root: %v", entries)
		}
		var size int64
		_ = filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
			if err != nil {
				return nil
			}
			if fi.Mode().IsRegular() {
				size += fi.Size()
			}
			return nil
		})
		if size > 8<<20 {
			t.Errorf("%d bytes written past the 8 MiB limit", size)
		}
	})
}
