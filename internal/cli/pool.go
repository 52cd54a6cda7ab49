package cli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// printJSON writes m as protojson with every field, zeros included, so scripts can
// read a count of 0 rather than a missing key.
func printJSON(w io.Writer, m proto.Message) error {
	out, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true, EmitDefaultValues: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(out))
	return err
}

// shape describes a VM shape; zeros are the node's defaults.
func shape(vcpus, memMiB int32) string {
	if vcpus == 0 && memMiB == 0 {
		return "default"
	}
	c, m := "default-vCPUs", "default-memory"
	if vcpus > 0 {
		c = fmt.Sprintf("%dvCPU", vcpus)
	}
	if memMiB > 0 {
		m = fmt.Sprintf("%dM", memMiB)
	}
	return c + "/" + m // no space: one table column
}

func newPoolCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pool",
		Short: "Manage warm pools: VMs of an image kept restored and paused on every node, for ~100 ms starts",
	}
	cmd.AddCommand(newPoolSetCmd(g), newPoolLsCmd(g), newPoolRmCmd(g))
	return cmd
}

type poolSetFlags struct {
	size, max, cpus int
	memory          string
	insecure        []string
}

func newPoolSetCmd(g *globals) *cobra.Command {
	var f poolSetFlags
	cmd := &cobra.Command{
		Use:   "set IMAGE --size N [--max M] [--cpus C] [--memory SIZE]",
		Short: "Create or change the warm pool of IMAGE (--size 0 removes it)",
		Long: `Every node keeps at least --size VMs of IMAGE restored from its template snapshot and
paused; a start of IMAGE with the same shape (--cpus, --memory; default the node's) claims
one. From the recent claim rate a node may grow its pool up to --max (default --size).
Pools take node capacity like sandboxes do. Needs an admin token.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := poolFromFlags(args[0], f)
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Images.SetPool(cmd.Context(), connect.NewRequest(&pb.SetPoolRequest{Pool: p}))
			if err != nil {
				return err
			}
			out := resp.Msg.GetPool()
			if out.GetSize() == 0 && out.GetMax() == 0 {
				fmt.Fprintf(g.stdout, "%s: no warm pool\n", out.GetImage())
				return nil
			}
			fmt.Fprintf(g.stdout, "%s: size %d, max %d, shape %s\n", out.GetImage(), out.GetSize(), out.GetMax(), shape(out.GetVcpus(), out.GetMemoryMib()))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.IntVar(&f.size, "size", 0, "warm VMs each node keeps at least (0..64; 0 with no --max removes the pool)")
	fl.IntVar(&f.max, "max", 0, "most warm VMs a node's autoscaler may keep (default --size)")
	fl.IntVar(&f.cpus, "cpus", 0, "vCPUs of the pool's VMs (default: the node's default)")
	fl.StringVar(&f.memory, "memory", "", "memory of the pool's VMs, e.g. 512M (default: the node's default)")
	fl.StringArrayVar(&f.insecure, "insecure-registry", nil, "registry host that speaks plain HTTP")
	_ = cmd.MarkFlagRequired("size")
	return cmd
}

// poolFromFlags checks what can be checked here; the server checks the rest.
func poolFromFlags(image string, f poolSetFlags) (*pb.Pool, error) {
	if f.size < 0 || f.size > state.MaxPoolSize {
		return nil, fmt.Errorf("invalid --size %d: want 0..%d", f.size, state.MaxPoolSize)
	}
	if f.max != 0 && (f.max < f.size || f.max > state.MaxPoolSize) {
		return nil, fmt.Errorf("invalid --max %d: want --size (%d)..%d", f.max, f.size, state.MaxPoolSize)
	}
	if f.cpus < 0 || f.cpus > 1024 {
		return nil, fmt.Errorf("invalid --cpus %d: want 1..1024 (the node's limit is checked by the server)", f.cpus)
	}
	mem, err := parseMemory(f.memory)
	if err != nil {
		return nil, err
	}
	return &pb.Pool{Image: localImageRef(image), Size: int32(f.size), Max: int32(f.max), Vcpus: int32(f.cpus),
		MemoryMib: int32(mem), InsecureRegistries: f.insecure}, nil
}

func newPoolLsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls [--json]",
		Short: "List warm pools and what each node reports about them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Images.ListPools(cmd.Context(), connect.NewRequest(&pb.ListPoolsRequest{}))
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(g.stdout, resp.Msg)
			}
			return writePoolTable(g.stdout, resp.Msg.GetPools())
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's answer as JSON (every field, for scripts)")
	return cmd
}

// writePoolTable prints one row per pool and node (a pool no node reported yet gets one
// row with dashes).
func writePoolTable(w io.Writer, pools []*pb.Pool) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tSIZE\tMAX\tSHAPE\tNODE\tTARGET\tREADY\tFILLING\tCLAIMS/1m\tERROR")
	for _, p := range pools {
		head := fmt.Sprintf("%s\t%d\t%d\t%s", p.GetImage(), p.GetSize(), p.GetMax(), shape(p.GetVcpus(), p.GetMemoryMib()))
		if len(p.GetNodes()) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t\n", head)
			continue
		}
		for _, n := range p.GetNodes() {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%s\n", head, n.GetNode(), n.GetTarget(), n.GetReady(), n.GetFilling(),
				n.GetClaimsLastMinute(), oneLine(n.GetError()))
		}
	}
	return tw.Flush()
}

// oneLine keeps a table cell on one line and free of terminal escapes.
func oneLine(s string) string {
	return printable(strings.Join(strings.Fields(s), " "))
}

func newPoolRmCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "rm IMAGE...",
		Short: "Remove warm pools (nodes stop their pool VMs)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, a := range args {
				if _, err := c.Images.DeletePool(cmd.Context(), connect.NewRequest(&pb.DeletePoolRequest{Image: localImageRef(a)})); err != nil {
					return err
				}
				fmt.Fprintln(g.stdout, a)
			}
			return nil
		},
	}
}

func newImageWarmCmd(g *globals) *cobra.Command {
	var (
		insecure []string
		asJSON   bool
		node     string
	)
	cmd := &cobra.Command{
		Use:   "warm IMAGE",
		Short: "Pull IMAGE and build its template snapshot on the node, so starts restore instead of booting",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Images.WarmImage(cmd.Context(), connect.NewRequest(&pb.WarmImageRequest{Ref: localImageRef(args[0]), InsecureRegistries: insecure, Node: node}))
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(g.stdout, resp.Msg)
			}
			t := resp.Msg.GetTemplate()
			built := "no (it existed)"
			if resp.Msg.GetBuilt() {
				built = "yes, in " + resp.Msg.GetBuildTime().AsDuration().String()
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "Template:\t%s\n", t.GetKey())
			fmt.Fprintf(tw, "Node:\t%s\n", t.GetNode())
			fmt.Fprintf(tw, "Image:\t%s (%s)\n", t.GetImage(), t.GetDigest())
			fmt.Fprintf(tw, "Shape:\t%s\n", shape(t.GetVcpus(), t.GetMemoryMib()))
			fmt.Fprintf(tw, "Size:\t%s\n", mib(t.GetSize()))
			fmt.Fprintf(tw, "Built:\t%s\n", built)
			return tw.Flush()
		},
	}
	cmd.Flags().StringArrayVar(&insecure, "insecure-registry", nil, "registry host that speaks plain HTTP")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's answer as JSON")
	cmd.Flags().StringVar(&node, "node", "", "the node to build it on (needed when several are ready; a warm pool warms every node)")
	return cmd
}

func newImageTemplatesCmd(g *globals) *cobra.Command {
	var (
		asJSON bool
		node   string
	)
	cmd := &cobra.Command{
		Use:   "templates",
		Short: "List the nodes' template snapshots",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Images.ListTemplates(cmd.Context(), connect.NewRequest(&pb.ListTemplatesRequest{Node: node}))
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(g.stdout, resp.Msg)
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TEMPLATE\tIMAGE\tDIGEST\tSHAPE\tSIZE\tLAST USED\tNODE")
			for _, t := range resp.Msg.GetTemplates() {
				last := "never"
				if t.GetLastUsed() != nil {
					last = ago(t.GetLastUsed().AsTime())
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", short(t.GetKey()), t.GetImage(), short(strings.TrimPrefix(t.GetDigest(), "sha256:")),
					shape(t.GetVcpus(), t.GetMemoryMib()), mib(t.GetSize()), last, t.GetNode())
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the API's answer as JSON")
	cmd.Flags().StringVar(&node, "node", "", "only this node's (default: every ready node's)")
	return cmd
}

func mib(bytes int64) string {
	return fmt.Sprintf("%.1f MiB", float64(bytes)/(1<<20))
}
