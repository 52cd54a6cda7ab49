package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fireworks-sandbox/fireworks/internal/agent"
	pb "github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// errNoTemplates answers template calls on a cluster server: templates are built and
// kept by each node.
var errNoTemplates = connect.NewError(connect.CodeFailedPrecondition,
	errors.New("this server runs no sandboxes: each node builds its own templates when an image first starts there, or for a warm pool (`fireworks pool set`)"))

func (h *imageService) WarmImage(ctx context.Context, req *connect.Request[pb.WarmImageRequest]) (*connect.Response[pb.WarmImageResponse], error) {
	// Templates share one disk budget on the node (least recently used go first): only an
	// admin builds one on purpose, so no tenant can push out the others'. (A user's runs
	// still build the template of the image they run, as they need it.)
	who, err := requireAdmin(ctx, "warming an image")
	if err != nil {
		return nil, err
	}
	ref := req.Msg.GetRef()
	if ref == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("no image reference given"))
	}
	if err := checkImageSource(ctx, ref); err != nil {
		return nil, err
	}
	if h.s.agent == nil {
		return nil, errNoTemplates
	}
	t, err := h.s.agent.WarmImage(ctx, ref, h.s.agent.PullOptions(req.Msg.GetInsecureRegistries(), who.Admin(), who.TokenID))
	if err != nil {
		var ce *connect.Error
		if errors.As(err, &ce) || ctx.Err() != nil {
			return nil, toConnectError(err)
		}
		// Mostly a pull or boot problem with this image: the caller's to fix.
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("warm %s: %w", ref, err))
	}
	resp := &pb.WarmImageResponse{Template: templateToPB(t), Built: t.Built}
	if t.Built {
		resp.BuildTime = durationpb.New(t.BuildTime)
	}
	return connect.NewResponse(resp), nil
}

func (h *imageService) ListTemplates(ctx context.Context, _ *connect.Request[pb.ListTemplatesRequest]) (*connect.Response[pb.ListTemplatesResponse], error) {
	if _, err := requireAdmin(ctx, "listing templates"); err != nil { // every tenant's images

		return nil, err
	}
	if h.s.agent == nil {
		return nil, errNoTemplates
	}
	resp := &pb.ListTemplatesResponse{}
	for _, t := range h.s.agent.Templates() {
		resp.Templates = append(resp.Templates, templateToPB(t))
	}
	return connect.NewResponse(resp), nil
}

func templateToPB(t agent.TemplateInfo) *pb.Template {
	return &pb.Template{Key: t.Key, Image: t.Image, Digest: t.Digest, Vcpus: int32(t.VCPUs),
		MemoryMib: int32(t.MemoryMiB), Size: t.SizeBytes, LastUsed: ts(t.LastUsed)}
}

func (h *imageService) SetPool(ctx context.Context, req *connect.Request[pb.SetPoolRequest]) (*connect.Response[pb.SetPoolResponse], error) {
	// Pools take capacity on every node: cluster-wide configuration, for admins.
	if _, err := requireAdmin(ctx, "configuring a warm pool"); err != nil {
		return nil, err
	}
	in := req.Msg.GetPool()
	p := state.Pool{
		Image: in.GetImage(), Size: int(in.GetSize()), Max: int(in.GetMax()), VCPUs: int(in.GetVcpus()),
		MemoryMiB: int(in.GetMemoryMib()), InsecureRegistries: in.GetInsecureRegistries(), UpdatedAt: h.s.now(),
	}
	if err := h.s.validatePool(p); err != nil {
		return nil, toConnectError(err)
	}
	out, err := h.s.store.SetPool(ctx, p)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.SetPoolResponse{Pool: poolToPB(out)}), nil
}

// validatePool checks what the state store cannot: the image source and the VM shape
// against the limits sandboxes have (0 means the node's default shape).
func (s *Server) validatePool(p state.Pool) error {
	if p.Image == "" {
		return invalid("a pool needs an image")
	}
	spec := state.SandboxSpec{Image: p.Image, VCPUs: p.VCPUs, MemoryMiB: p.MemoryMiB}
	if p.VCPUs < 0 || p.MemoryMiB < 0 {
		return invalid("pool %s: negative --cpus %d or --memory %d", p.Image, p.VCPUs, p.MemoryMiB)
	}
	var err error
	if s.agent != nil {
		err = s.agent.Validate(&spec)
	} else {
		err = validateClusterSpec(&spec)
	}
	if err != nil {
		return invalid("pool %s: %v", p.Image, err)
	}
	return nil
}

func (h *imageService) DeletePool(ctx context.Context, req *connect.Request[pb.DeletePoolRequest]) (*connect.Response[pb.DeletePoolResponse], error) {
	if _, err := requireAdmin(ctx, "removing a warm pool"); err != nil {
		return nil, err
	}
	if req.Msg.GetImage() == "" {
		return nil, toConnectError(invalid("no image given"))
	}
	if err := h.s.store.DeletePool(ctx, req.Msg.GetImage()); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.DeletePoolResponse{}), nil
}

