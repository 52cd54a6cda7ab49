package volume

import (
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// The volume server holds CAP_DAC_READ_SEARCH, which opens any file of a filesystem by
// handle through any mount of it the process can name. Its jail names none of the
// node's: its binary is on a tmpfs of its own (InstallServer) and each volume is a whole
// filesystem. A probe in such a jail, holding the server's capabilities, reads its
// volume's file by handle and not a file of the node's. The same probe given one of the
// node's directories (as a jail with the system directories bound had) reads the node's
// file: the layout, not luck, keeps it out.
func TestJailedServerOpensHandlesOnlyInItsVolumes(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "jails need root (namespaces, mounts, setuid)")
	}
	base := t.TempDir()
	vol, nodeDir, root, binDir := filepath.Join(base, "vol"), filepath.Join(base, "usr"), filepath.Join(base, "jail"), filepath.Join(base, "bin")
	for _, d := range []string{vol, nodeDir, root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// A volume is a filesystem of its own (an ext4 image on a node; a tmpfs here).
	if err := unix.Mount("tmpfs", vol, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(vol, unix.MNT_DETACH) })
	inside, secret := filepath.Join(vol, "in"), filepath.Join(base, "node-secret")
	os.WriteFile(inside, []byte("volume file\n"), 0o600)
	os.WriteFile(secret, []byte("node secret\n"), 0o600)
	handle := func(p string) string {
		h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, p, 0) // as an attacker would make it
		if err != nil {
			testutil.Skipf(t, "the filesystem of %s gives no file handles: %v", p, err)
		}
		return strconv.Itoa(int(h.Type())) + ":" + hex.EncodeToString(h.Bytes())
	}
	hin, hsecret := handle(inside), handle(secret)
	probe, err := testutil.BuildGuestTool(t.TempDir(), "handleprobe")
	if err != nil {
		t.Fatal(err)
	}
	bin, err := InstallServer(probe, binDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(binDir, unix.MNT_DETACH) })
	run := func(through string, extra ...jail.Mount) string {
		t.Helper()
		mounts := append([]jail.Mount{{Path: bin}, {Path: vol}}, extra...)
		cmd, err := jail.Command(jail.Spec{Root: root, UID: 1799999998, GID: 1799999998, Mounts: mounts,
			Caps: serverCaps, Proc: true, NoDevices: true, NoSystem: true, Dir: "/", Path: bin, Args: []string{"probe", through, hin, hsecret}})
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("jailed probe: %v: %s", err, out)
		}
		return string(out)
	}
	for _, through := range []string{vol, bin, "/proc/self"} {
		got := run(through)
		t.Logf("through %s: %s", through, got)
		if strings.Contains(got, "node secret") {
			t.Errorf("the server's jail let a file of the node be read by handle through %s: %q", through, got)
		}
		if through == vol && !strings.Contains(got, "read: volume file") {
			t.Errorf("the jailed server cannot open its volume's file by handle: %q", got)
		}
	}
	if got := run(nodeDir, jail.Mount{Path: nodeDir}); !strings.Contains(got, "node secret") {
		t.Errorf("with a node directory bound, the probe did not read the node's file (%q): this test would not see the hole", got)
	}
}
