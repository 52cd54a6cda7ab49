package nodeapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/sandboxlog"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
)

// attachStream is the server side of an Attach call.
type attachStream interface {
	Receive() (*pb.AttachRequest, error)
	Send(*pb.AttachResponse) error
}

// attachLocal serves an attach to a sandbox on this node: it replays and follows the
// output, forwards stdin, resizes and signals, and, when the sandbox's run on this node is
// over, sends the exit that finalExit returns (none when it returns nil).
func attachLocal(ctx context.Context, ag *agent.Agent, id string, stdin bool, stream attachStream, finalExit func(context.Context) (*pb.Exit, error)) error {
	var sendMu sync.Mutex
	send := func(r *pb.AttachResponse) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(r)
	}

	// Input: runs until the client closes its side or the call ends.
	inputCtx, stopInput := context.WithCancel(ctx)
	defer stopInput()
	go func() {
		var main *client.Session
		for {
			msg, err := stream.Receive()
			if err != nil {
				if main != nil && stdin && errors.Is(err, io.EOF) {
					_ = main.Stdin().Close()
				}
				return
			}
			if main == nil {
				main, err = ag.MainSession(inputCtx, id)
				if err != nil {
					return
				}
			}
			switch m := msg.Msg.(type) {
			case *pb.AttachRequest_Stdin:
				if stdin {
					_, _ = main.Stdin().Write(m.Stdin)
				}
			case *pb.AttachRequest_StdinClose:
				if stdin {
					_ = main.Stdin().Close()
				}
			case *pb.AttachRequest_Resize:
				_ = main.Resize(inputCtx, uint16(m.Resize.GetRows()), uint16(m.Resize.GetCols()))
			case *pb.AttachRequest_Signal:
				_ = main.Signal(inputCtx, int(m.Signal))
			}
		}
	}()

	err := sandboxlog.Read(ctx, ag.LogPath(id), ag.Live(id), func(r sandboxlog.Record) error {
		return send(&pb.AttachResponse{Msg: &pb.AttachResponse_Output{Output: &pb.Output{Stream: int32(r.Stream), Data: r.Data}}})
	})
	if err != nil {
		return toConnectError(err)
	}
	// The log closes when the sandbox goroutine ends; the final status is written just
	// before, but wait for it to be sure the exit we report is the recorded one.
	select {
	case <-ag.Done(id):
	case <-ctx.Done():
		return toConnectError(ctx.Err())
	}
	exit, err := finalExit(ctx)
	if err != nil || exit == nil {
		return toConnectError(err)
	}
	return send(&pb.AttachResponse{Msg: &pb.AttachResponse_Exit{Exit: exit}})
}

// logsLocal replays (and with follow, follows) the output of a sandbox on this node.
func logsLocal(ctx context.Context, ag *agent.Agent, id string, follow bool, send func(*pb.LogsResponse) error) error {
	var live *sandboxlog.Writer
	if follow {
		live = ag.Live(id)
	}
	err := sandboxlog.Read(ctx, ag.LogPath(id), live, func(r sandboxlog.Record) error {
		return send(&pb.LogsResponse{Output: &pb.Output{Stream: int32(r.Stream), Data: r.Data}})
	})
	return toConnectError(err)
}

// execStream is the server side of an Exec call.
type execStream interface {
	Receive() (*pb.ExecRequest, error)
	Send(*pb.ExecResponse) error
}

