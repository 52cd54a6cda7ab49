package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/agent"
	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/netpolicy"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// MaxPorts bounds the ports one sandbox publishes.
const MaxPorts = 32

// validateNetworkSpec checks the network part of a sandbox request.
func validateNetworkSpec(spec *state.SandboxSpec, admin bool) error {
	var errs []error
	switch spec.Network {
	case "", state.NetworkNone:
	default:
		errs = append(errs, fmt.Errorf("--network %q: want none, or leave it out for a network of its own", spec.Network))
	}
	if spec.Policy != "" {
		if spec.Network == state.NetworkNone {
			errs = append(errs, errors.New("a network policy needs a network (not --network none)"))
		} else if set, err := netpolicy.ParsePolicy(spec.Policy); err != nil {
			errs = append(errs, fmt.Errorf("network policy: %w", err))
		} else if !admin {
			// What every node protects, refused here as `policy apply` refuses it (a
			// node's own addresses are only known on the node: a rule inside them is kept
			// there and has no effect).
			for _, why := range set.AllowsInside(netpolicy.FixedProtected()) {
				errs = append(errs, fmt.Errorf("network policy: %s, which only an admin's policy may open (link-local and metadata, loopback, broadcast, multicast)", why))
			}
		}
	}
	if len(spec.Ports) > MaxPorts {
		errs = append(errs, fmt.Errorf("%d published ports: at most %d", len(spec.Ports), MaxPorts))
	}
	seen := map[uint16]bool{}
	for _, p := range spec.Ports {
		switch {
		case p.Port == 0:
			errs = append(errs, errors.New("published port 0: want 1..65535"))
		case seen[p.Port]:
			errs = append(errs, fmt.Errorf("port %d published twice", p.Port))
		}
		seen[p.Port] = true
	}
	if len(spec.Ports) > 0 && spec.Network == state.NetworkNone {
		errs = append(errs, errors.New("published ports need a network (not --network none)"))
	}
	return errors.Join(errs...)
}

// newAccessToken makes a sandbox's token for its private ports.
func newAccessToken() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func netStatusPB(st agent.NetStats) *pb.NetworkStatus {
	return &pb.NetworkStatus{Address: st.Address, EgressAllowed: st.EgressAllowed, EgressDropped: st.EgressDropped,
		IngressAllowed: st.IngressAllowed, IngressDropped: st.IngressDropped, SpoofedDropped: st.Spoofed,
		Policy: st.Policy, Effective: st.Effective}
}

// netStatus asks the sandbox's node for its live network status.
func (s *Server) netStatus(ctx context.Context, sb state.Sandbox) (*pb.NetworkStatus, error) {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp, err := c.GetPolicy(ctx, connect.NewRequest(&pb.GetPolicyRequest{Sandbox: sb.ID}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.GetNetwork(), nil
}

func (h *sandboxService) SetPolicy(ctx context.Context, req *connect.Request[pb.SetPolicyRequest]) (*connect.Response[pb.SetPolicyResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	text := req.Msg.GetPolicy()
	if sb.Spec.Network == state.NetworkNone {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s has no network (--network none)", sb.ID))
	}
	// Refused before anything changes: the old policy stays in force.
	if _, err := netpolicy.ParsePolicy(text); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("network policy: %w", err))
	}
	if sb.Status.Terminal() {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s", sb.ID, sb.Status))
	}
	if sb.Status != state.StatusRunning {
		// Still starting: its network is not there yet. Wait for the start to end, so
		// that what the caller is told is in force, is.
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		sb, err = h.s.waitFor(wctx, sb.ID, func(sb state.Sandbox) bool {
			return sb.Status != state.StatusPending && sb.Status != state.StatusStarting
		})
		cancel()
		if err != nil {
			return nil, toConnectError(err)
		}
		if sb.Status != state.StatusRunning {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s", sb.ID, sb.Status))
		}
	}
	// One change at a time (the leader serves every SetPolicy), node first: the node
	// checks the policy against what it protects and puts it in force, and only a policy
	// in force is recorded, so the state never holds one a node would refuse (a
	// restarted agent re-applies the recorded one).
	h.s.policyMu.Lock()
	defer h.s.policyMu.Unlock()
	admin := who.Admin()
	if err := h.s.applyPolicy(ctx, sb, text, admin); err != nil {
		return nil, err
	}
	if _, err := h.s.store.UpdateSandbox(ctx, sb.ID, state.Update{Policy: &text, PolicyAdmin: admin, Time: h.s.now()}); err != nil {
		// Put the recorded policy back in force, so node and state agree.
		if rerr := h.s.applyPolicy(context.WithoutCancel(ctx), sb, sb.Spec.Policy, sb.Spec.PolicyAdmin); rerr != nil {
			h.s.log.Error("restore the recorded network policy after a failed write", "sandbox", sb.ID, "err", rerr)
		}
		return nil, toConnectError(err)
	}
	st, err := h.s.netStatus(ctx, sb)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SetPolicyResponse{Network: st}), nil
}

