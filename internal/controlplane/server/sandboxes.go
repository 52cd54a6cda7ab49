package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

type sandboxService struct{ s *Server }

func (h *sandboxService) CreateSandbox(ctx context.Context, req *connect.Request[pb.CreateSandboxRequest]) (*connect.Response[pb.CreateSandboxResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	spec, err := h.memberSpec(ctx, who, req.Msg.GetSpec())
	if err != nil {
		return nil, err
	}
	if err := validName(req.Msg.GetName()); err != nil {
		return nil, toConnectError(err)
	}
	now := h.s.now()
	sb := state.Sandbox{
		ID: state.NewID(), Name: req.Msg.GetName(), Spec: spec, Status: state.StatusPending, Owner: who.TokenID,
		AccessToken: newAccessToken(), CreatedAt: now, Events: []state.Event{{Time: now, Status: state.StatusPending, Reason: "accepted"}},
	}
	sidecars := req.Msg.GetSidecars()
	if ref := req.Msg.GetSpec().GetSnapshot(); ref != "" {
		// A group's snapshot starts the whole group: its sidecars are the snapshot's.
		if sidecars, err = h.s.snapshotSidecars(ctx, who, ref, sidecars); err != nil {
			return nil, err
		}
	}
	members, err := h.group(ctx, who, sb, sidecars)
	if err != nil {
		return nil, err
	}
	// Placed in the same commit when it can be at once (a commit and a pass fewer
	// between the call and the node), else by the leader's next pass, woken now.
	var node string
	var sched scheduler.Config
	cp := h.s.cluster.ControlPlane
	if cp != nil {
		node, sched = cp.Choose(members[0])
	}
	if len(members) > 1 {
		err = h.s.store.CreateGroup(ctx, members, h.s.limits.quota(who.Admin()), node, sched)
	} else {
		err = h.s.store.CreateAndPlace(ctx, sb, h.s.limits.quota(who.Admin()), node, sched)
	}
	if err != nil {
		return nil, toConnectError(fmt.Errorf("create sandbox: %w", err))
	}
	if cp != nil && node == "" {
		cp.Notify() // not placed in its commit: the pass places it (placed ones need no pass)
	}
	// Read back from this server's copy: the create is applied here (Apply answers after
	// the state machine ran it), and the answer may be ordered right after it. A
	// linearizable read would cost every create a round of heartbeats to the followers.
	got, err := h.s.store.GetSandbox(state.WithStaleReads(ctx), sb.ID)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.CreateSandboxResponse{Sandbox: h.s.view(ctx, got)}), nil
}

// memberSpec is the spec a create asks for, resolved (snapshot, volumes), checked and
// with the defaults filled in: a sandbox's, or one member's of a group.
func (h *sandboxService) memberSpec(ctx context.Context, who auth.Identity, p *pb.SandboxSpec) (state.SandboxSpec, error) {
	spec := specFromPB(p)
	policyGiven := spec.Policy != ""
	if ref := p.GetSnapshot(); ref != "" {
		if err := h.s.resolveSnapshot(ctx, &spec, ref); err != nil {
			return spec, err
		}
	}
	if err := h.s.resolveVolumes(ctx, who, &spec, p.GetVolumes()); err != nil {
		return spec, err
	}
	if err := spec.CheckSizes(); err != nil {
		return spec, toConnectError(err)
	}
	if err := checkLifetime(spec.Lifetime); err != nil {
		return spec, toConnectError(err)
	}
	if err := checkImageSource(ctx, spec.Image); err != nil {
		return spec, err
	}
	if len(spec.InsecureRegistries) > 0 && !who.Admin() {
		// Plain-HTTP registries make the node connect wherever told: admins only.
		return spec, connect.NewError(connect.CodePermissionDenied, errors.New("--insecure-registry needs an admin token"))
	}
	var err error
	if spec.Boot, err = state.ParseBootMode(string(spec.Boot)); err != nil {
		return spec, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("--boot: %w", err))
	}
	if err := validateNetworkSpec(&spec, who.Admin()); err != nil {
		return spec, connect.NewError(connect.CodeInvalidArgument, err)
	}
	// Only an admin's own policy is an admin's: one carried from a snapshot with memory
	// stays what it was (a user's stays a user's, whoever starts it).
	spec.PolicyAdmin = spec.Policy != "" && who.Admin() && (policyGiven || spec.PolicyAdmin)
	spec.PullPrivate = who.Admin()
	if err := h.s.validateSpec(&spec); err != nil {
		return spec, connect.NewError(connect.CodeInvalidArgument, err)
	}
	return spec, nil
}

