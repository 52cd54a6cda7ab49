package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/agent"
	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/sandboxlog"
	"github.com/fireworks-sandbox/fireworks/internal/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

type sandboxService struct{ s *Server }

func (h *sandboxService) CreateSandbox(ctx context.Context, req *connect.Request[pb.CreateSandboxRequest]) (*connect.Response[pb.CreateSandboxResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	spec := specFromPB(req.Msg.GetSpec())
	if err := spec.CheckSizes(); err != nil {
		return nil, toConnectError(err)
	}
	if err := checkImageSource(ctx, spec.Image); err != nil {
		return nil, err
	}
	if len(spec.InsecureRegistries) > 0 && !who.Admin() {
		// Plain-HTTP registries make the node connect wherever told: admins only.
		return nil, connect.NewError(connect.CodePermissionDenied, errors.New("--insecure-registry needs an admin token"))
	}
	if err := validName(req.Msg.GetName()); err != nil {
		return nil, toConnectError(err)
	}
	if spec.Boot, err = state.ParseBootMode(string(spec.Boot)); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("--boot: %w", err))
	}
	if err := validateNetworkSpec(&spec, who.Admin()); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	spec.PolicyAdmin = spec.Policy != "" && who.Admin()
	spec.PullPrivate = who.Admin()
	if h.s.agent != nil {
		err = h.s.agent.Validate(&spec)
	} else {
		err = validateClusterSpec(&spec)
	}
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	now := h.s.now()
	sb := state.Sandbox{
		ID: state.NewID(), Name: req.Msg.GetName(), Spec: spec, Status: state.StatusPending, Owner: who.TokenID,
		AccessToken: newAccessToken(), CreatedAt: now, Events: []state.Event{{Time: now, Status: state.StatusPending, Reason: "accepted"}},
	}
	if err := h.s.store.CreateSandboxWithin(ctx, sb, h.s.limits.quota(who.Admin())); err != nil {
		return nil, toConnectError(fmt.Errorf("create sandbox: %w", err))
	}
	if h.s.agent != nil {
		if err := h.s.agent.Start(sb); err != nil {
			st := state.StatusFailed
			_, _ = h.s.store.UpdateSandbox(ctx, sb.ID, state.Update{Status: &st, Reason: err.Error(), Time: h.s.now()})
			return nil, toConnectError(err)
		}
	} else if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Notify() // place it now rather than at the next periodic pass
	}
	got, err := h.s.store.GetSandbox(ctx, sb.ID)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.CreateSandboxResponse{Sandbox: sandboxToPB(got)}), nil
}

