// Package cli is the `fireworks` command line: the user verbs (run, ps, exec, ...) that talk
// to the API, and the process verbs (dev) that run the platform.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode"

	"connectrpc.com/connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/spf13/cobra"
)

// Exit codes follow Docker: 125 when Fireworks itself fails, otherwise the command's own.
const (
	ExitFireworksError = 125
	ExitNotExecutable  = 126
	ExitNotFound       = 127
)

// ExitError carries a process exit code out of a command without printing anything more.
type ExitError struct{ Code int }

func (e ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

type globals struct {
	server, token string
	stale         bool
	// requestTimeout bounds every unary API call (a stop's bound also covers its grace).
	requestTimeout time.Duration
	// contacted is the server list the last client was made for, to name it in errors.
	contacted string
	stdin     io.Reader
	stdout    io.Writer
	stderr    io.Writer
}

func (g *globals) client() (*client.Client, error) {
	cfg, err := client.LoadConfig(g.server, g.token)
	if err != nil {
		return nil, err
	}
	if cfg.Token == "" {
		return nil, fmt.Errorf("no API token: start `fireworks dev` (it writes %s) or set FIREWORKS_TOKEN", client.ConfigPath())
	}
	cfg.Stale = g.stale
	cfg.RequestTimeout = g.requestTimeout
	g.contacted = cfg.Server
	return client.New(cfg)
}

// NewRoot builds the command tree.
func NewRoot() *cobra.Command {
	root, _ := newRoot()
	return root
}

func newRoot() (*cobra.Command, *globals) {
	g := &globals{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	root := &cobra.Command{
		Use:           "fireworks",
		Short:         "Run commands in hardware-isolated microVMs booted from OCI images",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.server, "server", "", "API address (default from $FIREWORKS_SERVER or the CLI config, else "+client.DefaultServer+")")
	root.PersistentFlags().BoolVar(&g.stale, "stale", false, "answer reads (ps, inspect, node ls, info) from the contacted server's own copy of the state, which may lag the leader")
	root.PersistentFlags().StringVar(&g.token, "token", "", "API token (default from $FIREWORKS_TOKEN or the CLI config)")
	root.PersistentFlags().DurationVar(&g.requestTimeout, "request-timeout", client.DefaultRequestTimeout, "give up on an API request (not a stream: attach, exec, logs -f) after this long")
	root.AddCommand(
		newRunCmd(g), newPsCmd(g), newLogsCmd(g), newExecCmd(g), newInspectCmd(g),
		newStopCmd(g), newPauseCmd(g), newResumeCmd(g), newMigrateCmd(g), newForkCmd(g), newSnapshotCmd(g), newVolumeCmd(g), newRmCmd(g), newInfoCmd(g), newImageCmd(g), newDevCmd(g), newSetupCmd(g),
		newDemoImageCmd(g), newTokenCmd(g),
		newServerCmd(g), newAgentCmd(g), newNodeCmd(g), newCACmd(g), newPoolCmd(g),
		newPolicyCmd(g), newPortForwardCmd(g), newIngressCmd(g), newTemplateCmd(g), newKubeControllerCmd(g),
		newAuditCmd(g), newStateCmd(g),
	)
	refuseUnknownSubcommands(root)
	return root, g
}

// refuseUnknownSubcommands makes a command group (`token`, `node`, ...) fail on a
// subcommand it does not have: cobra would print its help and exit 0, and a script's
// `fireworks token rm ID` would seem to have worked.
func refuseUnknownSubcommands(c *cobra.Command) {
	for _, sub := range c.Commands() {
		refuseUnknownSubcommands(sub)
	}
	if !c.HasSubCommands() || c.Run != nil || c.RunE != nil || c == c.Root() {
		return
	}
	c.Args = cobra.ArbitraryArgs
	c.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("%q is not a %s command (see `%s --help`)", args[0], cmd.CommandPath(), cmd.CommandPath())
		}
		return cmd.Help()
	}
}

// Main runs the CLI and returns the process exit code.
func Main(ctx context.Context, args []string) int {
	root, g := newRoot()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	fmt.Fprintln(os.Stderr, "fireworks: "+printable(g.describe(err)))
	return ExitFireworksError
}

// describe turns API errors into one readable line, naming the server that could not be
// reached (the `fireworks dev` hint only for the default local address).
func (g *globals) describe(err error) string {
	where := g.contacted
	if where == "" {
		// No API client was made: the error is a long-running command's own (an agent
		// that cannot reach its --server says which itself), not the CLI's.
		return err.Error()
	}
	unreachable := "cannot reach the Fireworks server at " + where
	if where == client.DefaultServer {
		unreachable += " (is `fireworks dev` running?)"
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		msg := ce.Message()
		switch ce.Code() {
		case connect.CodeUnavailable:
			if connect.IsWireError(ce) {
				return msg // the server answered: what it could not reach is in its message
			}
			return unreachable + ": " + msg
		case connect.CodeDeadlineExceeded:
			return "the Fireworks server at " + where + " did not answer in time (--request-timeout): " + msg
		case connect.CodeUnauthenticated:
			return "not authenticated: " + msg
		}
		return msg
	}
	s := err.Error()
	if strings.Contains(s, "connection refused") {
		return unreachable + ": " + s
	}
	return s
}

// printable replaces control characters (other than newline and tab) in text that may
// come from inside a guest (error reasons, console tails), so a guest cannot send escape
// sequences to the user's terminal.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		// (Format characters, such as bidirectional overrides, would reorder what follows.)
		if r == '\n' || r == '\t' || (r >= 0x20 && r != 0x7f && !(r >= 0x80 && r < 0xa0) && !unicode.Is(unicode.Cf, r)) {
			return r
		}
		return '?'
	}, s)
}