// group makes the members of main's group: main itself, then a sandbox per sidecar, each
// recording the group. Without sidecars it is main alone.
func (h *sandboxService) group(ctx context.Context, who auth.Identity, main state.Sandbox, sidecars []*pb.Sidecar) ([]state.Sandbox, error) {
	if len(sidecars) == 0 {
		return []state.Sandbox{main}, nil
	}
	if len(sidecars) > state.MaxSidecars {
		return nil, toConnectError(invalid("%d sidecars: at most %d", len(sidecars), state.MaxSidecars))
	}
	members := []state.Sandbox{main}
	g := &state.Group{Main: main.ID, Members: []state.GroupMember{{Name: state.MainMemberName, ID: main.ID, Reserved: main.Spec.Reserved()}}}
	names := map[string]bool{}
	for _, sc := range sidecars {
		name := sc.GetName()
		if err := state.ValidateSidecarName(name); err != nil {
			return nil, toConnectError(err)
		}
		if names[name] {
			return nil, toConnectError(invalid("two sidecars named %q: a name is how the group's members reach one", name))
		}
		if name == main.Name {
			return nil, toConnectError(invalid("sidecar name %q is the main's own name (its host name, which resolves to itself): name the sidecar otherwise", name))
		}
		names[name] = true
		spec, err := h.memberSpec(ctx, who, sc.GetSpec())
		if err != nil {
			// Said of the sidecar, with the error's own code.
			return nil, connect.NewError(connect.CodeOf(err), fmt.Errorf("sidecar %q: %s", name, connectMessage(err)))
		}
		if _, err := state.ParseProbe(sc.GetReady()); err != nil {
			return nil, toConnectError(fmt.Errorf("sidecar %q: %w", name, err))
		}
		spec.Ready = sc.GetReady()
		m := state.Sandbox{ID: state.NewID(), Spec: spec, Status: state.StatusPending, Owner: main.Owner,
			AccessToken: newAccessToken(), CreatedAt: main.CreatedAt,
			Events: []state.Event{{Time: main.CreatedAt, Status: state.StatusPending, Reason: "accepted as sidecar " + strconv.Quote(name) + " of " + main.ID}}}
		g.Members = append(g.Members, state.GroupMember{Name: name, ID: m.ID, Reserved: spec.Reserved(), Ready: spec.Ready})
		members = append(members, m)
	}
	for i := range members {
		members[i].Spec.Group = g
	}
	return members, nil
}

func (h *sandboxService) GetSandbox(ctx context.Context, req *connect.Request[pb.GetSandboxRequest]) (*connect.Response[pb.GetSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	out := h.s.view(ctx, sb)
	if sb.Status == state.StatusRunning && sb.Spec.Network != state.NetworkNone {
		// Live counters, best effort: inspect must not hang on a slow node.
		nctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		if st, err := h.s.netStatus(nctx, sb); err == nil {
			out.Network = h.s.netView(ctx, st)
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
		if !req.Msg.GetAll() && sb.Status.Terminal() || !who.CanAccess(sb.Owner) || req.Msg.GetMine() && sb.Owner != who.TokenID {
			continue
		}
		resp.Sandboxes = append(resp.Sandboxes, h.s.view(ctx, sb))
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
	} else if sb.StopRequestedAt.IsZero() && sb.Spec.Restart != "" && sb.Spec.Restart != state.RestartNever {
		// Ended, and its restart policy would run it again: the stop ends the policy
		// (as `docker stop` does), so it stays as it ended.
		if _, err := h.s.store.UpdateSandbox(ctx, sb.ID, state.Update{StopGrace: &grace, Time: h.s.now()}); err != nil {
			return nil, toConnectError(fmt.Errorf("stop sandbox %s: %w", sb.ID, err))
		}
	}
	sb, err = h.s.store.GetSandbox(ctx, sb.ID)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.StopSandboxResponse{Sandbox: h.s.view(ctx, sb)}), nil
}

// MaxLifetime bounds a lifetime a user sets (E2B allows 24 h).
const MaxLifetime = 24 * time.Hour

func checkLifetime(d time.Duration) error {
	if d < 0 || d > MaxLifetime {
		return invalid("lifetime %s: want 0 to %s", d, MaxLifetime)
	}
	return nil
}

func (h *sandboxService) SetLifetime(ctx context.Context, req *connect.Request[pb.SetLifetimeRequest]) (*connect.Response[pb.SetLifetimeResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	d := req.Msg.GetLifetime().AsDuration()
	if err := checkLifetime(d); err != nil {
		return nil, toConnectError(err)
	}
	now := h.s.now()
	var end time.Time
	if d > 0 {
		end = now.Add(d)
	}
	if sb, err = h.s.store.UpdateSandbox(ctx, sb.ID, state.Update{EndAt: &end, Time: now}); err != nil {
		return nil, toConnectError(fmt.Errorf("set the lifetime of sandbox %s: %w", req.Msg.GetSandbox(), err))
	}
	if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Notify()
	}
	return connect.NewResponse(&pb.SetLifetimeResponse{Sandbox: h.s.view(ctx, sb)}), nil
}

func (h *sandboxService) RemoveSandbox(ctx context.Context, req *connect.Request[pb.RemoveSandboxRequest]) (*connect.Response[pb.RemoveSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	if sb.IsSidecar() {
		main, err := h.s.store.GetSandbox(ctx, sb.Spec.Group.Main)
		if err == nil && !main.Status.Terminal() {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is sidecar %q of %s, which is %s: remove the group's main (its sidecars go with it)",
				sb.ID, sb.Spec.Group.MemberName(sb.ID), main.ID, main.Status))
		}
	}
	if sb.IsGroupMain() && req.Msg.GetForce() && !sb.Status.Terminal() {
		// rm -f kills the whole group at once: its sidecars first, without the grace
		// they would get when the main ends.
		for _, gm := range sb.Spec.Group.Members[1:] {
			if sc, err := h.s.store.GetSandbox(ctx, gm.ID); err == nil && sc.Owner == sb.Owner && !sc.Status.Terminal() {
				if err := h.s.stop(ctx, sc, 0); err != nil {
					return nil, toConnectError(fmt.Errorf("kill sidecar %q (%s) of %s: %w", gm.Name, gm.ID, sb.ID, err))
				}
			}
		}
	}
	if err := h.remove(ctx, sb, req.Msg.GetForce()); err != nil {
		return nil, err
	}
	if sb.IsGroupMain() {
		// Its sidecars go with it (stopped with it: the main's end stopped them).
		for _, gm := range sb.Spec.Group.Members[1:] {
			sc, err := h.s.store.GetSandbox(ctx, gm.ID)
			if errors.Is(err, state.ErrNotFound) || err == nil && (sc.Owner != sb.Owner || sc.Spec.Group == nil || sc.Spec.Group.Main != sb.ID) {
				continue
			}
			if err == nil {
				err = h.remove(ctx, sc, true)
			}
			if err != nil {
				return nil, toConnectError(fmt.Errorf("remove sidecar %q (%s) of %s: %w", gm.Name, gm.ID, sb.ID, err))
			}
		}
	}
	return connect.NewResponse(&pb.RemoveSandboxResponse{}), nil
}

