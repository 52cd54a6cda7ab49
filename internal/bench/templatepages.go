package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// TemplatePages is what a migration could leave out if the target held the template the
// sandbox was restored from: the guest's pages still equal to the template's and not
// zero (QEMU sends a zero page as a marker of a few bytes, so those cost nothing either
// way), counted in a sandbox restored from the template and running the migration
// series' program, against the template's memory file.
type TemplatePages struct {
	MemoryMiB int `json:"memory_mib"`
	// NonZeroMiB is the guest's RAM that is not zero: about what its first migration
	// sends. EqualMiB of it is still the template's (skippable); WrittenMiB the rest.
	NonZeroMiB float64 `json:"nonzero_mib"`
	EqualMiB   float64 `json:"template_equal_mib"`
	WrittenMiB float64 `json:"written_mib"`
}

// measureTemplatePages starts a sandbox of ref (mem MiB, restored from its template),
// lets it run the migration program a moment, and compares its RAM (read from its QEMU
// through /proc/PID/mem, root only) with the template's memory file page by page.
func measureTemplatePages(ctx context.Context, cfg Config, api *apiClient, ref string, mem int) (TemplatePages, error) {
	tp := TemplatePages{MemoryMiB: mem}
	id, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: migrateProgram(false), MemoryMib: int32(mem), InsecureRegistries: insecureFor(ref)})
	if err != nil {
		return tp, err
	}
	defer api.remove(context.WithoutCancel(ctx), id)
	d, err := api.details(ctx, id)
	if err != nil {
		return tp, err
	}
	if d["start_mode"] != "restore" && d["start_mode"] != "pool" {
		return tp, fmt.Errorf("sandbox %s was started by %q, not from its template: nothing to compare", id, d["start_mode"])
	}
	pid := d["pid"]
	memFile, err := qemuMemPath(pid)
	if err != nil {
		return tp, err
	}
	start, size, err := mappingOf(pid, memFile)
	if err != nil {
		return tp, err
	}
	if size != int64(mem)<<20 {
		return tp, fmt.Errorf("QEMU %s maps %d bytes of %s, not the guest's %d MiB", pid, size, memFile, mem)
	}
	guest, err := os.Open("/proc/" + pid + "/mem")
	if err != nil {
		return tp, fmt.Errorf("read the guest's RAM: %w", err)
	}
	defer guest.Close()
	tmpl, err := os.Open(memFile)
	if err != nil {
		return tp, fmt.Errorf("the template's memory file: %w", err)
	}
	defer tmpl.Close()
	const page = 4096
	const chunk = 256 * page
	g, t := make([]byte, chunk), make([]byte, chunk)
	zero := make([]byte, page)
	var nonzero, equal int64
	for off := int64(0); off < size; off += chunk {
		if _, err := guest.ReadAt(g, start+off); err != nil {
			return tp, fmt.Errorf("read the guest's RAM at %#x: %w", start+off, err)
		}
		if _, err := tmpl.ReadAt(t, off); err != nil && err != io.EOF {
			return tp, fmt.Errorf("read %s at %d: %w", memFile, off, err)
		}
		for p := 0; p < chunk; p += page {
			if bytes.Equal(g[p:p+page], zero) {
				continue
			}
			nonzero++
			if bytes.Equal(g[p:p+page], t[p:p+page]) {
				equal++
			}
		}
	}
	mib := func(pages int64) float64 { return float64(pages*page) / (1 << 20) }
	tp.NonZeroMiB, tp.EqualMiB, tp.WrittenMiB = mib(nonzero), mib(equal), mib(nonzero-equal)
	return tp, nil
}

// qemuMemPath is the memory file QEMU pid maps as guest RAM.
func qemuMemPath(pid string) (string, error) {
	b, err := os.ReadFile("/proc/" + pid + "/cmdline")
	if err != nil {
		return "", fmt.Errorf("the VMM's command line: %w", err)
	}
	if path := memPathArg(strings.Split(string(b), "\x00")); path != "" {
		return path, nil
	}
	return "", fmt.Errorf("VMM %s has no memory file (not restored from a template)", pid)
}

// memPathArg is the mem-path= of a QEMU command line's arguments, QEMU's ",," escapes
// undone ("" if none).
func memPathArg(args []string) string {
	for _, arg := range args {
		_, rest, ok := strings.Cut(arg, "mem-path=")
		if !ok {
			continue
		}
		var path strings.Builder
		for i := 0; i < len(rest); i++ {
			if rest[i] == ',' {
				if i+1 < len(rest) && rest[i+1] == ',' {
					path.WriteByte(',')
					i++
					continue
				}
				break
			}
			path.WriteByte(rest[i])
		}
		return path.String()
	}
	return ""
}

// mappingOf is where process pid maps file (start address, length).
func mappingOf(pid, file string) (int64, int64, error) {
	b, err := os.ReadFile("/proc/" + pid + "/maps")
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[5] != file {
			continue
		}
		lo, hi, _ := strings.Cut(f[0], "-")
		s, err1 := strconv.ParseInt(lo, 16, 64)
		e, err2 := strconv.ParseInt(hi, 16, 64)
		if err1 != nil || err2 != nil {
			return 0, 0, fmt.Errorf("maps of %s: %q", pid, line)
		}
		return s, e - s, nil
	}
	return 0, 0, fmt.Errorf("process %s does not map %s", pid, file)
}
