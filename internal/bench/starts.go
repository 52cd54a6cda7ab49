package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// sample is one measured start or exec: time to the first stdout byte and to the exit,
// both from the API call, and how the node says it started the sandbox (when it says).
type sample struct {
	first, exit time.Duration
	create      time.Duration // the CreateSandbox call alone (0 for execs and crun)
	handoff     time.Duration // from the sandbox's creation to the node starting it (0: unknown)
	how         string
	phases      []phase // the node's own account of the start, in order
}

// phase is one step of a start as the node timed it (pull, rootdisk, vmm, guest, ...).
type phase struct {
	name string
	ms   float64
}

// startOnce starts cmd in a new sandbox of ref with the given boot mode, follows its
// output to the exit and removes it. The clock starts right before CreateSandbox.
func (c *apiClient) startOnce(ctx context.Context, ref string, cmd []string, boot string) (sample, error) {
	return c.startSpecOnce(ctx, &pb.SandboxSpec{Image: ref, Cmd: cmd, Boot: boot}, 3*time.Minute)
}

// startSpecOnce is startOnce for any spec, within limit.
func (c *apiClient) startSpecOnce(ctx context.Context, spec *pb.SandboxSpec, limit time.Duration) (sample, error) {
	return c.startRequestOnce(ctx, &pb.CreateSandboxRequest{Spec: spec}, limit, nil)
}

// startRequestOnce is startSpecOnce for any create request (a group's); check, if set,
// looks at the sandbox once it ended (before it is removed).
func (c *apiClient) startRequestOnce(ctx context.Context, req *pb.CreateSandboxRequest, limit time.Duration, check func(*pb.Sandbox) error) (sample, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	spec := req.GetSpec()
	ref, boot := spec.GetImage(), spec.GetBoot()
	start := time.Now()
	resp, err := c.sandboxes.CreateSandbox(ctx, connect.NewRequest(req))
	if err != nil {
		return sample{}, fmt.Errorf("create sandbox of %s (boot %s): %w", ref, boot, err)
	}
	created := time.Since(start)
	id := resp.Msg.GetSandbox().GetId()
	// Removal is not part of the measurement, and must happen even when ctx ended.
	defer c.remove(context.WithoutCancel(ctx), id)

	stream := c.sandboxes.Attach(ctx)
	if err := stream.Send(&pb.AttachRequest{Msg: &pb.AttachRequest_Start{Start: &pb.AttachStart{Sandbox: id}}}); err != nil && !errors.Is(err, io.EOF) {
		return sample{}, fmt.Errorf("attach to sandbox %s: %w", id, err)
	}
	s := sample{create: created}
	for {
		msg, err := stream.Receive()
		if err != nil {
			_ = stream.CloseResponse()
			if errors.Is(err, io.EOF) {
				return sample{}, fmt.Errorf("attach to sandbox %s: the stream ended without an exit", id)
			}
			return sample{}, fmt.Errorf("attach to sandbox %s: %w", id, err)
		}
		if out := msg.GetOutput(); out != nil && out.GetStream() == 1 && len(out.GetData()) > 0 && s.first == 0 {
			s.first = time.Since(start)
		}
		if e := msg.GetExit(); e != nil {
			s.exit = time.Since(start)
			_ = stream.CloseRequest()
			_ = stream.CloseResponse()
			if e.GetStatus() != "exited" || e.GetCode() != 0 {
				return sample{}, fmt.Errorf("sandbox %s (boot %s) ended %s with code %d: %s", id, boot, e.GetStatus(), e.GetCode(), e.GetReason())
			}
			break
		}
	}
	if s.first == 0 {
		return sample{}, fmt.Errorf("sandbox %s (boot %s) printed nothing on stdout", id, boot)
	}
	got, err := c.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
	if err == nil {
		d := got.Msg.GetSandbox().GetDetails()
		s.how, s.phases = startedBy(d), parsePhases(d["start_phases"])
		s.handoff = handoff(got.Msg.GetSandbox())
	}
	if check != nil {
		if err != nil {
			return sample{}, fmt.Errorf("inspect sandbox %s: %w", id, err)
		}
		if err := check(got.Msg.GetSandbox()); err != nil {
			return sample{}, err
		}
	}
	return s, nil
}