// execLocal runs an exec session in a sandbox on this node and streams it.
func execLocal(ctx context.Context, ag *agent.Agent, id string, start *pb.ExecStart, stream execStream) error {
	sb := struct{ ID string }{id}
	env := start.GetEnv()
	sess, err := ag.Exec(ctx, sb.ID, proto.ExecRequest{
		Argv: start.GetArgv(), Env: env, Dir: start.GetWorkingDir(), User: start.GetUser(),
		TTY: start.GetTty(), Stdin: start.GetStdin(), Rows: uint16(start.GetRows()), Cols: uint16(start.GetCols()),
	})
	if err != nil {
		return toConnectError(fmt.Errorf("exec in sandbox %s: %w", sb.ID, err))
	}
	var ended string
	defer func() { _ = ag.ExecDone(sb.ID, sess) }()
	if !start.GetStdin() {
		_ = sess.Stdin().Close()
	}
	// A client that goes away takes its command with it (as a hung-up terminal would):
	// kill the process and stop reading its output, so nothing stays blocked in the
	// guest on a full pipe and the session does not count against the guest's limit.
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-ctx.Done():
			kctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = sess.Signal(kctx, 9)
			cancel()
			_ = sess.Close()
		case <-finished:
		}
	}()
	var sendMu sync.Mutex
	send := func(r *pb.ExecResponse) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(r)
	}
	go func() {
		for {
			msg, err := stream.Receive()
			if err != nil {
				if errors.Is(err, io.EOF) {
					_ = sess.Stdin().Close()
				}
				return
			}
			switch m := msg.Msg.(type) {
			case *pb.ExecRequest_Stdin:
				_, _ = sess.Stdin().Write(m.Stdin)
			case *pb.ExecRequest_StdinClose:
				_ = sess.Stdin().Close()
			case *pb.ExecRequest_Resize:
				_ = sess.Resize(ctx, uint16(m.Resize.GetRows()), uint16(m.Resize.GetCols()))
			case *pb.ExecRequest_Signal:
				_ = sess.Signal(ctx, int(m.Signal))
			}
		}
	}()
	var wg sync.WaitGroup
	pump := func(r io.Reader, streamNo int32) {
		defer wg.Done()
		if r == nil {
			return
		}
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				if serr := send(&pb.ExecResponse{Msg: &pb.ExecResponse_Output{Output: &pb.Output{Stream: streamNo, Data: append([]byte(nil), buf[:n]...)}}}); serr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	wg.Add(2)
	go pump(sess.Stdout(), sandboxlog.Stdout)
	go pump(sess.Stderr(), sandboxlog.Stderr)
	st, err := sess.Wait(ctx)
	wg.Wait()
	ended = ag.ExecDone(sb.ID, sess)
	if err != nil {
		if ended != "" {
			err = errors.New(ended)
		}
		return toConnectError(fmt.Errorf("exec in sandbox %s: %w", sb.ID, err))
	}
	code := st.Code
	reason := ""
	if ended != "" {
		reason = "the command was " + ended
	}
	switch st.ErrKind {
	case proto.ErrKindNotFound:
		code, reason = 127, "command not found: "+st.Err
	case proto.ErrKindNotExecutable:
		code, reason = 126, "command not executable: "+st.Err
	case "":
	default:
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("exec %q: %s", start.GetArgv()[0], st.Err))
	}
	status := "exited"
	if ended != "" {
		// The ends the node gives an exec (see agent.endExecs): a pause's, a migration's.
		status = "paused"
		if strings.Contains(ended, "migration") {
			status = "migrating"
		}
	}
	return send(&pb.ExecResponse{Msg: &pb.ExecResponse_Exit{Exit: &pb.Exit{Code: int32(code), Signal: int32(st.Signal), Status: status, Reason: reason}}})
}

func netStatusPB(st agent.NetStats) *pb.NetworkStatus {
	return &pb.NetworkStatus{Address: st.Address, EgressAllowed: st.EgressAllowed, EgressDropped: st.EgressDropped,
		IngressAllowed: st.IngressAllowed, IngressDropped: st.IngressDropped, SpoofedDropped: st.Spoofed,
		Policy: st.Policy, Effective: st.Effective}
}

// portForwardStream is the server side of a PortForward call.
type portForwardStream interface {
	Receive() (*pb.PortForwardRequest, error)
	Send(*pb.PortForwardResponse) error
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

func (n *sandboxService) SetPolicy(ctx context.Context, req *connect.Request[pb.SetPolicyRequest]) (*connect.Response[pb.SetPolicyResponse], error) {
	if err := checkID(req.Msg.GetSandbox()); err != nil {
		return nil, err
	}
	if err := n.ag.SetPolicy(req.Msg.GetSandbox(), req.Msg.GetPolicy(), req.Msg.GetAdmin() && callerOf(req.Header()).admin); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	st, err := n.ag.NetStats(req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.SetPolicyResponse{Network: netStatusPB(st)}), nil
}

func (n *sandboxService) GetPolicy(ctx context.Context, req *connect.Request[pb.GetPolicyRequest]) (*connect.Response[pb.GetPolicyResponse], error) {
	if err := checkID(req.Msg.GetSandbox()); err != nil {
		return nil, err
	}
	st, err := n.ag.NetStats(req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.GetPolicyResponse{Network: netStatusPB(st)}), nil
}

func (n *sandboxService) PortForward(ctx context.Context, stream *connect.BidiStream[pb.PortForwardRequest, pb.PortForwardResponse]) error {
	first, err := stream.Receive()
	if err != nil {
		return toConnectError(fmt.Errorf("read port-forward request: %w", err))
	}
	if err := checkID(first.GetSandbox()); err != nil {
		return err
	}
	if first.GetPort() == 0 || first.GetPort() > 65535 {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("guest port %d: want 1..65535", first.GetPort()))
	}
	return portForwardLocal(ctx, n.ag, first.GetSandbox(), uint16(first.GetPort()), first, stream)
}

