package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
)

// readPolicyFile reads and checks a policy file ("-" is stdin), so a bad one is reported
// with its line numbers before anything is sent.
func readPolicyFile(path string, stdin io.Reader) (string, error) {
	var r io.Reader = stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return "", fmt.Errorf("policy file: %w", err)
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, netpolicy.MaxPolicyBytes+1))
	if err != nil {
		return "", fmt.Errorf("read policy file %s: %w", path, err)
	}
	if _, err := netpolicy.ParsePolicy(string(b)); err != nil {
		return "", fmt.Errorf("policy file %s: %w", path, err)
	}
	return string(b), nil
}

func newPolicyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Show or change a sandbox's network policy (live, no restart)"}
	apply := &cobra.Command{
		Use:   "apply SANDBOX FILE",
		Short: "Replace a running sandbox's network policy with FILE (- reads stdin)",
		Long: `Replace a sandbox's network policy. The new rules are in force in the kernel within a
second, without restarting the sandbox; a malformed file is refused and the old policy stays.
An empty file goes back to the node's defaults.

File format (one statement per line, # comments):
  default [out|in] allow|deny
  allow|deny [out|in] CIDR [tcp|udp [PORT[-PORT]]]
"out" (the default) is what the sandbox sends, matched by destination; "in" is what reaches
it, matched by source. A file that says nothing about "default out" denies what it does not
allow. The node's defaults (no link-local 169.254.0.0/16, no node addresses, no other
sandboxes) stay in force for prefixes the file does not name.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			text, err := readPolicyFile(args[1], g.stdin)
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Sandboxes.SetPolicy(cmd.Context(), connect.NewRequest(&pb.SetPolicyRequest{Sandbox: args[0], Policy: text}))
			if err != nil {
				return err
			}
			writeNetworkText(g.stdout, resp.Msg.GetNetwork())
			return nil
		},
	}
	show := &cobra.Command{
		Use:   "show SANDBOX",
		Short: "Show a sandbox's policy, the rules enforced (node defaults merged in) and its packet counters",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			resp, err := c.Sandboxes.GetPolicy(cmd.Context(), connect.NewRequest(&pb.GetPolicyRequest{Sandbox: args[0]}))
			if err != nil {
				return err
			}
			writeNetworkText(g.stdout, resp.Msg.GetNetwork())
			return nil
		},
	}
	cmd.AddCommand(apply, show)
	return cmd
}

// writeNetworkText prints a network status for a person.
func writeNetworkText(w io.Writer, n *pb.NetworkStatus) {
	if n == nil {
		return
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	if n.GetAddress() != "" {
		fmt.Fprintf(tw, "Address:\t%s\n", n.GetAddress())
		fmt.Fprintf(tw, "Egress:\t%d allowed, %d dropped\n", n.GetEgressAllowed(), n.GetEgressDropped())
		fmt.Fprintf(tw, "Ingress:\t%d allowed, %d dropped\n", n.GetIngressAllowed(), n.GetIngressDropped())
		fmt.Fprintf(tw, "Spoofed:\t%d dropped\n", n.GetSpoofedDropped())
	}
	_ = tw.Flush()
	pol := n.GetPolicy()
	if strings.TrimSpace(pol) == "" {
		pol = "(none: the node's defaults)\n"
	}
	fmt.Fprintf(w, "Policy:\n%s", indent(pol))
	if e := n.GetEffective(); e != "" {
		fmt.Fprintf(w, "Enforced:\n%s", indent(e))
	}
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

func newPortForwardCmd(g *globals) *cobra.Command {
	var address string
	cmd := &cobra.Command{
		Use:   "port-forward SANDBOX [LOCAL:]GUEST",
		Short: "Forward a local TCP port to a port in a sandbox",
		Long: `Listen on LOCAL (default: the same number as GUEST) on this machine and forward every
connection to port GUEST inside the sandbox, through the API server and the sandbox's node.
Runs until interrupted.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			local, guest, err := parseForward(args[1])
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			// Fail now, not on every connection, if the sandbox is not there (or not ours).
			sb, err := c.Sandboxes.GetSandbox(cmd.Context(), connect.NewRequest(&pb.GetSandboxRequest{Sandbox: args[0]}))
			if err != nil {
				return err
			}
			if st := sb.Msg.GetSandbox().GetStatus(); st != "running" {
				return fmt.Errorf("sandbox %s is %s, not running", args[0], st)
			}
			ln, err := net.Listen("tcp", net.JoinHostPort(address, strconv.Itoa(int(local))))
			if err != nil {
				return fmt.Errorf("listen on %s:%d: %w", address, local, err)
			}
			fmt.Fprintf(g.stderr, "Forwarding %s -> %s:%d\n", ln.Addr(), args[0], guest)
			ctx := cmd.Context()
			go func() { // ends the accept loop when the command is interrupted
				<-ctx.Done()
				ln.Close()
			}()
			var wg sync.WaitGroup
			defer wg.Wait()
			for {
				conn, err := ln.Accept()
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := forwardConn(ctx, c, args[0], guest, conn); err != nil {
						fmt.Fprintf(g.stderr, "fireworks: port-forward %s: %s\n", conn.RemoteAddr(), g.describe(err))
					}
				}()
			}
		},
	}
	cmd.Flags().StringVar(&address, "address", "127.0.0.1", "local address to listen on")
	return cmd
}

