// Package bench measures what a user waits for: from the API call that asks for a
// sandbox to the command's first output byte, and to its exit. It starts the real server
// (a `fireworks dev` process) and talks to it in-process with the API client, so no CLI
// start-up is counted. One run measures, on the same image and command: cold boot,
// snapshot restore, warm-pool claim, exec in a running sandbox, and crun as the no-VM
// baseline; then guest↔host TCP with the network policy attached and detached, and HTTP
// through the ingress; then the scheduler and the control plane.
package bench

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/busybox"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// Config says what to measure and where to put things.
type Config struct {
	Runs      int    // measured starts per series
	Fireworks string // path to the fireworks binary (fireworks-init beside it)
	DataDir   string // dev server data dir; its assets/ caches the guest kernel between runs
	Out       string // JSON report path
	PNG       string // chart path ("" = none)
	Command   []string
	SkipCrun  bool
	// DensitySteps are the idle-sandbox counts the density rows measure, ascending
	// (none: no density rows).
	DensitySteps []int
	PoolSize     int // warm VMs the pool series keeps ready (default 2)
	Creates      int // control-plane creates per concurrency level (default 500)
	// The network series: SkipNetwork leaves it out; each throughput sample streams
	// NetSeconds (default 2s), NetRepeats times per direction and policy (default 3).
	SkipNetwork bool
	// SkipImages leaves out the first-start series of a large (≥1 GiB) and a small image.
	SkipImages bool
	// SkipE2B leaves out the E2B SDK rows (Sandbox.create → first output through the
	// real SDK on Node.js, installed with npm).
	SkipE2B bool
	// OnlyMigration measures the live migration series alone (on its dev server).
	OnlyMigration bool
	// OnlyE2B measures the E2B SDK rows and the crun baseline alone.
	OnlyE2B bool
	// OnlyControlPlane measures the control-plane rows alone (store and API).
	OnlyControlPlane bool
	// APIClients are the client counts of the API rows (default 1, 16, 64, 256).
	APIClients []int
	// SkipNodeScale leaves out the node autoscaler's scale-up on a Kubernetes control
	// plane (built from the module proxy by Repo/scripts/kube-tools.sh, cached);
	// NodeScaleRuns is how many scale-ups it measures (default 5).
	SkipNodeScale bool
	NodeScaleRuns int
	Repo          string // the source tree (default "."), for scripts/kube-tools.sh
	NetSeconds    time.Duration
	NetRepeats    int
	// Debug runs the bench cluster's processes at debug level and keeps their logs in
	// DataDir/cluster-logs.
	Debug      bool
	Log        *slog.Logger
	StdoutView io.Writer // where the table goes
}

// Series keys: how a series started the command.
const (
	KeyCold    = "cold"    // fireworks, --boot cold: boot the guest kernel
	KeyRestore = "restore" // fireworks, --boot restore: restore the image's template snapshot
	KeyPool    = "pool"    // fireworks, --boot auto with a warm pool: claim a paused VM
	KeyCrun    = "crun"    // crun on the same image: the no-VM baseline
	KeyExec    = "exec"    // exec in an already running sandbox
)

// Targets for the first-byte p50 under TCG (issue #4); printed beside the table, never
// asserted.
var targets = map[string]float64{KeyPool: 100, KeyRestore: 400}

// Series is one way of starting the command, measured Runs times.
type Series struct {
	Key  string `json:"key"`
	Name string `json:"name"`
	Runs int    `json:"runs"`
	// Boot is the boot mode the starts asked for; StartedBy is how the node says it
	// started them (from the sandbox's details), counted.
	Boot      string         `json:"boot,omitempty"`
	StartedBy map[string]int `json:"started_by,omitempty"`
	// NodePhases is the node's own timing of its start steps (p50 of each), which shows
	// where the first-byte time goes; the rest is the API, scheduling and output path.
	NodePhases []PhaseP50 `json:"node_phases_p50_ms,omitempty"`
	// CreateCall is the CreateSandbox call alone (the sandbox recorded, not yet started).
	CreateCall *Summary `json:"create_call_ms,omitempty"`
	// Handoff is the API → node handoff: from the sandbox's creation to the node
	// starting it (placement, and the assignment reaching the node).
	Handoff *Summary `json:"handoff_ms,omitempty"`
	// TargetP50 is the first-byte p50 this path should reach (0: none); TargetMet says
	// whether it did.
	TargetP50  float64   `json:"target_p50_ms,omitempty"`
	TargetMet  *bool     `json:"target_met,omitempty"`
	FirstByte  Summary   `json:"first_byte_ms"`
	Exit       Summary   `json:"exit_ms"`
	FirstBytes []float64 `json:"first_byte_samples_ms"`
	Exits      []float64 `json:"exit_samples_ms"`
}

