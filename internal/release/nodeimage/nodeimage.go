// Package nodeimage builds the Fireworks container image without a Docker daemon: a
// Debian root made by debootstrap with the packages a node runs (QEMU, iproute2,
// nftables, e2fsprogs, ...), and a layer with the project's binaries and a guest kernel to
// seed the agents' caches. The Helm chart runs every component from it: servers, agents
// and edges.
package nodeimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/release/rootfs"
)

// Packages are what the node's processes shell out to (the agent's VMM, networks, disks
// and volumes; the kernel's unpacking when a newer one is fetched), from the suite the
// build host runs.
var Packages = []string{
	"ca-certificates",
	"e2fsprogs", "erofs-utils", // root and scratch disks
	"lz4", "kmod", "cpio", "file", // guest kernel unpacking
	"iproute2", "nftables", // sandbox networks
	"util-linux", "mount", "procps", // namespaces, loop devices, process checks
}

// QEMUPackages must be QEMU 8.2 or later (restores map template memory read-only): on
// Debian 12 they come from bookworm-backports, elsewhere from the suite itself.
var QEMUPackages = []string{"qemu-system-x86", "qemu-utils"}

// Binaries are the project's programs the image carries, side by side in /usr/local/bin
// (the agent finds the guest init and the volume server beside itself).
var Binaries = []string{"fireworks", "fireworks-init", "fireworks-volume-server"}

// KernelSeedDir is where the image keeps the guest kernel cache agents start from.
const KernelSeedDir = "/usr/lib/fireworks/kernel-seed"

// baseVersion changes when the way the base root is made changes, so that a cached base
// built the old way is not reused.
const baseVersion = "1"

// Options for Build.
type Options struct {
	// BinDir holds the built Binaries (make build's bin/).
	BinDir string
	// CacheDir keeps the base root's layer and the guest kernel between builds; a base is
	// reused while the suite, mirror and package lists are the same.
	CacheDir string
	// Version labels the image (org.opencontainers.image.version).
	Version string
	Log     *slog.Logger
}

// Build makes the image.
func Build(ctx context.Context, o Options) (v1.Image, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	for _, b := range Binaries {
		if fi, err := os.Stat(filepath.Join(o.BinDir, b)); err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("binary %s missing in %s (run `make build`): %v", b, o.BinDir, err)
		}
	}
	if err := os.MkdirAll(o.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("image cache %s: %w", o.CacheDir, err)
	}
	basePath, err := baseLayerTar(ctx, o)
	if err != nil {
		return nil, err
	}
	base, err := tarball.LayerFromFile(basePath, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("base layer %s: %w", basePath, err)
	}
	appPath, err := appLayerTar(ctx, o)
	if err != nil {
		return nil, err
	}
	app, err := tarball.LayerFromFile(appPath, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("binaries layer %s: %w", appPath, err)
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), base, app)
	if err != nil {
		return nil, err
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	// A fixed creation time: the same inputs make the same image digest.
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cf.Config = v1.Config{
		Env: []string{
			"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			assets.KernelSeedEnv + "=" + KernelSeedDir,
		},
		// No entrypoint: every component names its command (`fireworks server`, ...).
		Cmd: []string{"fireworks", "--help"},
		Labels: map[string]string{
			"org.opencontainers.image.title":   "fireworks",
			"org.opencontainers.image.version": o.Version,
		},
	}
	return mutate.ConfigFile(img, cf)
}

// WriteArchive writes img as a docker-archive tar tagged ref (what `ctr images import`,
// `podman load` and `docker load` take).
func WriteArchive(path, ref string, img v1.Image) error {
	tag, err := parseTag(ref)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write image archive %s: %w", path, err)
	}
	return os.Rename(tmp, path)
}

// baseLayerTar returns the cached tar of the Debian root, making it on first use.
func baseLayerTar(ctx context.Context, o Options) (string, error) {
	suite, err := rootfs.HostSuite()
	if err != nil {
		return "", err
	}
	mirror, err := rootfs.AptMirror(suite)
	if err != nil {
		return "", err
	}
	backports := suite == "bookworm"
	include := slices.Clone(Packages)
	if !backports {
		include = append(include, QEMUPackages...)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n%v\n%s\n%v\n", baseVersion, suite, mirror, include, strings.Join(QEMUPackages, ","), backports)
	path := filepath.Join(o.CacheDir, "base-"+hex.EncodeToString(h.Sum(nil))[:16]+".tar")
	if _, err := os.Stat(path); err == nil {
		o.Log.Info("reusing the cached base root", "layer", path)
		return path, nil
	}
	// One debootstrap at a time per cache: the tests of two packages build the image at
	// once on a fresh machine, and the second takes what the first made.
	lock, err := os.OpenFile(filepath.Join(o.CacheDir, ".base.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close() // closing releases the lock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock the image cache %s: %w", o.CacheDir, err)
	}
	if _, err := os.Stat(path); err == nil {
		o.Log.Info("reusing the base root another build made", "layer", path)
		return path, nil
	}
	work, err := os.MkdirTemp(o.CacheDir, "base-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	root := filepath.Join(work, "root")
	start := time.Now()
	o.Log.Info("making the base root with debootstrap", "suite", suite, "packages", len(include))
	if err := rootfs.Debootstrap(ctx, root, include...); err != nil {
		return "", err
	}
	if backports {
		o.Log.Info("installing QEMU from bookworm-backports into the root")
		if err := installBackports(ctx, root, mirror, suite); err != nil {
			return "", err
		}
	}
	if err := tidyRoot(root); err != nil {
		return "", err
	}
	tmp := filepath.Join(work, "base.tar")
	if err := tarTree(root, tmp); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", err
	}
	o.Log.Info("base root made", "layer", path, "took", time.Since(start).Round(time.Second))
	return path, nil
}

// installBackports installs QEMUPackages from SUITE-backports inside root, with proc
// mounted in a mount namespace of its own (so it goes away with the command).
func installBackports(ctx context.Context, root, mirror, suite string) error {
	list := filepath.Join(root, "etc/apt/sources.list.d/backports.list")
	if err := os.WriteFile(list, fmt.Appendf(nil, "deb %s %s-backports main\n", mirror, suite), 0o644); err != nil {
		return err
	}
	if b, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		_ = os.WriteFile(filepath.Join(root, "etc/resolv.conf"), b, 0o644)
	}
	script := fmt.Sprintf(`set -e
mount -t proc proc %[1]s/proc
chroot %[1]s apt-get update -qq
DEBIAN_FRONTEND=noninteractive chroot %[1]s apt-get install -y -qq --no-install-recommends -t %[2]s-backports %[3]s
chroot %[1]s apt-get clean
umount %[1]s/proc`, shellQuote(root), suite, strings.Join(QEMUPackages, " "))
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("install %v from %s-backports in %s: %w\n%s", QEMUPackages, suite, root, err, tail(out, 4000))
	}
	return nil
}

