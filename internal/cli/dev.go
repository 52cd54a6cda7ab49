package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"connectrpc.com/connect"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/fireworks-sandbox/fireworks/internal/cluster/devproc"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// DefaultDataDir is where `fireworks dev` keeps state, images, assets and logs.
func DefaultDataDir() string {
	if d := os.Getenv("FIREWORKS_DATA_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/fireworks"
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "share", "fireworks")
}

// findInitBinary locates the guest init: flag, $FIREWORKS_INIT, or beside this executable.
func findInitBinary(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if p := os.Getenv("FIREWORKS_INIT"); p != "" {
		return p, nil
	}
	exe, err := os.Executable()
	if err == nil {
		p := filepath.Join(filepath.Dir(exe), "fireworks-init")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("cannot find the fireworks-init binary: build it with `make build` (it goes beside bin/fireworks), or pass --init-binary / set FIREWORKS_INIT")
}

type devFlags struct {
	dataDir, listen, accel, initBinary, node string
	logLevel, labels                         string
	cpus, memoryMiB                          int
	warm                                     warmFlags
	net                                      nodeNetFlags
	// The built-in ingress, in-process, and the xDS feed (see runDevIngress).
	ingressListen, ingressDomain, xdsListen string
	ingressTLSCert, ingressTLSKey           string
	noE2BAPI                                bool
	limits                                  server.Limits
}

func newDevCmd(g *globals) *cobra.Command {
	var f devFlags
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run the whole platform on this machine: API server, single-node Raft state and a node agent",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDev(cmd.Context(), g, f)
		},
	}
	cmd.Flags().StringVar(&f.dataDir, "data-dir", DefaultDataDir(), "state, images, guest assets and logs")
	cmd.Flags().StringVar(&f.listen, "listen", strings.TrimPrefix(client.DefaultServer, "http://"), "API listen address")
	cmd.Flags().StringVar(&f.accel, "accel", "auto", "accelerator: auto, kvm or tcg")
	cmd.Flags().StringVar(&f.initBinary, "init-binary", "", "guest init binary (default: fireworks-init beside this executable)")
	cmd.Flags().StringVar(&f.node, "node", "", "node name (default: hostname)")
	cmd.Flags().StringVar(&f.labels, "label", "", "node labels key=value, comma-separated (for --constraint)")
	cmd.Flags().IntVar(&f.cpus, "cpus", 0, "vCPUs the node offers to sandboxes (default: the host's cores; the scheduler overcommits them 4x)")
	cmd.Flags().IntVar(&f.memoryMiB, "memory", 0, "memory the node offers to sandboxes, MiB (default: 75% of the host's)")
	cmd.Flags().StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	f.warm.register(cmd.Flags())
	f.net.register(cmd.Flags())
	registerDevIngressFlags(cmd, &f)
	registerLimitFlags(cmd.Flags(), &f.limits)
	return cmd
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

func accelFlag(s string) (string, error) {
	switch s {
	case "", "auto":
		return "", nil
	case "kvm", "tcg":
		return s, nil
	}
	return "", fmt.Errorf("invalid --accel %q: want auto, kvm or tcg", s)
}

func runDev(ctx context.Context, g *globals, f devFlags) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := newLogger(f.logLevel)
	// Packages that log through slog.Default (asset fetching) should match the server's format.
	slog.SetDefault(log)
	accel, err := accelFlag(f.accel)
	if err != nil {
		return err
	}
	initBin, err := findInitBinary(f.initBinary)
	if err != nil {
		return err
	}
	labels, err := parseLabels(f.labels)
	if err != nil {
		return err
	}
	ingressTLS, err := loadServingTLS(f.ingressTLSCert, f.ingressTLSKey)
	if err != nil {
		return fmt.Errorf("--ingress-tls-cert/--ingress-tls-key: %w", err)
	}
	cfg := devproc.DevConfig{
		IngressTLS: ingressTLS, E2BAPI: !f.noE2BAPI,
		Labels:  labels,
		DataDir: f.dataDir, Listen: f.listen, Limits: f.limits,
		IngressListen: f.ingressListen, IngressDomain: f.ingressDomain, XDSListen: f.xdsListen, Log: log,
		Agent: agent.Config{DataDir: f.dataDir, Node: f.node, InitBinary: initBin, Accel: accel, MaxVCPUs: f.cpus, MaxMemoryMiB: f.memoryMiB},
		Ready: func(apiURL, token string) error {
			log.Info("CLI configured for this dev", "cli_config", client.ConfigPath())
			return client.SaveConfig(client.Config{Server: apiURL, Token: token})
		},
	}
	f.net.apply(&cfg.Agent)
	if err := f.warm.apply(&cfg.Agent); err != nil {
		return err
	}
	return devproc.RunDev(ctx, cfg)
}

