package cli

import (
	"fmt"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

func newTokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Create, list and revoke API and join tokens (admin)"}
	var (
		name, role string
		ttl        time.Duration
		uses       int
	)
	create := &cobra.Command{
		Use:   "create [--role admin|user|join|ingress] [--name NAME] [--ttl 720h] [--uses N]",
		Short: "Create a token and print it (it is shown only once)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			req := &pb.CreateTokenRequest{Name: name, Role: role, MaxUses: int32(uses)}
			if ttl != 0 {
				req.Ttl = durationpb.New(ttl)
			}
			resp, err := c.Tokens.CreateToken(cmd.Context(), connect.NewRequest(req))
			if err != nil {
				return err
			}
			fmt.Fprintln(g.stdout, resp.Msg.GetSecret())
			t := resp.Msg.GetToken()
			fmt.Fprintf(g.stderr, "created %s token %s%s; store it now, it cannot be shown again\n", t.GetRole(), t.GetId(), expiry(t))
			return nil
		},
	}
	create.Flags().StringVar(&role, "role", "user", "admin, user (own sandboxes only), join (lets an agent join) or ingress (an HTTP edge: watches routes, gets an edge certificate)")
	create.Flags().StringVar(&name, "name", "", "a name to recognise the token by")
	create.Flags().DurationVar(&ttl, "ttl", 0, "expire after this long (default: never; join tokens 24h)")
	create.Flags().IntVar(&uses, "uses", 0, "join tokens: how many hosts it may join (default 1)")

	ls := &cobra.Command{
		Use:   "ls",
		Short: "List tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Tokens.ListTokens(cmd.Context(), connect.NewRequest(&pb.ListTokensRequest{}))
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tROLE\tCREATED\tEXPIRES\tUSES")
			for _, t := range resp.Msg.GetTokens() {
				exp := "never"
				if t.GetExpiresAt() != nil {
					exp = t.GetExpiresAt().AsTime().Local().Format(time.RFC3339)
				}
				uses := ""
				if t.GetMaxUses() > 0 {
					uses = fmt.Sprintf("%d/%d", t.GetUses(), t.GetMaxUses())
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.GetId(), t.GetName(), t.GetRole(), t.GetCreatedAt().AsTime().Local().Format(time.RFC3339), exp, uses)
			}
			return tw.Flush()
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke TOKEN-ID...",
		Short: "Revoke tokens; calls made with them fail from now on",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, id := range args {
				if _, err := c.Tokens.RevokeToken(cmd.Context(), connect.NewRequest(&pb.RevokeTokenRequest{Id: id})); err != nil {
					return fmt.Errorf("revoke %s: %w", id, err)
				}
				fmt.Fprintln(g.stdout, id)
			}
			return nil
		},
	}
	cmd.AddCommand(create, ls, revoke)
	return cmd
}

func expiry(t *pb.Token) string {
	if t.GetExpiresAt() == nil {
		return ""
	}
	return ", expires " + t.GetExpiresAt().AsTime().Local().Format(time.RFC3339)
}
