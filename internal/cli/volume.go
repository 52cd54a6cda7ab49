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
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// newVolumeCmd: persistent volumes sandboxes mount (run -v NAME:/path[:ro]).
func newVolumeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "Persistent volumes that sandboxes mount with run -v NAME:/path[:ro], shared by those running at once"}
	var size, node string
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a volume (an empty filesystem of --size, kept until removed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			mib, err := parseMemory(size)
			if err != nil || mib <= 0 {
				return fmt.Errorf("invalid --size %q: want e.g. 512M, 10G or 1T (a bare number is MiB; 16M to 1T)", size)
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Volumes.CreateVolume(cmd.Context(), connect.NewRequest(&pb.CreateVolumeRequest{Name: args[0], SizeMib: int64(mib), Node: node}))
			if err != nil {
				return err
			}
			v := r.Msg.GetVolume()
			fmt.Fprintf(g.stdout, "%s\t%s\t%s\n", v.GetName(), short(v.GetId()), sizeText(v.GetSizeMib()))
			return nil
		},
	}
	create.Flags().StringVar(&size, "size", "10G", "size, e.g. 512M, 10G or 1T (a bare number is MiB; 16M to 1T): a full volume answers ENOSPC")
	create.Flags().StringVar(&node, "node", "", "admins: the node to keep it on (sandboxes that mount it run there)")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List volumes (an admin's: every token's, with their nodes)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Volumes.ListVolumes(cmd.Context(), connect.NewRequest(&pb.ListVolumesRequest{}))
			if err != nil {
				return err
			}
			vols := r.Msg.GetVolumes()
			slices.SortFunc(vols, func(a, b *pb.Volume) int {
				return cmp.Or(cmp.Compare(a.GetName(), b.GetName()), cmp.Compare(a.GetOwner(), b.GetOwner()), cmp.Compare(a.GetId(), b.GetId()))
			})
			admin := slices.ContainsFunc(vols, func(v *pb.Volume) bool { return v.GetNode() != "" })
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			head := "NAME\tID\tSIZE\tUSED BY\tCREATED"
			if admin {
				head += "\tOWNER\tNODE"
			}
			fmt.Fprintln(tw, head)
			for _, v := range vols {
				line := fmt.Sprintf("%s\t%s\t%s\t%s\t%s", printable(v.GetName()), short(v.GetId()), sizeText(v.GetSizeMib()), usedBy(v.GetUsedBy(), 3),
					v.GetCreatedAt().AsTime().Local().Format(time.DateTime))
				if admin {
					line += "\t" + short(v.GetOwner()) + "\t" + v.GetNode()
				}
				if v.GetShared() {
					line += "\t(shared with this token"
					if v.GetSharedReadOnly() {
						line += ", read-only"
					}
					line += ")"
				}
				if l := v.GetLost(); l != "" {
					line += "\t(lost: " + printable(l) + ")"
				}
				if to := v.GetMovingTo(); to != "" {
					line += "\t(moving to " + printable(to) + ")"
				}
				fmt.Fprintln(tw, line)
			}
			return tw.Flush()
		},
	}
	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a volume: its size, the space it uses, the sandboxes that mount it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Volumes.GetVolume(cmd.Context(), connect.NewRequest(&pb.GetVolumeRequest{Volume: args[0]}))
			if err != nil {
				return err
			}
			v := r.Msg.GetVolume()
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			row := func(k, val string) {
				if val != "" {
					fmt.Fprintf(tw, "%s:\t%s\n", k, val)
				}
			}
			row("Name", printable(v.GetName()))
			row("ID", v.GetId())
			row("Owner", v.GetOwner())
			row("Node", v.GetNode())
			row("Size", sizeText(v.GetSizeMib()))
			row("Used", fmt.Sprintf("%.1f MiB", float64(v.GetUsedBytes())/(1<<20)))
			row("Used by", usedBy(v.GetUsedBy(), 0))
			if len(v.GetShares()) > 0 {
				row("Shared with", shares(v))
			}
			if v.GetShared() {
				row("Shared", map[bool]string{true: "with this token, read-only", false: "with this token"}[v.GetSharedReadOnly()])
			}
			row("Created", v.GetCreatedAt().AsTime().Local().Format(time.DateTime))
			row("Lost", printable(v.GetLost()))
			row("Moving to", printable(v.GetMovingTo()))
			row("Move", printable(v.GetMoveNote()))
			return tw.Flush()
		},
	}
	var readOnly bool
	share := &cobra.Command{
		Use:   "share NAME TOKEN-ID",
		Short: "Let another token's sandboxes mount a volume (admins; --read-only: only with :ro)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return shareVolume(cmd.Context(), g, &pb.ShareVolumeRequest{Volume: args[0], Token: args[1], ReadOnly: readOnly})
		},
	}
	share.Flags().BoolVar(&readOnly, "read-only", false, "the token may mount it only read-only")
	unshare := &cobra.Command{
		Use:   "unshare NAME TOKEN-ID",
		Short: "Stop sharing a volume with a token (its sandboxes that mount it now keep it until they end)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return shareVolume(cmd.Context(), g, &pb.ShareVolumeRequest{Volume: args[0], Token: args[1], Unshare: true})
		},
	}
	rm := eachArgCmd(g, "rm NAME...", "Remove volumes and their data (refused while a sandbox that is not over mounts one)",
		func(ctx context.Context, c *client.Client, ref string) (string, error) {
			_, err := c.Volumes.DeleteVolume(ctx, connect.NewRequest(&pb.DeleteVolumeRequest{Volume: ref}))
			return ref, err
		})
	var to string
	var detach bool
	move := &cobra.Command{
		Use:   "move NAME",
		Short: "Move a volume's data to another node (admins; refused while a sandbox that is not over mounts it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Volumes.MoveVolume(cmd.Context(), connect.NewRequest(&pb.MoveVolumeRequest{Volume: args[0], Node: to}))
			if err != nil {
				return err
			}
			v := r.Msg.GetVolume()
			fmt.Fprintf(g.stdout, "moving volume %s to %s\n", printable(v.GetName()), printable(v.GetMovingTo()))
			if detach {
				return nil
			}
			// Until the move ends: moved, or failed (the volume stays where it was).
			for {
				select {
				case <-cmd.Context().Done():
					return cmd.Context().Err()
				case <-time.After(500 * time.Millisecond):
				}
				r, err := c.Volumes.GetVolume(cmd.Context(), connect.NewRequest(&pb.GetVolumeRequest{Volume: v.GetId()}))
				if err != nil {
					return err
				}
				if now := r.Msg.GetVolume(); now.GetMovingTo() == "" {
					if n := now.GetMoveNote(); n != "" {
						return fmt.Errorf("volume %s: %s", printable(now.GetName()), printable(n))
					}
					fmt.Fprintf(g.stdout, "volume %s is on node %s\n", printable(now.GetName()), printable(now.GetNode()))
					return nil
				}
			}
		},
	}
	move.Flags().StringVar(&to, "to", "", "the node to move it to (default: the ready node holding the fewest volumes)")
	move.Flags().BoolVarP(&detach, "detach", "d", false, "do not wait for the move to end (volume inspect shows it)")
	cmd.AddCommand(create, ls, inspect, rm, share, unshare, move)
	return cmd
}

