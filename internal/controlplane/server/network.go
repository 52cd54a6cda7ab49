package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
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
	alls := 0
	for _, p := range spec.Ports {
		switch {
		case p.All:
			if alls++; alls > 1 || p.Port != 0 {
				errs = append(errs, errors.New("every port is published once, with no port number"))
			}
			continue
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

// netStatus asks the sandbox's node for its live network status.
func (s *Server) netStatus(ctx context.Context, sb state.Sandbox) (*pb.NetworkStatus, error) {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp, err := c.sandboxes.GetPolicy(ctx, connect.NewRequest(&pb.GetPolicyRequest{Sandbox: sb.ID}))
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
	text := normalPolicy(req.Msg.GetPolicy())
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
	// Still starting: its network is not there yet. Wait for the start to end, so that
	// what the caller is told is in force, is.
	if sb, err = h.s.waitRunning(ctx, sb); err != nil {
		return nil, err
	}
	if sb.Migration != nil {
		// Its target makes its network from the policy the migration began with.
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is migrating: change its policy once that is done", sb.ID))
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
		// As the server itself: an admin's policy goes back in force only for an admin
		// (the node takes the admin flag only with the caller's word for it).
		rctx := context.WithoutCancel(ctx)
		if sb.Spec.PolicyAdmin {
			rctx = auth.With(rctx, auth.Identity{Role: state.RoleAdmin})
		}
		if rerr := h.s.applyPolicy(rctx, sb, sb.Spec.Policy, sb.Spec.PolicyAdmin); rerr != nil {
			h.s.log.Error("restore the recorded network policy after a failed write", "sandbox", sb.ID, "err", rerr)
		}
		return nil, toConnectError(err)
	}
	st, err := h.s.netStatus(ctx, sb)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SetPolicyResponse{Network: h.s.netView(ctx, st)}), nil
}

// applyPolicy puts a policy in force on the sandbox's node.
func (s *Server) applyPolicy(ctx context.Context, sb state.Sandbox, text string, admin bool) error {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return toConnectError(err)
	}
	// Bounded: policy changes are serialised (policyMu), so a node that does not answer
	// must not hold up every other sandbox's.
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err = c.sandboxes.SetPolicy(ctx, connect.NewRequest(&pb.SetPolicyRequest{Sandbox: sb.ID, Policy: text, Admin: admin}))
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
	return connect.NewResponse(&pb.GetPolicyResponse{Network: h.s.netView(ctx, st)}), nil
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
	rs := c.sandboxes.PortForward(rctx)
	if err := rs.Send(&pb.PortForwardRequest{Sandbox: sb.ID, Port: port, Data: first.GetData(), CloseWrite: first.GetCloseWrite()}); err != nil && !errors.Is(err, io.EOF) {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("port-forward on node %s: %w", sb.Node, err))
	}
	go relayRequests(stream.Receive, rs.Send, rs.CloseRequest)
	return relayResponses(rs.Receive, stream.Send, "port-forward", sb.Node)
}

// normalPolicy is "" (the node's defaults) for a policy of blank lines only: a policy with
// no rule and no default line otherwise denies by default, and "(none)" would be shown
// for what in fact denies everything.
func normalPolicy(text string) string {
	if strings.TrimSpace(text) == "" {
		return ""
	}
	return text
}