// remove removes sb (force: stopping it first if it is not over).
func (h *sandboxService) remove(ctx context.Context, sb state.Sandbox, force bool) error {
	if !sb.Status.Terminal() {
		if !force {
			return connect.NewError(connect.CodeFailedPrecondition,
				fmt.Errorf("sandbox %s is %s: stop it first or use rm -f", sb.ID, sb.Status))
		}
		if err := h.s.stop(ctx, sb, 0); err != nil {
			return toConnectError(fmt.Errorf("kill sandbox %s: %w", sb.ID, err))
		}
	}
	// Its node removes its files now, so that rm is done when it returns; a node that
	// cannot be reached does when the record is gone from its assignments.
	if sb.Node != "" {
		if c, err := h.s.nodeFor(ctx, sb); err == nil {
			rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_, err = c.sandboxes.RemoveSandbox(rctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: sb.ID}))
			cancel()
			if err != nil && connect.CodeOf(err) != connect.CodeUnavailable && connect.CodeOf(err) != connect.CodeDeadlineExceeded {
				return toConnectError(fmt.Errorf("remove sandbox %s on node %s: %w", sb.ID, sb.Node, err))
			}
		}
	}
	if err := h.s.store.DeleteSandbox(ctx, sb.ID); err != nil {
		return toConnectError(err)
	}
	return nil
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

func exitOf(sb state.Sandbox) *pb.Exit {
	return &pb.Exit{Code: int32(sb.ExitCode), Signal: int32(sb.Signal), Status: string(sb.Status), Reason: sb.Reason}
}

func (h *sandboxService) Logs(ctx context.Context, req *connect.Request[pb.LogsRequest], stream *connect.ServerStream[pb.LogsResponse]) error {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return toConnectError(err)
	}
	if sb.Node == "" {
		return nil // not placed yet: no output
	}
	// Following a sandbox that is paused (or pauses) goes on with its output after the
	// resume: its log is the same file, of which what was sent is skipped (a resume on
	// another node starts a log of its own there).
	sent := 0
	for {
		n, err := h.s.logsOnNode(ctx, sb, req.Msg, sent, stream)
		sent = max(sent, n) // n counts the records skipped too: the log from its start
		if err != nil || !req.Msg.GetFollow() {
			return err
		}
		// A live migration moved it: its log went with it, the same records, and goes on
		// there.
		if next, moved, err := h.s.movedOn(ctx, sb); err != nil {
			return err
		} else if moved {
			sb = next
			continue
		}
		cur, err := h.s.store.GetSandbox(ctx, sb.ID)
		if err != nil {
			return toConnectError(err)
		}
		// The run ended by a pause (maybe not recorded yet), or it is over.
		if cur.Status != state.StatusPaused && (cur.Status != state.StatusRunning || cur.PauseRequestedAt.IsZero()) {
			return nil
		}
		next, err := h.s.waitFor(ctx, sb.ID, true, func(sb state.Sandbox) bool {
			return sb.Status.Terminal() || sb.Status == state.StatusRunning && (sb.Resumes != cur.Resumes || sb.PauseRequestedAt.IsZero())
		})
		if err != nil {
			return toConnectError(err)
		}
		if next.Node != sb.Node {
			sent = 0
		}
		sb = next
		if sb.Node == "" || sb.Status.Terminal() && sb.Node == cur.Node {
			return nil // over while paused: nothing more was written
		}
	}
}

