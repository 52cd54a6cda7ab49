package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// waitStarted waits until the sandbox has left pending (its node has it live, or it is
// already over), so a data-plane call to the node finds it.
func (s *Server) waitStarted(ctx context.Context, id string) (state.Sandbox, error) {
	return s.waitFor(ctx, id, true, func(sb state.Sandbox) bool { return sb.Status != state.StatusPending })
}

// waitFor returns the sandbox once done holds for it. A counted wait is one of the calls a
// user token may hold waiting at once (Limits.WaitsPerOwner: waits for a sandbox to be
// placed, start, pause or resume); the waits that end a user's own sandbox (a stop, an
// attach collecting the exit) are not, so that the limit never keeps a user from
// cleaning up.
func (s *Server) waitFor(ctx context.Context, id string, counted bool, done func(state.Sandbox) bool) (state.Sandbox, error) {
	held := !counted
	for {
		changed := s.store.Changed()
		sb, err := s.store.GetSandbox(ctx, id)
		if err != nil || done(sb) {
			return sb, err
		}
		if !held {
			release, err := s.holdWait(ctx)
			if err != nil {
				return sb, err
			}
			defer release()
			held = true
		}
		select {
		case <-changed:
		case <-time.After(time.Second):
		case <-ctx.Done():
			return sb, ctx.Err()
		}
	}
}

// holdWait counts a user token's call that waits in waitFor, refusing one past the
// token's limit; admins and the server's own waits (no caller) are not counted.
func (s *Server) holdWait(ctx context.Context) (release func(), err error) {
	who, ok := auth.From(ctx)
	limit := s.limits.WaitsPerOwner
	if !ok || who.Admin() || limit <= 0 {
		return func() {}, nil
	}
	s.waitMu.Lock()
	defer s.waitMu.Unlock()
	if s.waiting[who.TokenID] >= limit {
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("%d calls of this token already wait for sandboxes to be placed, start or stop (--max-waits-per-token)", limit))
	}
	if s.waiting == nil {
		s.waiting = map[string]int{}
	}
	s.waiting[who.TokenID]++
	return func() {
		s.waitMu.Lock()
		defer s.waitMu.Unlock()
		if s.waiting[who.TokenID]--; s.waiting[who.TokenID] == 0 {
			delete(s.waiting, who.TokenID)
		}
	}, nil
}

// attachOnNode relays an attach to the node that runs sb, then reports the exit recorded
// in the state (the node's last report is committed before its stream ends).
func (s *Server) attachOnNode(ctx context.Context, sb state.Sandbox, stream *connect.BidiStream[pb.AttachRequest, pb.AttachResponse]) error {
	// The client's messages (stdin, resizes) are read once for the whole attachment:
	// a live migration moves it to the sandbox's new node (see movedOn).
	reqs := clientMessages(ctx, stream.Receive)
	// A live migration's target has the same log (it moved with the sandbox): the
	// records relayed already are skipped there, as Logs does.
	sent := 0
	for {
		n, err := s.attachOnce(ctx, sb, reqs, sent, stream)
		sent = max(sent, n)
		if err != nil {
			return err
		}
		next, moved, err := s.movedOn(ctx, sb)
		if err != nil {
			return err
		}
		if moved {
			sb = next
			continue
		}
		break
	}
	final, err := s.waitFor(ctx, sb.ID, false, func(sb state.Sandbox) bool { return sb.Status.Terminal() || sb.Status == state.StatusPaused })
	if err != nil {
		return toConnectError(err)
	}
	if final.Status == state.StatusPaused {
		// The attachment ends with the run it was to; the process itself goes on after
		// a resume, and so does its output in the log.
		return stream.Send(&pb.AttachResponse{Msg: &pb.AttachResponse_Exit{Exit: &pb.Exit{Status: string(state.StatusPaused),
			Reason: "it was paused; `fireworks resume " + sb.ID[:12] + "` brings it back, `fireworks logs -f " + sb.ID[:12] + "` follows its output"}}})
	}
	return stream.Send(&pb.AttachResponse{Msg: &pb.AttachResponse_Exit{Exit: exitOf(final)}})
}

