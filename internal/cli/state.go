package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

func newAuditCmd(g *globals) *cobra.Command {
	var (
		q      pb.ListAuditRequest
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Show the audit log of state changes: who changed what, when (admin)",
		Long: `Show the newest entries of the audit log (with --after, the oldest after that index,
so that pages follow on): every change to the cluster's state, with
who made it (a token, a node, a joining host, or the servers themselves), what it acted
on, when, and whether the state refused it. The log is replicated with the state; it keeps
at least the last ` + fmt.Sprint(state.MaxAudit) + ` changes. For longer retention export it
periodically: ` + "`fireworks audit --after INDEX --limit 5000 --json`" + ` pages on from INDEX (start a
full export at --after 1).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Cluster.ListAudit(cmd.Context(), connect.NewRequest(&q))
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(g.stdout, resp.Msg)
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "INDEX\tTIME\tBY\tOP\tTARGET\tDETAIL")
			for _, e := range resp.Msg.GetEntries() {
				by := state.Actor{Kind: e.GetActorKind(), ID: e.GetActorId(), Name: e.GetActorName()}.String()
				detail := e.GetDetail()
				if e.GetError() != "" {
					detail = strings.TrimSpace(detail + " REFUSED: " + e.GetError())
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", e.GetIndex(), e.GetAt().AsTime().Local().Format(time.DateTime),
					auditCell(by), auditCell(e.GetOp()), auditCell(e.GetTarget()), auditCell(detail))
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.StringVar(&q.Actor, "actor", "", "only changes by this token or node (ID or name), or by a kind: token, node, join, system")
	f.StringVar(&q.Target, "target", "", "only changes to this (a sandbox, token or node ID; a substring)")
	f.StringVar(&q.Op, "op", "", "only this change, e.g. create-sandbox, delete-token, join")
	f.Uint64Var(&q.After, "after", 0, "only entries after this index")
	f.Int32Var(&q.Limit, "limit", 100, "at most this many entries (at most 5000 a call): the newest, or with --after the oldest after it")
	f.BoolVar(&asJSON, "json", false, "print the API's answer as JSON")
	return cmd
}

// auditCell is one cell of the audit table: printable, and with line breaks and tabs
// shown escaped, so that text a user or a node put in a field (an image name, a reason)
// cannot draw rows of its own.
func auditCell(s string) string {
	return strings.NewReplacer("\n", `\n`, "\r", `\r`, "\t", `\t`).Replace(printable(s))
}

// stateFileTarget is where a state file named path is written: path, or through a symbolic
// link the file it names. Only a regular file is ever replaced (the file is renamed into
// place): a device, a pipe or a directory there is refused, never turned into a file.
func stateFileTarget(path string) (string, error) {
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		path = resolved
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return path, nil // a new file
	case err != nil:
		return "", err
	case fi.Mode()&os.ModeSymlink != 0:
		return "", fmt.Errorf("%s is a symbolic link to nothing: name the file itself", path)
	case !fi.Mode().IsRegular():
		return "", fmt.Errorf("%s is not a regular file (%s): a state file replaces only a file (use - for stdout)", path, fi.Mode().Type())
	}
	return path, nil
}

func newStateCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "state", Short: "Back up and restore the cluster's replicated state (admin)"}
	snapshot := &cobra.Command{
		Use:   "snapshot FILE",
		Short: "Write a backup of the whole cluster state to FILE (- for stdout)",
		Long: `Write a state file: every sandbox, node, token, pool, template, volume and snapshot
record, and the audit log, as the leader holds them after every change committed before
the call. It holds token hashes: keep it like the CA key. Sandboxes' disks and memory are
on the nodes, not in it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) (err error) {
			c, err := g.client()
			if err != nil {
				return err
			}
			stream, err := c.Cluster.SnapshotState(cmd.Context(), connect.NewRequest(&pb.SnapshotStateRequest{}))
			if err != nil {
				return err
			}
			defer stream.Close()
			var w io.Writer = g.stdout
			var tmp *os.File
			target := args[0]
			if target != "-" {
				if target, err = stateFileTarget(target); err != nil {
					return fmt.Errorf("state snapshot: %w", err)
				}
				// Written aside and renamed: a failed backup never replaces a good one.
				if tmp, err = os.CreateTemp(filepath.Dir(target), ".fireworks-state-*"); err != nil {
					return fmt.Errorf("state snapshot: %w", err)
				}
				defer func() {
					if err != nil {
						tmp.Close()
						os.Remove(tmp.Name())
					}
				}()
				w = tmp
			}
			n := 0
			for stream.Receive() {
				b := stream.Msg().GetData()
				n += len(b)
				if _, err := w.Write(b); err != nil {
					return fmt.Errorf("write state file: %w", err)
				}
			}
			if err := stream.Err(); err != nil {
				return err
			}
			if tmp == nil {
				return nil
			}
			if err := tmp.Sync(); err != nil {
				return err
			}
			if err := tmp.Close(); err != nil {
				return err
			}
			// Checked before it replaces anything: a backup that cannot be restored is none.
			f, err := os.Open(tmp.Name())
			if err != nil {
				return err
			}
			_, sum, err := state.ReadStateFile(f)
			f.Close()
			if err != nil {
				return fmt.Errorf("the server's state file does not check out: %w", err)
			}
			if err := os.Rename(tmp.Name(), target); err != nil {
				return fmt.Errorf("state snapshot: %w", err)
			}
			fmt.Fprintf(g.stderr, "wrote %s: %d bytes, state at index %d (%d sandboxes, %d nodes, %d tokens)\n",
				args[0], n, sum.Header.Index, sum.Sandboxes, sum.Nodes, sum.Tokens)
			return nil
		},
	}
	var yes bool
	restore := &cobra.Command{
		Use:   "restore FILE",
		Short: "Replace the whole cluster state with a state file's (--yes)",
		Long: `Replace the cluster's whole replicated state, on every server, with FILE's (from
` + "`fireworks state snapshot`" + `). The file is checked whole first (format, size, checksum).
Everything changed after the file was taken is gone: sandboxes created since are
forgotten (their nodes stop them), tokens are the file's (yours may no longer work: use
an admin token from the file's time). Restore into the same cluster, or into a new one
made with the same CA (agents' certificates come from it).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !yes {
				return errors.New("restoring replaces the whole cluster state with the file's; pass --yes to do it")
			}
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			// Checked here first too: a bad file fails before it is sent.
			if _, _, err := state.ReadStateFile(f); err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			stream := c.Cluster.RestoreState(cmd.Context())
			buf := make([]byte, 1<<20)
			for {
				n, rerr := f.Read(buf)
				if n > 0 {
					if err := stream.Send(&pb.StateChunk{Data: buf[:n]}); err != nil {
						break // the answer says why
					}
				}
				if rerr == io.EOF {
					break
				}
				if rerr != nil {
					return rerr
				}
			}
			resp, err := stream.CloseAndReceive()
			if err != nil {
				return err
			}
			m := resp.Msg
			fmt.Fprintf(g.stdout, "restored the state taken at %s (index %d): %d sandboxes, %d nodes, %d tokens\n",
				m.GetTakenAt().AsTime().Local().Format(time.DateTime), m.GetIndex(), m.GetSandboxes(), m.GetNodes(), m.GetTokens())
			return nil
		},
	}
	restore.Flags().BoolVar(&yes, "yes", false, "really replace the whole state")
	cmd.AddCommand(snapshot, restore)
	return cmd
}