// PhaseP50 is the median of one start step as the node timed it, over Count samples.
type PhaseP50 struct {
	Name  string  `json:"name"`
	P50   float64 `json:"p50"`
	Count int     `json:"count"`
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
	// TemplateBuildMs is how long building the image's template snapshot took (boot to
	// ready, save), before the measured series.
	TemplateBuildMs float64 `json:"template_build_ms,omitempty"`
	// TemplateReused: the data dir held a valid template from an earlier run.
	TemplateReused bool     `json:"template_reused,omitempty"`
	Series         []Series `json:"series"`
	// Scheduler is placement latency of the pure scheduler on synthetic clusters.
	Scheduler []SchedulerRow `json:"scheduler,omitempty"`
	// ControlPlane is create commit throughput and latency through 3 Raft servers.
	ControlPlane []RaftRow `json:"control_plane,omitempty"`
	// ControlPlaneAPI is the same through the real API: 3 `fireworks server` processes,
	// user tokens over HTTP/2, placement on simulated nodes (the store rows above are its
	// baseline: the commit alone).
	ControlPlaneAPI []APIRow `json:"control_plane_api,omitempty"`
	// Density is what idle sandboxes cost a node, per node setting.
	Density []DensityRow `json:"density,omitempty"`
	// NodeScale is the node autoscaler's scale-up on Kubernetes, beside kube-scheduler's
	// own latency in the same control plane.
	NodeScale []NodeScaleRow `json:"node_scale,omitempty"`
	// Network is guest↔host TCP and ingress HTTP (nil: not measured).
	Network *NetworkReport `json:"network,omitempty"`
	// Images is the first start of images the node does not have: pull, root disk, boot.
	Images []ImageRow `json:"images,omitempty"`
	// Pause is pause and resume of a running sandbox, per size.
	Pause []PauseRow `json:"pause,omitempty"`
	// Volumes is file I/O in the guest on a volume and on the scratch disk.
	Volumes []VolumeRow `json:"volumes,omitempty"`
	// Migrate is live migration of a running sandbox, per size and load.
	Migrate []MigrateRow `json:"migrate,omitempty"`
	// TemplatePages is what a migration could skip if the target held the template.
	TemplatePages *TemplatePages `json:"template_pages,omitempty"`
	// Errors lists the series that failed; everything else in the report was measured.
	Errors []SeriesError `json:"errors,omitempty"`
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

// SeriesError is a series that failed. One failed series never costs the others: every
// other series is still measured, printed and written, and the run fails at the end.
type SeriesError struct {
	Series string `json:"series"`
	Error  string `json:"error"`
}

func (r *Report) fail(log *slog.Logger, series string, err error) {
	log.Error("series failed; going on with the others", "series", series, "err", err)
	r.Errors = append(r.Errors, SeriesError{Series: series, Error: err.Error()})
}

// Run measures every series and writes the report. A series that fails is recorded in
// the report's Errors and the others still run; the returned error then names them all,
// after the table is printed and the report written.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Runs <= 0 {
		cfg.Runs = 50
	}
	if cfg.Creates <= 0 {
		cfg.Creates = 500
	}
	if cfg.PoolSize <= 0 {
		cfg.PoolSize = 2
	}
	if cfg.NetSeconds <= 0 {
		cfg.NetSeconds = 2 * time.Second
	}
	if cfg.NetRepeats <= 0 {
		cfg.NetRepeats = 3
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
	rep := &Report{Time: time.Now().UTC(), Image: "busybox (from the host's busybox-static)", Command: cfg.Command}
	if cfg.OnlyControlPlane {
		measureControlPlane(ctx, cfg, work, rep)
		return rep, finish(cfg, rep)
	}

	if !cfg.OnlyE2B {
		if err := measureOnDev(ctx, cfg, work, ref, rep); err != nil {
			rep.fail(cfg.Log, "fireworks dev", err)
		}
	}

	if !cfg.OnlyMigration && !cfg.OnlyE2B && len(cfg.DensitySteps) > 0 {
		rows, err := measureDensity(ctx, cfg, work, ref, cfg.DensitySteps, []densitySetting{
			{name: "TCG cache 1024 MiB (QEMU's)", tcgCache: 1024},
			{name: "TCG cache 256 MiB", tcgCache: 256},
			{name: "TCG cache 64 MiB", tcgCache: 64},
			{name: "TCG cache 64 MiB, KSM on", tcgCache: 64, ksm: true},
		})
		rep.Density = rows
		if err != nil {
			rep.fail(cfg.Log, "density", err)
		}
	}

	if !cfg.OnlyMigration && !cfg.SkipE2B {
		if err := measureE2B(ctx, cfg, img, work, rep); err != nil {
			rep.fail(cfg.Log, "E2B SDK", err)
		}
	}

	if !cfg.OnlyE2B {
		if err := measureMigrationBetweenAgents(ctx, cfg, img, work, rep); err != nil {
			rep.fail(cfg.Log, "live migration between agents", err)
		}
	}

	if !cfg.SkipCrun && !cfg.OnlyMigration {
		if err := measureCrun(ctx, cfg, img, work, rep); err != nil {
			rep.fail(cfg.Log, KeyCrun, err)
		}
		if err := measurePodman(ctx, cfg, ociDir, rep); err != nil {
			rep.fail(cfg.Log, KeyPodman, err)
		}
	}

	for _, n := range []int{100, 1000, 10000} {
		if cfg.OnlyMigration || cfg.OnlyE2B {
			break
		}
		r, err := scheduler.BenchPlacement(n, 500)
		if err != nil {
			rep.fail(cfg.Log, fmt.Sprintf("scheduler at %d nodes", n), err)
			continue
		}
		rep.Scheduler = append(rep.Scheduler, SchedulerRow{Nodes: r.Nodes, Allocations: r.Allocations, Iterations: r.Iterations,
			IndexMs: ms(r.Index), P50Ms: ms(r.P50), P99Ms: ms(r.P99)})
	}

	if !cfg.OnlyMigration && !cfg.OnlyE2B {
		measureControlPlane(ctx, cfg, work, rep)
	}

	if !cfg.OnlyMigration && !cfg.OnlyE2B && !cfg.SkipNodeScale {
		rows, err := BenchNodeScale(ctx, cmp.Or(cfg.Repo, "."), filepath.Join(work, "nodescale"), cmp.Or(cfg.NodeScaleRuns, 5), cfg.Log)
		if err != nil {
			rep.fail(cfg.Log, "node autoscaler", err)
		}
		rep.NodeScale = rows
	}

	return rep, finish(cfg, rep)
}