func (h *sandboxService) Exec(ctx context.Context, stream *connect.BidiStream[pb.ExecRequest, pb.ExecResponse]) error {
	first, start, err := rpc.ReadExecStart(stream)
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
	// A sandbox just created (`run -d` returns before it runs) is waited for.
	if sb, err = h.s.waitRunning(ctx, sb); err != nil {
		return err
	}
	// So is a live migration of it: the command runs where the sandbox runs after it.
	if sb, err = h.s.waitMigrated(ctx, sb); err != nil {
		return err
	}
	return h.s.execOnNode(ctx, sb, first, stream)
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
		Network: p.GetNetwork(), Policy: normalPolicy(p.GetPolicy()),
	}
	for _, pp := range p.GetPorts() {
		port := uint16(pp.GetPort())
		if pp.GetPort() > 65535 {
			port = 0 // refused by validation
		}
		if pp.GetAll() {
			port = 0
		}
		spec.Ports = append(spec.Ports, state.Port{Port: port, Public: pp.GetPublic(), All: pp.GetAll()})
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
	if m := p.GetMetadata(); len(m) > 0 {
		spec.Metadata = maps.Clone(m)
	}
	spec.KeepAlive, spec.NonRoot = p.GetKeepAlive(), p.GetNonRoot()
	if l := p.GetLifetime(); l != nil {
		spec.Lifetime = l.AsDuration()
	}
	spec.OnEnd, spec.Template = p.GetOnEnd(), p.GetTemplate()
	return spec
}

func sandboxToPB(sb state.Sandbox) *pb.Sandbox {
	spec := &pb.SandboxSpec{
		Image: sb.Spec.Image, Cmd: sb.Spec.Cmd, Env: sb.Spec.Env, WorkingDir: sb.Spec.WorkingDir,
		User: sb.Spec.User, Vcpus: int32(sb.Spec.VCPUs), MemoryMib: int32(sb.Spec.MemoryMiB),
		Tty: sb.Spec.TTY, Stdin: sb.Spec.Stdin, InsecureRegistries: sb.Spec.InsecureRegistries,
		Restart: string(sb.Spec.Restart), Constraints: sb.Spec.Constraints, Spread: sb.Spec.Spread,
		DiskMib: int32(sb.Spec.DiskMiB), Boot: string(sb.Spec.Boot),
		Network: sb.Spec.Network, Policy: sb.Spec.Policy, Snapshot: sb.Spec.Snapshot,
	}
	for _, p := range sb.Spec.Ports {
		spec.Ports = append(spec.Ports, &pb.Port{Port: uint32(p.Port), Public: p.Public, All: p.All})
	}
	for _, v := range sb.Spec.Volumes {
		spec.Volumes = append(spec.Volumes, &pb.VolumeMount{Volume: v.Volume, Path: v.Path, ReadOnly: v.ReadOnly})
	}
	if sb.Spec.Entrypoint != nil {
		spec.EntrypointSet, spec.Entrypoint = true, sb.Spec.Entrypoint
	}
	if sb.Spec.Timeout > 0 {
		spec.Timeout = durationpb.New(sb.Spec.Timeout)
	}
	spec.Metadata, spec.KeepAlive, spec.OnEnd, spec.Template = sb.Spec.Metadata, sb.Spec.KeepAlive, sb.Spec.OnEnd, sb.Spec.Template
	spec.NonRoot = sb.Spec.NonRoot
	if sb.Spec.Lifetime > 0 {
		spec.Lifetime = durationpb.New(sb.Spec.Lifetime)
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
	if sv := sb.Saved; sv != nil {
		out.Saved = &pb.SavedState{Node: sv.Node, Bytes: sv.Bytes, At: ts(sv.At)}
	}
	out.Resumes = int32(sb.Resumes)
	if !sb.EndAt.IsZero() {
		out.EndAt = ts(sb.EndAt)
	}
	if m := sb.Migration; m != nil {
		out.Migration = migrationToPB(*m)
	}
	for _, m := range sb.Migrations {
		out.Migrations = append(out.Migrations, migrationToPB(m))
	}
	if g := sb.Spec.Group; g != nil {
		out.Group = &pb.Group{Main: g.Main}
		for _, m := range g.Members {
			gm := &pb.GroupMember{Name: m.Name, Id: m.ID, Ready: m.Ready}
			out.Group.Members = append(out.Group.Members, gm)
		}
	}
	return out
}

// pauseWait bounds how long Pause and Resume wait for the node to save or restore.
const pauseWait = 5 * time.Minute

func (h *sandboxService) PauseSandbox(ctx context.Context, req *connect.Request[pb.PauseSandboxRequest]) (*connect.Response[pb.PauseSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	members, err := h.s.groupOf(ctx, sb)
	if err != nil {
		return nil, err
	}
	// A group pauses whole, its main first (so that it stops talking to the others).
	for _, m := range members {
		if m.Status.Terminal() || m.Status == state.StatusPaused {
			continue
		}
		pm, err := h.pause(ctx, m, "")
		if err != nil {
			return nil, err
		}
		if m.ID == sb.ID {
			sb = pm
		}
	}
	if sb, err = h.s.store.GetSandbox(ctx, sb.ID); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.PauseSandboxResponse{Sandbox: h.s.view(ctx, sb)}), nil
}

// groupOf is the members of sb's group as they are now, the main first; sb alone when it
// is in no group. Members removed meanwhile are left out.
func (s *Server) groupOf(ctx context.Context, sb state.Sandbox) ([]state.Sandbox, error) {
	g := sb.Spec.Group
	if g == nil || len(g.Members) < 2 {
		return []state.Sandbox{sb}, nil
	}
	var out []state.Sandbox
	for _, m := range g.Members {
		got, err := s.store.GetSandbox(ctx, m.ID)
		if errors.Is(err, state.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, toConnectError(err)
		}
		if got.Owner != sb.Owner || got.Spec.Group == nil || got.Spec.Group.Main != g.Main {
			// Never acted on through sb (the state makes members of one owner; this
			// keeps it so whatever a later path records).
			return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("sandbox %s names %s as a member of its group, which it is not", sb.ID, m.ID))
		}
		out = append(out, got)
	}
	return out, nil
}

