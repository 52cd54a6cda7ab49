package bench

import (
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

// PauseRow is pause and resume of one sandbox size, measured Runs cycles on one sandbox.
type PauseRow struct {
	MemoryMiB int `json:"memory_mib"`
	Runs      int `json:"runs"`
	// Pause is the PauseSandbox call, which returns once the sandbox is paused (its VM
	// saved and ended). Resume is from the ResumeSandbox call to the guest's next output
	// byte in the sandbox's log: the program it runs prints every 50 ms, so up to 50 ms of
	// it is the program's own wait.
	Pause  Summary `json:"pause_ms"`
	Resume Summary `json:"resume_ms"`
	// SavedMiB is the saved state's size (memory the guest touched, devices, scratch
	// disk blocks in use), as the last pause reported it.
	SavedMiB float64 `json:"saved_mib"`
	// Fork1Ms and Fork10Ms are fork calls of a running sandbox of this size with 1 and
	// 10 copies: until all run (the source is paused for the save and resumed after).
	Fork1Ms  float64 `json:"fork1_ms,omitempty"`
	Fork10Ms float64 `json:"fork10_ms,omitempty"`
	// Forks10PssMiB is the node memory (proportional set size of their VMMs, shared
	// pages split among their users) of the 10 forks once all run; Indep10PssMiB that of
	// 10 sandboxes of the same image, size and program started as usual (IndepMode says
	// how their node started them). Forks map the one flattened save copy-on-write.
	Forks10PssMiB float64 `json:"forks10_pss_mib,omitempty"`
	Indep10PssMiB float64 `json:"indep10_pss_mib,omitempty"`
	IndepMode     string  `json:"indep_start_mode,omitempty"`
	// SnapFSMs/SnapFSMiB and SnapMemMs/SnapMemMiB are a snapshot create call (files;
	// with memory) and the snapshot's size.
	SnapFSMs   float64 `json:"snapshot_fs_ms,omitempty"`
	SnapFSMiB  float64 `json:"snapshot_fs_mib,omitempty"`
	SnapMemMs  float64 `json:"snapshot_mem_ms,omitempty"`
	SnapMemMiB float64 `json:"snapshot_mem_mib,omitempty"`
}

// pauseProgram prints a counter every 50 ms: what resumes must carry on.
var pauseProgram = []string{"sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done"}

// measurePauseResume pauses and resumes one running sandbox of each size Runs times.
// Each cycle checks that the path it names ran: the sandbox is paused after the pause
// (with a saved state), and its node says it started by resuming.
func measurePauseResume(ctx context.Context, cfg Config, api *apiClient, ref string) ([]PauseRow, error) {
	var rows []PauseRow
	for _, mem := range []int{256, 1024} {
		row, err := pauseSeries(ctx, cfg, api, ref, mem)
		if err != nil {
			return rows, fmt.Errorf("%d MiB sandbox: %w", mem, err)
		}
		rows = append(rows, row)
	}
	return rows, nil
}

func pauseSeries(ctx context.Context, cfg Config, api *apiClient, ref string, mem int) (PauseRow, error) {
	row := PauseRow{MemoryMiB: mem, Runs: cfg.Runs}
	id, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: pauseProgram, MemoryMib: int32(mem)})
	if err != nil {
		return row, err
	}
	defer api.remove(context.WithoutCancel(ctx), id)
	logPath := filepath.Join(cfg.DataDir, "sandboxes", id, "output.log")
	cfg.Log.Info("measuring", "series", "pause and resume", "memory_mib", mem, "runs", cfg.Runs)
	var pauses, resumes []float64
	for i := 0; i < cfg.Runs; i++ {
		t0 := time.Now()
		p, err := api.sandboxes.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Sandbox: id}))
		if err != nil {
			return row, fmt.Errorf("pause %d: %w", i+1, err)
		}
		pauses = append(pauses, ms(time.Since(t0)))
		sb := p.Msg.GetSandbox()
		if sb.GetStatus() != "paused" || sb.GetSaved() == nil {
			return row, fmt.Errorf("pause %d: the sandbox is %s (saved %v), not paused", i+1, sb.GetStatus(), sb.GetSaved())
		}
		row.SavedMiB = float64(sb.GetSaved().GetBytes()) / (1 << 20)
		size, err := fileSize(logPath)
		if err != nil {
			return row, fmt.Errorf("the sandbox's log: %w", err)
		}
		t0 = time.Now()
		r, err := api.sandboxes.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Sandbox: id}))
		if err != nil {
			return row, fmt.Errorf("resume %d: %w", i+1, err)
		}
		if how := r.Msg.GetSandbox().GetDetails()["start_mode"]; how != "resume" {
			return row, fmt.Errorf("resume %d: the node started it by %q, not by resuming", i+1, how)
		}
		if err := waitGrowth(ctx, logPath, size, 30*time.Second); err != nil {
			return row, fmt.Errorf("resume %d: %w", i+1, err)
		}
		resumes = append(resumes, ms(time.Since(t0)))
	}
	row.Pause, row.Resume = summarize(pauses), summarize(resumes)
	// Forks of it: each run checks the copies run and say they were forked.
	for _, n := range []int{1, 10} {
		t0 := time.Now()
		r, err := api.sandboxes.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{Sandbox: id, Count: int32(n)}))
		took := ms(time.Since(t0))
		if err != nil {
			return row, fmt.Errorf("fork x%d: %w", n, err)
		}
		var pids []string
		for _, f := range r.Msg.GetForks() {
			how := f.GetDetails()["start_mode"]
			defer api.remove(context.WithoutCancel(ctx), f.GetId())
			if f.GetStatus() != "running" || how != "fork" {
				return row, fmt.Errorf("fork x%d: a copy is %s, started by %q", n, f.GetStatus(), how)
			}
			pids = append(pids, f.GetDetails()["pid"])
		}
		if len(r.Msg.GetForks()) != n {
			return row, fmt.Errorf("fork x%d: %d copies", n, len(r.Msg.GetForks()))
		}
		if n == 10 {
			if row.Forks10PssMiB, err = pssMiB(pids); err != nil {
				return row, fmt.Errorf("fork x%d: %w", n, err)
			}
		}
		for _, f := range r.Msg.GetForks() {
			api.remove(context.WithoutCancel(ctx), f.GetId())
		}
		if n == 1 {
			row.Fork1Ms = took
		} else {
			row.Fork10Ms = took
		}
	}
	// The baseline for the forks' memory: 10 sandboxes started as any is.
	var pids []string
	for i := range 10 {
		sid, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: pauseProgram, MemoryMib: int32(mem)})
		if err != nil {
			return row, fmt.Errorf("independent sandbox %d: %w", i+1, err)
		}
		defer api.remove(context.WithoutCancel(ctx), sid)
		got, err := api.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: sid}))
		if err != nil {
			return row, err
		}
		pids = append(pids, got.Msg.GetSandbox().GetDetails()["pid"])
		row.IndepMode = got.Msg.GetSandbox().GetDetails()["start_mode"]
	}
	if row.Indep10PssMiB, err = pssMiB(pids); err != nil {
		return row, fmt.Errorf("independent sandboxes: %w", err)
	}
	// Snapshots of it, each checked to be of the kind it names.
	for _, memory := range []bool{false, true} {
		t0 := time.Now()
		r, err := api.sandboxes.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{Sandbox: id, Name: fmt.Sprintf("bench-%d-%v", mem, memory), Memory: memory}))
		took := ms(time.Since(t0))
		if err != nil {
			return row, fmt.Errorf("snapshot (memory %v): %w", memory, err)
		}
		snap := r.Msg.GetSnapshot()
		_, _ = api.sandboxes.DeleteSnapshot(context.WithoutCancel(ctx), connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: snap.GetId()}))
		if snap.GetMemory() != memory {
			return row, fmt.Errorf("a snapshot asked with memory %v was made with memory %v", memory, snap.GetMemory())
		}
		size := float64(snap.GetBytes()) / (1 << 20)
		if memory {
			row.SnapMemMs, row.SnapMemMiB = took, size
		} else {
			row.SnapFSMs, row.SnapFSMiB = took, size
		}
	}
	return row, nil
}