// measureControlPlane measures creates committed through the store of 3 servers (the
// baseline) and through the real API of 3 server processes.
func measureControlPlane(ctx context.Context, cfg Config, work string, rep *Report) {
	if rows, err := BenchRaft(ctx, filepath.Join(work, "raft"), cfg.Creates, []int{1, 16, 64}); err != nil {
		rep.fail(cfg.Log, "control plane", err)
	} else {
		rep.ControlPlane = rows
	}
	clients := cfg.APIClients
	if len(clients) == 0 {
		clients = []int{1, 16, 64, 256}
	}
	rows, err := BenchAPI(ctx, cfg.Fireworks, filepath.Join(work, "api"), cfg.Creates, clients, 100, cfg.Log)
	rep.ControlPlaneAPI = rows
	if err != nil {
		rep.fail(cfg.Log, "control plane through the API", err)
	}
}

// finish writes the report where cfg says and returns every failure in it.
func finish(cfg Config, rep *Report) error {
	var errs []error
	if cfg.Out != "" {
		data, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(cfg.Out, append(data, '\n'), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("write report %s: %w", cfg.Out, err))
		}
	}
	if cfg.PNG != "" {
		if err := WriteChart(cfg.PNG, rep); err != nil {
			errs = append(errs, fmt.Errorf("write chart %s: %w", cfg.PNG, err))
		}
	}
	if cfg.StdoutView != nil {
		PrintTable(cfg.StdoutView, rep)
	}
	for _, e := range rep.Errors {
		errs = append(errs, fmt.Errorf("series %q failed: %s", e.Series, e.Error))
	}
	return errors.Join(errs...)
}

