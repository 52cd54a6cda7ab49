// Package bench measures what a user waits for: from asking for a sandbox to the
// command's first output byte, and to its exit. It drives the real binaries as a user
// would (a `fireworks dev` process, the `fireworks` CLI) and runs the same image and
// command under crun in the same run, as the no-VM baseline.
package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/fireworks-sandbox/fireworks/internal/image/busybox"
	"github.com/fireworks-sandbox/fireworks/internal/scheduler"
)

// Config says what to measure and where to put things.
type Config struct {
	Runs       int    // measured starts per series
	Fireworks  string // path to the fireworks binary (fireworks-init beside it)
	DataDir    string // dev server data dir; its assets/ caches the guest kernel between runs
	Out        string // JSON report path
	Command    []string
	SkipCrun   bool
	Creates    int // control-plane creates per concurrency level (default 500)
	Log        *slog.Logger
	StdoutView io.Writer // where the table goes
}

// Series is one way of starting the command, measured Runs times.
type Series struct {
	Name       string    `json:"name"`
	Runs       int       `json:"runs"`
	FirstByte  Summary   `json:"first_byte_ms"`
	Exit       Summary   `json:"exit_ms"`
	FirstBytes []float64 `json:"first_byte_samples_ms"`
	Exits      []float64 `json:"exit_samples_ms"`
}

// Summary is a distribution in milliseconds.
type Summary struct {
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	P99 float64 `json:"p99"`
	Min float64 `json:"min"`
	Max float64 `json:"max"`
}

// Report is what one bench run writes.
type Report struct {
	Time        time.Time `json:"time"`
	Accelerator string    `json:"accelerator"`
	Kernel      string    `json:"guest_kernel"`
	Image       string    `json:"image"`
	Command     []string  `json:"command"`
	Series      []Series  `json:"series"`
	// Scheduler is placement latency of the pure scheduler on synthetic clusters.
	Scheduler []SchedulerRow `json:"scheduler,omitempty"`
	// ControlPlane is create commit throughput and latency through 3 Raft servers.
	ControlPlane []RaftRow `json:"control_plane,omitempty"`
}

// SchedulerRow is one synthetic cluster size.
type SchedulerRow struct {
	Nodes       int     `json:"nodes"`
	Allocations int     `json:"allocations"`
	Iterations  int     `json:"iterations"`
	IndexMs     float64 `json:"index_build_ms"`
	P50Ms       float64 `json:"place_p50_ms"`
	P99Ms       float64 `json:"place_p99_ms"`
}