// handoff is the time from a sandbox's creation (recorded by the server) to its first
// "starting" event (recorded by the node as it began): the API → node handoff, which
// covers placement and the assignment reaching the node. Both clocks are this host's.
func handoff(sb *pb.Sandbox) time.Duration {
	for _, e := range sb.GetEvents() {
		if e.GetStatus() == "starting" && sb.GetCreatedAt() != nil {
			return e.GetTime().AsTime().Sub(sb.GetCreatedAt().AsTime())
		}
	}
	return 0
}

// startedBy is how the node says it started a sandbox (cold, restore or warm), so a
// series shows that it measured what it says.
func startedBy(details map[string]string) string { return details["start_mode"] }

// parsePhases reads the node's "start_phases" detail: "pull=1.2ms rootdisk=0.4ms vmm=85ms".
// Anything it cannot read is left out: the breakdown is a diagnosis, not a measurement.
func parsePhases(s string) []phase {
	var out []phase
	for _, f := range strings.Fields(s) {
		name, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			continue
		}
		out = append(out, phase{name: name, ms: ms(d)})
	}
	return out
}

// summarizePhases is the p50 of each phase over the samples that had it, in the order
// the phases first appeared.
func summarizePhases(samples []sample) []PhaseP50 {
	var order []string
	vals := map[string][]float64{}
	for _, s := range samples {
		for _, p := range s.phases {
			if _, seen := vals[p.name]; !seen {
				order = append(order, p.name)
			}
			vals[p.name] = append(vals[p.name], p.ms)
		}
	}
	var out []PhaseP50
	for _, n := range order {
		out = append(out, PhaseP50{Name: n, P50: summarize(vals[n]).P50, Count: len(vals[n])})
	}
	return out
}

func (c *apiClient) remove(ctx context.Context, id string) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	_, _ = c.sandboxes.RemoveSandbox(ctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: id, Force: true}))
}

