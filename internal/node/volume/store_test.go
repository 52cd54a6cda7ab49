package volume

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

func needMount(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "volume store tests need root (loop mounts)")
	}
	for _, tool := range []string{"mkfs.ext4", "mount", "umount", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found (run ./scripts/install-deps.sh)", tool)
		}
	}
}

// A volume is its size: writing past it is refused (ENOSPC, NFS3ERR_NOSPC to a client),
// and removing it unmounts it and deletes its image.
func TestStoreQuotaAndRemove(t *testing.T) {
	needMount(t)
	ctx := context.Background()
	st, err := NewStore(t.TempDir(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	const id = "00000000000000a1"
	for _, bad := range []struct {
		id   string
		size int
	}{{"../x", 32}, {id, 1}, {id, MaxSizeMiB + 1}} {
		if err := st.Create(ctx, bad.id, bad.size); err == nil {
			t.Errorf("Create(%q, %d) accepted", bad.id, bad.size)
			_ = st.Remove(ctx, bad.id)
		}
	}
	if err := st.Create(ctx, id, MinSizeMiB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Remove(context.Background(), id) })
	if err := st.Create(ctx, id, MinSizeMiB); err == nil {
		t.Error("a second Create of the same volume succeeded")
	}
	target, stop := serve(t, st.Dir(id))
	w, err := target.OpenFile("/big", 0o644)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	var werr error
	written := 0
	for range 2 * MinSizeMiB {
		if _, werr = w.Write(chunk); werr != nil {
			break
		}
		written++
	}
	w.Close()
	if werr == nil || !strings.Contains(werr.Error(), "NOSPC") {
		t.Fatalf("after %d MiB written into a %d MiB volume: %v (want NFS3ERR_NOSPC)", written, MinSizeMiB, werr)
	}
	// Removing the file frees its space at once: the server keeps nothing open of it
	// (go-nfs leaves the file of a failed write open; the server's files close themselves).
	if err := target.Remove("/big"); err != nil {
		t.Fatal(err)
	}
	w, err = target.OpenFile("/after", 0o644)
	if err != nil {
		t.Fatal(err)
	}
	for range MinSizeMiB / 2 {
		if _, err := w.Write(chunk); err != nil {
			t.Fatalf("a write once the full volume's file was removed: %v", err)
		}
	}
	w.Close()
	stop()
	// Mounted again (an agent restart) it is the same data.
	if err := st.Mount(ctx, id); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(st.Dir(id) + "/after"); err != nil || fi.Size() == 0 {
		t.Errorf("the volume's file after a second mount: %v", err)
	}
	if err := st.Remove(ctx, id); err != nil {
		t.Fatal(err)
	}
	if mounted, _ := isMounted(st.Dir(id)); mounted {
		t.Error("removed, the volume is still mounted")
	}
	if _, err := os.Stat(st.image(id)); !os.IsNotExist(err) {
		t.Errorf("removed, the volume's image is still there: %v", err)
	}
}

// A file's handle still names it once the volume was mounted again (nothing of it cached:
// an agent or node restart): the guest's client goes on with the handles it has.
func TestHandlesOutliveARemount(t *testing.T) {
	needMount(t)
	ctx := context.Background()
	st, err := NewStore(t.TempDir(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	id := "00000000000000aa"
	if err := st.Create(ctx, id, MinSizeMiB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Remove(context.Background(), id) })
	if err := os.MkdirAll(filepath.Join(st.Dir(id), "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(st.Dir(id), "sub", "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(st.Dir(id), false)
	if err != nil {
		t.Fatal(err)
	}
	fh, dh := s.ToHandle(nil, []string{"sub", "f"}), s.ToHandle(nil, []string{"sub"})
	s.Close()
	if err := st.Unmount(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := st.Mount(ctx, id); err != nil {
		t.Fatal(err)
	}
	s, err = NewServer(st.Dir(id), false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for want, h := range map[string][]byte{"sub/f": fh, "sub": dh} {
		if _, p, err := s.FromHandle(h); err != nil || strings.Join(p, "/") != want {
			t.Errorf("the handle of %s after a remount: %v %v", want, p, err)
		}
	}
}

// A volume moved to another store (another node) arrives with its data; an image that
// is not what this node's mkfs makes (a feature it would not set) or not clean is
// refused, and a stored errors=panic is reset.
func TestImportChecksTheImage(t *testing.T) {
	needMount(t)
	ctx := context.Background()
	from, err := NewStore(t.TempDir(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	to, err := NewStore(t.TempDir(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	const id = "00000000000000c1"
	if err := from.Create(ctx, id, 32); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(from.Dir(id), "f"), []byte("moved"), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := from.Export(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	copyFrom := func(path string) func(*os.File) error {
		return func(f *os.File) error {
			b, err := os.ReadFile(path)
			if err == nil {
				_, err = f.WriteAt(b, 0)
			}
			return err
		}
	}
	// Hostile variants of it first: a feature this node does not make, then a stored
	// errors=panic (accepted, reset).
	bad := filepath.Join(t.TempDir(), "bad.img")
	if b, err := os.ReadFile(img); err != nil || os.WriteFile(bad, b, 0o600) != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("tune2fs", "-O", "quota", bad).CombinedOutput(); err != nil {
		t.Fatalf("tune2fs: %v %s", err, out)
	}
	if err := to.Import(ctx, id, 32, copyFrom(bad)); err == nil || !strings.Contains(err.Error(), `"quota"`) {
		t.Fatalf("an image with a feature this node does not make: %v", err)
	}
	if out, err := exec.Command("tune2fs", "-E", "mount_opts=errors=panic", img).CombinedOutput(); err != nil {
		t.Fatalf("tune2fs: %v %s", err, out)
	}
	if err := to.Import(ctx, id, 31, copyFrom(img)); err == nil {
		t.Fatal("an image of another size was taken")
	}
	if err := to.Import(ctx, id, 32, copyFrom(img)); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("dumpe2fs", "-h", to.image(id)).Output(); strings.Contains(string(out), "errors=panic") {
		t.Error("the imported image keeps its stored errors=panic")
	}
	if err := to.Mount(ctx, id); err != nil {
		t.Fatal(err)
	}
	defer to.Remove(ctx, id)
	if b, err := os.ReadFile(filepath.Join(to.Dir(id), "f")); err != nil || string(b) != "moved" {
		t.Fatalf("the moved volume's file: %q %v", b, err)
	}
	if err := to.Import(ctx, id, 32, copyFrom(img)); err == nil {
		t.Error("an import over a volume the node has was taken")
	}
	_ = from.Remove(ctx, id)
}