// measureOnDev starts a `fireworks dev` server and measures every series that needs one:
// the VM start paths and the network. Each failed series is recorded and the next one
// still runs; only a server that cannot start ends them all.
func measureOnDev(ctx context.Context, cfg Config, work, ref string, rep *Report) error {
	// The dev server's built-in ingress, when this fireworks has one, for the network
	// series.
	var devFlags []string
	var ing *ingressTarget
	ingressNote := ""
	if !cfg.SkipNetwork {
		var ok bool
		if ok, ingressNote = ingressSupport(ctx, cfg.Fireworks); ok {
			addr, err := freeLoopbackAddr()
			if err != nil {
				return err
			}
			ing = &ingressTarget{addr: addr, domain: "bench.fireworks.test"}
			devFlags = []string{"--ingress-listen", ing.addr, "--ingress-domain", ing.domain}
		}
	}
	// Room for a fork of ten beside the other series' sandboxes on a small machine (the
	// scheduler overcommits vCPUs 4x; paused and idle VMs take little CPU).
	devFlags = append(devFlags, "--cpus", strconv.Itoa(max(runtime.NumCPU(), 3)))
	dev, err := startDev(ctx, cfg, work, devFlags...)
	if err != nil {
		return err
	}
	defer dev.stop()
	api, err := newAPIClient(dev.config)
	if err != nil {
		return err
	}
	rep.Accelerator, rep.Kernel = api.info(ctx)

	if cfg.OnlyMigration {
		if _, err := api.startOnce(ctx, ref, cfg.Command, "cold"); err != nil {
			return fmt.Errorf("warm-up start: %w", err)
		}
	} else if !cfg.SkipImages {
		if err := measureImages(ctx, cfg, api, rep); err != nil {
			rep.fail(cfg.Log, "images", err)
		}
	}
	if !cfg.OnlyMigration {
		measureVMs(ctx, cfg, api, ref, rep)
	}
	// In place: how an operator replaces QEMU under a dev node's sandboxes. The sizes
	// and loads are measured between agents (measureMigrationBetweenAgents).
	mrows, err := measureMigration(ctx, cfg, api, ref, MigrateInPlace, []migrateShape{{mem: 256}})
	rep.Migrate = append(rep.Migrate, mrows...)
	if err != nil {
		rep.fail(cfg.Log, "live migration in place", err)
	}
	if tp, err := measureTemplatePages(ctx, cfg, api, ref, 256); err != nil {
		rep.fail(cfg.Log, "template-equal pages", err)
	} else {
		rep.TemplatePages = &tp
	}
	if !cfg.SkipNetwork && !cfg.OnlyMigration {
		if rep.Network, err = measureNetwork(ctx, cfg, api, ref, ing, ingressNote); err != nil {
			rep.fail(cfg.Log, "network", err)
		}
	}
	return nil
}

// measureMigrationBetweenAgents builds the bench cluster (a server and two agents, each
// in a network namespace of its own) and measures live migration between the agents for
// 256 MiB and 1 GiB guests, idle and dirtying memory.
func measureMigrationBetweenAgents(ctx context.Context, cfg Config, img v1.Image, work string, rep *Report) error {
	c, err := startCluster(ctx, cfg, filepath.Join(work, "cluster"), img)
	if err != nil {
		return fmt.Errorf("bench cluster: %w", err)
	}
	defer c.stop()
	rows, err := measureMigration(ctx, cfg, c.api, c.ref, MigrateBetweenAgents,
		[]migrateShape{{mem: 256}, {mem: 256, dirty: true}, {mem: 1024}, {mem: 1024, dirty: true}})
	rep.Migrate = append(rep.Migrate, rows...)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, c.logTail())
	}
	return nil
}

