package initd

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseCmdline(t *testing.T) {
	got := parseCmdline("console=ttyS0 quiet fw.mods=virtio_ring,virtio fw.poweroff=\"reboot\"\n")
	want := map[string]string{"console": "ttyS0", "quiet": "", "fw.mods": "virtio_ring,virtio", "fw.poweroff": "reboot"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"A=1", "B=2", "PATH=/bin"}, []string{"B=3", "C=4", "A=5"})
	want := []string{"A=5", "B=3", "PATH=/bin", "C=4"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestLoadModulesRejectsPaths(t *testing.T) {
	for _, bad := range []string{"../etc/x", "a/b", ".."} {
		if err := loadModules(nil, bad); err == nil {
			t.Errorf("loadModules(%q) accepted", bad)
		}
	}
}

// Prefetch reads what the image names without opening anything but regular files and
// directories inside the root: a FIFO (as /etc/passwd), a link out of the root's mount
// or to a magic link, or a device node never blocks it or reaches a driver.
func TestPrefetchOpensOnlyPlainFilesInTheRoot(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "bin"), 0o755))
	must(unix.Mkfifo(filepath.Join(root, "etc/passwd"), 0o644))
	must(os.WriteFile(filepath.Join(root, "bin/sh"), []byte("plain"), 0o755))
	must(os.Symlink("/proc/self/fd/0", filepath.Join(root, "bin/magic")))
	must(os.Symlink("/proc/kmsg", filepath.Join(root, "bin/kmsg")))
	must(os.Symlink("../../../../etc/passwd", filepath.Join(root, "bin/climb")))
	if os.Geteuid() == 0 {
		must(unix.Mknod(filepath.Join(root, "bin/tty"), unix.S_IFCHR|0o666, int(unix.Mkdev(5, 0))))
	}
	done := make(chan struct{})
	go func() {
		prefetchIn(root, []string{"/etc/passwd", "/bin/magic", "/bin/kmsg", "/bin/climb", "/bin/tty", "/bin", "/bin/sh"})
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		// Unblock the FIFO so the goroutine can end, then fail.
		if f, err := os.OpenFile(filepath.Join(root, "etc/passwd"), os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
		t.Fatal("prefetch blocked on something the image named")
	}
	// A plain file is still read: it is found through the same resolution.
	f, fi, err := openPlain(mustOpenRoot(t, root), "/bin/sh")
	if err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("openPlain(/bin/sh) = %v, %v", fi, err)
	}
	f.Close()
	for _, p := range []string{"/etc/passwd", "/bin/magic", "/bin/kmsg", "/bin/tty"} {
		if f, _, err := openPlain(mustOpenRoot(t, root), p); err == nil {
			f.Close()
			t.Errorf("openPlain(%s) opened it", p)
		}
	}
}

func mustOpenRoot(t *testing.T, root string) int {
	t.Helper()
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// An image whose /etc/passwd is a FIFO (or a device) gets a clear error for a named user
// instead of an exec that blocks forever in init.
func TestUserLookupRefusesNonRegularPasswd(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(root, "etc/passwd"), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := resolveUser(root, "app"); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "/etc/passwd") || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("resolveUser with a FIFO passwd = %v", err)
		}
	case <-time.After(10 * time.Second):
		if f, err := os.OpenFile(filepath.Join(root, "etc/passwd"), os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
		t.Fatal("user lookup blocked on a FIFO /etc/passwd")
	}
	// A uid needs no passwd entry, so it runs even with that passwd (as root by default).
	for _, spec := range []string{"", "1234", "1234:5678"} {
		if u, err := resolveUser(root, spec); err != nil {
			t.Errorf("resolveUser(%q) with a FIFO passwd = %+v, %v", spec, u, err)
		}
	}
	// A missing passwd is an empty database: numeric users still work.
	if err := os.Remove(filepath.Join(root, "etc/passwd")); err != nil {
		t.Fatal(err)
	}
	if u, err := resolveUser(root, "1234"); err != nil || u.UID != 1234 {
		t.Errorf("resolveUser(1234) without passwd = %+v, %v", u, err)
	}
}
