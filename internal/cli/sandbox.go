package cli

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

type runFlags struct {
	detach, interactive, tty, rm bool
	name, workdir, user          string
	entrypoint                   string
	entrypointSet, nonRoot       bool
	env, insecure, volumes       []string
	cpus                         int
	restart                      string
	constraints                  []string
	spread                       bool
	memory                       string
	timeout                      time.Duration
	boot                         string
	network, policyFile          string
	ports                        []string
	snapshot                     string
	sidecars                     []string
	groupFile                    string
	specFlagsSet                 []string // spec flags given (refused with a group file)
}

func newRunCmd(g *globals) *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [-- COMMAND [ARG...]]  |  run --snapshot NAME [flags] [-- COMMAND [ARG...]]",
		Short: "Boot a microVM from IMAGE and run a command in it",
		Long: `Boot a microVM from IMAGE and run COMMAND (or the image's Entrypoint/Cmd) in it.
Attached by default: output streams back and the exit code is the command's.
IMAGE is a registry reference, oci:DIR[:TAG] or docker-archive:FILE[:TAG].
Exit codes: 125 Fireworks error, 126 not executable, 127 not found, 124 timed out.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if f.groupFile != "" {
				if len(args) > 0 {
					// The file names the images and commands.
					return fmt.Errorf("with -f, the file gives the image and the command: put %q in it", strings.Join(args, " "))
				}
				return nil
			}
			if f.snapshot != "" {
				return nil // the image is the snapshot's; args are the command
			}
			return cobra.MinimumNArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			f.entrypointSet = cmd.Flags().Changed("entrypoint")
			cmd.Flags().Visit(func(fl *pflag.Flag) {
				switch fl.Name {
				case "detach", "interactive", "tty", "rm", "name", "file":
				default:
					f.specFlagsSet = append(f.specFlagsSet, "--"+fl.Name)
				}
			})
			if f.groupFile != "" {
				args = []string{""}
			}
			// A command comes after "--" (pflag then reports the dash at 0); anything
			// before it is an IMAGE (or a command without "--"), which the snapshot names.
			if f.snapshot != "" && len(args) > 0 && cmd.ArgsLenAtDash() != 0 {
				return fmt.Errorf("with --snapshot, give no IMAGE (the snapshot names it), and the command after --: fireworks run --snapshot %s [-- COMMAND...]", f.snapshot)
			}
			if f.snapshot != "" {
				// No IMAGE: the snapshot names it. A leading "--" (pflag keeps none) is
				// not a command.
				args = append([]string{""}, args...)
			}
			return runSandbox(cmd.Context(), g, f, args)
		},
	}
	cmd.Flags().SetInterspersed(false)
	fl := cmd.Flags()
	fl.BoolVarP(&f.detach, "detach", "d", false, "start and print the sandbox ID without waiting")
	fl.BoolVarP(&f.interactive, "interactive", "i", false, "keep stdin open and send it to the command")
	fl.BoolVarP(&f.tty, "tty", "t", false, "allocate a terminal for the command")
	fl.BoolVar(&f.rm, "rm", false, "remove the sandbox when it exits (attached runs only)")
	fl.StringVar(&f.name, "name", "", "sandbox name (also its hostname)")
	fl.StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable (KEY=VALUE, or KEY to pass the local value)")
	fl.StringVarP(&f.workdir, "workdir", "w", "", "working directory inside the sandbox")
	fl.StringVarP(&f.user, "user", "u", "", "user: name, uid, uid:gid or name:group")
	fl.BoolVar(&f.nonRoot, "non-root", false, "refuse to run the command as root: the user (--user, or the image's) must resolve to a uid other than 0 (Kubernetes' runAsNonRoot)")
	fl.StringVar(&f.entrypoint, "entrypoint", "", "override the image's entrypoint (\"\" clears it)")
	fl.IntVar(&f.cpus, "cpus", 0, "vCPUs (default 1)")
	fl.StringVar(&f.memory, "memory", "", "memory, e.g. 512M or 1G (default 256M)")
	fl.DurationVar(&f.timeout, "timeout", 0, "kill the sandbox after this long (e.g. 30s)")
	fl.StringArrayVar(&f.insecure, "insecure-registry", nil, "registry host that speaks plain HTTP")
	fl.StringVar(&f.restart, "restart", "never", "cluster: re-run when it ends or its node dies: never, on-failure or always")
	fl.StringArrayVar(&f.constraints, "constraint", nil, "cluster: only nodes whose labels match (key==value, key!=value, key)")
	fl.BoolVar(&f.spread, "spread", false, "cluster: prefer the least loaded node instead of packing")
	fl.StringVar(&f.network, "network", "", "none: no network interface at all (default: a network of its own, NAT to the outside)")
	fl.StringVar(&f.policyFile, "policy", "", "network policy file (see README \"Networking\"; - reads stdin)")
	fl.StringArrayVarP(&f.volumes, "volume", "v", nil, "mount a volume (see fireworks volume create): NAME:/path, or NAME:/path:ro read-only; repeatable")
	fl.StringArrayVarP(&f.ports, "port", "p", nil, "publish a guest TCP port through the ingress: PORT (private: needs the access token) or PORT:public")
	fl.StringVar(&f.snapshot, "snapshot", "", "start from this snapshot (`fireworks snapshot ls`), giving no IMAGE: a filesystem snapshot boots its image with its files; one with memory carries on its processes as a new machine")
	fl.StringArrayVar(&f.sidecars, "sidecar", nil, "start a sidecar with it: name=NAME,image=IMAGE[,ready=tcp:PORT][,restart=POLICY][,memory=SIZE][,cpus=N][,env=K=V][,volume=V:/path][,cmd=COMMAND...] (cmd last); repeatable (README \"Sidecars\")")
	fl.StringVarP(&f.groupFile, "file", "f", "", "run the sandbox group a file describes (YAML: image, command, ..., sidecars; see README \"Sidecars\"); - reads stdin")
	fl.StringVar(&f.boot, "boot", "auto", "how the VM starts: auto (warm pool, else template snapshot, else boot), restore (template snapshot) or cold (boot the kernel)")
	return cmd
}

// parseMemory accepts 512, 512M, 512MiB, 1G, 1GiB, 1T, 1TiB (binary units; a bare number
// is MiB), up to 1 TiB; what a node offers is the server's to check.
func parseMemory(s string) (int, error) {
	if s == "" {
		return 0, nil
	}
	u := strings.ToUpper(strings.TrimSpace(s))
	mult := 1
	for _, suf := range []struct {
		s string
		m int
	}{{"TIB", 1 << 20}, {"TB", 1 << 20}, {"T", 1 << 20}, {"GIB", 1024}, {"GB", 1024}, {"G", 1024}, {"MIB", 1}, {"MB", 1}, {"M", 1}} {
		if strings.HasSuffix(u, suf.s) {
			u, mult = strings.TrimSuffix(u, suf.s), suf.m
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(u))
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("invalid --memory %q: want a size like 512M, 2G or 1T", s)
	}
	if n > (1<<20)/mult {
		return 0, fmt.Errorf("invalid --memory %q: at most 1T", s)
	}
	return n * mult, nil
}

// localImageRef makes oci:/docker-archive: paths absolute, since the server resolves them.
func localImageRef(ref string) string {
	for _, p := range []string{"oci:", "docker-archive:"} {
		if rest, ok := strings.CutPrefix(ref, p); ok {
			path, tag, hasTag := rest, "", false
			if i := strings.LastIndex(rest, ":"); i > 0 && !strings.Contains(rest[i:], "/") {
				path, tag, hasTag = rest[:i], rest[i+1:], true
			}
			if abs, err := filepath.Abs(path); err == nil {
				path = abs
			}
			if hasTag {
				return p + path + ":" + tag
			}
			return p + path
		}
	}
	return ref
}

func expandEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if !strings.Contains(kv, "=") {
			if v, ok := os.LookupEnv(kv); ok {
				out = append(out, kv+"="+v)
			}
			continue
		}
		out = append(out, kv)
	}
	return out
}

// dropDash removes the "--" that separates a positional (IMAGE, SANDBOX) from the command:
// flag parsing stops at the first positional, so cobra leaves it in args.
func dropDash(args []string) []string {
	if len(args) > 1 && args[1] == "--" {
		return append([]string{args[0]}, args[2:]...)
	}
	return args
}

func runSandbox(ctx context.Context, g *globals, f runFlags, args []string) error {
	args = dropDash(args)
	mem, err := parseMemory(f.memory)
	if err != nil {
		return err
	}
	if f.detach && (f.rm || f.interactive) {
		return errors.New("--detach cannot be combined with --rm or -i")
	}
	if err := g.checkTTY(f.interactive, f.tty); err != nil {
		return err
	}
	if f.cpus < 0 || f.cpus > 1024 {
		return fmt.Errorf("invalid --cpus %d: want 1..1024 (the node's limit is checked by the server)", f.cpus)
	}
	if f.timeout < 0 {
		return fmt.Errorf("invalid --timeout %s: must not be negative (0 means none)", f.timeout)
	}
	if _, err := state.ParseBootMode(f.boot); err != nil {
		return fmt.Errorf("invalid --boot %q: want auto, restore or cold", f.boot)
	}
	if f.network != "" && f.network != state.NetworkNone {
		return fmt.Errorf("invalid --network %q: want none (or leave it out for a network of its own)", f.network)
	}
	var policy string
	if f.policyFile != "" {
		if policy, err = readPolicyFile(f.policyFile, g.stdin); err != nil {
			return err
		}
	}
	var ports []*pb.Port
	for _, p := range f.ports {
		pp, err := state.ParsePort(p)
		if err != nil {
			return fmt.Errorf("invalid --port %q: want PORT or PORT:public (PORT in 1..65535)", p)
		}
		ports = append(ports, &pb.Port{Port: uint32(pp.Port), Public: pp.Public})
	}
	vols, err := volumeMounts(f.volumes)
	if err != nil {
		return err
	}
	var sidecars []*pb.Sidecar
	for _, s := range f.sidecars {
		sc, err := parseSidecar(s)
		if err != nil {
			return err
		}
		sidecars = append(sidecars, sc)
	}
	var fileSpec *pb.SandboxSpec
	if f.groupFile != "" {
		if len(f.specFlagsSet) > 0 {
			return fmt.Errorf("with -f, the file describes the group: %s belongs in it (only -d, -i, -t, --rm and --name go with -f)", strings.Join(f.specFlagsSet, ", "))
		}
		var name string
		if name, fileSpec, sidecars, err = readGroupFile(f.groupFile, g.stdin); err != nil {
			return err
		}
		if f.name == "" {
			f.name = name
		}
		fileSpec.Tty, fileSpec.Stdin = f.tty, f.interactive
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	image := args[0]
	if image != "" {
		image = localImageRef(image)
	}
	spec := &pb.SandboxSpec{
		Snapshot: f.snapshot,
		Image:    image, Cmd: args[1:], Env: expandEnv(f.env), WorkingDir: f.workdir,
		User: f.user, NonRoot: f.nonRoot, Vcpus: int32(f.cpus), MemoryMib: int32(mem), Tty: f.tty, Stdin: f.interactive,
		InsecureRegistries: f.insecure, Restart: f.restart, Constraints: f.constraints, Spread: f.spread,
		Boot: f.boot, Network: f.network, Policy: policy, Ports: ports, Volumes: vols,
	}
	if f.entrypointSet {
		spec.EntrypointSet = true
		if f.entrypoint != "" {
			spec.Entrypoint = []string{f.entrypoint}
		}
	}
	if f.timeout > 0 {
		spec.Timeout = durationpb.New(f.timeout)
	}
	if fileSpec != nil {
		spec = fileSpec
	}
	resp, err := c.Sandboxes.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Name: f.name, Spec: spec, Sidecars: sidecars}))
	if err != nil {
		return err
	}
	id := resp.Msg.GetSandbox().GetId()
	if f.detach {
		fmt.Fprintln(g.stdout, id)
		return nil
	}
	stopWatch := watchPending(ctx, g, c, id)
	exit, err := attach(ctx, g, c, id, f.interactive, f.tty)
	stopWatch()
	var ee ExitError
	if errors.As(err, &ee) {
		return err // interrupted while it waited for a node: nothing to remove, it stays
	}
	if err != nil {
		// Created, but not attached to (refused, or the connection broke): it runs
		// detached. Say which one it is, and remove it if --rm asked for that.
		if f.rm {
			if _, rerr := c.Sandboxes.RemoveSandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: id, Force: true})); rerr == nil {
				return fmt.Errorf("%w (sandbox %s was removed, as --rm asks)", err, short(id))
			}
		}
		return fmt.Errorf("%w (sandbox %s was created and runs without this terminal: `fireworks logs -f %s`, or `fireworks rm -f %s`)", err, short(id), short(id), short(id))
	}
	if f.rm {
		if _, err := c.Sandboxes.RemoveSandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: id, Force: true})); err != nil {
			fmt.Fprintf(g.stderr, "fireworks: remove sandbox %s: %s\n", id, g.describe(err))
		}
	}
	return exitFromStatus(g, exit)
}

// exitFromStatus maps a sandbox's end to the CLI's exit code.
func exitFromStatus(g *globals, e *pb.Exit) error {
	switch e.GetStatus() {
	case "exited":
		if e.GetCode() == ExitNotFound || e.GetCode() == ExitNotExecutable {
			fmt.Fprintln(g.stderr, "fireworks: "+printable(e.GetReason()))
		}
		if e.GetCode() == 0 {
			return nil
		}
		return ExitError{Code: int(e.GetCode())}
	case "failed":
		fmt.Fprintln(g.stderr, "fireworks: sandbox failed: "+printable(e.GetReason()))
		if e.GetCode() == 124 {
			return ExitError{Code: 124}
		}
		return ExitError{Code: ExitFireworksError}
	default:
		fmt.Fprintf(g.stderr, "fireworks: sandbox %s: %s\n", e.GetStatus(), printable(e.GetReason()))
		return ExitError{Code: ExitFireworksError}
	}
}

// watchPending tells the user, on stderr, why a sandbox that is not placed yet waits
// (the scheduler's reason: no node fits, a constraint, capacity), each time the reason
// changes, until the sandbox leaves pending or the returned stop is called. Without it
// `run` would sit silent until capacity frees.
func watchPending(ctx context.Context, g *globals, c *client.Client, id string) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { // ends with stop
		defer close(done)
		last := ""
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			resp, err := c.Sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
			if err != nil {
				continue
			}
			sb := resp.Msg.GetSandbox()
			if sb.GetStatus() != "pending" {
				return
			}
			if r := sb.GetReason(); strings.HasPrefix(r, "waiting for a node") && r != last {
				fmt.Fprintf(g.stderr, "fireworks: sandbox %s is %s (it starts when a node can take it; Ctrl-C leaves it pending, `fireworks rm -f %s` drops it)\n", short(id), printable(r), short(id))
				last = r
			}
		}
	}()
	return func() { cancel(); <-done }
}

// attach streams a sandbox's output and forwards stdin/signals/resizes until it exits.
//
// A signal (Ctrl-C, SIGTERM) goes to the sandbox's process; while the sandbox is still
// pending there is none, so the signal ends the wait instead: the CLI exits (128+signal)
// and says how to drop the sandbox, which stays pending.
func attach(ctx context.Context, g *globals, c *client.Client, id string, stdin, tty bool) (*pb.Exit, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sess, err := client.Attach(c.Sandboxes.Attach(ctx), id)
	if err != nil {
		return nil, err
	}
	var interrupted atomic.Int32
	onSignal := func(sig int32) {
		gctx, gcancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := c.Sandboxes.GetSandbox(gctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
		gcancel()
		if err == nil && resp.Msg.GetSandbox().GetStatus() == "pending" {
			interrupted.Store(sig)
			cancel()
			return
		}
		sess.Signal(sig)
	}
	exit, err := runSession(g, sess, stdin, tty, onSignal)
	if sig := interrupted.Load(); sig != 0 {
		fmt.Fprintf(g.stderr, "fireworks: stopped waiting; sandbox %s stays pending (`fireworks rm -f %s` drops it)\n", short(id), short(id))
		return nil, ExitError{Code: 128 + int(sig)}
	}
	return exit, err
}

// runSession wires a session to this terminal: raw mode only when keystrokes go to the
// sandbox (-i with -t; with -t alone ^C must stay a signal here, to be forwarded),
// resizes, signals (to signal) and stdin; it returns the session's exit.
func runSession(g *globals, sess *client.Session, stdin, tty bool, signal func(int32)) (*pb.Exit, error) {
	raw := tty && stdin
	restore := setupTerminal(g, raw, sess.Resize)
	defer restore()
	stopSignals := forwardSignals(raw, signal)
	defer stopSignals()
	if stdin {
		sess.PumpStdin(g.stdin)
	}
	return sess.Wait(g.stdout, g.stderr)
}

// setupTerminal puts a local terminal in raw mode for -t and reports its size; it returns a
// function that restores the terminal.
func setupTerminal(g *globals, tty bool, resize func(rows, cols uint16)) func() {
	f, ok := g.stdin.(*os.File)
	if !tty || !ok || !term.IsTerminal(int(f.Fd())) {
		return func() {}
	}
	old, err := term.MakeRaw(int(f.Fd()))
	if err != nil {
		return func() {}
	}
	report := func() {
		if w, h, err := term.GetSize(int(f.Fd())); err == nil {
			resize(uint16(h), uint16(w))
		}
	}
	report()
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-winch:
				report()
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(winch)
		close(done)
		_ = term.Restore(int(f.Fd()), old)
	}
}

// forwardSignals sends SIGINT/SIGTERM/SIGHUP to the sandbox's process (in raw TTY mode ^C
// arrives as a byte instead).
func forwardSignals(raw bool, fwd func(int32)) func() {
	if raw {
		return func() {}
	}
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-ch:
				fwd(int32(s.(syscall.Signal)))
			case <-done:
				return
			}
		}
	}()
	return func() { signal.Stop(ch); close(done) }
}

func newExecCmd(g *globals) *cobra.Command {
	var (
		interactive, tty bool
		env              []string
		workdir, user    string
	)
	cmd := &cobra.Command{
		Use:   "exec [flags] SANDBOX -- COMMAND [ARG...]",
		Short: "Run another command in a running sandbox",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args = dropDash(args); len(args) < 2 {
				return errors.New("exec needs a command: fireworks exec SANDBOX -- COMMAND [ARG...]")
			}
			if err := g.checkTTY(interactive, tty); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			rows, cols := uint32(24), uint32(80)
			if f, ok := g.stdin.(*os.File); ok && tty && term.IsTerminal(int(f.Fd())) {
				if w, h, err := term.GetSize(int(f.Fd())); err == nil {
					rows, cols = uint32(h), uint32(w)
				}
			}
			sess, err := client.Exec(c.Sandboxes.Exec(ctx), &pb.ExecStart{
				Sandbox: args[0], Argv: args[1:], Env: expandEnv(env), WorkingDir: workdir, User: user,
				Tty: tty, Stdin: interactive, Rows: rows, Cols: cols,
			})
			if err != nil {
				return err
			}
			// While the sandbox is still starting the server waits for it and there is
			// no process to signal: a signal ends the wait instead (the exec never runs).
			var interrupted atomic.Int32
			onSignal := func(sig int32) {
				gctx, gcancel := context.WithTimeout(ctx, 2*time.Second)
				resp, err := c.Sandboxes.GetSandbox(gctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: args[0]}))
				gcancel()
				if err == nil && (resp.Msg.GetSandbox().GetStatus() == "pending" || resp.Msg.GetSandbox().GetStatus() == "starting") {
					interrupted.Store(sig)
					cancel()
					return
				}
				sess.Signal(sig)
			}
			exit, err := runSession(g, sess, interactive, tty, onSignal)
			if sig := interrupted.Load(); sig != 0 {
				fmt.Fprintf(g.stderr, "fireworks: stopped waiting for sandbox %s to start; the command did not run\n", args[0])
				return ExitError{Code: 128 + int(sig)}
			}
			if err != nil {
				return err
			}
			return exitFromStatus(g, exit)
		},
	}
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().BoolVarP(&interactive, "interactive", "i", false, "send stdin to the command")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "allocate a terminal")
	cmd.Flags().StringArrayVarP(&env, "env", "e", nil, "set an environment variable")
	cmd.Flags().StringVarP(&workdir, "workdir", "w", "", "working directory")
	cmd.Flags().StringVarP(&user, "user", "u", "", "user")
	return cmd
}

func newPsCmd(g *globals) *cobra.Command {
	var all, quiet bool
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List sandboxes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Sandboxes.ListSandboxes(cmd.Context(), connect.NewRequest(&pb.ListSandboxesRequest{All: all}))
			if err != nil {
				return err
			}
			if quiet {
				for _, sb := range resp.Msg.GetSandboxes() {
					fmt.Fprintln(g.stdout, sb.GetId())
				}
				return nil
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tIMAGE\tSTATUS\tCREATED\tCOMMAND")
			names := map[string]string{} // ID -> name, for the sidecars' column
			for _, sb := range resp.Msg.GetSandboxes() {
				names[sb.GetId()] = sb.GetName()
			}
			for _, sb := range resp.Msg.GetSandboxes() {
				st := sb.GetStatus()
				if st == "exited" {
					st = fmt.Sprintf("exited (%d)", sb.GetExitCode())
				}
				name := sb.GetName()
				if gr := sb.GetGroup(); name == "" && gr != nil && gr.GetMain() != sb.GetId() {
					// A sidecar goes by MAIN/NAME (what logs, exec and inspect take too).
					main := cmp.Or(names[gr.GetMain()], short(gr.GetMain()))
					for _, m := range gr.GetMembers() {
						if m.GetId() == sb.GetId() {
							name = main + "/" + m.GetName()
						}
					}
				}
				// The command as given: an entrypoint set (a Kubernetes container's command)
				// and the arguments, on one line and printable (they are the user's bytes).
				command := sb.GetSpec().GetCmd()
				if sp := sb.GetSpec(); sp.GetEntrypointSet() {
					command = append(slices.Clone(sp.GetEntrypoint()), command...)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", short(sb.GetId()), oneLine(name), oneLine(sb.GetSpec().GetImage()), st,
					ago(sb.GetCreatedAt().AsTime()), oneLine(strings.Join(command, " ")))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include finished sandboxes")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print IDs only")
	return cmd
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func ago(t time.Time) string {
	d := time.Since(t).Round(time.Second)
	return d.String() + " ago"
}

func newLogsCmd(g *globals) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs [-f] SANDBOX",
		Short: "Print a sandbox's output (stdout to stdout, stderr to stderr)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			stream, err := c.Sandboxes.Logs(cmd.Context(), connect.NewRequest(&pb.LogsRequest{Sandbox: args[0], Follow: follow}))
			if err != nil {
				return err
			}
			for stream.Receive() {
				o := stream.Msg().GetOutput()
				out := g.stdout
				if o.GetStream() == 2 {
					out = g.stderr
				}
				_, _ = out.Write(o.GetData())
			}
			return stream.Err()
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep streaming until the sandbox exits")
	return cmd
}

func newInspectCmd(g *globals) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "inspect [--format json|text] SANDBOX...",
		Short: "Show a sandbox's full record (JSON, or a readable summary with --format text)",
		Long: `Show a sandbox's full record. JSON by default; its "details" hold what the node