// tidyRoot drops what a container gets from its runtime or never needs: apt's lists
// and caches, logs, and the build host's resolver configuration.
func tidyRoot(root string) error {
	for _, glob := range []string{"var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/*.log", "var/log/apt/*", "debootstrap"} {
		matches, _ := filepath.Glob(filepath.Join(root, glob))
		for _, m := range matches {
			if err := os.RemoveAll(m); err != nil {
				return err
			}
		}
	}
	return os.WriteFile(filepath.Join(root, "etc/resolv.conf"), nil, 0o644)
}

// appLayerTar makes the layer of the project's binaries and the guest kernel seed.
func appLayerTar(ctx context.Context, o Options) (string, error) {
	// The kernel the agents would fetch first, fetched here once (apt-get download on the
	// build host) and kept in the cache.
	kcache := filepath.Join(o.CacheDir, "assets")
	if _, err := assets.EnsureKernel(ctx, kcache); err != nil {
		return "", fmt.Errorf("guest kernel for the image's seed: %w", err)
	}
	work, err := os.MkdirTemp(o.CacheDir, "app-")
	if err != nil {
		return "", err
	}
	tree := filepath.Join(work, "tree")
	bin := filepath.Join(tree, "usr/local/bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return "", err
	}
	for _, b := range Binaries {
		if err := copyFile(filepath.Join(o.BinDir, b), filepath.Join(bin, b), 0o755); err != nil {
			return "", err
		}
	}
	seed := filepath.Join(tree, KernelSeedDir, "kernel")
	if err := os.MkdirAll(seed, 0o755); err != nil {
		return "", err
	}
	kroot := filepath.Join(kcache, "kernel")
	entries, err := os.ReadDir(kroot)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		// The resolved version and its unpacked directory; not the lock, nor work dirs.
		if e.Name() == "resolved.json" || (e.IsDir() && !strings.HasPrefix(e.Name(), "unpack-") && !strings.HasPrefix(e.Name(), "seed-")) {
			out, err := exec.CommandContext(ctx, "cp", "-a", filepath.Join(kroot, e.Name()), seed).CombinedOutput()
			if err != nil {
				return "", fmt.Errorf("copy the guest kernel %s: %v: %s", e.Name(), err, out)
			}
		}
	}
	path := filepath.Join(work, "app.tar")
	if err := tarTree(tree, path); err != nil {
		return "", err
	}
	// The tree is tarred; only the tar is needed from here (it is removed with the next
	// build's work directory sweep below).
	_ = os.RemoveAll(tree)
	sweepOld(o.CacheDir, "app-", work)
	return path, nil
}

// sweepOld removes the work directories of earlier builds (keep is this build's). Only
// those an hour old: another build (tests of two packages make the image at once) may
// still be writing its image from its own.
func sweepOld(dir, prefix, keep string) {
	old, _ := filepath.Glob(filepath.Join(dir, prefix+"*"))
	for _, p := range old {
		if fi, err := os.Stat(p); err == nil && p != keep && time.Since(fi.ModTime()) > time.Hour {
			_ = os.RemoveAll(p)
		}
	}
}

func tarTree(dir, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := rootfs.TarDir(dir, f); err != nil {
		f.Close()
		return fmt.Errorf("tar %s: %w", dir, err)
	}
	return f.Close()
}

func copyFile(from, to string, mode os.FileMode) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return fmt.Errorf("copy %s: %w", from, err)
	}
	return dst.Close()
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func parseTag(ref string) (name.Tag, error) {
	if !strings.Contains(ref, ":") {
		return name.Tag{}, fmt.Errorf("image reference %q: want a tag, e.g. fireworks:0.1.0", ref)
	}
	t, err := name.NewTag(ref)
	if err != nil {
		return name.Tag{}, fmt.Errorf("image reference %q: %w", ref, err)
	}
	return t, nil
}
