package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// execResult is how an exec ended and what it printed.
type execResult struct {
	status         string // exited, killed, ...
	code           int32
	stdout, stderr string
}

// run executes argv in sandbox id to its end and returns its exit and output, whatever
// the exit code (the network series' guest tools end by a broken connection).
func (c *apiClient) run(ctx context.Context, id string, argv []string) (execResult, error) {
	stream := c.sandboxes.Exec(ctx)
	defer func() { _ = stream.CloseResponse() }()
	if err := stream.Send(&pb.ExecRequest{Msg: &pb.ExecRequest_Start{Start: &pb.ExecStart{Sandbox: id, Argv: argv}}}); err != nil && !errors.Is(err, io.EOF) {
		return execResult{}, fmt.Errorf("exec %s in sandbox %s: %w", strings.Join(argv, " "), id, err)
	}
	_ = stream.CloseRequest()
	var out, errOut strings.Builder
	for {
		msg, err := stream.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("the stream ended without an exit")
			}
			return execResult{}, fmt.Errorf("exec %s in sandbox %s: %w", strings.Join(argv, " "), id, err)
		}
		if o := msg.GetOutput(); o != nil {
			if o.GetStream() == 2 {
				errOut.Write(o.GetData())
			} else {
				out.Write(o.GetData())
			}
		}
		if e := msg.GetExit(); e != nil {
			return execResult{status: e.GetStatus(), code: e.GetCode(), stdout: out.String(), stderr: errOut.String()}, nil
		}
	}
}

// runOK is run that wants exit code 0.
func (c *apiClient) runOK(ctx context.Context, id string, argv []string) (string, error) {
	r, err := c.run(ctx, id, argv)
	if err != nil {
		return "", err
	}
	if r.status != "exited" || r.code != 0 {
		return "", fmt.Errorf("exec %s in sandbox %s ended %s with code %d: %s", strings.Join(argv, " "), id, r.status, r.code, strings.TrimSpace(r.stderr))
	}
	return r.stdout, nil
}

// bgExec is an exec running while the bench does the host's side of a measurement.
type bgExec struct {
	cancel context.CancelFunc
	done   chan struct{}
	res    execResult
	err    error
}

// background starts argv in sandbox id; the caller must call wait.
func (c *apiClient) background(ctx context.Context, id string, argv []string) *bgExec {
	ctx, cancel := context.WithCancel(ctx)
	b := &bgExec{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(b.done)
		b.res, b.err = c.run(ctx, id, argv)
	}()
	return b
}

// wait gives the exec up to grace to end by itself (its connection closed), then ends
// it, and returns how it ended.
func (b *bgExec) wait(grace time.Duration) (execResult, error) {
	select {
	case <-b.done:
	case <-time.After(grace):
		b.cancel()
		<-b.done
	}
	b.cancel()
	return b.res, b.err
}

// sandboxInfo is what the network series needs to know about a running sandbox.
type sandboxInfo struct {
	id, address, netns, pid string
	token                   string
}

func (c *apiClient) sandboxInfo(ctx context.Context, id string) (sandboxInfo, error) {
	got, err := c.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
	if err != nil {
		return sandboxInfo{}, fmt.Errorf("get sandbox %s: %w", id, err)
	}
	sb := got.Msg.GetSandbox()
	d := sb.GetDetails()
	info := sandboxInfo{id: id, address: d["address"], netns: d["netns"], pid: d["pid"], token: sb.GetAccessToken()}
	if info.address == "" || info.netns == "" {
		return sandboxInfo{}, fmt.Errorf("sandbox %s has no network in its details (address %q, netns %q)", id, info.address, info.netns)
	}
	return info, nil
}

// counters is the number of packets a sandbox's policy programs have counted (allowed
// and dropped, both directions).
func (c *apiClient) counters(ctx context.Context, id string) (uint64, error) {
	got, err := c.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
	if err != nil {
		return 0, fmt.Errorf("get sandbox %s: %w", id, err)
	}
	n := got.Msg.GetSandbox().GetNetwork()
	if n == nil {
		return 0, fmt.Errorf("sandbox %s reports no network counters", id)
	}
	return n.GetEgressAllowed() + n.GetEgressDropped() + n.GetIngressAllowed() + n.GetIngressDropped(), nil
}

func (c *apiClient) setPolicy(ctx context.Context, id, text string) error {
	if _, err := c.sandboxes.SetPolicy(ctx, connect.NewRequest(&pb.SetPolicyRequest{Sandbox: id, Policy: text})); err != nil {
		return fmt.Errorf("set the policy of sandbox %s: %w", id, err)
	}
	return nil
}
