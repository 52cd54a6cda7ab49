package assets

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets/cpio"
)

// initramfsFormat changes whenever the archive layout below changes, so caches built by an
// older layout are not reused.
const initramfsFormat = "fireworks-initramfs-v2" // v2: padded to whole pages (see padToPage)

// Initramfs is a built initramfs archive.
type Initramfs struct {
	Path string
	// Version is the sha256 of everything that went into the archive.
	Version string
	// Modules are the modules every boot loads (fw.mods), in load order; they and the
	// volume modules are in /lib/modules/<name>.ko.
	Modules []string
}

// VolumeOrder is the initramfs file listing the volume modules (Kernel.VolumeModules) in
// load order, one per line: init loads them on the first volume mount.
const VolumeOrder = "/lib/modules/volume.order"

// File is one extra file placed into an initramfs.
type File struct {
	// Path inside the archive, e.g. /init or /bin/busybox.
	Path string
	// Mode holds the permission bits.
	Mode fs.FileMode
	// Source is a host file to copy; Data is used when Source is empty.
	Source string
	Data   []byte
}

// BuildInitramfs builds (or finds in cacheDir/initramfs) the guest initramfs: initBinary as
// /init, the kernel's guest modules flat under /lib/modules, the directories init mounts on,
// and /dev/console.
func BuildInitramfs(ctx context.Context, cacheDir string, k *Kernel, initBinary string) (*Initramfs, error) {
	if initBinary == "" {
		return nil, fmt.Errorf("build initramfs: no init binary given")
	}
	return BuildInitramfsFiles(ctx, cacheDir, k, []File{{Path: "/init", Mode: 0o755, Source: initBinary}})
}

// BuildInitramfsFiles is BuildInitramfs with arbitrary files (tests boot a busybox /init
// script this way). One of the files must be /init.
func BuildInitramfsFiles(ctx context.Context, cacheDir string, k *Kernel, files []File) (*Initramfs, error) {
	if k == nil {
		return nil, fmt.Errorf("build initramfs: no kernel given")
	}
	contents := make([][]byte, len(files))
	hasInit := false
	for i, f := range files {
		if f.Source != "" {
			b, err := os.ReadFile(f.Source)
			if err != nil {
				return nil, fmt.Errorf("build initramfs: read %s for %s: %w", f.Source, f.Path, err)
			}
			contents[i] = b
		} else {
			contents[i] = f.Data
		}
		if path.Clean("/"+f.Path) == "/init" {
			hasInit = true
		}
	}
	if !hasInit {
		return nil, fmt.Errorf("build initramfs: no /init among the files")
	}
	all := append(append([]string(nil), k.Modules...), k.VolumeModules...)
	mods := make([][]byte, len(all))
	for i, m := range all {
		b, err := os.ReadFile(filepath.Join(k.ModulesDir, m+".ko"))
		if err != nil {
			return nil, fmt.Errorf("build initramfs: read module %s: %w", m, err)
		}
		mods[i] = b
	}

	// The cache key covers every input, so a rebuilt init binary yields a new archive.
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00", initramfsFormat, k.Release)
	for i, f := range files {
		sum := sha256.Sum256(contents[i])
		fmt.Fprintf(h, "file\x00%s\x00%o\x00%x\x00", path.Clean("/"+f.Path), f.Mode.Perm(), sum)
	}
	for i, m := range all {
		sum := sha256.Sum256(mods[i])
		fmt.Fprintf(h, "mod\x00%s\x00%x\x00", m, sum)
	}
	volumeOrder := []byte(strings.Join(k.VolumeModules, "\n") + "\n")
	fmt.Fprintf(h, "volume-order\x00%x\x00", sha256.Sum256(volumeOrder))
	version := hex.EncodeToString(h.Sum(nil))

	dir := filepath.Join(cacheDir, "initramfs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create initramfs cache %s: %w", dir, err)
	}
	out := filepath.Join(dir, version[:32]+".cpio")
	res := &Initramfs{Path: out, Version: version, Modules: append([]string(nil), k.Modules...)}
	if _, err := os.Stat(out); err == nil {
		return res, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	var buf bytes.Buffer
	w := cpio.NewWriter(&buf)
	dirs := map[string]bool{}
	mkdirs := func(p string) error {
		var parents []string
		for d := path.Dir(p); d != "/" && !dirs[d]; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for i := len(parents) - 1; i >= 0; i-- {
			dirs[parents[i]] = true
			if err := w.Dir(parents[i], 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	for _, d := range []string{"/dev", "/proc", "/sys", "/tmp", "/mnt", "/run", "/lib/modules"} {
		if err := mkdirs(d + "/x"); err != nil {
			return nil, fmt.Errorf("build initramfs: %w", err)
		}
	}
	if err := w.CharDev("/dev/console", 0o600, 5, 1); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	for i, m := range all {
		if err := w.File("/lib/modules/"+m+".ko", 0o644, mods[i]); err != nil {
			return nil, fmt.Errorf("build initramfs: %w", err)
		}
	}
	if err := w.File(VolumeOrder, 0o644, volumeOrder); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	order := make([]int, len(files))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return files[order[a]].Path < files[order[b]].Path })
	for _, i := range order {
		p := path.Clean("/" + files[i].Path)
		if err := mkdirs(p); err != nil {
			return nil, fmt.Errorf("build initramfs: %w", err)
		}
		if err := w.File(p, files[i].Mode.Perm(), contents[i]); err != nil {
			return nil, fmt.Errorf("build initramfs: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	padToPage(&buf)
	if err := writeFileAtomic(out, buf.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	return res, nil
}

// padToPage pads the archive with NUL bytes (which the kernel's unpacker skips) to a whole
// number of 4 KiB pages. QEMU's microvm loads the initrd to end at the top of RAM, rounded
// down only to its start's page: an archive of any other size ends inside the last page,
// where the firmware put the ACPI tables, and overwrites the DSDT (the guest then finds no
// virtio devices and halts). A whole number of pages ends exactly below that page.
func padToPage(buf *bytes.Buffer) {
	if r := buf.Len() % 4096; r != 0 {
		buf.Write(make([]byte, 4096-r))
	}
}

// KernelCmdline is the guest kernel command line: serial console, the host TSC frequency
// (without it microvm under TCG often hangs calibrating the TSC against the PIT), skipped
// crypto self-tests (~0.7 s under TCG), panic=-1 (a guest panic reboots at once, which QEMU's
// -no-reboot turns into an exit the driver reports), and fw.mods, the modules init loads in
// order. The kernel does not pass dotted parameters such as fw.mods to init's environment:
// init reads them from /proc/cmdline.
func KernelCmdline(mods []string, extra ...string) string {
	khz, _ := HostTSCKHz()
	// tsc=reliable: under TCG the clocksource watchdog otherwise declares the TSC unstable
	// a few seconds into boot and falls back to a 4 ms clock (coarse timestamps, lost
	// ticks under load); the TSC QEMU emulates is steady.
	args := []string{"console=ttyS0", "quiet", fmt.Sprintf("tsc_early_khz=%d", khz), "tsc=reliable", "cryptomgr.notests", "no_timer_check", "panic=-1", "mitigations=off"}
	if len(mods) > 0 {
		args = append(args, "fw.mods="+strings.Join(mods, ","))
	}
	args = append(args, extra...)
	return strings.Join(args, " ")
}