// measureCrun measures the no-VM baseline: crun on the same image and command.
func measureCrun(ctx context.Context, cfg Config, img v1.Image, work string, rep *Report) error {
	bundle, err := crunBundle(ctx, img, filepath.Join(work, "crun"), cfg.Command)
	if err != nil {
		return err
	}
	n := 0
	name, wrap := "crun (no VM)", hybridCgroups()
	if wrap {
		name = "crun (no VM, via unshare -m)"
	}
	s, err := measure(ctx, cfg, KeyCrun, name, func() (sample, error) {
		n++
		id := fmt.Sprintf("fireworks-bench-%d-%d", os.Getpid(), n)
		var cmd *exec.Cmd
		if wrap {
			// crun refuses a cgroup v1/v2 hybrid whose v2 half has controllers; hide the
			// v2 mount in a private mount namespace. This adds a couple of ms to the
			// baseline, which only flatters the VM.
			cmd = exec.CommandContext(ctx, "unshare", "-m", "sh", "-c",
				`umount /sys/fs/cgroup/unified && exec crun run --bundle "$1" "$2"`, "sh", bundle, id)
		} else {
			cmd = exec.CommandContext(ctx, "crun", "run", "--bundle", bundle, id)
		}
		first, exit, err := timeCommand(ctx, cmd)
		return sample{first: first, exit: exit}, err
	})
	if err != nil {
		return err
	}
	rep.Series = append(rep.Series, s)
	return nil
}

// measureVMs measures the fireworks series through the API: cold boot, snapshot restore,
// warm-pool claim, and exec in a running sandbox. A failed series is recorded in rep and
// the next one still runs; only a failed first start (the image cannot be pulled or
// booted at all) ends them.
func measureVMs(ctx context.Context, cfg Config, api *apiClient, ref string, rep *Report) {
	accel := " (" + rep.Accelerator + ")"
	// The first start pulls the image and builds its root disk; then the template
	// snapshot is built once. Every measured start after that finds all three ready.
	cfg.Log.Info("warming the image cache")
	if _, err := api.startOnce(ctx, ref, cfg.Command, "cold"); err != nil {
		rep.fail(cfg.Log, "fireworks VM starts", fmt.Errorf("warm-up start: %w", err))
		return
	}
	cfg.Log.Info("building the template snapshot")
	if built, build, err := api.warmImage(ctx, ref); err != nil {
		rep.fail(cfg.Log, "template snapshot", err)
	} else {
		rep.TemplateBuildMs, rep.TemplateReused = ms(build), !built
	}

	for _, m := range []struct{ key, boot, name string }{
		{KeyCold, "cold", "fireworks cold boot"},
		{KeyRestore, "restore", "fireworks snapshot restore"},
	} {
		// One unmeasured restore first: the first one after the build pages the
		// template's memory file in, which no later start pays. (The cold series' warm-up
		// was the image cache's.)
		if m.key == KeyRestore {
			if _, err := api.startOnce(ctx, ref, cfg.Command, m.boot); err != nil {
				rep.fail(cfg.Log, m.key, fmt.Errorf("%s warm-up start: %w", m.name, err))
				continue
			}
		}
		s, err := measure(ctx, cfg, m.key, m.name+accel, func() (sample, error) {
			return api.startOnce(ctx, ref, cfg.Command, m.boot)
		})
		if err != nil {
			rep.fail(cfg.Log, m.key, err)
			continue
		}
		s.Boot = m.boot
		rep.Series = append(rep.Series, s)
	}

	if s, err := measurePool(ctx, cfg, api, ref, accel); err != nil {
		rep.fail(cfg.Log, KeyPool, err)
	} else {
		rep.Series = append(rep.Series, s)
	}
	if s, err := measureExec(ctx, cfg, api, ref, accel); err != nil {
		rep.fail(cfg.Log, KeyExec, err)
	} else {
		rep.Series = append(rep.Series, s)
	}
	rows, err := measurePauseResume(ctx, cfg, api, ref)
	rep.Pause = rows
	if err != nil {
		rep.fail(cfg.Log, "pause and resume", err)
	}
	groups, err := measureGroups(ctx, cfg, api, ref, accel)
	rep.Series = append(rep.Series, groups...)
	if err != nil {
		rep.fail(cfg.Log, "groups", err)
	}
	vrows, err := measureVolumes(ctx, cfg, api, ref)
	rep.Volumes = vrows
	if err != nil {
		rep.fail(cfg.Log, "volumes", err)
	}

}

