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
