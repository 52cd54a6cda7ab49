package nodeimage

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// The image is built the way `make image` builds it and then run by a real container
// runtime (Podman): the binaries run, QEMU is new enough, the node's tools are there, the
// kernel seed is where the agent looks, and the servers' non-root user can run it.
func TestImageRunsInAContainerRuntime(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "building the node image needs root (debootstrap, chroot)")
	}
	for _, tool := range []string{"debootstrap", "podman", "unshare", "apt-get"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found (scripts/install-deps.sh installs it)", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	bin := t.TempDir()
	if _, _, err := testutil.BuildBinaries(bin); err != nil {
		t.Fatal(err)
	}
	// The cache make image uses: a fresh machine makes the base root here once (~1.5
	// minutes), later runs reuse it.
	img, err := Build(ctx, Options{BinDir: bin, CacheDir: "/var/cache/fireworks/nodeimage", Version: "test",
		Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(t.TempDir(), "image.tar")
	const ref = "localhost/fireworks-image-test:1"
	if err := WriteArchive(archive, ref, img); err != nil {
		t.Fatal(err)
	}
	// Podman's own store, in the test's directory: nothing is left in the machine's.
	// (A short path: Podman refuses a runroot longer than 50 characters.)
	store, err := os.MkdirTemp("", "fwpd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(store)
	podman := func(args ...string) (string, error) {
		// As the differential tests run it: everything under store, runc, cgroupfs, and
		// rlimits a sandboxed runner may set.
		full := []string{"--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "run"),
			"--tmpdir", filepath.Join(store, "tmp"), "--network-config-dir", filepath.Join(store, "net"), "--volumepath", filepath.Join(store, "vol"),
			"--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"}
		if args[0] == "run" {
			full = append(full, "run", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
			args = args[1:]
		}
		full = append(full, args...)
		out, err := exec.CommandContext(ctx, "podman", full...).CombinedOutput()
		return string(out), err
	}
	if out, err := podman("load", "-i", archive); err != nil {
		t.Fatalf("podman load: %v\n%s", err, out)
	}
	out, err := podman("run", "--rm", "--network=none", ref, "sh", "-c",
		`fireworks --help | head -1; qemu-system-x86_64 --version | head -1; cat "$FIREWORKS_KERNEL_SEED/kernel/resolved.json"; echo; `+
			`for t in fireworks-init fireworks-volume-server nft ip mkfs.ext4 mkfs.erofs lz4 cpio modprobe losetup unshare pgrep; do command -v $t >/dev/null || echo "missing $t"; done`)
	if err != nil {
		t.Fatalf("podman run: %v\n%s", err, out)
	}
	if strings.Contains(out, "missing ") || !strings.Contains(out, "microVMs") {
		t.Errorf("the image lacks something:\n%s", out)
	}
	m := regexp.MustCompile(`QEMU emulator version (\d+)\.(\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no QEMU version in:\n%s", out)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	if major < 8 || (major == 8 && minor < 2) {
		t.Errorf("QEMU %s.%s in the image; Fireworks needs 8.2 or later", m[1], m[2])
	}
	if !strings.Contains(out, `"version"`) {
		t.Errorf("no kernel seed in the image:\n%s", out)
	}
	// Servers, edges and the controller run as 65532 with a read-only root.
	if out, err := podman("run", "--rm", "--network=none", "--user", "65532:65532", "--read-only", ref, "fireworks", "server", "--help"); err != nil || !strings.Contains(out, "--peers") {
		t.Errorf("fireworks server --help as 65532 on a read-only root: %v\n%s", err, out)
	}
}