func (h *imageService) ListPools(ctx context.Context, _ *connect.Request[pb.ListPoolsRequest]) (*connect.Response[pb.ListPoolsResponse], error) {
	if _, err := requireAdmin(ctx, "listing warm pools"); err != nil { // cluster configuration

		return nil, err
	}
	pools, err := h.s.store.ListPools(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	statuses := h.s.poolStatuses()
	resp := &pb.ListPoolsResponse{}
	listed := map[string]bool{}
	for _, p := range pools {
		out := poolToPB(p)
		listed[p.Image] = true
		for _, st := range statuses {
			if st.GetImage() == p.Image {
				out.Nodes = append(out.Nodes, st)
			}
		}
		resp.Pools = append(resp.Pools, out)
	}
	// Pools a node keeps by its own configuration (--warm-pool) are listed too, with
	// what the node reports; they have no cluster-wide size.
	byImage := map[string]*pb.Pool{}
	for _, st := range statuses {
		if listed[st.GetImage()] {
			continue
		}
		p := byImage[st.GetImage()]
		if p == nil {
			p = &pb.Pool{Image: st.GetImage()}
			byImage[st.GetImage()] = p
			resp.Pools = append(resp.Pools, p)
		}
		p.Nodes = append(p.Nodes, st)
	}
	return connect.NewResponse(resp), nil
}

// poolStatuses is what the nodes in this server's reach say about their warm pools,
// sorted by node: the local agent's own in dev, else each ready node's last heartbeat.
func (s *Server) poolStatuses() []*pb.PoolNodeStatus {
	if s.agent != nil {
		var out []*pb.PoolNodeStatus
		for _, p := range s.agent.Pools() {
			out = append(out, PoolStatusToPB(s.agent.NodeName(), p))
		}
		return out
	}
	var out []*pb.PoolNodeStatus
	for _, n := range s.store.LocalNodes() {
		if n.Status != state.NodeReady {
			continue // a down node's report is stale, and its pools are gone with it
		}
		out = append(out, s.pools.get(n.ID)...)
	}
	return out
}

// PoolStatusToPB is one node's report about one of its warm pools.
func PoolStatusToPB(node string, p agent.PoolStatus) *pb.PoolNodeStatus {
	return &pb.PoolNodeStatus{Node: node, Image: p.Image, Digest: p.Digest, Target: int32(p.Target),
		Ready: int32(p.Ready), Filling: int32(p.Filling), ClaimsLastMinute: int32(p.Claims), Error: p.Error}
}

func poolToPB(p state.Pool) *pb.Pool {
	return &pb.Pool{Image: p.Image, Size: int32(p.Size), Max: int32(p.Max), Vcpus: int32(p.VCPUs),
		MemoryMib: int32(p.MemoryMiB), InsecureRegistries: p.InsecureRegistries, UpdatedAt: ts(p.UpdatedAt)}
}

// poolReports keeps what each node last reported about its warm pools, in the leader's
// memory like heartbeats: it is refreshed every few seconds, so losing it with a
// leadership change costs one heartbeat interval.
type poolReports struct {
	mu     sync.Mutex
	byNode map[string][]*pb.PoolNodeStatus
}

// Bounds on what one node's report may hold, so a misbehaving agent cannot grow the
// leader's memory or the ListPools answer without limit.
const (
	maxPoolReports   = 256
	maxPoolErrorLen  = 1024
	maxPoolFieldSize = 512
)

func (r *poolReports) set(node string, in []*pb.PoolNodeStatus) {
	out := make([]*pb.PoolNodeStatus, 0, min(len(in), maxPoolReports))
	for _, st := range in {
		if len(out) == maxPoolReports {
			break
		}
		if len(st.GetImage()) > maxPoolFieldSize || len(st.GetDigest()) > maxPoolFieldSize {
			continue
		}
		c := proto.CloneOf(st)
		c.Node = node // a node reports only for itself
		if len(c.Error) > maxPoolErrorLen {
			c.Error = c.Error[:maxPoolErrorLen]
		}
		out = append(out, c)
	}
	slices.SortStableFunc(out, func(a, b *pb.PoolNodeStatus) int { return cmp.Compare(a.Image, b.Image) })
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byNode == nil {
		r.byNode = map[string][]*pb.PoolNodeStatus{}
	}
	r.byNode[node] = out
}

func (r *poolReports) forget(node string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.byNode, node)
}

// get returns copies of node's last report.
func (r *poolReports) get(node string) []*pb.PoolNodeStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*pb.PoolNodeStatus
	for _, st := range r.byNode[node] {
		out = append(out, proto.CloneOf(st))
	}
	return out
}

// heartbeatPools is the warm-pool configuration every heartbeat reply carries: the
// leader's copy of the state, which holds every committed change.
func (s *Server) heartbeatPools() []*pb.Pool {
	var out []*pb.Pool
	for _, p := range s.store.LocalPools() {
		out = append(out, poolToPB(p))
	}
	return out
}

// feedAgentPools hands the pool configuration to this process's own agent (dev): now,
// and again after every change to it, until ctx ends.
func (s *Server) feedAgentPools(ctx context.Context) {
	var last []state.Pool
	first := true
	for {
		changed := s.store.Changed()
		cur := s.store.LocalPools()
		if first || !reflect.DeepEqual(cur, last) {
			s.agent.SetPools(cur)
			last, first = cur, false
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}