recorded, among them start_mode (cold, restore or warm) and start_phases (how long
each step of the start took). --format text shows the same as a readable summary,
how the sandbox started first.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if format != "json" && format != "text" {
				return fmt.Errorf("invalid --format %q: want json or text", format)
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, a := range args {
				resp, err := c.Sandboxes.GetSandbox(cmd.Context(), connect.NewRequest(&pb.GetSandboxRequest{Sandbox: a}))
				if err != nil {
					return err
				}
				if format == "text" {
					writeSandboxText(g.stdout, resp.Msg.GetSandbox())
					continue
				}
				out, _ := protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true, EmitDefaultValues: true}.Marshal(resp.Msg.GetSandbox())
				fmt.Fprintln(g.stdout, string(out))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "json", "json or text")
	return cmd
}

func newStopCmd(g *globals) *cobra.Command {
	grace := 10 * time.Second
	cmd := eachArgCmd(g, "stop SANDBOX...", "Stop running sandboxes (SIGTERM, then kill after the grace period)",
		func(ctx context.Context, c *client.Client, ref string) (string, error) {
			r, err := c.Sandboxes.StopSandbox(ctx, connect.NewRequest(&pb.StopSandboxRequest{Sandbox: ref, Grace: durationpb.New(grace)}))
			if err != nil {
				return "", err
			}
			return r.Msg.GetSandbox().GetId(), nil
		})
	cmd.Flags().VarP((*seconds)(&grace), "time", "t", "grace period before the VM is killed (seconds, or a duration like 500ms)")
	return cmd
}

