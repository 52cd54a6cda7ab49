package cli

import (
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// newMigrateCmd: live migration of a running sandbox to another node (admins).
func newMigrateCmd(g *globals) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "migrate SANDBOX [--to NODE]",
		Short: "Move a running sandbox to another node live: its memory, processes, files, ID, token, policy and ports go with it (admin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Sandboxes.MigrateSandbox(cmd.Context(), connect.NewRequest(&pb.MigrateSandboxRequest{Sandbox: args[0], To: to}))
			if err != nil {
				return err
			}
			m := r.Msg.GetMigration()
			fmt.Fprintf(g.stdout, "%s migrated from %s to %s: %s\n", r.Msg.GetSandbox().GetId(), m.GetFrom(), m.GetTo(), migrationText(m))
			if n := len(r.Msg.GetSandbox().GetGroup().GetMembers()); n > 1 {
				// The whole group moved, each member live (inspect shows each one's).
				fmt.Fprintf(g.stdout, "(with its sandbox group: %d members, all now on %s)\n", n, m.GetTo())
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the node to move it to (default: the scheduler's choice among the other nodes)")
	return cmd
}

// migrationText says what a migration took: "downtime 4ms, 71.0 MiB + 3.0 MiB of disk in 1.2s".
func migrationText(m *pb.Migration) string {
	took := ""
	if m.GetStarted() != nil && m.GetEnded() != nil {
		took = " in " + m.GetEnded().AsTime().Sub(m.GetStarted().AsTime()).Round(time.Millisecond).String()
	}
	return fmt.Sprintf("downtime %s, %s + %s of disk%s", (time.Duration(m.GetDowntimeUs()) * time.Microsecond).Round(100*time.Microsecond).String(),
		mib(m.GetBytes()), mib(m.GetDiskBytes()), took)
}

// migrationRow is one migration for inspect: "n1 -> n2: moved, downtime ...".
func migrationRow(m *pb.Migration) string {
	where := ""
	if m.GetFrom() != "" {
		where = m.GetFrom() + " -> " + m.GetTo() + ": "
	}
	if m.GetOutcome() == "" {
		return where + "in progress since " + tsText(m.GetStarted())
	}
	out := where + m.GetOutcome() + " at " + tsText(m.GetEnded())
	if m.GetOutcome() == "moved" {
		out += ", " + migrationText(m)
	}
	return out
}