// Run measures every series and writes the report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Runs <= 0 {
		cfg.Runs = 20
	}
	if cfg.Creates <= 0 {
		cfg.Creates = 500
	}
	if len(cfg.Command) == 0 {
		cfg.Command = []string{"echo", "ready"}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	work, err := os.MkdirTemp("", "fireworks-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	img, err := busybox.Image()
	if err != nil {
		return nil, fmt.Errorf("build bench image: %w", err)
	}
	ociDir := filepath.Join(work, "oci")
	p, err := layout.Write(ociDir, empty.Index)
	if err != nil {
		return nil, fmt.Errorf("write OCI layout %s: %w", ociDir, err)
	}
	if err := p.AppendImage(img); err != nil {
		return nil, fmt.Errorf("write bench image to %s: %w", ociDir, err)
	}
	ref := "oci:" + ociDir

	dev, err := startDev(ctx, cfg, work)
	if err != nil {
		return nil, err
	}
	defer dev.stop()
	rep := &Report{Time: time.Now().UTC(), Image: "busybox (from the host's busybox-static)", Command: cfg.Command}
	rep.Accelerator, rep.Kernel = dev.info(ctx)

	// The first run pulls the image and builds its root disk: "image cached" means every
	// measured run after it finds both ready.
	cfg.Log.Info("warming the image cache")
	if _, _, err := timeCommand(ctx, dev.command(append([]string{"run", "--rm", ref, "--"}, cfg.Command...)...)); err != nil {
		return nil, fmt.Errorf("warm-up run: %w", err)
	}
	cold, err := measure(ctx, cfg, "fireworks cold boot ("+rep.Accelerator+")", func() *exec.Cmd {
		return dev.command(append([]string{"run", "--rm", ref, "--"}, cfg.Command...)...)
	})
	if err != nil {
		return nil, err
	}
	rep.Series = append(rep.Series, cold)

	if !cfg.SkipCrun {
		bundle, err := crunBundle(ctx, img, filepath.Join(work, "crun"), cfg.Command)
		if err != nil {
			return nil, err
		}
		n := 0
		name, wrap := "crun (no VM)", hybridCgroups()
		if wrap {
			name = "crun (no VM, via unshare -m)"
		}
		s, err := measure(ctx, cfg, name, func() *exec.Cmd {
			n++
			id := fmt.Sprintf("fireworks-bench-%d-%d", os.Getpid(), n)
			if wrap {
				// crun refuses a cgroup v1/v2 hybrid whose v2 half has controllers; hide the
				// v2 mount in a private mount namespace. This adds a couple of ms to the
				// baseline, which only flatters the VM.
				return exec.CommandContext(ctx, "unshare", "-m", "sh", "-c",
					`umount /sys/fs/cgroup/unified && exec crun run --bundle "$1" "$2"`, "sh", bundle, id)
			}
			return exec.CommandContext(ctx, "crun", "run", "--bundle", bundle, id)
		})
		if err != nil {
			return nil, err
		}
		rep.Series = append(rep.Series, s)
	}

	for _, n := range []int{100, 1000, 10000} {
		r, err := scheduler.BenchPlacement(n, 500)
		if err != nil {
			return nil, fmt.Errorf("scheduler bench at %d nodes: %w", n, err)
		}
		rep.Scheduler = append(rep.Scheduler, SchedulerRow{Nodes: r.Nodes, Allocations: r.Allocations, Iterations: r.Iterations,
			IndexMs: ms(r.Index), P50Ms: ms(r.P50), P99Ms: ms(r.P99)})
	}

	cpRows, err := BenchRaft(ctx, filepath.Join(work, "raft"), cfg.Creates, []int{1, 16, 64})
	if err != nil {
		return nil, fmt.Errorf("control-plane bench: %w", err)
	}
	rep.ControlPlane = cpRows

	if cfg.Out != "" {
		data, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(cfg.Out, append(data, '\n'), 0o644); err != nil {
			return nil, fmt.Errorf("write report %s: %w", cfg.Out, err)
		}
	}
	if cfg.StdoutView != nil {
		PrintTable(cfg.StdoutView, rep)
	}
	return rep, nil
}

// PrintTable writes the report as an aligned table.
func PrintTable(w io.Writer, rep *Report) {
	fmt.Fprintf(w, "accelerator: %s   guest kernel: %s   command: %s\n", rep.Accelerator, rep.Kernel, strings.Join(rep.Command, " "))
	fmt.Fprintf(w, "%-36s %5s %12s %12s %12s %12s\n", "start path", "runs", "p50 1st byte", "p95 1st byte", "p50 exit", "p95 exit")
	for _, s := range rep.Series {
		fmt.Fprintf(w, "%-36s %5d %10.1fms %10.1fms %10.1fms %10.1fms\n", s.Name, s.Runs, s.FirstByte.P50, s.FirstByte.P95, s.Exit.P50, s.Exit.P95)
	}
	if len(rep.Scheduler) > 0 {
		fmt.Fprintf(w, "\n%-12s %12s %12s %12s %12s\n", "scheduler", "allocations", "index build", "place p50", "place p99")
		for _, r := range rep.Scheduler {
			fmt.Fprintf(w, "%6d nodes %12d %10.3fms %10.3fms %10.3fms\n", r.Nodes, r.Allocations, r.IndexMs, r.P50Ms, r.P99Ms)
		}
	}
	if len(rep.ControlPlane) > 0 {
		fmt.Fprintf(w, "\n%-28s %8s %12s %12s %12s\n", "control plane (3 servers)", "creates", "creates/s", "commit p50", "commit p99")
		for _, r := range rep.ControlPlane {
			fmt.Fprintf(w, "%-28s %8d %12.0f %10.2fms %10.2fms\n", fmt.Sprintf("%d concurrent clients", r.Concurrency), r.Creates, r.PerSecond, r.P50Ms, r.P99Ms)
		}
	}
}

func measure(ctx context.Context, cfg Config, name string, mk func() *exec.Cmd) (Series, error) {
	s := Series{Name: name, Runs: cfg.Runs}
	cfg.Log.Info("measuring", "series", name, "runs", cfg.Runs)
	for i := 0; i < cfg.Runs; i++ {
		first, exit, err := timeCommand(ctx, mk())
		if err != nil {
			return s, fmt.Errorf("%s, run %d: %w", name, i+1, err)
		}
		s.FirstBytes = append(s.FirstBytes, ms(first))
		s.Exits = append(s.Exits, ms(exit))
	}
	s.FirstByte, s.Exit = summarize(s.FirstBytes), summarize(s.Exits)
	return s, nil
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/float64(time.Microsecond)) / 1000 }

// timeCommand runs cmd and returns when its first stdout byte arrived and when it exited,
// both from the moment it was started.
func timeCommand(ctx context.Context, cmd *exec.Cmd) (first, exit time.Duration, err error) {
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	r := bufio.NewReader(out)
	if _, err := r.ReadByte(); err == nil {
		first = time.Since(start)
	}
	_, _ = io.Copy(io.Discard, r)
	if err := cmd.Wait(); err != nil {
		return 0, 0, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(stderr.String()))
	}
	exit = time.Since(start)
	if first == 0 {
		return 0, 0, fmt.Errorf("%s printed nothing", strings.Join(cmd.Args, " "))
	}
	return first, exit, nil
}

func summarize(xs []float64) Summary {
	s := slices.Clone(xs)
	slices.Sort(s)
	q := func(p float64) float64 {
		if len(s) == 0 {
			return 0
		}
		// Nearest rank: the smallest sample with at least p of the samples at or below it.
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	if len(s) == 0 {
		return Summary{}
	}
	return Summary{P50: q(0.50), P95: q(0.95), P99: q(0.99), Min: s[0], Max: s[len(s)-1]}
}

// hybridCgroups reports a cgroup v1 hierarchy with a v2 mount beside it that has
// controllers, which crun refuses to run under.
func hybridCgroups() bool {
	b, err := os.ReadFile("/sys/fs/cgroup/unified/cgroup.controllers")
	return err == nil && strings.TrimSpace(string(b)) != ""
}