// measurePool: every measured start claims a VM that waited ready; the refill after each
// claim runs between starts and is not counted.
func measurePool(ctx context.Context, cfg Config, api *apiClient, ref, accel string) (Series, error) {
	if err := api.setPool(ctx, ref, cfg.PoolSize); err != nil {
		return Series{}, err
	}
	poolWait := 5 * time.Minute // the first fill restores PoolSize VMs
	s, err := measure(ctx, cfg, KeyPool, "fireworks warm-pool claim"+accel, func() (sample, error) {
		if err := api.waitPoolReady(ctx, ref, poolWait); err != nil {
			return sample{}, err
		}
		poolWait = time.Minute
		return api.startOnce(ctx, ref, cfg.Command, "auto")
	})
	// The pool goes whatever happened, so the exec series and the server's shutdown do
	// not share the machine with paused VMs.
	if derr := api.deletePool(context.WithoutCancel(ctx), ref); derr != nil && err == nil {
		err = derr
	}
	s.Boot = "auto"
	return s, err
}

// measureExec times exec in one running sandbox.
func measureExec(ctx context.Context, cfg Config, api *apiClient, ref, accel string) (Series, error) {
	id, err := api.startLongRunning(ctx, ref, []string{"sleep", "3600"})
	if err != nil {
		return Series{}, err
	}
	defer api.remove(context.WithoutCancel(ctx), id)
	if _, err := api.execOnce(ctx, id, cfg.Command); err != nil {
		return Series{}, fmt.Errorf("warm-up exec: %w", err)
	}
	return measure(ctx, cfg, KeyExec, "fireworks exec in a running sandbox"+accel, func() (sample, error) {
		return api.execOnce(ctx, id, cfg.Command)
	})
}