// waitPoolReady waits until the node reports a warm VM of ref ready and no refill in
// flight: the measured claim then competes with no background restore for the CPUs, and
// the wait itself is not part of any sample.
func (c *apiClient) waitPoolReady(ctx context.Context, ref string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last string
	for {
		resp, err := c.images.ListPools(ctx, connect.NewRequest(&pb.ListPoolsRequest{}))
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("warm pool of %s not ready within %s (last: %s): %w", ref, timeout, last, ctx.Err())
			}
			return fmt.Errorf("list pools: %w", err)
		}
		last = "pool not listed"
		for _, p := range resp.Msg.GetPools() {
			if p.GetImage() != ref {
				continue
			}
			last = "no node reports the pool"
			for _, n := range p.GetNodes() {
				last = fmt.Sprintf("node %s: ready %d, filling %d, target %d", n.GetNode(), n.GetReady(), n.GetFilling(), n.GetTarget())
				if n.GetError() != "" {
					last += ", error: " + n.GetError()
				}
				// Full again (the refill after the last claim is done), and nothing
				// filling: the measured start does not share the CPUs with a refill.
				if n.GetReady() >= 1 && n.GetReady() >= n.GetTarget() && n.GetFilling() == 0 {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("warm pool of %s not ready within %s (last: %s): %w", ref, timeout, last, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// setPool configures a warm pool of size VMs for ref on every node.
func (c *apiClient) setPool(ctx context.Context, ref string, size int) error {
	_, err := c.images.SetPool(ctx, connect.NewRequest(&pb.SetPoolRequest{Pool: &pb.Pool{Image: ref, Size: int32(size)}}))
	if err != nil {
		return fmt.Errorf("set warm pool of %s to %d: %w", ref, size, err)
	}
	return nil
}

func (c *apiClient) deletePool(ctx context.Context, ref string) error {
	if _, err := c.images.DeletePool(ctx, connect.NewRequest(&pb.DeletePoolRequest{Image: ref})); err != nil {
		return fmt.Errorf("delete warm pool of %s: %w", ref, err)
	}
	return nil
}

// warmImage builds ref's template snapshot if there is none, and says whether it did and
// how long that took.
func (c *apiClient) warmImage(ctx context.Context, ref string) (built bool, took time.Duration, err error) {
	resp, err := c.images.WarmImage(ctx, connect.NewRequest(&pb.WarmImageRequest{Ref: ref}))
	if err != nil {
		return false, 0, fmt.Errorf("warm image %s: %w", ref, err)
	}
	return resp.Msg.GetBuilt(), resp.Msg.GetBuildTime().AsDuration(), nil
}

// info returns the accelerator and guest kernel the server reports.
func (c *apiClient) info(ctx context.Context) (accel, kernel string) {
	resp, err := c.system.Info(ctx, connect.NewRequest(&pb.InfoRequest{}))
	if err != nil {
		return "unknown", "unknown"
	}
	return resp.Msg.GetAccel(), resp.Msg.GetKernelRelease()
}

// startLongRunning starts argv in a sandbox of ref and waits until it runs.
func (c *apiClient) startLongRunning(ctx context.Context, ref string, argv []string) (string, error) {
	return c.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: argv})
}

// startSpec creates a sandbox of spec and waits until it runs.
func (c *apiClient) startSpec(ctx context.Context, spec *pb.SandboxSpec) (string, error) {
	ref, argv := spec.GetImage(), spec.GetCmd()
	resp, err := c.sandboxes.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Spec: spec}))
	if err != nil {
		return "", fmt.Errorf("create sandbox of %s running %s: %w", ref, strings.Join(argv, " "), err)
	}
	id := resp.Msg.GetSandbox().GetId()
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		got, err := c.sandboxes.GetSandbox(wctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
		if err != nil {
			c.remove(context.WithoutCancel(ctx), id)
			return "", fmt.Errorf("wait for sandbox %s to run: %w", id, err)
		}
		switch st := got.Msg.GetSandbox().GetStatus(); st {
		case "running":
			return id, nil
		case "exited", "failed", "lost":
			c.remove(context.WithoutCancel(ctx), id)
			return "", fmt.Errorf("sandbox %s running %s ended (%s) before the execs: %s", id, strings.Join(argv, " "), st, got.Msg.GetSandbox().GetReason())
		}
		select {
		case <-wctx.Done():
			c.remove(context.WithoutCancel(ctx), id)
			return "", fmt.Errorf("sandbox %s did not start running: %w", id, wctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// execOnce runs argv in the running sandbox id through the Exec stream. The clock starts
// right before the ExecStart message is sent (which opens the call).
func (c *apiClient) execOnce(ctx context.Context, id string, argv []string) (sample, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	stream := c.sandboxes.Exec(ctx)
	defer func() { _ = stream.CloseResponse() }()
	start := time.Now()
	if err := stream.Send(&pb.ExecRequest{Msg: &pb.ExecRequest_Start{Start: &pb.ExecStart{Sandbox: id, Argv: argv}}}); err != nil && !errors.Is(err, io.EOF) {
		return sample{}, fmt.Errorf("exec in sandbox %s: %w", id, err)
	}
	_ = stream.CloseRequest()
	var s sample
	for {
		msg, err := stream.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return sample{}, fmt.Errorf("exec in sandbox %s: the stream ended without an exit", id)
			}
			return sample{}, fmt.Errorf("exec in sandbox %s: %w", id, err)
		}
		if out := msg.GetOutput(); out != nil && out.GetStream() == 1 && len(out.GetData()) > 0 && s.first == 0 {
			s.first = time.Since(start)
		}
		if e := msg.GetExit(); e != nil {
			s.exit = time.Since(start)
			if e.GetStatus() != "exited" || e.GetCode() != 0 {
				return sample{}, fmt.Errorf("exec %s in sandbox %s ended %s with code %d: %s", strings.Join(argv, " "), id, e.GetStatus(), e.GetCode(), e.GetReason())
			}
			if s.first == 0 {
				return sample{}, fmt.Errorf("exec %s in sandbox %s printed nothing on stdout", strings.Join(argv, " "), id)
			}
			return s, nil
		}
	}
}

// countHow tallies how the node started each sample ("" when it did not say).
func countHow(samples []sample) map[string]int {
	m := map[string]int{}
	for _, s := range samples {
		if s.how != "" {
			m[s.how]++
		}
	}
	if len(m) == 0 {
		return nil
	}
	return m
}

// describeHow renders countHow's tally in a stable order, e.g. "restore×1 warm×49".
func describeHow(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s×%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}
