package bench

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// MigrateRow is live migration of one sandbox size under one load, measured Runs times
// on one sandbox: between the two agents of the bench cluster (each in a network
// namespace of its own, the stream and the disk mirror over their mutual TLS), or, for
// Where "in place", into a fresh VMM on the dev server's one node (the same path but
// for the node-to-node transport).
type MigrateRow struct {
	Where     string `json:"where"` // "between agents" or "in place"
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
	// StartedBy is how the node started the sandbox (its start_mode before the first
	// migration). First is that first migration, not in the summaries: for a sandbox
	// restored from its image's template, the source's QEMU reads every page of the
	// guest's RAM, so the template's pages that no VM on the node had read yet enter the
	// page cache then (at a cost that depends on the machine; see README). Later
	// migrations move a VM whose RAM is its own.
	StartedBy string     `json:"started_by"`
	First     MigrateOne `json:"first"`
}

// MigrateOne is one migration.
type MigrateOne struct {
	Downtime float64 `json:"downtime_ms"`
	Total    float64 `json:"total_ms"`
	MiB      float64 `json:"sent_mib"`
}

// Where a migration series ran.
const (
	MigrateBetweenAgents = "between agents"
	MigrateInPlace       = "in place"
)

// migrateShape is one row's sandbox.
type migrateShape struct {
	mem   int
	dirty bool
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

// measureMigration measures each shape's series where says: between the bench
// cluster's agents, or in place on the dev server's node.
func measureMigration(ctx context.Context, cfg Config, api *apiClient, ref, where string, shapes []migrateShape) ([]MigrateRow, error) {
	var rows []MigrateRow
	for _, sh := range shapes {
		row, err := migrateSeries(ctx, cfg, api, ref, where, sh)
		if err != nil {
			return rows, fmt.Errorf("%s, %d MiB sandbox (%s): %w", where, sh.mem, row.Load, err)
		}
		rows = append(rows, row)
	}
	return rows, nil
}

func migrateSeries(ctx context.Context, cfg Config, api *apiClient, ref, where string, sh migrateShape) (MigrateRow, error) {
	row := MigrateRow{Where: where, MemoryMiB: sh.mem, Load: "idle", Runs: min(cfg.Runs, migrationRuns)}
	if sh.dirty {
		row.Load = "dirtying memory"
	}
	id, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: migrateProgram(sh.dirty), MemoryMib: int32(sh.mem), InsecureRegistries: insecureFor(ref)})
	if err != nil {
		return row, err
	}
	defer api.remove(context.WithoutCancel(ctx), id)
	d, err := api.details(ctx, id)
	if err != nil {
		return row, err
	}
	row.StartedBy = d["start_mode"]
	cfg.Log.Info("measuring", "series", "live migration", "where", where, "memory_mib", sh.mem, "load", row.Load, "runs", row.Runs)
	time.Sleep(time.Second) // the loop (and the load) going
	var down, guest, vmmDown, total, sent []float64
	for i := range row.Runs + 1 {
		before, err := api.output(ctx, id)
		if err != nil {
			return row, fmt.Errorf("the sandbox's log: %w", err)
		}
		t0 := time.Now()
		r, err := api.sandboxes.MigrateSandbox(ctx, connect.NewRequest(&pb.MigrateSandboxRequest{Sandbox: id}))
		if err != nil {
			return row, fmt.Errorf("migration %d: %w", i+1, err)
		}
		took := ms(time.Since(t0))
		m := r.Msg.GetMigration()
		if how := r.Msg.GetSandbox().GetDetails()["start_mode"]; m.GetOutcome() != "moved" || how != "migrated" {
			return row, fmt.Errorf("migration %d: outcome %q, the node started it by %q: not a live migration", i+1, m.GetOutcome(), how)
		}
		// The row measures the path it names: another node, or the same one.
		moved := m.GetFrom() != m.GetTo() && r.Msg.GetSandbox().GetNode() == m.GetTo()
		if moved != (where == MigrateBetweenAgents) {
			return row, fmt.Errorf("migration %d went from node %q to %q (the sandbox is on %q): not a migration %s", i+1, m.GetFrom(), m.GetTo(), r.Msg.GetSandbox().GetNode(), where)
		}
		cfg.Log.Debug("migrated", "sandbox", id, "from", m.GetFrom(), "to", m.GetTo(), "total", time.Since(t0), "details", r.Msg.GetSandbox().GetDetails())
		d, err := strconv.ParseFloat(strings.TrimSuffix(r.Msg.GetSandbox().GetDetails()["migration_downtime"], "ms"), 64)
		if err != nil {
			return row, fmt.Errorf("migration %d: the target did not report the downtime (%v)", i+1, r.Msg.GetSandbox().GetDetails())
		}
		mib := float64(m.GetBytes()+m.GetDiskBytes()) / (1 << 20)
		if i == 0 {
			row.First = MigrateOne{Downtime: d, Total: took, MiB: mib}
			continue
		}
		down, total, sent = append(down, d), append(total, took), append(sent, mib)
		vmmDown = append(vmmDown, float64(m.GetDowntimeUs())/1000)
		// The guest's readings go on after the switch-over: its gaps since the call.
		time.Sleep(500 * time.Millisecond)
		after, err := api.output(ctx, id)
		if err != nil {
			return row, fmt.Errorf("migration %d: the sandbox's log: %w", i+1, err)
		}
		if len(after) < len(before) {
			return row, fmt.Errorf("migration %d: the sandbox's log shrank from %d to %d bytes", i+1, len(before), len(after))
		}
		guest = append(guest, longestGap(after[len(before):]))
	}
	row.Downtime, row.GuestStall, row.VMMDowntime, row.Total, row.MiB = summarize(down), summarize(guest), summarize(vmmDown), summarize(total), summarize(sent)
	return row, nil
}

