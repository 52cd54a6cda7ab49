package cpio

import (
	"bytes"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func sample(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(w.Dir("/dev", 0o755))
	must(w.CharDev("/dev/console", 0o600, 5, 1))
	must(w.Dir("lib", 0o755))
	must(w.File("/lib/odd.bin", 0o644, []byte("abc")))           // length not a multiple of 4
	must(w.File("/init", 0o755, []byte("#!/bin/sh\necho hi\n"))) // executable
	must(w.File("/empty", 0o600, nil))
	must(w.Symlink("/sh", "bin/busybox"))
	must(w.Close())
	return buf.Bytes()
}

// The archive must be readable by GNU cpio, the independent reference for the format.
func TestArchiveReadableByGNUCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		testutil.Skipf(t, "cpio(1) not found: cannot cross-check the archive format")
	}
	data := sample(t)
	if len(data)%4 != 0 {
		t.Fatalf("archive length %d is not 4-byte aligned", len(data))
	}
	list := exec.Command("cpio", "-itv", "--quiet")
	list.Stdin = bytes.NewReader(data)
	out, err := list.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v: %s", err, out)
	}
	for _, want := range []string{"crw-------", "5,", "dev/console", "-rwxr-xr-x", "init", "lrwxrwxrwx", "sh -> bin/busybox", "drwxr-xr-x"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("listing lacks %q:\n%s", want, out)
		}
	}

	dir := t.TempDir()
	ext := exec.Command("cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/console")
	ext.Dir = dir
	ext.Stdin = bytes.NewReader(data)
	if out, err := ext.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v: %s", err, out)
	}
	for name, want := range map[string]string{"lib/odd.bin": "abc", "init": "#!/bin/sh\necho hi\n", "empty": ""} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || string(got) != want {
			t.Errorf("%s = %q, %v; want %q", name, got, err, want)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, "init")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("init mode = %v, %v; want 0755", fi.Mode(), err)
	}
}

func TestReproducible(t *testing.T) {
	if !bytes.Equal(sample(t), sample(t)) {
		t.Fatal("two archives of the same entries differ")
	}
}

func TestRejectsDuplicatesAndBadNames(t *testing.T) {
	w := NewWriter(&bytes.Buffer{})
	if err := w.File("/a", 0o644, nil); err != nil {
		t.Fatal(err)
	}
	if err := w.File("a/", 0o644, nil); err == nil {
		t.Error("duplicate entry accepted")
	}
	if err := NewWriter(&bytes.Buffer{}).Dir("/", 0o755); err == nil {
		t.Error("empty name accepted")
	}
	_ = w.Close()
	if err := w.File("/b", 0o644, nil); err == nil {
		t.Error("write after Close accepted")
	}
}