// pause pauses sb (see PauseSandbox) and returns it paused; pauseFor names the call
// that will resume it (a fork, a snapshot), "" for a user's pause.
func (h *sandboxService) pause(ctx context.Context, sb state.Sandbox, pauseFor string) (state.Sandbox, error) {
	var err error
	if sb.Status != state.StatusPaused {
		who, err := caller(ctx)
		if err != nil {
			return sb, err
		}
		release, err := h.s.savedRoom(ctx, who, int64(sb.Spec.Reserved().MemoryMiB)<<20)
		if err != nil {
			return sb, err
		}
		defer release()
	}
	if sb, err = h.s.settled(ctx, sb); err != nil {
		return sb, toConnectError(err)
	}
	if sb.Status != state.StatusPaused {
		id := sb.ID
		if sb.Status != state.StatusRunning {
			return sb, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s: only a running sandbox can be paused", id, sb.Status))
		}
		if sb.Migration != nil {
			return sb, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is migrating: pause it once that is done", id))
		}
		if sb, err = h.s.store.UpdateSandbox(ctx, id, state.Update{RequestPause: true, PauseFor: pauseFor, Time: h.s.now()}); err != nil {
			return sb, toConnectError(fmt.Errorf("pause sandbox %s: %w", id, err))
		}
		wctx, cancel := context.WithTimeout(ctx, pauseWait)
		defer cancel()
		// Done when paused, over (the save failed), or running without a request (the
		// node refused: it says why).
		sb, err = h.s.waitFor(wctx, sb.ID, true, func(sb state.Sandbox) bool {
			return sb.Status != state.StatusRunning || sb.PauseRequestedAt.IsZero()
		})
		if err != nil {
			return sb, toConnectError(fmt.Errorf("pause sandbox %s: %w", sb.ID, err))
		}
		switch {
		case sb.Status == state.StatusRunning:
			return sb, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("pause sandbox %s: its node refused: %s", sb.ID, h.s.textFor(ctx, sb, sb.Runtime["pause_refused"])))
		case sb.Status != state.StatusPaused:
			return sb, connect.NewError(connect.CodeAborted, fmt.Errorf("pause sandbox %s: it is %s: %s", sb.ID, sb.Status, h.s.textFor(ctx, sb, sb.Reason)))
		}
	}
	return sb, nil
}