// details is sandbox id's details (how the node started it, its VMM's pid, ...).
func (c *apiClient) details(ctx context.Context, id string) (map[string]string, error) {
	got, err := c.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
	if err != nil {
		return nil, fmt.Errorf("get sandbox %s: %w", id, err)
	}
	return got.Msg.GetSandbox().GetDetails(), nil
}

// insecureFor names the registry of ref when it is one (the bench cluster's, on its
// bridge, speaks plain HTTP); an oci: layout has none.
func insecureFor(ref string) []string {
	if strings.HasPrefix(ref, "oci:") {
		return nil
	}
	host, _, _ := strings.Cut(ref, "/")
	return []string{host}
}

// output is sandbox id's standard output so far, through the API (the log moves with a
// migrated sandbox).
func (c *apiClient) output(ctx context.Context, id string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	stream, err := c.sandboxes.Logs(ctx, connect.NewRequest(&pb.LogsRequest{Sandbox: id}))
	if err != nil {
		return nil, err
	}
	defer stream.Close()
	var out []byte
	for stream.Receive() {
		if o := stream.Msg().GetOutput(); o.GetStream() == 1 {
			out = append(out, o.GetData()...)
		}
		if len(out) > 16<<20 {
			return nil, fmt.Errorf("sandbox %s printed over 16 MiB: not the bench's program", id)
		}
	}
	return out, stream.Err()
}

// longestGap is the longest gap (ms) the guest program printed in out (0 if none over
// its 2 ms threshold).
func longestGap(out []byte) float64 {
	longest := 0.0
	for _, line := range strings.Split(string(out), "\n") {
		if f, ok := strings.CutPrefix(strings.TrimSpace(line), "gap "); ok {
			if us, err := strconv.Atoi(f); err == nil {
				longest = max(longest, float64(us)/1000)
			}
		}
	}
	return longest
}

func printMigration(w io.Writer, rows []MigrateRow, tp *TemplatePages, accel string) {
	fmt.Fprintf(w, "\nlive migration, ms: between two agents (each in a network namespace of its own, over mutual TLS), and in place (a fresh VMM on the same node); downtime = source's stop to target's release; %s\n", accel)
	fmt.Fprintf(w, "%-42s %5s %9s %9s %9s %9s %9s %9s %9s %9s\n", "sandbox", "runs", "down p50", "down p99", "qemu p50", "stall p99", "total p50", "total p99", "MiB p50", "1st total")
	for _, r := range rows {
		fmt.Fprintf(w, "%-42s %5d %9.1f %9.1f %9.1f %9.1f %9.0f %9.0f %9.1f %9.0f\n", fmt.Sprintf("%s: %d MiB, %s", r.Where, r.MemoryMiB, r.Load), r.Runs,
			r.Downtime.P50, r.Downtime.P99, r.VMMDowntime.P50, r.GuestStall.P99, r.Total.P50, r.Total.P99, r.MiB.P50, r.First.Total)
	}
	var how []string
	for _, r := range rows {
		if r.StartedBy != "" && !slices.Contains(how, r.StartedBy) {
			how = append(how, r.StartedBy)
		}
	}
	fmt.Fprintf(w, "(sandboxes started by: %s) ", strings.Join(how, ", "))
	if tp != nil {
		fmt.Fprintf(w, "(a %d MiB sandbox restored from its template: %.1f MiB of its RAM is not zero, %.1f MiB of that still equal to the template: what a first migration to a node holding the template could skip; QEMU sends it) ",
			tp.MemoryMiB, tp.NonZeroMiB, tp.EqualMiB)
	}
	fmt.Fprintf(w, "(goals: downtime p99 <= 50 ms; total <= 2 s for an idle 256 MiB guest. 1st = the sandbox's first migration (not in p50/p99): its RAM was still the template's pages, read into the page cache then. stall = longest gap in the guest's own clock readings: under TCG its clock stops with it, so that is its slowdown, not the stop)\n")
}