// pssMiB sums the proportional set size of processes pids.
func pssMiB(pids []string) (float64, error) {
	var kib int
	for _, pid := range pids {
		b, err := os.ReadFile("/proc/" + pid + "/smaps_rollup")
		if err != nil {
			return 0, fmt.Errorf("memory of VMM %q: %w", pid, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Pss:"); ok {
				n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
				kib += n
			}
		}
	}
	return float64(kib) / 1024, nil
}

func fileSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// waitGrowth waits until the file at path is larger than size (new output logged).
func waitGrowth(ctx context.Context, path string, size int64, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if n, err := fileSize(path); err == nil && n > size {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no output from the resumed guest within %s", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
}

func printPause(w io.Writer, rows []PauseRow, accel string) {
	fmt.Fprintf(w, "\npause = the call, until the VM is saved and ended; resume = the call, until the guest's next output byte (it prints every 50 ms); %s\n", accel)
	fmt.Fprintf(w, "%-26s %5s %10s %10s %10s %10s %10s %10s %10s\n", "sandbox", "runs", "pause p50", "pause p95", "resume p50", "resume p95", "saved MiB", "fork x1", "fork x10")
	for _, r := range rows {
		fmt.Fprintf(w, "%-26s %5d %10.1f %10.1f %10.1f %10.1f %10.1f %10.0f %10.0f\n", fmt.Sprintf("%d MiB", r.MemoryMiB), r.Runs,
			r.Pause.P50, r.Pause.P95, r.Resume.P50, r.Resume.P95, r.SavedMiB, r.Fork1Ms, r.Fork10Ms)
	}
	fmt.Fprintf(w, "%-26s %14s %14s %16s %12s %12s %12s %12s\n", "sandbox", "10 forks MiB", "10 indep. MiB", "indep. started", "snap fs ms", "snap fs MiB", "snap mem ms", "snap mem MiB")
	for _, r := range rows {
		fmt.Fprintf(w, "%-26s %14.0f %14.0f %16s %12.0f %12.1f %12.0f %12.1f\n", fmt.Sprintf("%d MiB", r.MemoryMiB), r.Forks10PssMiB, r.Indep10PssMiB, r.IndepMode,
			r.SnapFSMs, r.SnapFSMiB, r.SnapMemMs, r.SnapMemMiB)
	}
	fmt.Fprintf(w, "(node memory = the VMMs' proportional set size: pages shared copy-on-write are split among their users)\n")
	if !strings.Contains(accel, "kvm") {
		fmt.Fprintf(w, "(TCG: the save and restore stream memory through QEMU either way; KVM changes the guest's own time to run again, not the copy)\n")
	}
}