func (h *sandboxService) ResumeSandbox(ctx context.Context, req *connect.Request[pb.ResumeSandboxRequest]) (*connect.Response[pb.ResumeSandboxResponse], error) {
	sb, err := h.s.lookup(ctx, req.Msg.GetSandbox())
	if err != nil {
		return nil, toConnectError(err)
	}
	node := req.Msg.GetNode()
	if node != "" {
		if _, err := requireAdmin(ctx, "choosing the node a sandbox resumes on"); err != nil {
			return nil, err
		}
	}
	var endAt time.Time
	if l := req.Msg.GetLifetime(); l != nil {
		if err := checkLifetime(l.AsDuration()); err != nil {
			return nil, toConnectError(err)
		}
		if l.AsDuration() > 0 {
			endAt = h.s.now().Add(l.AsDuration())
		}
	}
	if sb.Spec.Group != nil && len(sb.Spec.Group.Members) > 1 {
		if node != "" {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("sandbox %s is in a group: a group resumes on the node holding its saved state, not on --node", sb.ID))
		}
		members, err := h.s.groupOf(ctx, sb)
		if err != nil {
			return nil, err
		}
		// A group resumes whole, on its node (never split: a member the node has no room
		// for fails the resume), its sidecars first, so that its main finds them.
		for i := len(members) - 1; i >= 0; i-- {
			m := members[i]
			if m.Status != state.StatusPaused || m.Saved == nil {
				continue
			}
			if _, err := h.resumeOne(ctx, m, m.Saved.Node, endAt); err != nil {
				return nil, err
			}
		}
		if sb, err = h.s.store.GetSandbox(ctx, sb.ID); err != nil {
			return nil, toConnectError(err)
		}
		return connect.NewResponse(&pb.ResumeSandboxResponse{Sandbox: h.s.view(ctx, sb)}), nil
	}
	if sb, err = h.resumeOne(ctx, sb, node, endAt); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.ResumeSandboxResponse{Sandbox: h.s.view(ctx, sb)}), nil
}

// resumeOne resumes paused sb (on node, if given) and returns it once it runs; one that
// is resuming already is waited for.
func (h *sandboxService) resumeOne(ctx context.Context, sb state.Sandbox, node string, endAt time.Time) (state.Sandbox, error) {
	var err error
	if sb.Status == state.StatusPaused {
		var sched scheduler.Config
		if cp := h.s.cluster.ControlPlane; cp != nil {
			sched = cp.Scheduling()
			defer cp.Notify() // a resume the holder cannot take waits for a pass
		}
		resumed, err := h.s.store.ResumeSandbox(ctx, sb.ID, node, sched, h.s.now(), endAt)
		if err != nil {
			return sb, toConnectError(err) // it names the sandbox
		}
		sb = resumed
	}
	if sb.Status == state.StatusPending || sb.Status == state.StatusStarting {
		wctx, cancel := context.WithTimeout(ctx, pauseWait)
		defer cancel()
		sb, err = h.s.waitFor(wctx, sb.ID, true, func(sb state.Sandbox) bool {
			return sb.Status != state.StatusPending && sb.Status != state.StatusStarting
		})
		if err != nil {
			return sb, toConnectError(fmt.Errorf("resume sandbox %s: %w", sb.ID, err))
		}
	}
	if sb.Status != state.StatusRunning {
		return sb, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("resume sandbox %s: it is %s: %s", sb.ID, sb.Status, h.s.textFor(ctx, sb, sb.Reason)))
	}
	return sb, nil
}

// nodeDetails are the runtime details that name the node's internals (its paths, the
// VMM's pid, the sandbox's address and namespace there): an admin's to see.
var nodeDetails = []string{"pid", "run_dir", "console_log", "qemu_cmdline", "netns", "address", "vmm_pid", "migrated_from"}

// view is sb as the caller may see it: all of it for an admin; for a user, nothing that
// names or locates a node (users neither name nor learn the nodes, see the README's
// security section).
func (s *Server) view(ctx context.Context, sb state.Sandbox) *pb.Sandbox {
	out := sandboxToPB(sb)
	if who, ok := auth.From(ctx); ok && who.Admin() {
		return out
	}
	hide := func(text string) string { return hideNodes(sb, text) }
	out.Node = ""
	out.Reason = hide(out.Reason)
	for _, e := range out.Events {
		e.Reason = hide(e.Reason)
	}
	if out.Saved != nil {
		out.Saved.Node = ""
	}
	for _, m := range append(out.Migrations, out.Migration) {
		if m != nil {
			// Where it went, and why a move failed (a node's own error names nodes and
			// addresses), are the operator's to know.
			m.From, m.To = "", ""
			if strings.HasPrefix(m.Outcome, "failed") {
				m.Outcome = "failed"
			}
		}
	}
	for _, e := range out.Events {
		if strings.HasPrefix(e.Reason, "migrated from node ") {
			e.Reason = "migrated to another node"
		}
	}
	if d, ok := out.Details["drain"]; ok && d != "" {
		out.Details["drain"] = "stays on its node, which is being drained: it could not move live and its restart policy does not allow a stop and a new start"
	}
	if len(out.Details) > 0 {
		d := make(map[string]string, len(out.Details))
		for k, v := range out.Details {
			if !slices.Contains(nodeDetails, k) {
				d[k] = hide(v)
			}
		}
		out.Details = d
	}
	return out
}