// parseForward reads "[LOCAL:]GUEST".
func parseForward(s string) (local, guest uint16, err error) {
	l, gs, found := strings.Cut(s, ":")
	if !found {
		gs = l
	}
	gp, err1 := strconv.ParseUint(gs, 10, 16)
	lp, err2 := strconv.ParseUint(l, 10, 16)
	if err1 != nil || err2 != nil || gp == 0 || (found && lp == 0) {
		return 0, 0, fmt.Errorf("invalid port mapping %q: want [LOCAL:]GUEST with ports in 1..65535", s)
	}
	if !found {
		lp = gp
	}
	return uint16(lp), uint16(gp), nil
}

// forwardConn carries one local connection to the guest port and back.
func forwardConn(ctx context.Context, c *client.Client, sandbox string, port uint16, conn net.Conn) error {
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream := c.Sandboxes.PortForward(ctx)
	if err := stream.Send(&pb.PortForwardRequest{Sandbox: sandbox, Port: uint32(port)}); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	go func() { // local → guest; ends with the connection or the call
		buf := make([]byte, 32<<10)
		for {
			n, err := conn.Read(buf)
			if n > 0 {
				if stream.Send(&pb.PortForwardRequest{Data: append([]byte(nil), buf[:n]...)}) != nil {
					return
				}
			}
			if err != nil {
				_ = stream.Send(&pb.PortForwardRequest{CloseWrite: true})
				return
			}
		}
	}()
	for {
		m, err := stream.Receive()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := conn.Write(m.GetData()); err != nil {
			return nil // the local side went away
		}
	}
}

// nodeNetFlags are a node's networking options (dev and agent).
type nodeNetFlags struct {
	metrics, cidr, resolvConf string
	nameservers, denys, allow []string
}

func (f *nodeNetFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&f.metrics, "metrics-listen", "", "serve Prometheus metrics (sandbox packet counters) at http://ADDR/metrics (default: off)")
	fl.StringVar(&f.cidr, "sandbox-cidr", agent.DefaultSandboxCIDR, "IPv4 range sandbox addresses come from (a /30 per sandbox)")
	fl.StringArrayVar(&f.denys, "deny-cidr", nil, "a range sandboxes may not reach unless an admin's policy allows it, beyond the node's own addresses (repeatable; e.g. the cluster's management network)")
	fl.StringArrayVar(&f.allow, "registry-allow", nil, "a range a user's image pull may reach besides public addresses, e.g. an internal registry's (repeatable; admins' pulls reach anything)")
	fl.StringArrayVar(&f.nameservers, "nameserver", nil, "DNS server for guests (repeatable, at most 3; default: the node's own from --resolv-conf that guests can reach)")
	fl.StringVar(&f.resolvConf, "resolv-conf", "", "the resolv.conf whose nameservers guests get (default /etc/resolv.conf, else systemd-resolved's); an agent in a pod reads the host's, mounted (its own names the cluster's DNS)")
}

func (f *nodeNetFlags) apply(cfg *agent.Config) {
	cfg.MetricsListen, cfg.SandboxCIDR, cfg.DenyCIDRs, cfg.RegistryAllow = f.metrics, f.cidr, f.denys, f.allow
	if len(f.nameservers) > 0 {
		cfg.Nameservers = f.nameservers
	} else if f.resolvConf != "" {
		// An empty list, not nil: the agent does not fall back to its own resolv.conf.
		cfg.Nameservers = append([]string{}, network.Nameservers(f.resolvConf)...)
	}
}
