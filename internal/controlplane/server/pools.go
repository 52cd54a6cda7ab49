package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

func (h *imageService) WarmImage(ctx context.Context, req *connect.Request[pb.WarmImageRequest]) (*connect.Response[pb.WarmImageResponse], error) {
	// Templates share one disk budget on the node (least recently used go first): only an
	// admin builds one on purpose, so no tenant can push out the others'. (A user's runs
	// still build the template of the image they run, as they need it.)
	if _, err := requireAdmin(ctx, "warming an image"); err != nil {
		return nil, err
	}
	ref := req.Msg.GetRef()
	if ref == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("no image reference given"))
	}
	if err := checkImageSource(ctx, ref); err != nil {
		return nil, err
	}
	nodes, err := h.s.targetNodes(req.Msg.GetNode())
	if err != nil {
		return nil, err
	}
	if len(nodes) > 1 {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("a template is built on one node: name it with --node (ready: %s), or set a warm pool (`fireworks pool set %s`) to warm the image on every node", strings.Join(nodes, ", "), ref))
	}
	var resp *connect.Response[pb.WarmImageResponse]
	err = h.s.onNodes(ctx, nodes, "warm "+ref, 0, func(ctx context.Context, n *nodeConn) error {
		resp, err = n.images.WarmImage(ctx, connect.NewRequest(&pb.WarmImageRequest{Ref: ref, InsecureRegistries: req.Msg.GetInsecureRegistries()}))
		if err == nil && resp.Msg.GetTemplate() != nil {
			resp.Msg.Template.Node = n.name
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (h *imageService) ListTemplates(ctx context.Context, req *connect.Request[pb.ListTemplatesRequest]) (*connect.Response[pb.ListTemplatesResponse], error) {
	if _, err := requireAdmin(ctx, "listing templates"); err != nil { // every tenant's images
		return nil, err
	}
	nodes, err := h.s.targetNodes(req.Msg.GetNode())
	if err != nil {
		return nil, err
	}
	resp := &pb.ListTemplatesResponse{}
	err = h.s.onNodes(ctx, nodes, "list templates", nodeCallTimeout, func(ctx context.Context, n *nodeConn) error {
		got, err := n.images.ListTemplates(ctx, connect.NewRequest(&pb.ListTemplatesRequest{}))
		if err == nil {
			for _, t := range got.Msg.GetTemplates() {
				t.Node = n.name
				resp.Templates = append(resp.Templates, t)
			}
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
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
		ManagedBy: in.GetManagedBy(),
	}
	if err := h.s.validatePool(p); err != nil {
		return nil, toConnectError(err)
	}
	// A manager (the Kubernetes controller) changes only the pools it manages: never an
	// operator's, whatever its namespaces ask for. (An operator may take any pool over.)
	if p.ManagedBy != "" {
		for _, cur := range h.s.store.LocalPools() {
			if cur.Image == p.Image && cur.ManagedBy != p.ManagedBy {
				return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("the warm pool of %s is %s; %s may not change it", p.Image, poolOwnerText(cur.ManagedBy), p.ManagedBy))
			}
		}
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
	if err := spec.CheckSizes(); err != nil {
		return invalid("pool: %v", err)
	}
	if err := s.validateSpec(&spec); err != nil {
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
	statuses := h.s.poolStatuses(ctx)
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
	// what the node reports; they have no cluster-wide size. (A cluster pool a node still
	// reports after its removal is one the node is draining.)
	byImage := map[string]*pb.Pool{}
	for _, st := range statuses {
		if listed[st.GetImage()] || !st.GetLocal() {
			continue
		}
		p := byImage[st.GetImage()]
		if p == nil {
			p = &pb.Pool{Image: st.GetImage(), Size: st.GetSize(), Max: st.GetMax()}
			byImage[st.GetImage()] = p
			resp.Pools = append(resp.Pools, p)
		}
		p.Nodes = append(p.Nodes, st)
	}
	return connect.NewResponse(resp), nil
}

// poolStatuses is what the ready nodes say about their warm pools, sorted by node: each
// asked now (a claim a moment ago shows), or its last heartbeat's report if it does not
// answer at once.
func (s *Server) poolStatuses(ctx context.Context) []*pb.PoolNodeStatus {
	var ready []string
	for _, n := range s.store.LocalNodes() {
		if n.Status == state.NodeReady { // a down node's report is stale, and its pools are gone with it
			ready = append(ready, n.ID)
		}
	}
	byNode := make([][]*pb.PoolNodeStatus, len(ready))
	var wg sync.WaitGroup
	for i, n := range ready {
		wg.Go(func() {
			if live, ok := s.livePools(ctx, n); ok {
				byNode[i] = live
			} else {
				byNode[i] = s.pools.get(n)
			}
		})
	}
	wg.Wait()
	return slices.Concat(byNode...)
}

// livePools asks a node for its warm pools now (briefly).
func (s *Server) livePools(ctx context.Context, node string) ([]*pb.PoolNodeStatus, bool) {
	c, err := s.node(ctx, node)
	if err != nil {
		return nil, false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := c.images.ListPools(ctx, connect.NewRequest(&pb.ListPoolsRequest{}))
	if err != nil {
		return nil, false
	}
	var out []*pb.PoolNodeStatus
	for _, p := range resp.Msg.GetPools() {
		out = append(out, p.GetNodes()...)
	}
	return boundPoolReport(node, out), true // bounded and attributed as a heartbeat's report is
}

// poolOwnerText says whose a pool is, for errors.
func poolOwnerText(managedBy string) string {
	if managedBy == "" {
		return "an operator's"
	}
	return "managed by " + managedBy
}

func poolToPB(p state.Pool) *pb.Pool {
	return &pb.Pool{Image: p.Image, Size: int32(p.Size), Max: int32(p.Max), Vcpus: int32(p.VCPUs), ManagedBy: p.ManagedBy,
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
	out := boundPoolReport(node, in)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byNode == nil {
		r.byNode = map[string][]*pb.PoolNodeStatus{}
	}
	r.byNode[node] = out
}

// boundPoolReport is what is kept of a node's report about its pools: bounded, as the
// node's own (a node reports only for itself), sorted by image.
func boundPoolReport(node string, in []*pb.PoolNodeStatus) []*pb.PoolNodeStatus {
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
	return out
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
