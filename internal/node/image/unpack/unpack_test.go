package unpack_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/unpack"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

type E = testimage.Entry

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "unpacking needs root (chown of extracted files)")
	}
}

// setup makes base/root and base/sentinel (with one file in it) and returns them.
func setup(t *testing.T) (root, sentinel string) {
	t.Helper()
	requireRoot(t)
	base := t.TempDir()
	root = filepath.Join(base, "root")
	sentinel = filepath.Join(base, testimage.HostileSentinel)
	for _, d := range []string{root, sentinel} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(sentinel, "file"), []byte("original\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, sentinel
}

func apply(t *testing.T, root string, lim unpack.Limits, layers ...[]E) error {
	t.Helper()
	u, err := unpack.New(root, lim, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for i, l := range layers {
		if err := u.Apply(context.Background(), bytes.NewReader(testimage.Tar(t, l...))); err != nil {
			return err
		}
		_ = i
	}
	return nil
}

func mustApply(t *testing.T, root string, layers ...[]E) {
	t.Helper()
	if err := apply(t, root, unpack.Limits{}, layers...); err != nil {
		t.Fatalf("apply: %v", err)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return string(b)
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func assertSentinel(t *testing.T, sentinel string) {
	t.Helper()
	ents, err := os.ReadDir(sentinel)
	if err != nil {
		t.Fatalf("sentinel: %v", err)
	}
	if len(ents) != 1 || ents[0].Name() != "file" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("sentinel directory changed: %v", names)
	}
	if got := readFile(t, filepath.Join(sentinel, "file")); got != "original\n" {
		t.Errorf("sentinel file changed: %q", got)
	}
}

func TestMetadataPreserved(t *testing.T) {
	root, _ := setup(t)
	mustApply(t, root, []E{
		{Name: "./", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/su", Mode: 0o4755, Body: "setuid"},
		{Name: "bin/sh", Type: tar.TypeSymlink, Link: "busybox", UID: 7, GID: 8},
		{Name: "home/app/", Type: tar.TypeDir, Mode: 0o750, UID: 1000, GID: 1000},
		{Name: "home/app/notes", Mode: 0o600, Body: "hi", UID: 1000, GID: 1001},
		{Name: "home/app/hard", Type: tar.TypeLink, Link: "home/app/notes"},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "deep/a/b/c", Body: "implicit parents"},
		{Name: "pipe", Type: tar.TypeFifo},
	})
	check := func(p string, mode os.FileMode, uid, gid uint32) {
		t.Helper()
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != mode || st.Uid != uid || st.Gid != gid {
			t.Errorf("%s: mode %v uid %d gid %d, want %v %d %d", p, fi.Mode(), st.Uid, st.Gid, mode, uid, gid)
		}
		if fi.Mode()&os.ModeSymlink == 0 && p != "deep/a" && !fi.ModTime().Equal(testimage.Epoch) {
			t.Errorf("%s: mtime %v, want %v", p, fi.ModTime(), testimage.Epoch)
		}
	}
	check("bin/su", 0o755|os.ModeSetuid, 0, 0)
	check("bin/sh", 0o777|os.ModeSymlink, 7, 8)
	check("home/app", 0o750|os.ModeDir, 1000, 1000)
	check("home/app/notes", 0o600, 1000, 1001)
	check("tmp", 0o777|os.ModeDir|os.ModeSticky, 0, 0)
	check("bin", 0o755|os.ModeDir, 0, 0)
	if l, _ := os.Readlink(filepath.Join(root, "bin/sh")); l != "busybox" {
		t.Errorf("bin/sh -> %q", l)
	}
	a, _ := os.Stat(filepath.Join(root, "home/app/notes"))
	b, _ := os.Stat(filepath.Join(root, "home/app/hard"))
	if !os.SameFile(a, b) {
		t.Error("home/app/hard is not a hardlink of notes")
	}
	if got := readFile(t, filepath.Join(root, "deep/a/b/c")); got != "implicit parents" {
		t.Errorf("deep/a/b/c = %q", got)
	}
	if fi, err := os.Lstat(filepath.Join(root, "pipe")); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("FIFO: %v, %v; want a named pipe", fi, err)
	}
}

// Device nodes and FIFOs are recorded as the layer says (debootstrap and `docker
// import` roots carry /dev/*), with their numbers, owner and mode, hardlinks to them
// too, and a later layer can replace or white them out. They are never opened.
func TestDeviceNodesRecorded(t *testing.T) {
	root, _ := setup(t)
	mustApply(t, root, []E{
		{Name: "dev/", Type: tar.TypeDir},
		{Name: "dev/full", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devmin: 7},
		{Name: "dev/sda", Type: tar.TypeBlock, Mode: 0o660, Devmajor: 8, Devmin: 0, GID: 6},
		{Name: "dev/null-link", Type: tar.TypeLink, Link: "dev/full"},
		{Name: "dev/big", Type: tar.TypeChar, Mode: 0o600, Devmajor: 4095, Devmin: 1048575},
		{Name: "run/initctl", Type: tar.TypeFifo, Mode: 0o600},
		{Name: "dev/gone", Type: tar.TypeChar, Mode: 0o600, Devmajor: 1, Devmin: 3},
		{Name: "dev/replaced", Type: tar.TypeFifo, Mode: 0o644},
	}, []E{
		{Name: "dev/.wh.gone"},
		{Name: "dev/replaced", Body: "now a file"},
	})
	for _, c := range []struct {
		path       string
		typ        os.FileMode
		perm       os.FileMode
		major, min uint32
		gid        uint32
	}{
		{"dev/full", os.ModeDevice | os.ModeCharDevice, 0o666, 1, 7, 0},
		{"dev/sda", os.ModeDevice, 0o660, 8, 0, 6},
		{"dev/big", os.ModeDevice | os.ModeCharDevice, 0o600, 4095, 1048575, 0},
		{"run/initctl", os.ModeNamedPipe, 0o600, 0, 0, 0},
	} {
		fi, err := os.Lstat(filepath.Join(root, c.path))
		if err != nil {
			t.Errorf("%s: %v", c.path, err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().Type() != c.typ || fi.Mode().Perm() != c.perm || unix.Major(st.Rdev) != c.major || unix.Minor(st.Rdev) != c.min || st.Gid != c.gid {
			t.Errorf("%s: %v %d:%d gid %d, want %v|%v %d:%d gid %d", c.path, fi.Mode(), unix.Major(st.Rdev), unix.Minor(st.Rdev), st.Gid,
				c.typ, c.perm, c.major, c.min, c.gid)
		}
	}
	a, _ := os.Lstat(filepath.Join(root, "dev/full"))
	b, _ := os.Lstat(filepath.Join(root, "dev/null-link"))
	if a == nil || b == nil || !os.SameFile(a, b) {
		t.Error("dev/null-link is not a hardlink of dev/full")
	}
	if exists(filepath.Join(root, "dev/gone")) {
		t.Error("a whited-out device node is still there")
	}
	if got := readFile(t, filepath.Join(root, "dev/replaced")); got != "now a file" {
		t.Errorf("FIFO replaced by a file in a later layer: %q", got)
	}
}

// A device number no kernel can hold is refused, not truncated into another device.
func TestDeviceNumberOutOfRange(t *testing.T) {
	root, _ := setup(t)
	err := apply(t, root, unpack.Limits{}, []E{{Name: "dev/x", Type: tar.TypeChar, Devmajor: 1 << 20, Devmin: 1}})
	if !errors.Is(err, unpack.ErrHostileLayer) {
		t.Fatalf("apply = %v, want ErrHostileLayer", err)
	}
}

func TestWhiteouts(t *testing.T) {
	root, _ := setup(t)
	mustApply(t, root,
		[]E{
			{Name: "a/x", Body: "x"}, {Name: "a/y", Body: "y"},
			{Name: "b/z", Body: "z"},
			{Name: "c/old", Body: "old"}, {Name: "c/sub/old", Body: "old"},
			{Name: "d/old", Body: "old"}, {Name: "d/keep/old", Body: "old"},
		},
		[]E{
			{Name: "a/.wh.x"},
			{Name: ".wh.b"},
			{Name: ".wh.nothing-there"},
			// Opaque directory with its marker first.
			{Name: "c/", Type: tar.TypeDir},
			{Name: "c/.wh..wh..opq"},
			{Name: "c/new", Body: "new"},
			// Opaque marker after entries of the same layer: those stay,
			// and so does nothing from below, even inside kept directories.
			{Name: "d/keep/new", Body: "new"},
			{Name: "d/.wh..wh..opq"},
		},
	)
	for p, want := range map[string]bool{
		"a/x": false, "a/y": true, "b": false, "b/z": false,
		"c": true, "c/old": false, "c/sub": false, "c/new": true,
		"d/old": false, "d/keep/old": false, "d/keep/new": true,
	} {
		if got := exists(filepath.Join(root, p)); got != want {
			t.Errorf("%s exists = %v, want %v", p, got, want)
		}
	}
	if exists(filepath.Join(root, "a/.wh.x")) || exists(filepath.Join(root, "c/.wh..wh..opq")) {
		t.Error("whiteout markers were written as files")
	}
}

func TestReplaceAcrossLayers(t *testing.T) {
	root, sentinel := setup(t)
	mustApply(t, root,
		[]E{
			{Name: "dir-then-file/inner", Body: "x"},
			{Name: "file-then-dir", Body: "x"},
			// Symlinks pointing out of the tree (as seen from the host):
			// later entries with the same name must replace the link, not
			// write through it.
			{Name: "link-to-file", Type: tar.TypeSymlink, Link: "../" + testimage.HostileSentinel + "/file"},
			{Name: "link-to-dir", Type: tar.TypeSymlink, Link: "../" + testimage.HostileSentinel},
		},
		[]E{
			{Name: "dir-then-file", Body: "now a file"},
			{Name: "file-then-dir/", Type: tar.TypeDir},
			{Name: "file-then-dir/inner", Body: "y"},
			{Name: "link-to-file", Body: "replaced", Mode: 0o600},
			{Name: "link-to-dir/", Type: tar.TypeDir, Mode: 0o700},
		},
	)
	if got := readFile(t, filepath.Join(root, "dir-then-file")); got != "now a file" {
		t.Errorf("dir-then-file = %q", got)
	}
	if got := readFile(t, filepath.Join(root, "file-then-dir/inner")); got != "y" {
		t.Errorf("file-then-dir/inner = %q", got)
	}
	if fi, err := os.Lstat(filepath.Join(root, "link-to-file")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("link-to-file not replaced by a regular file: %v %v", fi, err)
	}
	if fi, err := os.Lstat(filepath.Join(root, "link-to-dir")); err != nil || !fi.IsDir() {
		t.Errorf("link-to-dir not replaced by a directory: %v %v", fi, err)
	}
	assertSentinel(t, sentinel)
	if fi, _ := os.Stat(sentinel); fi.Mode().Perm() != 0o755 {
		t.Errorf("sentinel mode changed to %v", fi.Mode())
	}
}

func TestAbsoluteSymlinkResolvesInsideRoot(t *testing.T) {
	root, sentinel := setup(t)
	mustApply(t, root,
		[]E{
			{Name: "run/", Type: tar.TypeDir},
			{Name: "var/", Type: tar.TypeDir},
			{Name: "var/run", Type: tar.TypeSymlink, Link: "/run"},
			{Name: "var/lock", Type: tar.TypeSymlink, Link: "/run/lock"}, // dangling
			{Name: "usr/lib/x", Type: tar.TypeSymlink, Link: "../../../../../lib"},
		},
		[]E{
			{Name: "var/run/x", Body: "through an absolute symlink"},
			{Name: "var/lock/y", Body: "through a dangling symlink"},
			{Name: "usr/lib/x/z", Body: "through a relative symlink that climbs too far"},
		},
	)
	if got := readFile(t, filepath.Join(root, "run/x")); got != "through an absolute symlink" {
		t.Errorf("run/x = %q", got)
	}
	if got := readFile(t, filepath.Join(root, "run/lock/y")); got != "through a dangling symlink" {
		t.Errorf("run/lock/y = %q", got)
	}
	if got := readFile(t, filepath.Join(root, "lib/z")); got != "through a relative symlink that climbs too far" {
		t.Errorf("lib/z = %q", got)
	}
	if l, _ := os.Readlink(filepath.Join(root, "var/run")); l != "/run" {
		t.Errorf("var/run -> %q, want /run", l)
	}
	if exists("/run/x") && readFile(t, "/run/x") == "through an absolute symlink" {
		t.Error("wrote the host's /run/x")
	}
	assertSentinel(t, sentinel)
}

func hashFile(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestHostileLayers(t *testing.T) {
	requireRoot(t)
	passwd := hashFile(t, "/etc/passwd")
	// Kinds that are legitimate once resolved inside the root: the write
	// lands at <root>/sentinel/pwned. All others must be refused.
	confined := []string{testimage.HostileSymlink, testimage.HostileSymlinkRelative}
	for _, kind := range testimage.HostileKinds() {
		t.Run(kind, func(t *testing.T) {
			root, sentinel := setup(t)
			err := apply(t, root, unpack.Limits{}, testimage.HostileEntries(t, kind))
			if slices.Contains(confined, kind) {
				if err != nil {
					t.Fatalf("apply: %v", err)
				}
				if got := readFile(t, filepath.Join(root, testimage.HostileSentinel, "pwned")); got != "pwned\n" {
					t.Errorf("confined write = %q", got)
				}
			} else {
				if !errors.Is(err, unpack.ErrHostileLayer) {
					t.Fatalf("apply = %v, want ErrHostileLayer", err)
				}
				t.Logf("refused: %v", err)
			}
			assertSentinel(t, sentinel)
			if exists(testimage.HostileAbsolutePath) {
				t.Errorf("%s exists", testimage.HostileAbsolutePath)
			}
			if exists(filepath.Join(filepath.Dir(root), "pwned")) {
				t.Error("pwned written beside the root")
			}
			if hashFile(t, "/etc/passwd") != passwd {
				t.Fatal("host /etc/passwd changed")
			}
			// No device node, whatever happened.
			filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Mode()&(os.ModeDevice|os.ModeCharDevice) != 0 {
					t.Errorf("device node %s created", p)
				}
				return nil
			})
		})
	}
}

func TestLimits(t *testing.T) {
	for _, tc := range []struct {
		name  string
		lim   unpack.Limits
		layer []E
	}{
		{"total", unpack.Limits{MaxTotalBytes: 10}, []E{{Name: "a", Body: "123456"}, {Name: "b", Body: "123456"}}},
		{"file", unpack.Limits{MaxFileBytes: 5}, []E{{Name: "a", Body: "123456"}}},
		{"entries", unpack.Limits{MaxEntries: 2}, []E{{Name: "a"}, {Name: "b"}, {Name: "c"}}},
		{"path", unpack.Limits{MaxPathLen: 20}, []E{{Name: strings.Repeat("x/", 11) + "y"}}},
		{"symlink target", unpack.Limits{MaxPathLen: 20}, []E{{Name: "l", Type: tar.TypeSymlink, Link: strings.Repeat("x", 21)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, _ := setup(t)
			err := apply(t, root, tc.lim, tc.layer)
			if !errors.Is(err, unpack.ErrHostileLayer) {
				t.Fatalf("apply = %v, want ErrHostileLayer", err)
			}
		})
	}
}

func TestLimitsAreCumulativeAcrossLayers(t *testing.T) {
	root, _ := setup(t)
	err := apply(t, root, unpack.Limits{MaxTotalBytes: 10},
		[]E{{Name: "a", Body: "123456"}}, []E{{Name: "b", Body: "123456"}})
	if !errors.Is(err, unpack.ErrHostileLayer) {
		t.Fatalf("apply = %v, want ErrHostileLayer", err)
	}
}

func TestSymlinkLoop(t *testing.T) {
	root, _ := setup(t)
	err := apply(t, root, unpack.Limits{}, []E{
		{Name: "a", Type: tar.TypeSymlink, Link: "b"},
		{Name: "b", Type: tar.TypeSymlink, Link: "a"},
		{Name: "a/x", Body: "x"},
	})
	if err == nil || !errors.Is(err, syscall.ELOOP) {
		t.Fatalf("apply = %v, want ELOOP", err)
	}
}

func TestContextCancelled(t *testing.T) {
	root, _ := setup(t)
	u, err := unpack.New(root, unpack.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := u.Apply(ctx, bytes.NewReader(testimage.Tar(t, E{Name: "a"}))); !errors.Is(err, context.Canceled) {
		t.Fatalf("apply = %v, want context.Canceled", err)
	}
}