// PrintTable writes the report as aligned tables.
func PrintTable(w io.Writer, rep *Report) {
	fmt.Fprintf(w, "accelerator: %s   guest kernel: %s   command: %s\n", rep.Accelerator, rep.Kernel, strings.Join(rep.Command, " "))
	switch {
	case rep.TemplateBuildMs > 0:
		fmt.Fprintf(w, "template snapshot built in %.0f ms\n", rep.TemplateBuildMs)
	case rep.TemplateReused:
		fmt.Fprintf(w, "template snapshot: kept in the data dir from an earlier run\n")
	}
	fmt.Fprintf(w, "first byte = API call to the command's first stdout byte (crun, podman: process start); exit = to the exit; all in ms\n")
	fmt.Fprintf(w, "%-42s %4s %9s %9s %9s %9s %9s %9s %9s  %-10s %-4s %s\n",
		"start path", "runs", "p50", "p95", "p99", "min", "max", "p50 exit", "p95 exit", "target p50", "met?", "started by (node says)")
	for _, s := range rep.Series {
		target, met := "", ""
		if s.TargetP50 > 0 {
			target = fmt.Sprintf("<= %.0f", s.TargetP50)
			if s.TargetMet != nil {
				met = map[bool]string{true: "yes", false: "no"}[*s.TargetMet]
			}
		}
		f := s.FirstByte
		fmt.Fprintf(w, "%-42s %4d %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f  %-10s %-4s %s\n",
			s.Name, s.Runs, f.P50, f.P95, f.P99, f.Min, f.Max, s.Exit.P50, s.Exit.P95, target, met, describeHow(s.StartedBy))
	}
	for _, s := range rep.Series {
		if len(s.NodePhases) == 0 {
			continue
		}
		var parts []string
		sum := 0.0
		for _, p := range s.NodePhases {
			parts = append(parts, fmt.Sprintf("%s %.1f", p.Name, p.P50))
			sum += p.P50
		}
		create := ""
		if s.CreateCall != nil {
			create = fmt.Sprintf("; CreateSandbox call p50 %.1f", s.CreateCall.P50)
		}
		if s.Handoff != nil {
			create += fmt.Sprintf("; API→node handoff p50 %.1f p99 %.1f", s.Handoff.P50, s.Handoff.P99)
		}
		fmt.Fprintf(w, "  %s, node phases p50 (sum %.1f of first-byte p50 %.1f): %s%s\n", s.Name, sum, s.FirstByte.P50, strings.Join(parts, ", "), create)
	}
	if len(rep.Images) > 0 {
		fmt.Fprintf(w, "\nfirst start of an image the node does not have (pull from a loopback registry, root disk, cold boot; checked not cached)\n")
		fmt.Fprintf(w, "%-28s %7s %10s %10s %10s %10s %10s %10s %10s\n", "image", "files", "size MiB", "gzip MiB", "pull ms", "MiB/s", "rootdisk", "MiB/s", "1st byte")
		for _, r := range rep.Images {
			fmt.Fprintf(w, "%-28s %7d %10.1f %10.1f %10.0f %10.1f %10.0f %10.1f %10.0f\n", r.Image, r.Files, r.UncompressedMiB, r.CompressedMiB,
				r.PullMs, r.PullMiBps, r.RootDiskMs, r.RootDiskMiBps, r.FirstByteMs)
		}
	}
	if len(rep.Pause) > 0 {
		printPause(w, rep.Pause, rep.Accelerator)
	}
	if len(rep.Density) > 0 {
		printDensity(w, rep.Density, rep.Accelerator)
	}
	if len(rep.Volumes) > 0 {
		printVolumes(w, rep.Volumes, rep.Accelerator)
	}
	if len(rep.Migrate) > 0 {
		printMigration(w, rep.Migrate, rep.TemplatePages, rep.Accelerator)
	}
	if rep.Network != nil {
		printNetwork(w, rep.Network, rep.Accelerator)
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
	if len(rep.ControlPlaneAPI) > 0 {
		fmt.Fprintf(w, "\n%-40s %8s %12s %12s %12s  %s\n", "creates through the API (3 servers)", "creates", "creates/s", "create p50", "create p99", "checked: placed on a simulated node / via a follower")
		for _, r := range rep.ControlPlaneAPI {
			fmt.Fprintf(w, "%-40s %8d %12.0f %10.2fms %10.2fms  %d/%d placed on %d nodes, %d forwarded\n", fmt.Sprintf("%d clients, %d nodes", r.Clients, r.Nodes), r.Creates, r.PerSecond, r.P50Ms, r.P99Ms, r.Placed, r.Creates, r.Nodes, r.Forwarded)
		}
		fmt.Fprintf(w, "goal: >= %d creates/s and p99 <= %d ms at %d clients\n", apiGoalPerSecond, apiGoalP99Ms, apiGoalClients)
	}
	if len(rep.NodeScale) > 0 {
		fmt.Fprintf(w, "\n%-72s %4s %9s %9s %9s  %s\n", "node autoscaler on Kubernetes (real control plane, simulated pool)", "runs", "p50 ms", "p99 ms", "max ms", "each run checked")
		for _, r := range rep.NodeScale {
			fmt.Fprintf(w, "%-72s %4d %9.1f %9.1f %9.1f  %s\n", r.Path, r.Runs, r.Latency.P50, r.Latency.P99, r.Latency.Max, r.Checked)
		}
	}
	if len(rep.Errors) > 0 {
		fmt.Fprintf(w, "\nFAILED series (everything above was measured without them):\n")
		for _, e := range rep.Errors {
			fmt.Fprintf(w, "  %s: %s\n", e.Series, e.Error)
		}
	}
}

func measure(ctx context.Context, cfg Config, key, name string, one func() (sample, error)) (Series, error) {
	s := Series{Key: key, Name: name, Runs: cfg.Runs}
	cfg.Log.Info("measuring", "series", name, "runs", cfg.Runs)
	var samples []sample
	for i := 0; i < cfg.Runs; i++ {
		if err := ctx.Err(); err != nil {
			return s, fmt.Errorf("%s, run %d: %w", name, i+1, err)
		}
		x, err := one()
		if err != nil {
			return s, fmt.Errorf("%s, run %d: %w", name, i+1, err)
		}
		samples = append(samples, x)
		s.FirstBytes = append(s.FirstBytes, ms(x.first))
		s.Exits = append(s.Exits, ms(x.exit))
	}
	s.StartedBy = countHow(samples)
	s.NodePhases = summarizePhases(samples)
	var creates []float64
	for _, x := range samples {
		if x.create > 0 {
			creates = append(creates, ms(x.create))
		}
	}
	if len(creates) > 0 {
		c := summarize(creates)
		s.CreateCall = &c
	}
	var handoffs []float64
	for _, x := range samples {
		if x.handoff > 0 {
			handoffs = append(handoffs, ms(x.handoff))
		}
	}
	if len(handoffs) > 0 {
		h := summarize(handoffs)
		s.Handoff = &h
	}
	s.FirstByte, s.Exit = summarize(s.FirstBytes), summarize(s.Exits)
	if t, ok := targets[key]; ok {
		met := s.FirstByte.P50 <= t
		s.TargetP50, s.TargetMet = t, &met
	}
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
