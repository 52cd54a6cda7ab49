package cli

import (
	"context"
	"fmt"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// newPauseCmd and newResumeCmd: `docker pause`/`unpause` with the memory saved to disk
// (a paused sandbox holds no CPU or RAM on its node).
func newPauseCmd(g *globals) *cobra.Command {
	return eachArgCmd(g, "pause SANDBOX...", "Save running sandboxes whole (memory, processes, disk) and end their VMs; they keep their IDs",
		func(ctx context.Context, c *client.Client, ref string) (string, error) {
			r, err := c.Sandboxes.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Sandbox: ref}))
			if err != nil {
				return "", err
			}
			return r.Msg.GetSandbox().GetId(), nil
		})
}

func newResumeCmd(g *globals) *cobra.Command {
	var node string
	cmd := eachArgCmd(g, "resume SANDBOX...", "Bring paused sandboxes back: every process carries on where it was",
		func(ctx context.Context, c *client.Client, ref string) (string, error) {
			r, err := c.Sandboxes.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Sandbox: ref, Node: node}))
			if err != nil {
				return "", err
			}
			return r.Msg.GetSandbox().GetId(), nil
		})
	cmd.Flags().StringVar(&node, "node", "", "resume on this node (admin; it fetches the saved state from the node that holds it). Default: that node if it has room, else any")
	return cmd
}

// eachArgCmd is a command acting on each thing named (`use` ends with "NAME..."), like
// docker's: every one is tried, each failure reported, and what call returns (an ID)
// printed for each that worked.
func eachArgCmd(g *globals, use, short string, call func(ctx context.Context, c *client.Client, ref string) (string, error)) *cobra.Command {
	verb, _, _ := strings.Cut(use, " ")
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			failed := false
			for _, a := range args {
				out, err := call(cmd.Context(), c, a)
				if err != nil {
					fmt.Fprintf(g.stderr, "fireworks: %s %s: %s\n", verb, a, printable(g.describe(err)))
					failed = true
					continue
				}
				fmt.Fprintln(g.stdout, out)
			}
			if failed {
				return ExitError{Code: ExitFireworksError}
			}
			return nil
		},
	}
}

// newForkCmd: running copies of a sandbox, each a new machine from the same instant.
func newForkCmd(g *globals) *cobra.Command {
	var count int
	cmd := &cobra.Command{
		Use:   "fork SANDBOX [--count N]",
		Short: "Make N running copies of a running or paused sandbox (new machines carrying on from the same instant)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if count < 1 {
				return fmt.Errorf("invalid --count %d: want 1..16", count)
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Sandboxes.ForkSandbox(cmd.Context(), connect.NewRequest(&pb.ForkSandboxRequest{Sandbox: args[0], Count: int32(count)}))
			if err != nil {
				return err
			}
			for _, f := range r.Msg.GetForks() {
				fmt.Fprintln(g.stdout, f.GetId())
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&count, "count", 1, "how many copies (1..16)")
	return cmd
}