type sandboxService struct {
	fireworksv1connect.UnimplementedSandboxServiceHandler
	ag *agent.Agent
}

func (n *sandboxService) Attach(ctx context.Context, stream *connect.BidiStream[pb.AttachRequest, pb.AttachResponse]) error {
	first, err := stream.Receive()
	if err != nil {
		return toConnectError(fmt.Errorf("read attach request: %w", err))
	}
	id := first.GetStart().GetSandbox()
	if err := checkID(id); err != nil {
		return err
	}
	spec, _ := n.ag.Spec(id)
	// No exit here: the server reports the one recorded in the state.
	return attachLocal(ctx, n.ag, id, spec.Stdin, stream, func(context.Context) (*pb.Exit, error) { return nil, nil })
}

func (n *sandboxService) Logs(ctx context.Context, req *connect.Request[pb.LogsRequest], stream *connect.ServerStream[pb.LogsResponse]) error {
	if err := checkID(req.Msg.GetSandbox()); err != nil {
		return err
	}
	return logsLocal(ctx, n.ag, req.Msg.GetSandbox(), req.Msg.GetFollow(), stream.Send)
}

func (n *sandboxService) Exec(ctx context.Context, stream *connect.BidiStream[pb.ExecRequest, pb.ExecResponse]) error {
	_, start, err := rpc.ReadExecStart(stream)
	if err != nil {
		return err
	}
	if err := checkID(start.GetSandbox()); err != nil {
		return err
	}
	return execLocal(ctx, n.ag, start.GetSandbox(), start, stream)
}

// RemoveSandbox removes the files of a sandbox that is over (its VM is stopped first if
// one is still live here): the server calls it before it forgets the sandbox, so that
// `rm` is done when it returns. A node that misses the call removes them when the
// sandbox leaves its assignments.
func (n *sandboxService) RemoveSandbox(ctx context.Context, req *connect.Request[pb.RemoveSandboxRequest]) (*connect.Response[pb.RemoveSandboxResponse], error) {
	id := req.Msg.GetSandbox()
	if err := checkID(id); err != nil {
		return nil, err
	}
	if err := n.ag.Stop(ctx, id, 0); err != nil && !errors.Is(err, agent.ErrNotRunning) {
		return nil, toConnectError(fmt.Errorf("stop sandbox %s before removing it: %w", id, err))
	}
	if err := n.ag.Remove(id); err != nil {
		return nil, toConnectError(fmt.Errorf("remove sandbox %s: %w", id, err))
	}
	return connect.NewResponse(&pb.RemoveSandboxResponse{}), nil
}

// CreateSnapshot copies a running sandbox's filesystem (see agent.SnapshotFS), or a
// paused one's saved VM (agent.SnapshotMemory), into the snapshot the server named; the
// server records it once the files are here.
func (n *sandboxService) CreateSnapshot(ctx context.Context, req *connect.Request[pb.CreateSnapshotRequest]) (*connect.Response[pb.CreateSnapshotResponse], error) {
	id, snap := req.Msg.GetSandbox(), req.Msg.GetSnapshotId()
	if err := checkID(id); err != nil {
		return nil, err
	}
	if err := checkID(snap); err != nil {
		return nil, err
	}
	snapshot := n.ag.SnapshotFS
	if req.Msg.GetMemory() {
		snapshot = n.ag.SnapshotMemory
	}
	info, err := snapshot(ctx, id, snap)
	if err != nil {
		return nil, toConnectError(fmt.Errorf("snapshot sandbox %s on node %s: %w", id, n.ag.NodeName(), err))
	}
	return connect.NewResponse(&pb.CreateSnapshotResponse{Snapshot: &pb.Snapshot{Id: snap, Sandbox: id, ImageDigest: info.ImageDigest,
		Bytes: info.Bytes, CreatedAt: timestamppb.New(info.At), Node: n.ag.NodeName(), Memory: info.Memory}}), nil
}

// DeleteSnapshot removes a snapshot's files (by ID) from this node.
func (n *sandboxService) DeleteSnapshot(ctx context.Context, req *connect.Request[pb.DeleteSnapshotRequest]) (*connect.Response[pb.DeleteSnapshotResponse], error) {
	if err := checkID(req.Msg.GetSnapshot()); err != nil {
		return nil, err
	}
	if err := n.ag.RemoveSnapshot(ctx, req.Msg.GetSnapshot()); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.DeleteSnapshotResponse{}), nil
}