func (h *sandboxService) GetSandbox(ctx context.Context, req *connect.Request[pb.GetSandboxRequest]) (*connect.Response[pb.GetSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	out := sandboxToPB(sb)
	if sb.Status == state.StatusRunning && sb.Spec.Network != state.NetworkNone {
		// Live counters, best effort: inspect must not hang on a slow node.
		nctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		if st, err := h.s.netStatus(nctx, sb); err == nil {
			out.Network = st
		}
		cancel()
	}
	return connect.NewResponse(&pb.GetSandboxResponse{Sandbox: out}), nil
}

func (h *sandboxService) ListSandboxes(ctx context.Context, req *connect.Request[pb.ListSandboxesRequest]) (*connect.Response[pb.ListSandboxesResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	all, err := h.s.store.ListSandboxes(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListSandboxesResponse{}
	for _, sb := range all {
		if !req.Msg.GetAll() && sb.Status.Terminal() || !who.CanAccess(sb.Owner) {
			continue
		}
		resp.Sandboxes = append(resp.Sandboxes, sandboxToPB(sb))
	}
	return connect.NewResponse(resp), nil
}

func (h *sandboxService) StopSandbox(ctx context.Context, req *connect.Request[pb.StopSandboxRequest]) (*connect.Response[pb.StopSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	grace := 10 * time.Second
	if g := req.Msg.GetGrace(); g != nil {
		grace = g.AsDuration()
	}
	if grace < 0 || grace > 10*time.Minute {
		return nil, toConnectError(invalid("grace %s must be between 0 and 10m", grace))
	}
	if !sb.Status.Terminal() {
		if err := h.s.stop(ctx, sb, grace); err != nil {
			return nil, toConnectError(fmt.Errorf("stop sandbox %s: %w", sb.ID, err))
		}
	}
	sb, err = h.s.store.GetSandbox(ctx, sb.ID)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.StopSandboxResponse{Sandbox: sandboxToPB(sb)}), nil
}

func (h *sandboxService) RemoveSandbox(ctx context.Context, req *connect.Request[pb.RemoveSandboxRequest]) (*connect.Response[pb.RemoveSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if !sb.Status.Terminal() {
		if !req.Msg.GetForce() {
			return nil, connect.NewError(connect.CodeFailedPrecondition,
				fmt.Errorf("sandbox %s is %s: stop it first or use rm -f", sb.ID, sb.Status))
		}
		if err := h.s.stop(ctx, sb, 0); err != nil {
			return nil, toConnectError(fmt.Errorf("kill sandbox %s: %w", sb.ID, err))
		}
	}
	// A local sandbox's files go now; a remote node removes its own when the record is
	// gone from its assignments.
	if h.s.agent != nil && h.s.isLocal(sb) {
		if err := h.s.agent.Remove(sb.ID); err != nil {
			return nil, toConnectError(err)
		}
	}
	if err := h.s.store.DeleteSandbox(ctx, sb.ID); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.RemoveSandboxResponse{}), nil
}

// Attach replays the main process's output from the start, follows it, forwards stdin and
// signals, and ends with the exit.
func (h *sandboxService) Attach(ctx context.Context, stream *connect.BidiStream[pb.AttachRequest, pb.AttachResponse]) error {
	first, err := stream.Receive()
	if err != nil {
		return toConnectError(fmt.Errorf("read attach request: %w", err))
	}
	start := first.GetStart()
	if start == nil {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("the first attach message must be start"))
	}
	sb, err := h.s.lookup(ctx, start.GetSandbox())
	if err != nil {
		return toConnectError(err)
	}
	// A new sandbox waits for a node; attach once the node has it.
	if sb, err = h.s.waitStarted(ctx, sb.ID); err != nil {
		return toConnectError(err)
	}
	return h.s.attachOnNode(ctx, sb, stream)
}

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

func exitOf(sb state.Sandbox) *pb.Exit {
	return &pb.Exit{Code: int32(sb.ExitCode), Signal: int32(sb.Signal), Status: string(sb.Status), Reason: sb.Reason}
}

func (h *sandboxService) Logs(ctx context.Context, req *connect.Request[pb.LogsRequest], stream *connect.ServerStream[pb.LogsResponse]) error {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return toConnectError(err)
	}
	if sb.Node == "" && h.s.agent == nil {
		return nil // not placed yet: no output
	}
	return h.s.logsOnNode(ctx, sb, req.Msg, stream)
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

// readExecStart reads and checks the first message of an Exec call.
func readExecStart(stream execStream) (*pb.ExecRequest, *pb.ExecStart, error) {
	first, err := stream.Receive()
	if err != nil {
		return nil, nil, toConnectError(fmt.Errorf("read exec request: %w", err))
	}
	start := first.GetStart()
	if start == nil || len(start.GetArgv()) == 0 {
		return nil, nil, connect.NewError(connect.CodeInvalidArgument, errors.New("the first exec message must be start with a non-empty argv"))
	}
	return first, start, nil
}

func (h *sandboxService) Exec(ctx context.Context, stream *connect.BidiStream[pb.ExecRequest, pb.ExecResponse]) error {
	first, start, err := readExecStart(stream)
	if err != nil {
		return err
	}
	if err := validateEnvPB(start.GetEnv()); err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err)
	}
	sb, err := h.s.lookup(ctx, start.GetSandbox())
	if err != nil {
		return toConnectError(err)
	}
	if sb.Status != state.StatusRunning {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s, not running", sb.ID, sb.Status))
	}
	return h.s.execOnNode(ctx, sb, first, stream)
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
	if err != nil {
		return toConnectError(fmt.Errorf("exec in sandbox %s: %w", sb.ID, err))
	}
	code := st.Code
	reason := ""
	switch st.ErrKind {
	case proto.ErrKindNotFound:
		code, reason = 127, "command not found: "+st.Err
	case proto.ErrKindNotExecutable:
		code, reason = 126, "command not executable: "+st.Err
	case "":
	default:
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("exec %q: %s", start.GetArgv()[0], st.Err))
	}
	return send(&pb.ExecResponse{Msg: &pb.ExecResponse_Exit{Exit: &pb.Exit{Code: int32(code), Signal: int32(st.Signal), Status: "exited", Reason: reason}}})
}