// hideNodes replaces the names of the nodes sb has to do with in text.
func hideNodes(sb state.Sandbox, text string) string {
	for _, n := range []string{sb.Node, sb.Spec.SnapshotNode, sb.Spec.ForkNode} {
		if n != "" {
			text = strings.ReplaceAll(text, "node "+n, "a node")
		}
	}
	if sb.Saved != nil && sb.Saved.Node != "" {
		text = strings.ReplaceAll(text, "node "+sb.Saved.Node, "a node")
	}
	for _, m := range append(slices.Clone(sb.Migrations), ptrOr(sb.Migration)) {
		for _, n := range []string{m.From, m.To} {
			if n != "" {
				text = strings.ReplaceAll(text, "node "+n, "a node")
				text = strings.ReplaceAll(text, strconv.Quote(n), "a node")
			}
		}
		if m.ToAddress != "" {
			text = strings.ReplaceAll(text, m.ToAddress, "a node's address")
			if host, _, err := net.SplitHostPort(m.ToAddress); err == nil && host != "" {
				text = strings.ReplaceAll(text, host, "a node's address")
			}
		}
	}
	// Where a saved state is fetched from (a failed fetch names the URL).
	for _, a := range []string{sb.Spec.ForkAddress, savedAddress(sb)} {
		if a != "" {
			text = strings.ReplaceAll(text, a, "a node's address")
		}
	}
	// Paths in a node's data directory (a VMM's error names the files it read).
	return nodePath.ReplaceAllString(text, "<node data>/$1/…")
}

func ptrOr(m *state.Migration) state.Migration {
	if m == nil {
		return state.Migration{}
	}
	return *m
}

// nodePath matches a path into a node's data directory.
var nodePath = regexp.MustCompile(`(?:/[\w.+@-]+)+/(sandboxes|snapshots|run|templates|images)/[\w./+@-]*`)

// userError is err as the caller may read it about sb: a user's without node names,
// addresses or paths (see hideNodes); its code is kept.
func (s *Server) userError(ctx context.Context, sb state.Sandbox, err error) error {
	if who, ok := auth.From(ctx); err == nil || ok && who.Admin() {
		return err
	}
	code := connect.CodeOf(err)
	msg := err.Error()
	var ce *connect.Error
	if errors.As(err, &ce) {
		msg = ce.Message()
	}
	return connect.NewError(code, errors.New(hideNodes(sb, msg)))
}

func savedAddress(sb state.Sandbox) string {
	if sb.Saved == nil {
		return ""
	}
	return sb.Saved.Address
}

// textFor is text about sb as the caller may read it: a user's without node names.
func (s *Server) textFor(ctx context.Context, sb state.Sandbox, text string) string {
	if who, ok := auth.From(ctx); ok && who.Admin() {
		return text
	}
	return hideNodes(sb, text)
}

// netView is a sandbox's network status as the caller may see it: for a user, without
// the node's own rules (they list the node's addresses).
func (s *Server) netView(ctx context.Context, st *pb.NetworkStatus) *pb.NetworkStatus {
	if who, ok := auth.From(ctx); ok && who.Admin() || st == nil {
		return st
	}
	st.Address, st.Effective = "", ""
	return st
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
	var sb state.Sandbox
	if mainRef, member, ok := strings.Cut(ref, "/"); ok {
		// MAIN/NAME: a member of MAIN's sandbox group by its name there.
		main, err := s.store.GetOwnedSandbox(ctx, mainRef, owner)
		if err != nil {
			return state.Sandbox{}, err
		}
		id := ""
		if g := main.Spec.Group; g != nil && g.Main == main.ID {
			for _, m := range g.Members {
				if m.Name == member {
					id = m.ID
				}
			}
		}
		if id == "" {
			return state.Sandbox{}, fmt.Errorf("sandbox %s has no group member named %q: %w", main.ID, member, state.ErrNotFound)
		}
		ref = id
	}
	sb, err = s.store.GetOwnedSandbox(ctx, ref, owner)
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
// ends). It records the request, which the sandbox's node acts on (SIGTERM, then a kill
// after grace) and reports.
func (s *Server) stop(ctx context.Context, sb state.Sandbox, grace time.Duration) error {
	if _, err := s.store.UpdateSandbox(ctx, sb.ID, state.Update{StopGrace: &grace, Time: s.now()}); err != nil {
		return err
	}
	if sb.Status == state.StatusPending && sb.Node == "" {
		return s.recordStoppedBeforeStart(ctx, sb.ID)
	}
	if sb.Status == state.StatusPaused {
		// Nothing runs: it is over now (its node lets the saved state go).
		st, code := state.StatusExited, 128+15
		_, err := s.store.UpdateSandbox(ctx, sb.ID, state.Update{Status: &st, Reason: "stopped by request while paused", ExitCode: &code, Time: s.now()})
		if errors.Is(err, state.ErrInvalidTransition) {
			return nil // it moved on meanwhile (a resume): the node handles the request
		}
		return err
	}
	if cp := s.cluster.ControlPlane; cp != nil {
		cp.Notify()
	}
	wctx, cancel := context.WithTimeout(ctx, grace+30*time.Second)
	defer cancel()
	_, err := s.waitFor(wctx, sb.ID, false, func(sb state.Sandbox) bool { return sb.Status.Terminal() })
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return fmt.Errorf("node %s has not confirmed the stop yet; it stops the sandbox when it reconnects", sb.Node)
	}
	return err
}

