// Package assets prepares what every guest boots: the Debian cloud kernel, unpacked to the
// PVH ELF vmlinux that QEMU microvm and Firecracker load directly, its virtio/filesystem
// modules, and the initramfs (PID 1 plus those modules) built by the project itself.
//
// Everything lands in a cache directory, keyed by the kernel package version or by a hash of
// the initramfs inputs, so repeated calls are cheap and concurrent callers (several test
// binaries, an agent restarting) are safe: a lock file serialises the kernel unpack, and every
// result is written under a temporary name and renamed into place.
package assets

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Kernel is an unpacked guest kernel.
type Kernel struct {
	// Vmlinux is the PVH-bootable ELF kernel image.
	Vmlinux string
	// Release is the kernel's uname -r, e.g. 6.1.0-56-cloud-amd64.
	Release string
	// ModulesDir holds the guest modules, flat, as <name>.ko (uncompressed).
	ModulesDir string
	// Package and Version name the Debian package the kernel came from.
	Package string
	Version string
	// Modules lists the modules every boot loads, in an order that satisfies their
	// dependencies (each module after the ones it needs).
	Modules []string
	// VolumeModules are the further modules a guest loads when it mounts a volume (the
	// NFS client), in load order; none of them is in Modules.
	VolumeModules []string
}

// MetaPackage is the Debian package whose dependency names the current cloud kernel.
const MetaPackage = "linux-image-cloud-amd64"

// GuestModules is the set of modules the guest needs, in the order they are worth loading.
// Dependencies are added automatically; names that are built into the kernel are skipped.
var GuestModules = []string{
	"virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk", "virtio_rng",
	"overlay", "erofs", "ext4",
	"failover", "net_failover", "virtio_net",
	"fuse", "virtiofs",
}

// VolumeModules is the NFS client a guest loads on its first volume mount: kept out of
// GuestModules, so that boots (and templates) without volumes do not pay for it.
var VolumeModules = []string{"nfsv3"}

// moduleLists names what a kernel directory was unpacked for: a cache made for other
// lists is unpacked again.
func moduleLists() string {
	return strings.Join(GuestModules, ",") + ";" + strings.Join(VolumeModules, ",")
}

// resolveTTL is how long a looked-up package version is trusted before apt is asked again;
// apt-cache takes about a second here, too slow to pay on every agent start, yet security
// updates to the guest kernel should be picked up within a day.
const resolveTTL = 24 * time.Hour

// manifest is what a finished kernel directory records about itself.
type manifest struct {
	Package string   `json:"package"`
	Version string   `json:"version"`
	Release string   `json:"release"`
	Modules []string `json:"modules"`
	// VolumeModules and Lists: see Kernel.VolumeModules and moduleLists.
	VolumeModules []string  `json:"volume_modules,omitempty"`
	Lists         string    `json:"lists,omitempty"`
	Created       time.Time `json:"created"`
}

type resolved struct {
	Package string    `json:"package"`
	Version string    `json:"version"`
	At      time.Time `json:"at"`
}

