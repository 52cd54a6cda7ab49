package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// maxAuditPage bounds one ListAudit answer; older entries are read in pages (after).
const maxAuditPage = 5000

// stateChunk is the size of the pieces a state file travels in (under the per-message
// bound of streams).
const stateChunk = 1 << 20

func (h *clusterService) ListAudit(ctx context.Context, req *connect.Request[pb.ListAuditRequest]) (*connect.Response[pb.ListAuditResponse], error) {
	// The log names every tenant's tokens and sandboxes: the operator's.
	if _, err := requireAdmin(ctx, "reading the audit log"); err != nil {
		return nil, err
	}
	m := req.Msg
	limit := int(m.GetLimit())
	switch {
	case limit < 0:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("limit %d is negative", limit))
	case limit == 0:
		limit = 100
	case limit > maxAuditPage:
		limit = maxAuditPage
	}
	for _, f := range []string{m.GetActor(), m.GetTarget(), m.GetOp()} {
		if len(f) > 256 {
			return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("an audit filter is longer than 256 bytes"))
		}
	}
	entries, err := h.s.store.Audit(ctx, state.AuditQuery{After: m.GetAfter(), Actor: m.GetActor(), Target: m.GetTarget(), Op: m.GetOp(), Limit: limit})
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListAuditResponse{Entries: make([]*pb.AuditEntry, 0, len(entries))}
	for _, e := range entries {
		resp.Entries = append(resp.Entries, &pb.AuditEntry{
			Index: e.Index, At: timestamppb.New(e.At), ActorKind: e.By.Kind, ActorId: e.By.ID, ActorName: e.By.Name,
			ActorRole: string(e.By.Role), Server: e.Server, Op: e.Op, Target: e.Target, Detail: e.Detail, Error: e.Error,
		})
	}
	return connect.NewResponse(resp), nil
}

func (h *clusterService) SnapshotState(ctx context.Context, _ *connect.Request[pb.SnapshotStateRequest], stream *connect.ServerStream[pb.StateChunk]) error {
	// The state holds every token's hash and every tenant's sandboxes.
	id, err := requireAdmin(ctx, "taking a state snapshot")
	if err != nil {
		return err
	}
	var file bytes.Buffer
	hdr, err := h.s.store.SnapshotState(ctx, &file)
	if err != nil {
		return toConnectError(err)
	}
	h.s.log.Info("state snapshot taken", "by", id.TokenID, "index", hdr.Index, "bytes", file.Len())
	for b := file.Bytes(); len(b) > 0; {
		n := min(len(b), stateChunk)
		if err := stream.Send(&pb.StateChunk{Data: b[:n]}); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func (h *clusterService) RestoreState(ctx context.Context, stream *connect.ClientStream[pb.StateChunk]) (*connect.Response[pb.RestoreStateResponse], error) {
	id, err := requireAdmin(ctx, "restoring the state")
	if err != nil {
		return nil, err
	}
	sum, err := h.s.store.RestoreState(ctx, &chunkReader{stream: stream})
	if err != nil {
		return nil, toConnectError(err)
	}
	h.s.log.Warn("state restored from a state file", "by", id.TokenID, "taken_at", sum.Header.TakenAt, "index", sum.Header.Index)
	if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Notify()
	}
	return connect.NewResponse(&pb.RestoreStateResponse{Index: sum.Header.Index, TakenAt: timestamppb.New(sum.Header.TakenAt),
		Sandboxes: int32(sum.Sandboxes), Nodes: int32(sum.Nodes), Tokens: int32(sum.Tokens)}), nil
}

// chunkReader reads a client stream of chunks as one byte stream.
type chunkReader struct {
	stream *connect.ClientStream[pb.StateChunk]
	buf    []byte
}

func (c *chunkReader) Read(p []byte) (int, error) {
	for len(c.buf) == 0 {
		if !c.stream.Receive() {
			if err := c.stream.Err(); err != nil {
				return 0, err
			}
			return 0, io.EOF
		}
		c.buf = c.stream.Msg().GetData()
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	return n, nil
}