// attachOnce relays one attachment to sb's node until the node ends it, past the first
// skip output records; it returns how many the node sent (skipped ones included).
func (s *Server) attachOnce(ctx context.Context, sb state.Sandbox, reqs <-chan *pb.AttachRequest, skip int, stream *connect.BidiStream[pb.AttachRequest, pb.AttachResponse]) (int, error) {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return 0, toConnectError(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rs := c.sandboxes.Attach(rctx)
	// The node knows sandboxes by ID only (the caller may have named it or given a prefix).
	fwd := &pb.AttachRequest{Msg: &pb.AttachRequest_Start{Start: &pb.AttachStart{Sandbox: sb.ID}}}
	if err := rs.Send(fwd); err != nil && !errors.Is(err, io.EOF) {
		return 0, connect.NewError(connect.CodeUnavailable, fmt.Errorf("attach on node %s: %w", sb.Node, err))
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); forwardMessages(rctx, reqs, rs.Send, rs.CloseRequest, nil) }()
	defer wg.Wait()
	defer cancel()
	n := 0
	for {
		m, err := rs.Receive()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, connect.NewError(connect.CodeUnavailable, fmt.Errorf("lost the stream from node %s: %w", sb.Node, err))
		}
		if m.GetExit() != nil {
			continue // the state has the authoritative exit
		}
		if m.GetOutput() != nil {
			if n++; n <= skip {
				continue
			}
		}
		if err := stream.Send(m); err != nil {
			return n, err
		}
	}
}

// movedOn says, once a run of sb ended on its node, whether that was a live migration
// that moved it (waiting for one in progress to end), and returns it as it is now, once
// its new run is there to attach to or follow (its node has reported it).
func (s *Server) movedOn(ctx context.Context, sb state.Sandbox) (state.Sandbox, bool, error) {
	cur, err := s.waitFor(ctx, sb.ID, false, func(cur state.Sandbox) bool { return cur.Migration == nil })
	if err != nil {
		return cur, false, toConnectError(err)
	}
	if cur.Status != state.StatusRunning || cur.Resumes == sb.Resumes || !cur.PauseRequestedAt.IsZero() || len(cur.Migrations) == 0 {
		return cur, false, nil
	}
	last := cur.Migrations[len(cur.Migrations)-1]
	if last.Outcome != state.MigrationMoved {
		return cur, false, nil
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if now, err := s.waitFor(rctx, sb.ID, false, func(now state.Sandbox) bool {
		return now.Runtime["migration"] == last.ID || now.Status != state.StatusRunning || now.Resumes != cur.Resumes
	}); err == nil {
		cur = now
	}
	return cur, true, nil
}

// logsOnNode relays sb's log from its node, past the first skip records; it returns how
// many records the node sent (skipped ones included).
func (s *Server) logsOnNode(ctx context.Context, sb state.Sandbox, req *pb.LogsRequest, skip int, stream *connect.ServerStream[pb.LogsResponse]) (int, error) {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return 0, toConnectError(err)
	}
	rs, err := c.sandboxes.Logs(ctx, connect.NewRequest(&pb.LogsRequest{Sandbox: sb.ID, Follow: req.GetFollow()}))
	if err != nil {
		return 0, connect.NewError(connect.CodeUnavailable, fmt.Errorf("logs from node %s: %w", sb.Node, err))
	}
	defer rs.Close()
	n := 0
	for rs.Receive() {
		n++
		if n <= skip {
			continue
		}
		if err := stream.Send(rs.Msg()); err != nil {
			return n, err
		}
	}
	if err := rs.Err(); err != nil {
		return n, connect.NewError(connect.CodeUnavailable, fmt.Errorf("logs from node %s: %w", sb.Node, err))
	}
	return n, nil
}

func (s *Server) execOnNode(ctx context.Context, sb state.Sandbox, first *pb.ExecRequest, stream *connect.BidiStream[pb.ExecRequest, pb.ExecResponse]) error {
	// The client's messages (stdin, resizes) are read by one goroutine for the whole
	// call: an exec the node refuses because the sandbox just moved is started again
	// where it runs now (see below), from the same stream.
	reqs := clientMessages(ctx, stream.Receive)
	began := time.Now()
	for attempt := 1; ; attempt++ {
		used, err := s.execOnce(ctx, sb, first, reqs, stream)
		// A node whose agent is restarting (an upgrade) refuses connections for a few
		// seconds: nothing reached it, so the exec is tried again for a while.
		if !used && nodeRefused(err) {
			if time.Since(began) < nodeRedialFor {
				select {
				case <-time.After(500 * time.Millisecond):
				case <-ctx.Done():
					return toConnectError(ctx.Err())
				}
				now, lerr := s.store.GetSandbox(ctx, sb.ID)
				if lerr != nil {
					return toConnectError(lerr)
				}
				if sb, lerr = s.waitRunning(ctx, now); lerr != nil {
					return lerr // it ended meanwhile (its node was declared down...)
				}
				attempt--
				continue
			}
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("node %s did not answer for %s (its agent may be restarting or down): %w", sb.Node, nodeRedialFor, err))
		}
		// A node answers Aborted when a live migration moved the sandbox away before the
		// command started there: nothing ran, so it is started where the sandbox runs
		// now, unless the client's input or the command's output went through already.
		if connect.CodeOf(err) != connect.CodeAborted || used || attempt == 3 {
			return err
		}
		now, lerr := s.store.GetSandbox(ctx, sb.ID)
		if lerr != nil {
			return toConnectError(lerr)
		}
		if now, lerr = s.waitRunning(ctx, now); lerr != nil {
			return lerr
		}
		if now, lerr = s.waitMigrated(ctx, now); lerr != nil {
			return lerr
		}
		sb = now
	}
}