// EnsureKernel returns the guest kernel, downloading and unpacking it into
// cacheDir/kernel/<version> on first use. A later call finds it there without work.
func EnsureKernel(ctx context.Context, cacheDir string) (*Kernel, error) {
	root := filepath.Join(cacheDir, "kernel")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("create kernel cache %s: %w", root, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(root, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := seedKernel(os.Getenv(KernelSeedEnv), root); err != nil {
		slog.Warn("cannot seed the guest kernel cache", "seed", os.Getenv(KernelSeedEnv), "err", err)
	}

	pkg, version, err := resolvePackage(ctx, root)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(root, sanitize(version))
	if k, err := loadKernel(dir); err == nil {
		return k, nil
	}
	slog.Info("fetching guest kernel", "package", pkg, "version", version)
	if err := unpackKernel(ctx, root, dir, pkg, version); err != nil {
		return nil, err
	}
	return loadKernel(dir)
}

// KernelSeedEnv names a cache directory that EnsureKernel filled, which an empty cache
// starts from: the node image carries one, so an agent in a container needs
// neither apt's package lists nor the package mirror to boot its first VM. apt is still
// asked for a newer kernel when it can answer.
const KernelSeedEnv = "FIREWORKS_KERNEL_SEED"

// seedKernel copies the resolved kernel of the cache directory seed into root (a
// cache's kernel directory) when root has none yet.
func seedKernel(seed, root string) error {
	if seed == "" {
		return nil
	}
	seed = filepath.Join(seed, "kernel")
	if _, err := os.Stat(filepath.Join(root, "resolved.json")); err == nil {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(seed, "resolved.json"))
	if err != nil {
		return err
	}
	var r resolved
	if err := json.Unmarshal(b, &r); err != nil || r.Version == "" {
		return fmt.Errorf("%s/resolved.json names no kernel version (%v)", seed, err)
	}
	name := sanitize(r.Version)
	if _, err := loadKernel(filepath.Join(seed, name)); err != nil {
		return err
	}
	work, err := os.MkdirTemp(root, "seed-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if err := copyTree(filepath.Join(seed, name), filepath.Join(work, name)); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(root, name)); errors.Is(err, os.ErrNotExist) {
		if err := os.Rename(filepath.Join(work, name), filepath.Join(root, name)); err != nil {
			return err
		}
	}
	return writeFileAtomic(filepath.Join(root, "resolved.json"), b, 0o644)
}

// copyTree copies a kernel directory: directories and regular files, nothing else.
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(dst, 0o755)
		case d.Type().IsRegular():
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			defer src.Close()
			out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
			if err != nil {
				return err
			}
			if _, err := io.Copy(out, src); err != nil {
				out.Close()
				return fmt.Errorf("copy %s: %w", p, err)
			}
			return out.Close()
		default:
			return fmt.Errorf("%s: not a file or directory", p)
		}
	})
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._+-]`)

func sanitize(s string) string { return unsafeChars.ReplaceAllString(s, "_") }

func loadKernel(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("read kernel manifest in %s: %w", dir, err)
	}
	if m.Lists != moduleLists() {
		return nil, fmt.Errorf("kernel cache %s holds modules %q, want %q", dir, m.Lists, moduleLists())
	}
	k := &Kernel{
		Vmlinux: filepath.Join(dir, "vmlinux"), Release: m.Release,
		ModulesDir: filepath.Join(dir, "modules"), Package: m.Package, Version: m.Version, Modules: m.Modules,
		VolumeModules: m.VolumeModules,
	}
	if _, err := os.Stat(k.Vmlinux); err != nil {
		return nil, fmt.Errorf("kernel cache %s is incomplete: %w", dir, err)
	}
	return k, nil
}

// resolvePackage finds the current linux-image-*-cloud-amd64 package and version, reusing
// a lookup younger than resolveTTL. If apt cannot answer but a kernel is cached, that kernel
// is used (offline restarts keep working).
func resolvePackage(ctx context.Context, root string) (pkg, version string, err error) {
	path := filepath.Join(root, "resolved.json")
	var r resolved
	if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &r) == nil && r.Version != "" {
		if time.Since(r.At) < resolveTTL {
			if _, err := os.Stat(filepath.Join(root, sanitize(r.Version), "manifest.json")); err == nil {
				return r.Package, r.Version, nil
			}
		}
	}
	pkg, version, aptErr := aptResolve(ctx)
	if aptErr != nil {
		if r.Version != "" {
			if _, err := os.Stat(filepath.Join(root, sanitize(r.Version), "manifest.json")); err == nil {
				slog.Warn("cannot look up the current guest kernel package; using the cached one", "version", r.Version, "err", aptErr)
				return r.Package, r.Version, nil
			}
		}
		return "", "", aptErr
	}
	b, _ := json.Marshal(resolved{Package: pkg, Version: version, At: time.Now()})
	if err := writeFileAtomic(path, b, 0o644); err != nil {
		return "", "", err
	}
	return pkg, version, nil
}

var kernelPkgRe = regexp.MustCompile(`^linux-image-[0-9][A-Za-z0-9.+-]*-cloud-amd64$`)

func aptResolve(ctx context.Context) (pkg, version string, err error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", MetaPackage).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache depends %s: %v: %s (is apt available, and has `apt-get update` run?)", MetaPackage, err, bytes.TrimSpace(out))
	}
	for _, line := range strings.Split(string(out), "\n") {
		name, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: ")
		if ok && kernelPkgRe.MatchString(name) {
			pkg = name
			break
		}
	}
	if pkg == "" {
		return "", "", fmt.Errorf("apt-cache depends %s names no linux-image-*-cloud-amd64 package (run `apt-get update` once): %s", MetaPackage, bytes.TrimSpace(out))
	}
	out, err = exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", pkg).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %v: %s", pkg, err, bytes.TrimSpace(out))
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			return pkg, strings.TrimSpace(v), nil
		}
	}
	return "", "", fmt.Errorf("apt-cache show %s reports no version", pkg)
}

// unpackKernel downloads pkg=version and fills dir with vmlinux, modules/ and manifest.json.
func unpackKernel(ctx context.Context, root, dir, pkg, version string) error {
	work, err := os.MkdirTemp(root, "unpack-")
	if err != nil {
		return fmt.Errorf("create kernel work directory: %w", err)
	}
	defer os.RemoveAll(work)

	// Sandbox::User=root: the cache directory is usually not readable by apt's _apt user,
	// and the package is only unpacked, never installed.
	dl := exec.CommandContext(ctx, "apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg+"="+version)
	dl.Dir = work
	if out, err := dl.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get download %s=%s: %v: %s", pkg, version, err, bytes.TrimSpace(out))
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download %s=%s left %d .deb files, want 1", pkg, version, len(debs))
	}
	tree := filepath.Join(work, "tree")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tree).CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg-deb -x %s: %v: %s", debs[0], err, bytes.TrimSpace(out))
	}
	bz, _ := filepath.Glob(filepath.Join(tree, "boot", "vmlinuz-*"))
	if len(bz) != 1 {
		return fmt.Errorf("package %s has %d /boot/vmlinuz-* files, want 1", pkg, len(bz))
	}
	release := strings.TrimPrefix(filepath.Base(bz[0]), "vmlinuz-")

	stage := filepath.Join(work, "out")
	if err := os.MkdirAll(filepath.Join(stage, "modules"), 0o755); err != nil {
		return err
	}
	if err := ExtractVmlinux(ctx, bz[0], filepath.Join(stage, "vmlinux")); err != nil {
		return err
	}
	orders, err := copyModules(filepath.Join(tree, "lib", "modules", release), filepath.Join(stage, "modules"), GuestModules, VolumeModules)
	if err != nil {
		return err
	}
	b, _ := json.MarshalIndent(manifest{Package: pkg, Version: version, Release: release, Modules: orders[0], VolumeModules: orders[1],
		Lists: moduleLists(), Created: time.Now().UTC()}, "", "  ")
	if err := os.WriteFile(filepath.Join(stage, "manifest.json"), b, 0o644); err != nil {
		return err
	}
	_ = os.RemoveAll(dir) // a half-finished directory from a crash without a manifest
	if err := os.Rename(stage, dir); err != nil {
		return fmt.Errorf("install kernel into %s: %w", dir, err)
	}
	return nil
}

// ExtractVmlinux cuts the compressed payload out of a bzImage and decompresses it to the
// ELF vmlinux. The boot protocol's setup header locates it: setup_sects at 0x1f1 (0 means
// 4) gives the start of the protected-mode code at (setup_sects+1)*512, and payload_offset
// (0x248) and payload_length (0x24c) are relative to that start.
func ExtractVmlinux(ctx context.Context, bzImage, out string) error {
	img, err := os.ReadFile(bzImage)
	if err != nil {
		return fmt.Errorf("read bzImage: %w", err)
	}
	if len(img) < 0x250 || string(img[0x202:0x206]) != "HdrS" {
		return fmt.Errorf("%s is not a bzImage (no HdrS setup header)", bzImage)
	}
	if proto := binary.LittleEndian.Uint16(img[0x206:]); proto < 0x208 {
		return fmt.Errorf("%s uses boot protocol %#x; payload fields need 2.08 or later", bzImage, proto)
	}
	setupSects := int(img[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	base := (setupSects + 1) * 512
	off := int(binary.LittleEndian.Uint32(img[0x248:]))
	n := int(binary.LittleEndian.Uint32(img[0x24c:]))
	if off < 0 || n <= 0 || base+off+n > len(img) {
		return fmt.Errorf("%s: payload %d+%d at base %d lies outside the %d-byte file", bzImage, off, n, base, len(img))
	}
	payload := img[base+off : base+off+n]

	var wantSize int64 = -1
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("create %s: %w", tmp, err)
	}
	defer os.Remove(tmp)
	switch {
	case bytes.HasPrefix(payload, []byte{0x02, 0x21, 0x4c, 0x18}), bytes.HasPrefix(payload, []byte{0x04, 0x22, 0x4d, 0x18}):
		// LZ4 (the kernel uses the legacy frame). No LZ4 decoder in the standard library;
		// the lz4 CLI reads both frame formats. The kernel build appends the decompressed
		// size as 4 little-endian bytes, which lz4 would take for the start of another frame
		// (and exit 1), so they are cut off here and checked against the output below.
		if len(payload) < 8 {
			f.Close()
			return fmt.Errorf("%s: LZ4 payload of %d bytes is too short", bzImage, len(payload))
		}
		wantSize = int64(binary.LittleEndian.Uint32(payload[len(payload)-4:]))
		in := out + ".lz4"
		if err := os.WriteFile(in, payload[:len(payload)-4], 0o600); err != nil {
			f.Close()
			return fmt.Errorf("write kernel payload: %w", err)
		}
		defer os.Remove(in)
		cmd := exec.CommandContext(ctx, "lz4", "-d", "-c", "-q", in)
		cmd.Stdout = f
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			f.Close()
			return fmt.Errorf("decompress LZ4 kernel payload with lz4 (apt-get install lz4): %v: %s", err, bytes.TrimSpace(stderr.Bytes()))
		}
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(bytes.NewReader(payload))
		if err != nil {
			f.Close()
			return fmt.Errorf("gzip kernel payload: %w", err)
		}
		zr.Multistream(false) // the appended size trailer is not another gzip member
		if _, err := io.Copy(f, zr); err != nil {
			f.Close()
			return fmt.Errorf("decompress gzip kernel payload: %w", err)
		}
	default:
		f.Close()
		return fmt.Errorf("%s: unsupported payload compression (magic % x); LZ4 and gzip are supported", bzImage, payload[:min(4, len(payload))])
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if wantSize >= 0 && fi.Size() != wantSize {
		return fmt.Errorf("%s: decompressed kernel is %d bytes, the image says %d", bzImage, fi.Size(), wantSize)
	}
	if err := checkPVH(tmp); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

// checkPVH verifies the file is an x86-64 ELF carrying the Xen PVH entry note
// (XEN_ELFNOTE_PHYS32_ENTRY, type 18), which is what lets QEMU boot it without firmware.
func checkPVH(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("decompressed kernel %s is not an ELF file: %w", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("kernel %s is for %v, want x86-64", path, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			return fmt.Errorf("read ELF notes of %s: %w", path, err)
		}
		for len(data) >= 12 {
			nsz := int(binary.LittleEndian.Uint32(data[0:]))
			dsz := int(binary.LittleEndian.Uint32(data[4:]))
			typ := binary.LittleEndian.Uint32(data[8:])
			nameEnd := 12 + align4(nsz)
			end := nameEnd + align4(dsz)
			if nsz < 0 || dsz < 0 || end > len(data) {
				break
			}
			if typ == 18 && strings.TrimRight(string(data[12:12+nsz]), "\x00") == "Xen" {
				return nil
			}
			data = data[end:]
		}
	}
	return fmt.Errorf("kernel %s has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted directly by QEMU microvm", path)
}

func align4(n int) int { return (n + 3) &^ 3 }

// copyModules copies the modules of each list and their dependencies from modRoot
// (lib/modules/<release>) into dst as <name>.ko and returns each list's in load order,
// leaving out of a list what an earlier one has. The package ships no modules.dep (depmod
// runs at install time), so dependencies are read from each module's .modinfo section.
func copyModules(modRoot, dst string, lists ...[]string) ([][]string, error) {
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modRoot, "modules.builtin")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if line != "" {
				builtin[modName(line)] = true
			}
		}
	}
	files := map[string]string{}
	err := filepath.WalkDir(filepath.Join(modRoot, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			files[modName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list modules in %s: %w", modRoot, err)
	}

	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		case 2:
			return nil
		}
		path, ok := files[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("guest module %s is neither a module nor built into this kernel (needed by %s)", name, strings.Join(chain, " -> "))
		}
		state[name] = 1
		deps, err := moduleDepends(path)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, name)
		return copyFile(path, filepath.Join(dst, name+".ko"))
	}
	var orders [][]string
	for _, want := range lists {
		order = nil
		for _, m := range want {
			if err := visit(modName(m), nil); err != nil {
				return nil, err
			}
		}
		orders = append(orders, order)
	}
	return orders, nil
}

// modName turns "kernel/drivers/char/hw_random/virtio-rng.ko" into "virtio_rng", the name
// the kernel uses (it treats - and _ alike in module names).
func modName(p string) string {
	n := strings.TrimSuffix(filepath.Base(p), ".ko")
	return strings.ReplaceAll(n, "-", "_")
}

// moduleDepends reads the "depends=" entry of a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo of %s: %w", path, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d != "" {
					deps = append(deps, modName(d))
				}
			}
			sort.Strings(deps) // deterministic order for a reproducible initramfs
			return deps, nil
		}
	}
	return nil, nil
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return nil
}

func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("install %s: %w", path, err)
	}
	return nil
}

// lockFile takes an exclusive flock on path, polling so that ctx can cancel the wait.
// flock locks belong to the open file description, so two callers in one process exclude
// each other as well as callers in different processes.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for lock %s: %w", path, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
