// Command fireworks-bench measures sandbox start latency (cold boot, snapshot restore,
// warm-pool claim, exec) against crun on the same image and command, and guest↔host TCP
// with the network policy attached and detached and HTTP through the ingress; it prints
// a table, writes the figures as JSON and draws the start distributions as a PNG (see
// internal/bench). It runs in a network namespace of its own unless told otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/bench"
)

func main() {
	var cfg bench.Config
	var command string
	flag.IntVar(&cfg.Runs, "runs", 50, "measured starts per series")
	flag.StringVar(&cfg.Fireworks, "fireworks", "bin/fireworks", "fireworks binary (fireworks-init beside it)")
	flag.StringVar(&cfg.DataDir, "data-dir", "/var/tmp/fireworks-bench", "data dir of the bench's own `fireworks dev` (keeps the guest kernel between runs)")
	flag.StringVar(&cfg.Out, "out", "bench-results.json", "JSON report path")
	flag.StringVar(&cfg.PNG, "png", "", "chart path (default: the JSON path with .png; \"-\" for none)")
	flag.IntVar(&cfg.PoolSize, "pool-size", 2, "warm VMs the warm-pool series keeps ready")
	flag.StringVar(&command, "command", "echo ready", "command to run (split on spaces)")
	flag.BoolVar(&cfg.SkipCrun, "skip-crun", false, "do not measure the container baselines (crun, podman run --rm)")
	flag.IntVar(&cfg.Creates, "creates", 500, "control-plane creates per concurrency level")
	flag.BoolVar(&cfg.SkipNetwork, "skip-network", false, "do not measure the network series")
	density := flag.String("density", "10,100", "idle sandboxes per density step, comma-separated (\"\": skip the density rows)")
	flag.BoolVar(&cfg.OnlyControlPlane, "only-control-plane", false, "measure the control-plane rows alone (creates through the store and through the API)")
	flag.BoolVar(&cfg.OnlyMigration, "only-migration", false, "measure the live migration series alone")
	flag.BoolVar(&cfg.OnlyE2B, "only-e2b", false, "measure the E2B SDK rows (and the crun baseline) alone")
	flag.BoolVar(&cfg.SkipImages, "skip-images", false, "do not measure the first start of a large (≥1 GiB) and a small image")
	flag.BoolVar(&cfg.SkipNodeScale, "skip-nodescale", false, "do not measure the node autoscaler's scale-up on a Kubernetes control plane (its tools are built by scripts/kube-tools.sh, cached)")
	flag.IntVar(&cfg.NodeScaleRuns, "nodescale-runs", 5, "scale-ups the node autoscaler series measures")
	flag.BoolVar(&cfg.SkipE2B, "skip-e2b", false, "do not measure Sandbox.create → first output through the real e2b SDK (Node.js, npm)")
	flag.DurationVar(&cfg.NetSeconds, "net-time", 2*time.Second, "how long each throughput sample streams")
	flag.IntVar(&cfg.NetRepeats, "net-repeats", 3, "throughput samples per direction, policy attached and detached")
	debug := flag.Bool("debug", false, "log each measurement's details (e.g. every migration's nodes and timings); the bench cluster's processes log at debug level into DATA-DIR/cluster-logs")
	hostNetwork := flag.Bool("host-network", false, "run in the machine's network namespace instead of a private one (sandbox networks and NAT rules then land on the machine)")
	flag.Parse()
	for _, f := range strings.Split(*density, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "-density %q: want counts like 10,100\n", *density)
			os.Exit(2)
		}
		cfg.DensitySteps = append(cfg.DensitySteps, n)
	}
	cfg.Command = strings.Fields(command)
	switch {
	case cfg.PNG == "-" || (cfg.PNG == "" && cfg.Out == ""):
		cfg.PNG = ""
	case cfg.PNG == "":
		cfg.PNG = strings.TrimSuffix(cfg.Out, filepath.Ext(cfg.Out)) + ".png"
	}
	cfg.StdoutView = os.Stdout
	if *debug {
		cfg.Debug = true
		cfg.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if abs, err := filepath.Abs(cfg.Fireworks); err == nil {
		cfg.Fireworks = abs
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if !*hostNetwork {
		code, again, err := bench.InPrivateNetNS(ctx, cfg.DataDir)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fireworks-bench:", err)
		}
		if again {
			stop()
			os.Exit(code)
		}
	}
	_, err := bench.Run(ctx, cfg)
	// The report is written whatever failed: a failed series is listed in it.
	for _, f := range []string{cfg.Out, cfg.PNG} {
		if _, serr := os.Stat(f); f != "" && serr == nil {
			fmt.Printf("wrote %s\n", f)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fireworks-bench:", err)
		os.Exit(1)
	}
}
