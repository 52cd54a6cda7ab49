package cli

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// newSnapshotCmd: named snapshots of a sandbox's filesystem.
func newSnapshotCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Named snapshots of a sandbox's filesystem, or of all of it with --memory (run --snapshot NAME starts from one)"}
	var memory bool
	create := &cobra.Command{
		Use:   "create SANDBOX NAME",
		Short: "Copy a running sandbox's files (its filesystem frozen for the copy; it runs on), or with --memory its whole machine",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Sandboxes.CreateSnapshot(cmd.Context(), connect.NewRequest(&pb.CreateSnapshotRequest{Sandbox: args[0], Name: args[1], Memory: memory}))
			if err != nil {
				return err
			}
			s := r.Msg.GetSnapshot()
			fmt.Fprintf(g.stdout, "%s\t%s\t%.1f MiB\n", s.GetName(), short(s.GetId()), float64(s.GetBytes())/(1<<20))
			return nil
		},
	}
	create.Flags().BoolVar(&memory, "memory", false, "with the sandbox's memory and processes too: a running sandbox pauses for the save and resumes; a start from the snapshot carries on from that instant as a new machine")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List snapshots (an admin's: every token's, with their nodes)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Sandboxes.ListSnapshots(cmd.Context(), connect.NewRequest(&pb.ListSnapshotsRequest{}))
			if err != nil {
				return err
			}
			snaps := r.Msg.GetSnapshots()
			slices.SortFunc(snaps, func(a, b *pb.Snapshot) int {
				return cmp.Or(cmp.Compare(a.GetName(), b.GetName()), cmp.Compare(a.GetOwner(), b.GetOwner()), cmp.Compare(a.GetId(), b.GetId()))
			})
			// An admin's list has every token's, with their owners and nodes; a user's
			// has their own, whose nodes they are not told.
			admin := slices.ContainsFunc(snaps, func(s *pb.Snapshot) bool { return s.GetNode() != "" })
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			head := "NAME\tID\tIMAGE\tFROM SANDBOX\tKIND\tSIZE\tCREATED"
			if admin {
				head += "\tOWNER\tNODE"
			}
			fmt.Fprintln(tw, head)
			for _, s := range snaps {
				kind := "files"
				if s.GetMemory() {
					kind = fmt.Sprintf("memory (%d vCPU, %d MiB)", s.GetVcpus(), s.GetMemoryMib())
				}
				if sc := s.GetSidecars(); len(sc) > 0 {
					names := make([]string, len(sc))
					for i, n := range sc {
						names[i] = printable(n)
					}
					kind += ", group + " + strings.Join(names, " ")
				}
				line := fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%.1f MiB\t%s", printable(s.GetName()), short(s.GetId()), printable(s.GetImage()), short(s.GetSandbox()),
					kind, float64(s.GetBytes())/(1<<20), s.GetCreatedAt().AsTime().Local().Format(time.DateTime))
				if admin {
					line += "\t" + short(s.GetOwner()) + "\t" + s.GetNode()
				}
				if l := s.GetLost(); l != "" {
					line += "\t(lost: " + printable(l) + ")"
				}
				fmt.Fprintln(tw, line)
			}
			return tw.Flush()
		},
	}
	rm := eachArgCmd(g, "rm NAME...", "Remove snapshots (their files on their nodes, then the records)",
		func(ctx context.Context, c *client.Client, ref string) (string, error) {
			_, err := c.Sandboxes.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: ref}))
			return ref, err
		})
	cmd.AddCommand(create, ls, rm)
	return cmd
}