// applyPolicy puts a policy in force on the sandbox's node.
func (s *Server) applyPolicy(ctx context.Context, sb state.Sandbox, text string, admin bool) error {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return toConnectError(err)
	}
	_, err = c.SetPolicy(ctx, connect.NewRequest(&pb.SetPolicyRequest{Sandbox: sb.ID, Policy: text, Admin: admin}))
	return err
}

func (h *sandboxService) GetPolicy(ctx context.Context, req *connect.Request[pb.GetPolicyRequest]) (*connect.Response[pb.GetPolicyResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if sb.Spec.Network == state.NetworkNone {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s has no network (--network none)", sb.ID))
	}
	if sb.Status != state.StatusRunning {
		return connect.NewResponse(&pb.GetPolicyResponse{Network: &pb.NetworkStatus{Policy: sb.Spec.Policy}}), nil
	}
	st, err := h.s.netStatus(ctx, sb)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.GetPolicyResponse{Network: st}), nil
}

// portForwardStream is the server side of a PortForward call.
type portForwardStream interface {
	Receive() (*pb.PortForwardRequest, error)
	Send(*pb.PortForwardResponse) error
}

func (h *sandboxService) PortForward(ctx context.Context, stream *connect.BidiStream[pb.PortForwardRequest, pb.PortForwardResponse]) error {
	first, err := stream.Receive()
	if err != nil {
		return toConnectError(fmt.Errorf("read port-forward request: %w", err))
	}
	port := first.GetPort()
	if port == 0 || port > 65535 {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("guest port %d: want 1..65535", port))
	}
	sb, err := h.s.lookup(ctx, first.GetSandbox())
	if err != nil {
		return toConnectError(err)
	}
	if sb.Status != state.StatusRunning {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s, not running", sb.ID, sb.Status))
	}
	c, err := h.s.nodeFor(ctx, sb)
	if err != nil {
		return toConnectError(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rs := c.PortForward(rctx)
	if err := rs.Send(&pb.PortForwardRequest{Sandbox: sb.ID, Port: port, Data: first.GetData(), CloseWrite: first.GetCloseWrite()}); err != nil && !errors.Is(err, io.EOF) {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("port-forward on node %s: %w", sb.Node, err))
	}
	go relayRequests(stream.Receive, rs.Send, rs.CloseRequest)
	return relayResponses(rs.Receive, stream.Send, "port-forward", sb.Node)
}

// portForwardLocal connects to a guest port of a sandbox on this node and copies both
// ways until either side is done.
func portForwardLocal(ctx context.Context, ag *agent.Agent, id string, port uint16, first *pb.PortForwardRequest, stream portForwardStream) error {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := ag.DialSandbox(dctx, id, port)
	cancel()
	if err != nil {
		return connect.NewError(connect.CodeUnavailable, err)
	}
	defer conn.Close()
	// Client → guest; the call's end (handler return) stops it by closing conn.
	go func() {
		m := first
		for {
			if len(m.GetData()) > 0 {
				if _, err := conn.Write(m.GetData()); err != nil {
					conn.Close()
					return
				}
			}
			if m.GetCloseWrite() {
				if cw, ok := conn.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
				return
			}
			var err error
			if m, err = stream.Receive(); err != nil {
				if cw, ok := conn.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
				return
			}
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if err := stream.Send(&pb.PortForwardResponse{Data: buf[:n]}); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("port %d of sandbox %s: %w", port, id, err))
		}
	}
}

func (n *nodeSandboxService) SetPolicy(ctx context.Context, req *connect.Request[pb.SetPolicyRequest]) (*connect.Response[pb.SetPolicyResponse], error) {
	if err := n.ag.SetPolicy(req.Msg.GetSandbox(), req.Msg.GetPolicy(), req.Msg.GetAdmin()); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	st, err := n.ag.NetStats(req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.SetPolicyResponse{Network: netStatusPB(st)}), nil
}

func (n *nodeSandboxService) GetPolicy(ctx context.Context, req *connect.Request[pb.GetPolicyRequest]) (*connect.Response[pb.GetPolicyResponse], error) {
	st, err := n.ag.NetStats(req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.GetPolicyResponse{Network: netStatusPB(st)}), nil
}

func (n *nodeSandboxService) PortForward(ctx context.Context, stream *connect.BidiStream[pb.PortForwardRequest, pb.PortForwardResponse]) error {
	first, err := stream.Receive()
	if err != nil {
		return toConnectError(fmt.Errorf("read port-forward request: %w", err))
	}
	if first.GetPort() == 0 || first.GetPort() > 65535 {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("guest port %d: want 1..65535", first.GetPort()))
	}
	return portForwardLocal(ctx, n.ag, first.GetSandbox(), uint16(first.GetPort()), first, stream)
}
