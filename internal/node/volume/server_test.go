package volume

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	nfsc "github.com/willscott/go-nfs-client/nfs"
	"github.com/willscott/go-nfs-client/nfs/rpc"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// serve runs a Server of dir on loopback and mounts it with an NFSv3 client (the
// protocol over TCP, as a guest's kernel speaks it).
func serve(t *testing.T, dir string) (*nfsc.Target, func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		// Opening files by their kernel handles needs CAP_DAC_READ_SEARCH.
		testutil.Skipf(t, "volume server tests need root (open_by_handle_at)")
	}
	s, err := NewServer(dir, false)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(ln) }()
	c, err := rpc.DialTCP("tcp", ln.Addr().String(), false)
	if err != nil {
		t.Fatal(err)
	}
	m := &nfsc.Mount{Client: c}
	target, err := m.Mount("/", rpc.AuthNull)
	if err != nil {
		t.Fatal(err)
	}
	stop := func() { _ = m.Unmount(); c.Close(); ln.Close(); s.Close() }
	t.Cleanup(stop)
	return target, stop
}

func TestServeReadWrite(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "from-node.txt"), []byte("node\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	target, _ := serve(t, dir)
	f, err := target.Open("/from-node.txt")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(f)
	f.Close()
	if string(b) != "node\n" {
		t.Errorf("read %q", b)
	}
	if _, err := target.Mkdir("/sub", 0o755); err != nil {
		t.Fatal(err)
	}
	w, err := target.OpenFile("/sub/from-client.txt", 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("client\n")); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if got, _ := os.ReadFile(filepath.Join(dir, "sub", "from-client.txt")); string(got) != "client\n" {
		t.Errorf("the node reads %q", got)
	}
	if err := target.Rename("/sub/from-client.txt", "/moved.txt"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "moved.txt")); err != nil {
		t.Errorf("rename: %v", err)
	}
	if err := target.Remove("/moved.txt"); err != nil {
		t.Fatal(err)
	}
	entries, err := target.ReadDirPlus("/")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if got := strings.Join(names, ","); !strings.Contains(got, "from-node.txt") || !strings.Contains(got, "sub") || strings.Contains(got, "moved.txt") {
		t.Errorf("the root lists %s", got)
	}
}

// A guest's symlink never leads the server out of the volume: not to a file of the node
// by an absolute target, nor by climbing out with "..".
func TestServeSymlinksStayInside(t *testing.T) {
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("node secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	target, _ := serve(t, dir)
	for _, link := range []string{outside, filepath.Join(outside, "secret"), "../../../../../../" + strings.TrimPrefix(outside, "/")} {
		if err := target.Symlink(link, "/escape"); err != nil {
			t.Fatalf("symlink %s: %v", link, err)
		}
		for _, p := range []string{"/escape/secret", "/escape"} {
			if f, err := target.Open(p); err == nil {
				b, _ := io.ReadAll(f)
				f.Close()
				if strings.Contains(string(b), "node secret") {
					t.Fatalf("through a symlink to %s, %s read the node's file outside the volume", link, p)
				}
			}
			if w, err := target.OpenFile(p+"-new", 0o644); err == nil {
				_, _ = w.Write([]byte("x"))
				w.Close()
			}
		}
		if err := target.Remove("/escape"); err != nil {
			t.Fatal(err)
		}
	}
	entries, _ := os.ReadDir(outside)
	if len(entries) != 1 {
		t.Errorf("the directory outside the volume holds %d entries after the attempts, want its 1", len(entries))
	}
}

// Handles are the files' own: a client goes on with those it has against another
// server of the same directory (a restarted one, or the one in a migrated sandbox's new
// namespace), and one for a file removed meanwhile is stale.
func TestServeHandlesOutliveTheServer(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "a", "b", "f"), []byte("kept\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	first, err := NewServer(dir, false)
	if err != nil {
		if os.Geteuid() != 0 {
			testutil.Skipf(t, "volume server tests need root (open_by_handle_at)")
		}
		t.Fatal(err)
	}
	h := first.ToHandle(nil, []string{"a", "b", "f"})
	gone := first.ToHandle(nil, []string{"a"})
	first.Close()
	if len(h) == 0 || len(h) > 64 {
		t.Fatalf("a handle of %d bytes (NFSv3 allows 64)", len(h))
	}
	second, err := NewServer(dir, false)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	_, p, err := second.FromHandle(h)
	if err != nil || strings.Join(p, "/") != "a/b/f" {
		t.Fatalf("another server resolves the handle to %v, %v", p, err)
	}
	if err := os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "c")); err != nil {
		t.Fatal(err)
	}
	if _, p, err := second.FromHandle(h); err != nil || strings.Join(p, "/") != "c/b/f" {
		t.Errorf("after a rename of its directory the handle resolves to %v, %v", p, err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "c")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := second.FromHandle(gone); err == nil {
		t.Error("the handle of a removed directory still resolves")
	}
	if _, _, err := second.FromHandle([]byte("not a handle of ours")); err == nil {
		t.Error("a made-up handle resolves")
	}
	// A handle of another file of the same filesystem (outside the volume) is refused.
	outside := filepath.Join(filepath.Dir(dir), "outside-"+filepath.Base(dir))
	if err := os.WriteFile(outside, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(outside)
	parent, err := NewServer(filepath.Dir(dir), false)
	if err != nil {
		t.Fatal(err)
	}
	defer parent.Close()
	if _, _, err := second.FromHandle(parent.ToHandle(nil, []string{filepath.Base(outside)})); err == nil {
		t.Error("a handle of a file outside the volume resolves")
	}
}
