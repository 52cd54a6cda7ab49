package assets

import (
	"bytes"
	"context"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// kernelForTest fetches the real kernel into a fresh cache with two concurrent callers, so
// the lock and the atomic install are exercised on every run.
func kernelForTest(t *testing.T) (*Kernel, string) {
	t.Helper()
	for _, tool := range []string{"apt-get", "apt-cache", "dpkg-deb", "lz4"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found: cannot fetch the Debian guest kernel", tool)
		}
	}
	cache := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var (
		wg   sync.WaitGroup
		ks   [2]*Kernel
		errs [2]error
	)
	for i := range ks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ks[i], errs[i] = EnsureKernel(ctx, cache)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			if strings.Contains(err.Error(), "apt-cache") || strings.Contains(err.Error(), "apt-get download") {
				testutil.Skipf(t, "cannot fetch the guest kernel package (apt lookups or download failed): %v", err)
			}
			t.Fatal(err)
		}
	}
	if ks[0].Vmlinux != ks[1].Vmlinux || ks[0].Version != ks[1].Version {
		t.Fatalf("concurrent callers got different kernels: %+v vs %+v", ks[0], ks[1])
	}
	return ks[0], cache
}

func TestEnsureKernel(t *testing.T) {
	k, cache := kernelForTest(t)
	if err := checkPVH(k.Vmlinux); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(k.Release, "-cloud-amd64") {
		t.Errorf("release %q does not look like a cloud kernel", k.Release)
	}
	// Dependencies come before their users; built-ins (ext4 here) are not listed.
	pos := func(m string) int { return slices.Index(k.Modules, m) }
	for _, pair := range [][2]string{{"virtio_ring", "virtio"}, {"virtio", "virtio_mmio"}, {"virtio", "virtio_console"},
		{"libcrc32c", "erofs"}, {"failover", "net_failover"}, {"net_failover", "virtio_net"}, {"fuse", "virtiofs"}} {
		if pos(pair[0]) < 0 || pos(pair[1]) < 0 || pos(pair[0]) > pos(pair[1]) {
			t.Errorf("module order %v: want %s before %s", k.Modules, pair[0], pair[1])
		}
	}
	// The volume modules (the NFS client) come apart, in their own order, and repeat
	// nothing a boot loads.
	vpos := func(m string) int { return slices.Index(k.VolumeModules, m) }
	for _, pair := range [][2]string{{"sunrpc", "lockd"}, {"grace", "lockd"}, {"lockd", "nfs"}, {"nfs", "nfsv3"}} {
		if vpos(pair[0]) < 0 || vpos(pair[1]) < 0 || vpos(pair[0]) > vpos(pair[1]) {
			t.Errorf("volume module order %v: want %s before %s", k.VolumeModules, pair[0], pair[1])
		}
	}
	for _, m := range append(slices.Clone(k.Modules), k.VolumeModules...) {
		if _, err := os.Stat(filepath.Join(k.ModulesDir, m+".ko")); err != nil {
			t.Errorf("module %s listed but not copied: %v", m, err)
		}
		if slices.Contains(k.Modules, m) && slices.Contains(k.VolumeModules, m) {
			t.Errorf("module %s is in both lists", m)
		}
	}
	// A second call reuses the unpacked kernel instead of unpacking again.
	man := filepath.Join(filepath.Dir(k.Vmlinux), "manifest.json")
	before, _ := os.Stat(man)
	k2, err := EnsureKernel(context.Background(), cache)
	if err != nil {
		t.Fatal(err)
	}
	after, _ := os.Stat(man)
	if k2.Vmlinux != k.Vmlinux || !before.ModTime().Equal(after.ModTime()) {
		t.Errorf("second call rebuilt the kernel cache")
	}

	// An empty cache seeded from this one (as the node image seeds an agent's) has the
	// same kernel with neither apt nor the mirror: nothing is on PATH.
	seeded := t.TempDir()
	t.Setenv(KernelSeedEnv, cache)
	t.Setenv("PATH", t.TempDir())
	k3, err := EnsureKernel(context.Background(), seeded)
	if err != nil {
		t.Fatalf("EnsureKernel from the seed %s: %v", cache, err)
	}
	if k3.Version != k.Version || !strings.HasPrefix(k3.Vmlinux, seeded) || !slices.Equal(k3.Modules, k.Modules) {
		t.Errorf("seeded kernel = %+v, want version %s under %s", k3, k.Version, seeded)
	}
	if err := checkPVH(k3.Vmlinux); err != nil {
		t.Errorf("seeded vmlinux: %v", err)
	}
	// A cache that has a kernel is never overwritten by the seed.
	if err := seedKernel(t.TempDir(), filepath.Join(seeded, "kernel")); err != nil {
		t.Errorf("a seed over a filled cache: %v", err)
	}
}

