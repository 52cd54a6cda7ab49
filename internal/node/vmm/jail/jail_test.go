package jail

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// A jailed program runs as its user, sees the system read-only and its own files, writes
// only those, and sees nothing else of the host: not a file beside its own, not the
// data directory they are in.
func TestJailConfines(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "jails need root (namespaces, mounts, setuid)")
	}
	base := t.TempDir()
	mine, other, root := filepath.Join(base, "vm-a"), filepath.Join(base, "vm-b"), filepath.Join(base, "vm-a", "jail")
	for _, d := range []string{mine, other, root} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(mine, 4000123, 4000123); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(other, "disk"), []byte("other sandbox's disk\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "state.db"), []byte("node data\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd, err := Command(Spec{Root: root, UID: 4000123, GID: 4000123, Mounts: []Mount{{Path: mine, Writable: true}}, Dir: mine,
		Path: "/bin/sh", Args: []string{"sh", "-c", `id -u; echo written > ` + mine + `/out && echo wrote-own;
cat ` + other + `/disk 2>/dev/null && echo READ-OTHER; cat ` + base + `/state.db 2>/dev/null && echo READ-DATA;
echo x > /usr/x 2>/dev/null && echo WROTE-USR; ls / | tr '\n' ' '`}})
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	t.Logf("jailed: %s", out)
	if err != nil {
		t.Fatalf("jailed sh: %v: %s", err, out)
	}
	s := string(out)
	if !strings.HasPrefix(s, "4000123\n") || !strings.Contains(s, "wrote-own") {
		t.Errorf("want uid 4000123 and its own file written: %q", s)
	}
	for _, bad := range []string{"READ-OTHER", "READ-DATA", "WROTE-USR", "tmp/Test"} {
		if strings.Contains(s, bad) {
			t.Errorf("the jail let through %s: %q", bad, s)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(mine, "out")); string(b) != "written\n" {
		t.Errorf("the jail's write to its own directory: %q", b)
	}
}
