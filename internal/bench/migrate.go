package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// MigrateRow is live migration of one sandbox size under one load, measured Runs times
// on one sandbox (on the bench's one node: each migration moves it into a fresh VMM
// there, by the same path as between nodes but for the node-to-node transport).
type MigrateRow struct {
	MemoryMiB int    `json:"memory_mib"`
	Load      string `json:"load"` // idle, or dirtying memory
	Runs      int    `json:"runs"`
	// Downtime is how long the guest was stopped: from the source's stop for the
	// switch-over to the target's release of it once the switch-over was committed
	// (host clock, as the target reports it). GuestStall is the longest gap between the
	// guest program's consecutive readings of its own clock (a loop, well under 1 ms
	// apart when it runs) around each migration: under TCG the guest's clock stops with
	// its vCPUs, so that is how much slower the guest ran meanwhile (the pre-copy's
	// dirty tracking, a busy host), not the stop. VMMDowntime is what the source's
	// QEMU measured (the last copy and the device state); Total the migrate call; MiB
	// what was sent (RAM and devices, and the disk mirror).
	Downtime    Summary `json:"downtime_ms"`
	GuestStall  Summary `json:"guest_stall_ms"`
	VMMDowntime Summary `json:"vmm_downtime_ms"`
	Total       Summary `json:"total_ms"`
	MiB         Summary `json:"sent_mib"`
}

// migrateProgram reads the guest's monotonic clock (/proc/timer_list's "now at N nsecs",
// shell builtins only: no fork per reading) in a loop and prints each gap over 2 ms, in
// µs; dirtying also keeps an awk rewriting a large array meanwhile.
func migrateProgram(dirty bool) []string {
	loop := `prev=0; while :; do { read l1; read l2; read w1 w2 ns rest; } </proc/timer_list; ` +
		`if [ $prev -gt 0 ] && [ $((ns-prev)) -gt 2000000 ]; then echo "gap $(((ns-prev)/1000))"; fi; prev=$ns; done`
	if dirty {
		loop = `awk 'BEGIN{for(;;){for(i=0;i<200000;i++)a[i]=i+n;n++}}' & ` + loop
	}
	return []string{"sh", "-c", loop}
}

// migrationRuns is how many migrations each row measures (fewer in a smoke run).
const migrationRuns = 20

func measureMigration(ctx context.Context, cfg Config, api *apiClient, ref string) ([]MigrateRow, error) {
	var rows []MigrateRow
	for _, mem := range []int{256, 1024} {
		for _, dirty := range []bool{false, true} {
			row, err := migrateSeries(ctx, cfg, api, ref, mem, dirty)
			if err != nil {
				return rows, fmt.Errorf("%d MiB sandbox (%s): %w", mem, row.Load, err)
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

func migrateSeries(ctx context.Context, cfg Config, api *apiClient, ref string, mem int, dirty bool) (MigrateRow, error) {
	row := MigrateRow{MemoryMiB: mem, Load: "idle", Runs: min(cfg.Runs, migrationRuns)}
	if dirty {
		row.Load = "dirtying memory"
	}
	id, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: migrateProgram(dirty), MemoryMib: int32(mem)})
	if err != nil {
		return row, err
	}
	defer api.remove(context.WithoutCancel(ctx), id)
	logPath := filepath.Join(cfg.DataDir, "sandboxes", id, "output.log")
	cfg.Log.Info("measuring", "series", "live migration", "memory_mib", mem, "load", row.Load, "runs", row.Runs)
	time.Sleep(time.Second) // the loop (and the load) going
	var down, guest, vmmDown, total, sent []float64
	for i := range row.Runs {
		before, err := fileSize(logPath)
		if err != nil {
			return row, fmt.Errorf("the sandbox's log: %w", err)
		}
		t0 := time.Now()
		r, err := api.sandboxes.MigrateSandbox(ctx, connect.NewRequest(&pb.MigrateSandboxRequest{Sandbox: id}))
		if err != nil {
			return row, fmt.Errorf("migration %d: %w", i+1, err)
		}
		total = append(total, ms(time.Since(t0)))
		m := r.Msg.GetMigration()
		if how := r.Msg.GetSandbox().GetDetails()["start_mode"]; m.GetOutcome() != "moved" || how != "migrated" {
			return row, fmt.Errorf("migration %d: outcome %q, the node started it by %q: not a live migration", i+1, m.GetOutcome(), how)
		}
		vmmDown = append(vmmDown, float64(m.GetDowntimeUs())/1000)
		d, err := strconv.ParseFloat(strings.TrimSuffix(r.Msg.GetSandbox().GetDetails()["migration_downtime"], "ms"), 64)
		if err != nil {
			return row, fmt.Errorf("migration %d: the target did not report the downtime (%v)", i+1, r.Msg.GetSandbox().GetDetails())
		}
		down = append(down, d)
		sent = append(sent, float64(m.GetBytes()+m.GetDiskBytes())/(1<<20))
		// The guest's readings go on after the switch-over: its gaps since the call.
		time.Sleep(500 * time.Millisecond)
		gap, err := longestGap(logPath, before)
		if err != nil {
			return row, fmt.Errorf("migration %d: %w", i+1, err)
		}
		guest = append(guest, gap)
	}
	row.Downtime, row.GuestStall, row.VMMDowntime, row.Total, row.MiB = summarize(down), summarize(guest), summarize(vmmDown), summarize(total), summarize(sent)
	return row, nil
}

// longestGap is the longest gap (ms) the guest program printed to its log past offset
// (0 if none over its 2 ms threshold). The log's records carry the bytes as written.
func longestGap(path string, offset int64) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return 0, err
	}
	b, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return 0, err
	}
	longest := 0.0
	for _, field := range bytes.Split(b, []byte("gap ")) {
		end := bytes.IndexAny(field, "\n\x00")
		if end < 0 {
			continue
		}
		if us, err := strconv.Atoi(strings.TrimSpace(string(field[:end]))); err == nil {
			longest = max(longest, float64(us)/1000)
		}
	}
	return longest, nil
}

func printMigration(w io.Writer, rows []MigrateRow, accel string) {
	fmt.Fprintf(w, "\nlive migration (within the bench's node: a fresh VMM each time), ms; downtime = source's stop to target's release; %s\n", accel)
	fmt.Fprintf(w, "%-26s %5s %9s %9s %9s %9s %9s %9s %9s\n", "sandbox", "runs", "down p50", "down p99", "qemu p50", "stall p99", "total p50", "total p99", "MiB p50")
	for _, r := range rows {
		fmt.Fprintf(w, "%-26s %5d %9.1f %9.1f %9.1f %9.1f %9.0f %9.0f %9.1f\n", fmt.Sprintf("%d MiB, %s", r.MemoryMiB, r.Load), r.Runs,
			r.Downtime.P50, r.Downtime.P99, r.VMMDowntime.P50, r.GuestStall.P99, r.Total.P50, r.Total.P99, r.MiB.P50)
	}
	fmt.Fprintf(w, "(goals: downtime p99 <= 50 ms; total <= 2 s for an idle 256 MiB guest. stall = longest gap in the guest's own clock readings: under TCG its clock stops with it, so that is its slowdown, not the stop)\n")
}
