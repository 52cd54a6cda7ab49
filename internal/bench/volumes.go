package bench

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// VolumeRow is file I/O measured inside the guest on one kind of storage: a volume (NFS
// to the sandbox's volume server) or the sandbox's own scratch disk (the overlay's
// writable layer on its virtio disk), the baseline. Each figure is the median of Runs.
type VolumeRow struct {
	Target string `json:"target"`
	// FSType is the filesystem magic the guest reports for the directory measured
	// (checked: NFS's for the volume, overlayfs's for the scratch disk).
	FSType string `json:"fs_type"`
	Runs   int    `json:"runs"`
	// WriteMBps: 64 MiB written with dd and synced; ReadMBps: read back with the guest's
	// page cache dropped first.
	WriteMBps float64 `json:"seq_write_mbps"`
	ReadMBps  float64 `json:"seq_read_mbps"`
	// SmallFilesMs: 1,000 files created (shell redirections, no process per file), listed
	// with their attributes (one ls -l: a stat each), and removed (one rm -r).
	SmallFilesMs float64 `json:"small_files_ms"`
}

// volumeScript times, inside the guest, the three measurements on directory $1 and prints
// "fstype write_ms read_ms small_ms". The clock is the guest's uptime (10 ms steps; busybox
// date has no sub-second format), steady across one script; each part takes far longer.
const volumeScript = `set -e
now() { read u _ < /proc/uptime; echo $(( ${u%.*}${u#*.} * 10 )); }
d="$1/bench.$$"; mkdir -p "$d"
fs=$(stat -f -c %t "$1")
t0=$(now); dd if=/dev/zero of="$d/seq" bs=1M count=64 conv=fsync 2>/dev/null; t1=$(now)
sync; echo 3 > /proc/sys/vm/drop_caches
t2=$(now); dd if="$d/seq" of=/dev/null bs=1M 2>/dev/null; t3=$(now)
rm "$d/seq"; mkdir "$d/small"
t4=$(now)
i=0; while [ $i -lt 1000 ]; do : > "$d/small/f$i"; i=$((i+1)); done
ls -l "$d/small" > /dev/null
rm -r "$d/small"
t5=$(now)
rmdir "$d"
echo "$fs $((t1-t0)) $((t3-t2)) $((t5-t4))"`

// measureVolumes runs the volume script on a volume and on the scratch disk of one
// sandbox that mounts the volume, Runs times each (at most 5: each run writes 64 MiB).
func measureVolumes(ctx context.Context, cfg Config, api *apiClient, ref string) ([]VolumeRow, error) {
	name := "bench-volume"
	if _, err := api.volumes.CreateVolume(ctx, connect.NewRequest(&pb.CreateVolumeRequest{Name: name, SizeMib: 1024})); err != nil {
		return nil, fmt.Errorf("create the bench volume: %w", err)
	}
	defer func() {
		_, _ = api.volumes.DeleteVolume(context.WithoutCancel(ctx), connect.NewRequest(&pb.DeleteVolumeRequest{Volume: name}))
	}()
	id, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: []string{"sleep", "3600"}, MemoryMib: 512,
		Volumes: []*pb.VolumeMount{{Volume: name, Path: "/vol"}}})
	if err != nil {
		return nil, err
	}
	defer api.remove(context.WithoutCancel(ctx), id)
	runs := min(cfg.Runs, 5)
	var rows []VolumeRow
	for _, t := range []struct{ target, dir, fs string }{
		{"volume (NFS to its server)", "/vol", "6969"},  // NFS_SUPER_MAGIC
		{"scratch disk (baseline)", "/tmp", "794c7630"}, // OVERLAYFS_SUPER_MAGIC
	} {
		row := VolumeRow{Target: t.target, Runs: runs}
		var w, r, s []float64
		for range runs {
			out, err := api.runOK(ctx, id, []string{"sh", "-c", volumeScript, "sh", t.dir})
			if err != nil {
				return rows, err
			}
			f := strings.Fields(out)
			if len(f) != 4 {
				return rows, fmt.Errorf("volume script on %s printed %q", t.dir, out)
			}
			if row.FSType = f[0]; f[0] != t.fs {
				return rows, fmt.Errorf("%s is on %s in the guest, not %s: the row would not measure what it names", t.dir, f[0], t.fs)
			}
			msv := make([]float64, 3)
			for i := range msv {
				if msv[i], err = strconv.ParseFloat(f[i+1], 64); err != nil || msv[i] < 0 {
					return rows, fmt.Errorf("volume script on %s printed %q", t.dir, out)
				}
				msv[i] = max(msv[i], 10) // under one tick of the clock
			}
			w, r, s = append(w, 64*(1<<20)/(msv[0]/1e3)/1e6), append(r, 64*(1<<20)/(msv[1]/1e3)/1e6), append(s, msv[2])
		}
		row.WriteMBps, row.ReadMBps, row.SmallFilesMs = summarize(w).P50, summarize(r).P50, summarize(s).P50
		rows = append(rows, row)
	}
	return rows, nil
}

func printVolumes(w io.Writer, rows []VolumeRow, accel string) {
	fmt.Fprintf(w, "\nfile I/O in the guest, median of the runs: 64 MiB written (synced) and read back (cache dropped); 1,000 small files created, listed, removed; %s\n", accel)
	fmt.Fprintf(w, "%-28s %-10s %5s %12s %12s %14s\n", "storage", "fs magic", "runs", "write MB/s", "read MB/s", "1000 files ms")
	for _, r := range rows {
		fmt.Fprintf(w, "%-28s %-10s %5d %12.1f %12.1f %14.0f\n", r.Target, r.FSType, r.Runs, r.WriteMBps, r.ReadMBps, r.SmallFilesMs)
	}
}