func shareVolume(ctx context.Context, g *globals, req *pb.ShareVolumeRequest) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	r, err := c.Volumes.ShareVolume(ctx, connect.NewRequest(req))
	if err != nil {
		return err
	}
	fmt.Fprintf(g.stdout, "%s\t%s\tshared with %s\n", r.Msg.GetVolume().GetName(), short(r.Msg.GetVolume().GetId()), shares(r.Msg.GetVolume()))
	return nil
}

// shares lists whom a volume is shared with.
func shares(v *pb.Volume) string {
	var out []string
	for _, s := range v.GetShares() {
		t := short(s.GetToken())
		if s.GetReadOnly() {
			t += " (read-only)"
		}
		out = append(out, t)
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, ", ")
}

// volumeMounts reads run's -v flags (NAME:/path[:ro]).
func volumeMounts(flags []string) ([]*pb.VolumeMount, error) {
	var out []*pb.VolumeMount
	for _, f := range flags {
		ref, m, err := state.ParseVolumeMount(f)
		if err != nil {
			return nil, fmt.Errorf("invalid --volume %q: want NAME:/path or NAME:/path:ro (%v)", f, strings.TrimPrefix(err.Error(), state.ErrInvalid.Error()+": "))
		}
		out = append(out, &pb.VolumeMount{Volume: ref, Path: m.Path, ReadOnly: m.ReadOnly})
	}
	return out, nil
}

func sizeText(mib int64) string {
	switch {
	case mib >= 1<<20 && mib%(1<<20) == 0:
		return fmt.Sprintf("%d TiB", mib>>20)
	case mib >= 1<<10 && mib%(1<<10) == 0:
		return fmt.Sprintf("%d GiB", mib>>10)
	}
	return fmt.Sprintf("%d MiB", mib)
}

// usedBy names the sandboxes that mount a volume, the first max of them (0: all) and the
// number of the rest: ls keeps its column narrow, inspect lists them all.
func usedBy(ids []string, max int) string {
	if len(ids) == 0 {
		return "-"
	}
	var out []string
	for i, id := range ids {
		if max > 0 && i == max {
			out = append(out, fmt.Sprintf("+%d", len(ids)-max))
			break
		}
		out = append(out, short(id))
	}
	return strings.Join(out, ",")
}