// execOnce runs one exec on sb's node, relaying reqs to it; used says whether any of
// the client's messages or the node's answers went through.
func (s *Server) execOnce(ctx context.Context, sb state.Sandbox, first *pb.ExecRequest, reqs <-chan *pb.ExecRequest, stream *connect.BidiStream[pb.ExecRequest, pb.ExecResponse]) (used bool, err error) {
	c, err := s.nodeFor(ctx, sb)
	if err != nil {
		return false, toConnectError(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rs := c.sandboxes.Exec(rctx)
	start := first.GetStart()
	fwd := &pb.ExecRequest{Msg: &pb.ExecRequest_Start{Start: &pb.ExecStart{
		Sandbox: sb.ID, Argv: start.GetArgv(), Env: start.GetEnv(), WorkingDir: start.GetWorkingDir(), User: start.GetUser(),
		Tty: start.GetTty(), Stdin: start.GetStdin(), Rows: start.GetRows(), Cols: start.GetCols(),
	}}}
	if err := rs.Send(fwd); err != nil && !errors.Is(err, io.EOF) {
		return false, connect.NewError(connect.CodeUnavailable, fmt.Errorf("exec on node %s: %w", sb.Node, err))
	}
	var relayed atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); forwardMessages(rctx, reqs, rs.Send, rs.CloseRequest, &relayed) }()
	defer wg.Wait()
	defer cancel()
	answered := false
	err = relayResponses(rs.Receive, func(m *pb.ExecResponse) error {
		answered = true
		return stream.Send(m)
	}, "exec", sb.Node)
	cancel()
	wg.Wait()
	return answered || relayed.Load(), err
}

// nodeRedialFor is how long an exec is tried again while its node refuses connections.
const nodeRedialFor = 15 * time.Second

// nodeRefused reports whether err says that the node did not take the call: its agent
// is not listening (the dial failed), or is shutting down and said so (an HTTP/2 GOAWAY
// that this call came after, which the server promises it did not process; Go's
// transport reports it only in its text).
func nodeRefused(err error) bool {
	if err == nil || connect.IsWireError(err) {
		return false // the node (or the guest through it) answered
	}
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial" || strings.Contains(err.Error(), "graceful shutdown GOAWAY")
}

// clientMessages reads a client's stream messages into a channel, closed when the
// stream ends (or ctx): one reader for a call that a live migration may move from node
// to node.
func clientMessages[T any](ctx context.Context, recv func() (*T, error)) <-chan *T {
	out := make(chan *T)
	go func() { // ends with the client's stream or the call
		defer close(out)
		for {
			m, err := recv()
			if err != nil {
				return
			}
			select {
			case out <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// forwardMessages sends msgs to a node's stream until ctx ends, the node's stream
// breaks, or msgs closes (the client closed its side: so is the node's). relayed, if
// not nil, records that one went through.
func forwardMessages[T any](ctx context.Context, msgs <-chan *T, send func(*T) error, closeSend func() error, relayed *atomic.Bool) {
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				_ = closeSend()
				return
			}
			if relayed != nil {
				relayed.Store(true)
			}
			if send(m) != nil {
				return
			}
		case <-ctx.Done():
			return
		}
	}
}

// relayResponses copies a node's stream to the client until the node ends it. The node's
// own verdicts (bad user, not running...) pass through; a broken stream is "unavailable".
func relayResponses[T any](recv func() (*T, error), send func(*T) error, what, node string) error {
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			var ce *connect.Error
			if errors.As(err, &ce) && ce.Code() != connect.CodeUnknown && ce.Code() != connect.CodeUnavailable {
				return err
			}
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("lost the %s stream from node %s: %w", what, node, err))
		}
		if err := send(m); err != nil {
			return err
		}
	}
}

// relayRequests copies a client's messages to the node until either side ends; the call's
// context (cancelled when the handler returns) ends it.
func relayRequests[T any](recv func() (*T, error), send func(*T) error, closeSend func() error) {
	for {
		m, err := recv()
		if err != nil {
			_ = closeSend()
			return
		}
		if send(m) != nil {
			return
		}
	}
}