func validateEnvPB(env []string) error {
	for _, kv := range env {
		if k, _, ok := cutEq(kv); !ok || k == "" {
			return fmt.Errorf("invalid environment entry %q: want KEY=VALUE", kv)
		}
	}
	return nil
}

func cutEq(s string) (string, string, bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == '=' {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

func specFromPB(p *pb.SandboxSpec) state.SandboxSpec {
	spec := state.SandboxSpec{
		Image: p.GetImage(), Cmd: p.GetCmd(), Env: p.GetEnv(), WorkingDir: p.GetWorkingDir(),
		User: p.GetUser(), VCPUs: int(p.GetVcpus()), MemoryMiB: int(p.GetMemoryMib()),
		TTY: p.GetTty(), Stdin: p.GetStdin(), InsecureRegistries: p.GetInsecureRegistries(),
		Restart: state.RestartPolicy(p.GetRestart()), Constraints: p.GetConstraints(), Spread: p.GetSpread(),
		DiskMiB: int(p.GetDiskMib()), Boot: state.BootMode(p.GetBoot()),
		Network: p.GetNetwork(), Policy: p.GetPolicy(),
	}
	for _, pp := range p.GetPorts() {
		port := uint16(pp.GetPort())
		if pp.GetPort() > 65535 {
			port = 0 // refused by validation
		}
		spec.Ports = append(spec.Ports, state.Port{Port: port, Public: pp.GetPublic()})
	}
	if p.GetEntrypointSet() {
		spec.Entrypoint = append([]string{}, p.GetEntrypoint()...)
		if len(spec.Entrypoint) == 0 {
			spec.Entrypoint = []string{""}
		}
	}
	if t := p.GetTimeout(); t != nil {
		spec.Timeout = t.AsDuration()
	}
	return spec
}

func sandboxToPB(sb state.Sandbox) *pb.Sandbox {
	spec := &pb.SandboxSpec{
		Image: sb.Spec.Image, Cmd: sb.Spec.Cmd, Env: sb.Spec.Env, WorkingDir: sb.Spec.WorkingDir,
		User: sb.Spec.User, Vcpus: int32(sb.Spec.VCPUs), MemoryMib: int32(sb.Spec.MemoryMiB),
		Tty: sb.Spec.TTY, Stdin: sb.Spec.Stdin, InsecureRegistries: sb.Spec.InsecureRegistries,
		Restart: string(sb.Spec.Restart), Constraints: sb.Spec.Constraints, Spread: sb.Spec.Spread,
		DiskMib: int32(sb.Spec.DiskMiB), Boot: string(sb.Spec.Boot),
		Network: sb.Spec.Network, Policy: sb.Spec.Policy,
	}
	for _, p := range sb.Spec.Ports {
		spec.Ports = append(spec.Ports, &pb.Port{Port: uint32(p.Port), Public: p.Public})
	}
	if sb.Spec.Entrypoint != nil {
		spec.EntrypointSet, spec.Entrypoint = true, sb.Spec.Entrypoint
	}
	if sb.Spec.Timeout > 0 {
		spec.Timeout = durationpb.New(sb.Spec.Timeout)
	}
	out := &pb.Sandbox{
		Id: sb.ID, Name: sb.Name, Spec: spec, Status: string(sb.Status), Reason: sb.Reason,
		ExitCode: int32(sb.ExitCode), Signal: int32(sb.Signal), Node: sb.Node, ImageDigest: sb.ImageDigest,
		Accel: sb.Accel, CreatedAt: ts(sb.CreatedAt), StartedAt: ts(sb.StartedAt), FinishedAt: ts(sb.FinishedAt),
		Details: sb.Runtime, Owner: sb.Owner, Restarts: int32(sb.Restarts), AccessToken: sb.AccessToken,
	}
	for _, e := range sb.Events {
		out.Events = append(out.Events, &pb.Event{Time: ts(e.Time), Status: string(e.Status), Reason: e.Reason})
	}
	return out
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// lookup resolves a sandbox reference the caller gave (ID, name or ID prefix) and checks
// the caller may act on it: admins on every sandbox, users on the ones they created.
func (s *Server) lookup(ctx context.Context, ref string) (state.Sandbox, error) {
	who, err := caller(ctx)
	if err != nil {
		return state.Sandbox{}, err
	}
	owner := ""
	if !who.Admin() {
		// A user's lookups see only the user's sandboxes: another's is "not found" by
		// ID, name or prefix, so nothing confirms that it exists.
		owner = who.TokenID
	}
	sb, err := s.store.GetOwnedSandbox(ctx, ref, owner)
	if err != nil {
		return state.Sandbox{}, err
	}
	if !who.CanAccess(sb.Owner) {
		return state.Sandbox{}, connect.NewError(connect.CodePermissionDenied,
			fmt.Errorf("sandbox %q belongs to another token; a user token acts only on its own sandboxes", ref))
	}
	return sb, nil
}

// stop ends a sandbox that is not over yet and returns once it is recorded as over (or ctx
// ends). On this process's own node it stops the VM directly; elsewhere it records the
// request, which the node acts on (SIGTERM, then a kill after grace).
func (s *Server) stop(ctx context.Context, sb state.Sandbox, grace time.Duration) error {
	if s.agent != nil && s.isLocal(sb) {
		if err := s.agent.Stop(ctx, sb.ID, grace); err != nil && !errors.Is(err, agent.ErrNotRunning) {
			return err
		}
		if sb.Status == state.StatusPending && sb.Node == "" {
			// Never started here: nothing runs, so record the stop itself.
			return s.recordStoppedBeforeStart(ctx, sb.ID)
		}
		return nil
	}
	if _, err := s.store.UpdateSandbox(ctx, sb.ID, state.Update{StopGrace: &grace, Time: s.now()}); err != nil {
		return err
	}
	if sb.Status == state.StatusPending && sb.Node == "" {
		return s.recordStoppedBeforeStart(ctx, sb.ID)
	}
	if cp := s.cluster.ControlPlane; cp != nil {
		cp.Notify()
	}
	wctx, cancel := context.WithTimeout(ctx, grace+30*time.Second)
	defer cancel()
	_, err := s.waitFor(wctx, sb.ID, func(sb state.Sandbox) bool { return sb.Status.Terminal() })
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return fmt.Errorf("node %s has not confirmed the stop yet; it stops the sandbox when it reconnects", sb.Node)
	}
	return err
}

func (s *Server) recordStoppedBeforeStart(ctx context.Context, id string) error {
	st, code := state.StatusExited, 128+15
	_, err := s.store.UpdateSandbox(ctx, id, state.Update{Status: &st, Reason: "stopped by request before it started", ExitCode: &code, Time: s.now()})
	if errors.Is(err, state.ErrInvalidTransition) {
		return nil // it moved on meanwhile; the node handles the request
	}
	return err
}

// validateClusterSpec checks a request on a cluster server, where no single node's limits
// apply: absurd amounts are refused, the rest is the scheduler's business (a sandbox that
// fits no node stays pending with the reason).
func validateClusterSpec(spec *state.SandboxSpec) error {
	r := SandboxResources(*spec)
	spec.VCPUs, spec.MemoryMiB = r.VCPUs, r.MemoryMiB
	switch {
	case spec.VCPUs > 1024:
		return fmt.Errorf("--cpus %d is more than any node has (limit 1024)", spec.VCPUs)
	case spec.MemoryMiB < 128 || spec.MemoryMiB > 4<<20:
		return fmt.Errorf("--memory %dMiB is outside 128 MiB..4 TiB", spec.MemoryMiB)
	case spec.DiskMiB < 0 || spec.DiskMiB > 64<<20:
		return fmt.Errorf("disk %dMiB is outside 0..64 TiB", spec.DiskMiB)
	case spec.Timeout < 0:
		return fmt.Errorf("--timeout %s is negative", spec.Timeout)
	}
	if _, err := state.ParseRestartPolicy(string(spec.Restart)); err != nil {
		return err
	}
	for _, c := range spec.Constraints {
		if _, err := scheduler.ParseConstraint(c); err != nil {
			return err
		}
	}
	return agent.ValidateEnv(spec.Env)
}
