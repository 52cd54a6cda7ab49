package initd

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// contextTar is a build context as the SDK tars it: paths relative to the context, a
// directory's entries listed one by one (gzip on).
func contextTar(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	add := func(h *tar.Header, body string) {
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	add(&tar.Header{Name: "app/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(&tar.Header{Name: "app/hello.txt", Typeflag: tar.TypeReg, Mode: 0o644}, "hello\n")
	add(&tar.Header{Name: "app/sub/", Typeflag: tar.TypeDir, Mode: 0o755}, "")
	add(&tar.Header{Name: "app/sub/run.sh", Typeflag: tar.TypeReg, Mode: 0o755}, "#!/bin/sh\n")
	add(&tar.Header{Name: "app/link", Typeflag: tar.TypeSymlink, Linkname: "hello.txt"}, "")
	add(&tar.Header{Name: "app/hard", Typeflag: tar.TypeLink, Linkname: "app/hello.txt"}, "")
	add(&tar.Header{Name: "config.json", Typeflag: tar.TypeReg, Mode: 0o644}, "{}\n")
	add(&tar.Header{Name: "notes.md", Typeflag: tar.TypeReg, Mode: 0o644}, "# notes\n")
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestBuildCopy(t *testing.T) {
	tarball := contextTar(t)
	copyTo := func(t *testing.T, args ...string) (string, string, int) {
		t.Helper()
		dir := t.TempDir()
		t.Chdir(dir)
		var out, errOut bytes.Buffer
		code := Build(append([]string{"copy"}, args...), bytes.NewReader(tarball), &out, &errOut)
		return dir, errOut.String(), code
	}
	t.Run("a directory's contents into DEST", func(t *testing.T) {
		dir, stderr, code := copyTo(t, "app", "dest/")
		if code != 0 {
			t.Fatalf("copy: %d %s", code, stderr)
		}
		if got := readFile(t, filepath.Join(dir, "dest/hello.txt")); got != "hello\n" {
			t.Errorf("hello.txt: %q", got)
		}
		fi, err := os.Stat(filepath.Join(dir, "dest/sub/run.sh"))
		if err != nil || fi.Mode().Perm() != 0o755 {
			t.Errorf("run.sh: %v %v", fi, err)
		}
		if l, err := os.Readlink(filepath.Join(dir, "dest/link")); err != nil || l != "hello.txt" {
			t.Errorf("link: %q %v", l, err)
		}
		a, _ := os.Stat(filepath.Join(dir, "dest/hello.txt"))
		b, _ := os.Stat(filepath.Join(dir, "dest/hard"))
		if !os.SameFile(a, b) {
			t.Error("the hard link is not one")
		}
		if _, err := os.Stat(filepath.Join(dir, "dest/config.json")); err == nil {
			t.Error("a file outside SRC was copied")
		}
	})
	t.Run("a file to a file name, with a mode", func(t *testing.T) {
		dir, stderr, code := copyTo(t, "config.json", "etc/app/config.json", "", "600")
		if code != 0 {
			t.Fatalf("copy: %d %s", code, stderr)
		}
		fi, err := os.Stat(filepath.Join(dir, "etc/app/config.json"))
		if err != nil || fi.Mode().Perm() != 0o600 || fi.IsDir() {
			t.Fatalf("config.json: %v %v", fi, err)
		}
	})
	t.Run("a file into a directory", func(t *testing.T) {
		dir, stderr, code := copyTo(t, "./config.json", "etc/")
		if code != 0 {
			t.Fatalf("copy: %d %s", code, stderr)
		}
		if got := readFile(t, filepath.Join(dir, "etc/config.json")); got != "{}\n" {
			t.Errorf("config.json: %q", got)
		}
	})
	t.Run("a glob", func(t *testing.T) {
		dir, stderr, code := copyTo(t, "*.md", "docs")
		if code != 0 {
			t.Fatalf("copy: %d %s", code, stderr)
		}
		if got := readFile(t, filepath.Join(dir, "docs/notes.md")); got != "# notes\n" {
			t.Errorf("notes.md: %q", got)
		}
	})
	t.Run("nothing matches", func(t *testing.T) {
		_, stderr, code := copyTo(t, "missing", "x")
		if code == 0 || !strings.Contains(stderr, "nothing in the uploaded files matches") {
			t.Errorf("copy of nothing: %d %q", code, stderr)
		}
	})
	t.Run("an unknown owner", func(t *testing.T) {
		_, stderr, code := copyTo(t, "app", "x", "no-such-user-here")
		if code == 0 || !strings.Contains(stderr, "no-such-user-here") {
			t.Errorf("copy with an unknown owner: %d %q", code, stderr)
		}
	})
}

func TestBuildCopyRefusesEntriesOutsideTheContext(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Name: "../escape", Typeflag: tar.TypeReg, Mode: 0o644})
	_ = tw.Close()
	dir := t.TempDir()
	t.Chdir(dir)
	var errOut bytes.Buffer
	if code := Build([]string{"copy", ".", "dest"}, &buf, &bytes.Buffer{}, &errOut); code == 0 || !strings.Contains(errOut.String(), "outside the context") {
		t.Errorf("an entry outside the context: %d %q", code, errOut.String())
	}
}

func TestBuildWorkdir(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	var out bytes.Buffer
	if code := Build([]string{"workdir", "a/b"}, nil, &out, &bytes.Buffer{}); code != 0 {
		t.Fatalf("workdir: %d", code)
	}
	want := filepath.Join(dir, "a/b")
	if got := strings.TrimSpace(out.String()); got != want {
		t.Errorf("workdir printed %q, want %q", got, want)
	}
	if fi, err := os.Stat(want); err != nil || !fi.IsDir() {
		t.Errorf("workdir made nothing: %v", err)
	}
}

func TestBuildEnv(t *testing.T) {
	t.Setenv("FW_BUILD_TEST", "a b")
	var out bytes.Buffer
	if code := Build([]string{"env"}, nil, &out, &bytes.Buffer{}); code != 0 {
		t.Fatalf("env: %d", code)
	}
	if !strings.Contains(out.String(), "\x00FW_BUILD_TEST=a b\x00") && !strings.HasPrefix(out.String(), "FW_BUILD_TEST=a b\x00") {
		t.Errorf("env printed %q", out.String())
	}
}