func TestBuildInitramfs(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		testutil.Skipf(t, "cpio(1) not found: cannot list the built initramfs")
	}
	// A fake kernel with two tiny modules keeps this test independent of the download.
	modDir := t.TempDir()
	for _, m := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(modDir, m+".ko"), []byte("module "+m), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	k := &Kernel{Release: "6.1.0-test-cloud-amd64", ModulesDir: modDir, Modules: []string{"a", "b"}}
	cache := t.TempDir()
	initBin := filepath.Join(t.TempDir(), "init")
	if err := os.WriteFile(initBin, []byte("init v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	r1, err := BuildInitramfs(ctx, cache, k, initBin)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r1.Modules, []string{"a", "b"}) {
		t.Errorf("modules = %v", r1.Modules)
	}
	list := exec.Command("cpio", "-itv", "--quiet")
	f, _ := os.Open(r1.Path)
	defer f.Close()
	list.Stdin = f
	out, err := list.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t %s: %v: %s", r1.Path, err, out)
	}
	for _, want := range []string{"-rwxr-xr-x", " init\n", "dev/console", "lib/modules/a.ko", "lib/modules/b.ko", "proc\n", "sys\n", "tmp\n", "mnt\n", "run\n"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("initramfs lacks %q:\n%s", want, out)
		}
	}

	// A whole number of pages, so that QEMU's microvm places it below the ACPI tables
	// (see padToPage), and cpio(1) read it above (the padding is NUL bytes).
	if fi, err := os.Stat(r1.Path); err != nil || fi.Size()%4096 != 0 {
		t.Errorf("initramfs size %v (%v): want a multiple of 4096", fi.Size(), err)
	}
	again, err := BuildInitramfs(ctx, cache, k, initBin)
	if err != nil || again.Version != r1.Version {
		t.Fatalf("same inputs gave version %s (%v), want %s", again.Version, err, r1.Version)
	}
	if err := os.WriteFile(initBin, []byte("init v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	r2, err := BuildInitramfs(ctx, cache, k, initBin)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Version == r1.Version || r2.Path == r1.Path {
		t.Fatalf("a changed init binary kept the initramfs version %s", r1.Version)
	}
	b, _ := os.ReadFile(r2.Path)
	if !bytes.Contains(b, []byte("init v2")) {
		t.Error("rebuilt initramfs does not contain the new init")
	}
	if _, err := BuildInitramfs(ctx, cache, k, filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing init binary accepted")
	}
}

func TestKernelCmdline(t *testing.T) {
	got := KernelCmdline([]string{"virtio", "virtio_mmio"}, "fw.debug=1")
	for _, want := range []string{"console=ttyS0", "tsc_early_khz=", "panic=-1", "fw.mods=virtio,virtio_mmio", "fw.debug=1"} {
		if !strings.Contains(got, want) {
			t.Errorf("cmdline %q lacks %q", got, want)
		}
	}
	khz, src := HostTSCKHz()
	t.Logf("host TSC %d kHz from %s", khz, src)
}

func TestParseTSCLog(t *testing.T) {
	for log, want := range map[string]int{
		"[ 0.0] tsc: Detected 2445.402 MHz processor\n":                                                                2445402,
		"[ 0.0] tsc: Detected 2100.000 MHz processor\n[ 1.2] tsc: Refined TSC clocksource calibration: 2099.998 MHz\n": 2099998,
		"nothing here": 0,
	} {
		if got := parseTSCLog([]byte(log)); got != want {
			t.Errorf("parseTSCLog(%q) = %d, want %d", log, got, want)
		}
	}
}