// startWait bounds how long a call on a sandbox that is still being placed or started
// waits for it to run.
const startWait = 2 * time.Minute

// waitRunning returns sb once it runs: at once if it does, after its start if it is
// pending or starting (within startWait), else a "failed precondition" naming its status.
func (s *Server) waitRunning(ctx context.Context, sb state.Sandbox) (state.Sandbox, error) {
	sb, err := s.settled(ctx, sb)
	if err != nil {
		return sb, err
	}
	if sb.Status != state.StatusRunning {
		hint := ""
		if sb.Status == state.StatusPaused {
			hint = fmt.Sprintf(" (`fireworks resume %s` brings it back)", sb.ID[:min(12, len(sb.ID))])
		}
		return sb, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is %s, not running%s", sb.ID, sb.Status, hint))
	}
	return sb, nil
}

// settled returns sb once it is no longer being placed or started (within startWait):
// a call acting on a running sandbox (exec, pause, fork, snapshot) waits for one still
// starting instead of failing at once.
func (s *Server) settled(ctx context.Context, sb state.Sandbox) (state.Sandbox, error) {
	if sb.Status == state.StatusPending || sb.Status == state.StatusStarting {
		wctx, cancel := context.WithTimeout(ctx, startWait)
		got, err := s.waitFor(wctx, sb.ID, true, func(sb state.Sandbox) bool {
			return sb.Status != state.StatusPending && sb.Status != state.StatusStarting
		})
		cancel()
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			reason := ""
			if got.Reason != "" {
				reason = " (" + got.Reason + ")"
			}
			return got, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("sandbox %s is still %s after %s%s", sb.ID, got.Status, startWait, reason))
		}
		if err != nil {
			return got, toConnectError(err)
		}
		sb = got
	}
	return sb, nil
}

func (s *Server) recordStoppedBeforeStart(ctx context.Context, id string) error {
	st, code := state.StatusExited, 128+15
	_, err := s.store.UpdateSandbox(ctx, id, state.Update{Status: &st, Reason: "stopped by request before it started", ExitCode: &code, Time: s.now()})
	if errors.Is(err, state.ErrInvalidTransition) {
		return nil // it moved on meanwhile; the node handles the request
	}
	return err
}

// validateSpec checks a sandbox request (or a pool's shape), the same on every server.
// Amounts that no node of the cluster offers are refused at once (while nodes are
// registered: a cluster whose first node has not joined yet takes the request); the rest
// is the scheduler's business: a sandbox that fits no node now stays pending with the
// reason. It fills in the default shape.
func (s *Server) validateSpec(spec *state.SandboxSpec) error {
	if spec.Image == "" {
		return errors.New("no image given")
	}
	r := spec.Reserved()
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
	if err := state.ValidateEnv(spec.Env); err != nil {
		return err
	}
	// Without copying the nodes: this runs on every create.
	most, nodes := s.store.LargestNode()
	switch {
	case nodes == 0:
	case spec.VCPUs > most.VCPUs:
		return fmt.Errorf("--cpus %d: no node offers that many vCPUs to a sandbox (the most is %d)", spec.VCPUs, most.VCPUs)
	case spec.MemoryMiB > most.MemoryMiB:
		return fmt.Errorf("--memory %dMiB: no node offers that much memory to a sandbox (the most is %d MiB)", spec.MemoryMiB, most.MemoryMiB)
	}
	return nil
}

// snapshotSidecars are the sidecars a start from snapshot ref has: those of the group it
// was taken of, each from its own part of the snapshot (none for a lone sandbox's
// snapshot, whose sidecars are the ones asked for).
func (s *Server) snapshotSidecars(ctx context.Context, who auth.Identity, ref string, asked []*pb.Sidecar) ([]*pb.Sidecar, error) {
	snap, err := s.store.GetSnapshot(ctx, ref, who.TokenID, who.Admin())
	if err != nil {
		return nil, toConnectError(err)
	}
	if len(snap.Members) == 0 {
		return asked, nil
	}
	if len(asked) > 0 {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("snapshot %s is a sandbox group's: it starts with the group's sidecars (give no --sidecar)", snap.Name))
	}
	var out []*pb.Sidecar
	for _, m := range snap.Members {
		spec := &pb.SandboxSpec{}
		if m.Spec != nil {
			spec = sandboxToPB(state.Sandbox{Spec: *m.Spec}).GetSpec()
		}
		spec.Snapshot, spec.Restart = m.Snapshot, string(m.Restart)
		out = append(out, &pb.Sidecar{Name: m.Name, Ready: m.Ready, Spec: spec})
	}
	return out, nil
}