func newRmCmd(g *globals) *cobra.Command {
	var force bool
	cmd := eachArgCmd(g, "rm [-f] SANDBOX...", "Remove sandboxes and their logs",
		func(ctx context.Context, c *client.Client, ref string) (string, error) {
			_, err := c.Sandboxes.RemoveSandbox(ctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: ref, Force: force}))
			return ref, err
		})
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill a running sandbox first")
	return cmd
}

func newInfoCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "info",
		Short: "Show the server's node, accelerator, guest kernel and limits",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.System.Info(cmd.Context(), connect.NewRequest(&pb.InfoRequest{}))
			if err != nil {
				return err
			}
			i := resp.Msg
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "Server:\t%s\n", c.Server)
			fmt.Fprintf(tw, "Version:\t%s\n", i.GetVersion())
			// A user token is told less than an admin (no node size, load or data
			// directory): print what the server said, not blanks for what it did not.
			line := func(label, value string) {
				if value != "" {
					fmt.Fprintf(tw, "%s:\t%s\n", label, value)
				}
			}
			line("Node", i.GetNode())
			accel := i.GetAccel()
			if r := i.GetAccelReason(); r != "" {
				accel += " (" + r + ")"
			}
			line("Accelerator", accel)
			line("VMM", i.GetQemuVersion())
			line("Guest kernel", i.GetKernelRelease())
			line("Init version", i.GetInitVersion())
			if i.GetNodeVcpus() > 0 {
				line("Node capacity", fmt.Sprintf("%d vCPUs, %d MiB", i.GetNodeVcpus(), i.GetNodeMemoryMib()))
				line("Running", strconv.Itoa(int(i.GetSandboxesRunning())))
			}
			if i.GetMaxVcpus() > 0 {
				line("Sandbox limits", fmt.Sprintf("1..%d vCPUs, 128..%d MiB", i.GetMaxVcpus(), i.GetMaxMemoryMib()))
			}
			line("Data dir", i.GetDataDir())
			return tw.Flush()
		},
	}
}

// seconds is a duration flag that also takes a bare number of seconds, as `docker stop -t`.
type seconds time.Duration

func (s *seconds) String() string { return time.Duration(*s).String() }
func (s *seconds) Type() string   { return "duration" }
func (s *seconds) Set(v string) error {
	if n, err := strconv.Atoi(v); err == nil {
		*s = seconds(time.Duration(n) * time.Second)
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("%q: want seconds (10) or a duration (1m30s)", v)
	}
	*s = seconds(d)
	return nil
}

// checkTTY refuses -it when stdin is not a terminal, as Docker does ("the input device is
// not a TTY"): the guest's terminal would echo the piped input back and never see its
// end, so the command would wait forever. -t alone (no stdin) is fine.
func (g *globals) checkTTY(interactive, tty bool) error {
	if !interactive || !tty {
		return nil
	}
	if f, ok := g.stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return errors.New("the input device is not a TTY: use -i without -t to send piped input")
}