func newSetupCmd(g *globals) *cobra.Command {
	var dataDir, initBinary, accelName string
	cmd := &cobra.Command{
		Use:   "setup",
		Short: "Fetch the guest kernel, build the initramfs and pick the accelerator (dev does this too)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			initBin, err := findInitBinary(initBinary)
			if err != nil {
				return err
			}
			accel, err := accelFlag(accelName)
			if err != nil {
				return err
			}
			dir := filepath.Join(dataDir, "assets")
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("create %s: %w", dir, err)
			}
			k, err := assets.EnsureKernel(ctx, dir)
			if err != nil {
				return err
			}
			ird, err := assets.BuildInitramfs(ctx, dir, k, initBin)
			if err != nil {
				return err
			}
			choice := vmm.DetectAccel(ctx, dir, accel, k.Vmlinux)
			fmt.Fprintf(g.stdout, "guest kernel:  %s (%s)\ninitramfs:     %s (version %s)\naccelerator:   %s (%s)\n",
				k.Release, k.Vmlinux, ird.Path, ird.Version, choice.Accel, choice.Reason)
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", DefaultDataDir(), "data directory")
	cmd.Flags().StringVar(&initBinary, "init-binary", "", "guest init binary")
	cmd.Flags().StringVar(&accelName, "accel", "auto", "accelerator: auto, kvm or tcg")
	return cmd
}

func newImageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Manage images on the nodes"}
	var insecure []string
	var node string
	pull := &cobra.Command{
		Use:   "pull IMAGE",
		Short: "Pull an image (registry ref, oci:DIR[:TAG] or docker-archive:FILE[:TAG])",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			stream, err := c.Images.PullImage(cmd.Context(), connect.NewRequest(&pb.PullImageRequest{Ref: localImageRef(args[0]), InsecureRegistries: insecure, Node: node}))
			if err != nil {
				return err
			}
			bars := map[string]*progressbar.ProgressBar{}
			f, isFile := g.stderr.(*os.File)
			showBars := isFile && term.IsTerminal(int(f.Fd()))
			for stream.Receive() {
				switch m := stream.Msg().Msg.(type) {
				case *pb.PullImageResponse_Progress:
					if !showBars {
						continue
					}
					p := m.Progress
					key := p.GetNode() + " " + short(strings.TrimPrefix(p.GetLayer(), "sha256:"))
					b := bars[key]
					if b == nil {
						b = progressbar.DefaultBytes(p.GetTotal(), key)
						bars[key] = b
					}
					_ = b.Set64(p.GetComplete())
				case *pb.PullImageResponse_Image:
					for _, b := range bars {
						_ = b.Finish()
					}
					fmt.Fprintln(g.stdout, strings.TrimSpace(m.Image.GetRef()+" "+m.Image.GetDigest()+" "+m.Image.GetNode()))
				}
			}
			return stream.Err()
		},
	}
	pull.Flags().StringArrayVar(&insecure, "insecure-registry", nil, "registry host that speaks plain HTTP")
	pull.Flags().StringVar(&node, "node", "", "pull on this node only (default: every ready node)")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Images.ListImages(cmd.Context(), connect.NewRequest(&pb.ListImagesRequest{Node: node}))
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stdout, "%-60s %-20s %-12s %s\n", "REF", "DIGEST", "SIZE", "NODE")
			for _, i := range resp.Msg.GetImages() {
				fmt.Fprintf(g.stdout, "%-60s %-20s %-12s %s\n", i.GetRef(), short(strings.TrimPrefix(i.GetDigest(), "sha256:")),
					fmt.Sprintf("%.1f MiB", float64(i.GetSize())/(1<<20)), i.GetNode())
			}
			return nil
		},
	}
	rm := &cobra.Command{
		Use:   "rm IMAGE...",
		Short: "Remove images",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, a := range args {
				r, err := c.Images.RemoveImage(cmd.Context(), connect.NewRequest(&pb.RemoveImageRequest{Ref: localImageRef(a), Node: node}))
				if err != nil {
					return err
				}
				fmt.Fprintln(g.stdout, a)
				if n := r.Msg.GetTemplatesDropped(); n > 0 {
					fmt.Fprintf(g.stderr, "note: %d template snapshot(s) of %s removed with it (its next start boots and builds one again)\n", n, a)
				}
				if n := r.Msg.GetSandboxesUsing(); n > 0 {
					fmt.Fprintf(g.stderr, "note: %d running sandbox(es) still use %s; its files stay until they end\n", n, a)
				}
			}
			return nil
		},
	}
	ls.Flags().StringVar(&node, "node", "", "only this node's images (default: every ready node's)")
	rm.Flags().StringVar(&node, "node", "", "remove from this node only (default: every ready node that holds it)")
	cmd.AddCommand(pull, ls, rm, newImageWarmCmd(g), newImageTemplatesCmd(g))
	return cmd
}
