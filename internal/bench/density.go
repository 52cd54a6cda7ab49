package bench

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// DensityRow is what idle sandboxes of one image cost a node: Sandboxes of them, each
// restored from the image's template (checked: the node says so) and idle (sleep),
// measured once all run and a few seconds passed.
type DensityRow struct {
	// Setting is the node's knobs for the row (the TCG cache size, KSM).
	Setting   string `json:"setting"`
	Sandboxes int    `json:"sandboxes"`
	// PSSMiB is the VMMs' proportional set size per sandbox (pages shared by n VMMs
	// count 1/n to each): QEMU's own memory, TCG's translation cache and the guest's
	// private pages. AvailMiB is the node's MemAvailable drop per sandbox (everything:
	// the agent's bookkeeping, page tables, the template's page cache).
	PSSMiB   float64 `json:"pss_per_sandbox_mib"`
	AvailMiB float64 `json:"mem_available_drop_per_sandbox_mib"`
	// FitFor24GiB is how many such sandboxes 24 GiB hold at AvailMiB each (the larger
	// of the two figures), 2 GiB kept for the host.
	FitFor24GiB int `json:"fit_in_24gib"`
	// StartP50Ms is the start (create to running) p50 of the row's sandboxes, and
	// CPUBoundMs a CPU-bound command's time in one of them: what a smaller translation
	// cache costs.
	StartP50Ms float64 `json:"start_p50_ms"`
	CPUBoundMs float64 `json:"cpu_bound_ms,omitempty"`
	// StartedBy tallies how the node started them (all restore: the row's path).
	StartedBy map[string]int `json:"started_by"`
}

// densitySetting is one set of node knobs the density rows are measured with.
type densitySetting struct {
	name     string
	tcgCache int  // --tcg-cache-mib (0: the node's default)
	ksm      bool // the host's kernel same-page merging on
}

// cpuBound is a command that keeps a vCPU busy for a while under TCG: the loop's code
// is translated once and run many times, so a cache too small to hold it shows.
var cpuBound = []string{"sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo done"}

// measureDensity starts a dev server per setting and, on each, idle sandboxes of ref in
// steps up to max (or until the node refuses more), one row per step.
func measureDensity(ctx context.Context, cfg Config, work, ref string, steps []int, settings []densitySetting) ([]DensityRow, error) {
	var rows []DensityRow
	for _, st := range settings {
		r, err := densityOn(ctx, cfg, work, ref, steps, st)
		rows = append(rows, r...)
		if err != nil {
			return rows, fmt.Errorf("density, %s: %w", st.name, err)
		}
	}
	return rows, nil
}

func densityOn(ctx context.Context, cfg Config, work, ref string, steps []int, st densitySetting) (rows []DensityRow, err error) {
	if st.ksm {
		restore, err := setKSM(true)
		if err != nil {
			return nil, err
		}
		defer restore()
	}
	// Memory offered well past the machine's: the row measures what idle sandboxes
	// really take, not what the scheduler reserves for them.
	flags := []string{"--memory", strconv.Itoa(steps[len(steps)-1] * 200), "--cpus", "64"}
	if st.tcgCache > 0 {
		flags = append(flags, "--tcg-cache-mib", strconv.Itoa(st.tcgCache))
	}
	dir := filepath.Join(work, fmt.Sprintf("density-%d-%v", st.tcgCache, st.ksm))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	dev, err := startDev(ctx, cfg, dir, flags...)
	if err != nil {
		return nil, err
	}
	defer dev.stop()
	api, err := newAPIClient(dev.config)
	if err != nil {
		return nil, err
	}
	if _, _, err := api.warmImage(ctx, ref); err != nil {
		return nil, err
	}
	var ids, pids []string
	var starts []float64
	how := map[string]int{}
	defer func() {
		for _, id := range ids {
			api.remove(context.WithoutCancel(ctx), id)
		}
	}()
	availBefore, err := memAvailableMiB()
	if err != nil {
		return nil, err
	}
	spec := &pb.SandboxSpec{Image: ref, Cmd: []string{"sleep", "36000"}, MemoryMib: 128, Boot: "restore"}
	for _, n := range steps {
		for len(ids) < n {
			t0 := time.Now()
			id, err := api.startSpec(ctx, spec)
			if err != nil {
				return rows, fmt.Errorf("sandbox %d: %w", len(ids)+1, err)
			}
			starts = append(starts, ms(time.Since(t0)))
			ids = append(ids, id)
			got, err := api.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
			if err != nil {
				return rows, err
			}
			d := got.Msg.GetSandbox().GetDetails()
			how[d["start_mode"]]++
			pids = append(pids, d["pid"])
		}
		// Idle: what the guests touched while starting is all they hold.
		time.Sleep(5 * time.Second)
		pss, err := pssMiB(pids)
		if err != nil {
			return rows, err
		}
		avail, err := memAvailableMiB()
		if err != nil {
			return rows, err
		}
		row := DensityRow{Setting: st.name, Sandboxes: n, PSSMiB: pss / float64(n), AvailMiB: (availBefore - avail) / float64(n),
			StartP50Ms: summarize(starts).P50, StartedBy: maps.Clone(how)}
		per := max(row.PSSMiB, row.AvailMiB)
		if per > 0 {
			row.FitFor24GiB = int((22 * 1024) / per)
		}
		if s, err := api.execOnce(ctx, ids[0], cpuBound); err == nil {
			row.CPUBoundMs = ms(s.exit)
		}
		if row.StartedBy["restore"] != n {
			return rows, fmt.Errorf("%d of %d sandboxes started by restoring the template (%v): not the path the row names", row.StartedBy["restore"], n, row.StartedBy)
		}
		rows = append(rows, row)
		cfg.Log.Info("density", "setting", st.name, "sandboxes", n, "pss_mib", row.PSSMiB, "avail_drop_mib", row.AvailMiB)
	}
	return rows, nil
}

// memAvailableMiB is the host's MemAvailable.
func memAvailableMiB() (float64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kib, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return float64(kib) / 1024, err
		}
	}
	return 0, fmt.Errorf("no MemAvailable in /proc/meminfo")
}

// setKSM turns the kernel's same-page merging on or off and returns what puts it back.
func setKSM(on bool) (func(), error) {
	const path = "/sys/kernel/mm/ksm/run"
	old, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("KSM: %w", err)
	}
	v := "0"
	if on {
		v = "1"
	}
	if err := os.WriteFile(path, []byte(v), 0); err != nil {
		return nil, fmt.Errorf("KSM: %w", err)
	}
	return func() { _ = os.WriteFile(path, old, 0) }, nil
}

func printDensity(w io.Writer, rows []DensityRow, accel string) {
	fmt.Fprintf(w, "\nidle sandboxes of one image, each restored from its template (%s)\n", accel)
	fmt.Fprintf(w, "%-30s %9s %12s %14s %12s %12s %12s  %s\n", "node setting", "sandboxes", "PSS/sandbox", "avail drop/sb", "fit 24 GiB", "start p50", "CPU-bound", "started by")
	for _, r := range rows {
		fmt.Fprintf(w, "%-30s %9d %10.1f M %12.1f M %12d %10.0fms %10.0fms  %s\n", r.Setting, r.Sandboxes, r.PSSMiB, r.AvailMiB, r.FitFor24GiB, r.StartP50Ms, r.CPUBoundMs, describeHow(r.StartedBy))
	}
	fmt.Fprintf(w, "goal: >= 1000 idle sandboxes per 24 GiB node\n")
}
