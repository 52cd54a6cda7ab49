package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/kubejoin"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// ControlPlane is what the API needs from the leader's loops (internal/controlplane/leader).
type ControlPlane interface {
	// Heartbeat records that node's agent is alive (kept in the leader's memory).
	Heartbeat(node string)
	// Notify asks for a scheduling pass now (after a create, a stop, a node change).
	Notify()
	// Choose picks a node for a sandbox about to be created, if it can place it at once
	// ("" otherwise), and the scheduler configuration to re-check the plan with.
	Choose(sb state.Sandbox) (string, scheduler.Config)
	// Scheduling is the scheduler configuration placements use.
	Scheduling() scheduler.Config
	// Hold says a call of this server pauses sandbox id for its save and will resume it
	// (see state.Sandbox.PausedFor), until the returned release is called.
	Hold(id string) (release func())
}

// ClusterOptions turn a server into a cluster member: agents join and talk to it over
// mutual TLS, and sandboxes are placed on nodes by the control plane.
type ClusterOptions struct {
	CA                *pki.CA
	ControlPlane      ControlPlane
	HeartbeatInterval time.Duration
	// AgentClientTLS dials node's internal API at host (this server's certificate, CA
	// roots, the peer must hold node's agent certificate).
	AgentClientTLS func(host, node string) *tls.Config
	// LeaderAPI maps a Raft server ID to its API address, for leader hints.
	LeaderAPI func(id string) string
	// KubeJoin, when set, admits agents that join with a Kubernetes ServiceAccount token
	// instead of a join token (internal/controlplane/kubejoin): the node name is then
	// the one the token proves, not one the agent may choose.
	KubeJoin NodeProver
	// NoJoinTokens refuses joins by join token: with KubeJoin, every node is a
	// Kubernetes node proven by its pod, and a join token (any name) would get around
	// that binding.
	NoJoinTokens bool
}

// NodeProver says which node a credential proves (a Kubernetes ServiceAccount token of
// an agent's pod: kubejoin.Reviewer). Errors wrapping kubejoin.ErrRefused are refusals;
// others mean it could not be checked now.
type NodeProver interface {
	Node(ctx context.Context, token string) (string, error)
}

// nodeHeader carries the leader's API address when a node call reaches a follower.
const leaderHeader = "Fireworks-Leader"

type agentKey struct{}

// agentFrom returns the node name of the verified agent certificate on the request.
func agentFrom(ctx context.Context) (string, bool) {
	n, ok := ctx.Value(agentKey{}).(string)
	return n, ok
}

// nodeServicePrefix is the HTTP path prefix of the agent protocol.
var nodeServicePrefix = "/" + fireworksv1connect.NodeServiceName + "/"

// authenticateAgent admits agent-protocol calls: Join is authenticated by its join token
// (checked in the handler), everything else by an agent certificate from the cluster CA.
func (s *Server) authenticateAgent(w http.ResponseWriter, r *http.Request, next http.Handler) {
	if r.URL.Path == fireworksv1connect.NodeServiceJoinProcedure {
		next.ServeHTTP(w, r)
		return
	}
	role, node, err := pki.PeerIdentity(r.TLS)
	if err != nil || role != pki.RoleAgent {
		rpc.Unauthenticated(w, r, "the node protocol needs an agent certificate from the cluster CA (join with a join token first)")
		return
	}
	if s.store.CertRevoked(r.TLS.PeerCertificates[0].SerialNumber.Text(16), node) {
		rpc.Unauthenticated(w, r, fmt.Sprintf("node %s was removed from the cluster: its certificate is refused (join again with a new join token)", node))
		return
	}
	ctx := context.WithValue(r.Context(), agentKey{}, node)
	next.ServeHTTP(w, r.WithContext(state.WithActor(ctx, state.Actor{Kind: "node", ID: node})))
}

type nodeService struct{ s *Server }

// leaderOnly refuses node calls on a follower, naming the leader: agents talk to the
// leader, which holds heartbeats in memory and commits their reports.
func (h *nodeService) leaderOnly() error {
	if h.s.store.IsLeader() {
		return nil
	}
	id, _ := h.s.store.Leader()
	err := connect.NewError(connect.CodeUnavailable, fmt.Errorf("this server is not the leader (leader: %q)", id))
	if h.s.cluster.LeaderAPI != nil && id != "" {
		err.Meta().Set(leaderHeader, h.s.cluster.LeaderAPI(id))
	}
	return err
}

func (h *nodeService) Join(ctx context.Context, req *connect.Request[pb.JoinRequest]) (*connect.Response[pb.JoinResponse], error) {
	if err := h.leaderOnly(); err != nil {
		return nil, err
	}
	m := req.Msg
	if err := validNodeName(m.GetNode()); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	rec := state.JoinRecord{Node: m.GetNode()}
	var err error
	if m.GetKubeToken() != "" {
		rec.Via, err = h.admitKube(ctx, m, req.Peer().Addr)
	} else {
		rec.Token, err = h.admitToken(ctx, m)
	}
	if err != nil {
		return nil, err
	}
	// A join token must not buy a certificate for a name that is taken (a node that is
	// registered, in any state, or holds a certificate): its holder could pass for that
	// node. A host rebuilt under the same name joins after `fireworks node rm`. A node
	// its Kubernetes pod proves is that node: its new certificate replaces its old ones
	// (the state revokes them).
	if rec.Via == "" && h.nameTaken(ctx, m.GetNode()) {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("node name %q is taken; remove the old node first (`fireworks node rm %s`) to join a host under it", m.GetNode(), m.GetNode()))
	}
	names, ips, err := joinNames(m.GetAddresses())
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	certPEM, err := h.s.cluster.CA.SignCSR(m.GetCsr(), pki.IssueRequest{CommonName: m.GetNode(), Role: pki.RoleAgent, DNSNames: names, IPs: ips})
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("sign node certificate: %w", err))
	}
	serial, notAfter, err := pki.SerialOf(certPEM)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	// The use is committed before the certificate leaves: a token whose uses ran out
	// meanwhile (another host joined at the same moment) buys nothing.
	rec.Serial, rec.NotAfter, rec.Time = serial, notAfter, h.s.now()
	joiner := state.Actor{Kind: "join", ID: rec.Token, Name: rec.Via}
	if err := h.s.store.RecordJoin(state.WithActor(ctx, joiner), rec); err != nil {
		if errors.Is(err, state.ErrQuota) {
			return nil, connect.NewError(connect.CodePermissionDenied, err)
		}
		if errors.Is(err, state.ErrExists) {
			return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("%w; remove the old node first (`fireworks node rm %s`) to join a host under it", err, m.GetNode()))
		}
		return nil, toConnectError(err)
	}
	h.s.log.Info("node joined", "node", m.GetNode(), "token", rec.Token, "via", rec.Via, "replaces_its_certificates", rec.Via != "")
	return connect.NewResponse(&pb.JoinResponse{CertPem: certPEM, CaPem: h.s.cluster.CA.CertPEM()}), nil
}

// inFlight holds the keys (peers' addresses) with a call under way.
type inFlight struct {
	mu   sync.Mutex
	busy map[string]bool
}

// take admits one call for key if none is under way, and returns its release.
func (f *inFlight) take(key string) (func(), bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.busy[key] {
		return nil, false
	}
	if f.busy == nil {
		f.busy = map[string]bool{}
	}
	f.busy[key] = true
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		delete(f.busy, key)
	}, true
}

// peerHost is the host of a peer's address (the address itself if it has no port).
func peerHost(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

// nameTaken says whether node is registered (in any state) or holds a live certificate.
func (h *nodeService) nameTaken(ctx context.Context, node string) bool {
	_, err := h.s.store.GetNode(ctx, node)
	return err == nil || h.s.store.HasLiveCerts(node, h.s.now())
}

// admitToken checks a join by join token and returns the token's ID.
func (h *nodeService) admitToken(ctx context.Context, m *pb.JoinRequest) (string, error) {
	if h.s.cluster.NoJoinTokens {
		return "", connect.NewError(connect.CodeUnauthenticated, errors.New("this cluster admits agents by Kubernetes ServiceAccount token only, not by join token (its servers run with --kube-join-service-account; --allow-join-tokens admits join tokens too)"))
	}
	// One message for every token problem: no oracle for guessing.
	bad := connect.NewError(connect.CodeUnauthenticated, errors.New("join token unknown, expired or not a join token"))
	tok, err := h.s.store.GetToken(ctx, m.GetTokenId())
	if err != nil || tok.Role != state.RoleJoin || !tok.ValidAt(h.s.now()) || !pki.VerifySecret(m.GetTokenSecret(), tok.SecretHash) {
		return "", bad
	}
	if tok.Uses >= max(tok.MaxUses, 1) {
		return "", connect.NewError(connect.CodePermissionDenied, fmt.Errorf("join token %s was used %d times, all it may be (`fireworks token create --role join --uses N` makes one for N hosts)", tok.ID, tok.Uses))
	}
	return tok.ID, nil
}

// admitKube checks a join by Kubernetes ServiceAccount token: the node it proves must be
// the node the agent asks to join as. It returns what the join is recorded under.
func (h *nodeService) admitKube(ctx context.Context, m *pb.JoinRequest, peer string) (string, error) {
	if m.GetTokenId() != "" || m.GetTokenSecret() != "" {
		return "", connect.NewError(connect.CodeInvalidArgument, errors.New("a join carries a join token or a Kubernetes token, not both"))
	}
	if h.s.cluster.KubeJoin == nil {
		return "", connect.NewError(connect.CodeUnauthenticated, errors.New("this cluster does not admit agents by Kubernetes ServiceAccount token (its servers run without --kube-join-service-account): join with a join token"))
	}
	// One review at a time per address: Join runs before any credential, and a stranger
	// must not hold every review the servers make at once (agents, one per node address,
	// are told to try again).
	release, ok := h.s.joinsFrom.take(peerHost(peer))
	if !ok {
		return "", connect.NewError(connect.CodeUnavailable, fmt.Errorf("a join from %s is being checked already; try again", peerHost(peer)))
	}
	defer release()
	node, err := h.s.cluster.KubeJoin.Node(ctx, m.GetKubeToken())
	if errors.Is(err, kubejoin.ErrRefused) {
		h.s.log.Warn("join refused", "node", m.GetNode(), "err", err)
		return "", connect.NewError(connect.CodeUnauthenticated, err)
	}
	if err != nil {
		// The agent tries again: the API server may be back by then.
		h.s.log.Error("join: cannot check the agent's Kubernetes token", "node", m.GetNode(), "err", err)
		return "", connect.NewError(connect.CodeUnavailable, fmt.Errorf("the server cannot check Kubernetes tokens now: %w", err))
	}
	if node != m.GetNode() {
		h.s.log.Warn("join refused: the agent asked for another node's name", "node", m.GetNode(), "token_node", node)
		return "", connect.NewError(connect.CodePermissionDenied, fmt.Errorf("the Kubernetes token is of a pod on node %q: an agent joins only as the node it runs on, not as %q", node, m.GetNode()))
	}
	return "kubernetes", nil
}

func (h *nodeService) Register(ctx context.Context, req *connect.Request[pb.RegisterRequest]) (*connect.Response[pb.RegisterResponse], error) {
	if err := h.leaderOnly(); err != nil {
		return nil, err
	}
	node, _ := agentFrom(ctx)
	in := req.Msg.GetNode()
	if in.GetId() != node {
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("certificate is for node %q, registration says %q", node, in.GetId()))
	}
	if in.GetVcpus() <= 0 || in.GetMemoryMib() <= 0 || in.GetAddress() == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("node %s: registration needs capacity and an address", node))
	}
	n, err := h.s.store.RegisterNode(ctx, state.Node{
		ID: node, Address: in.GetAddress(), Labels: in.GetLabels(),
		Capacity: state.Resources{VCPUs: int(in.GetVcpus()), MemoryMiB: int(in.GetMemoryMib()), DiskMiB: int(in.GetDiskMib())},
		Accel:    in.GetAccel(), Kernel: in.GetKernel(), Version: in.GetVersion(), Images: capList(in.GetImages()),
		Warm: capList(in.GetWarm()), UpdatedAt: h.s.now(),
	})
	if err != nil {
		return nil, toConnectError(err)
	}
	h.s.pools.forget(node) // a new session: its pools report again with the first heartbeat
	if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Heartbeat(node)
		cp.Notify()
	}
	h.s.log.Info("node registered", "node", node, "address", n.Address, "vcpus", n.Capacity.VCPUs, "memory_mib", n.Capacity.MemoryMiB)
	return connect.NewResponse(&pb.RegisterResponse{Node: h.s.nodeToPB(n, nil), HeartbeatInterval: durationpb.New(h.s.cluster.HeartbeatInterval)}), nil
}

func (h *nodeService) Heartbeat(ctx context.Context, req *connect.Request[pb.HeartbeatRequest]) (*connect.Response[pb.HeartbeatResponse], error) {
	if err := h.leaderOnly(); err != nil {
		return nil, err
	}
	node, _ := agentFrom(ctx)
	n, err := h.s.store.GetNode(ctx, node)
	if err != nil {
		// Unknown (e.g. removed) or not registered yet: the agent must register again.
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("node %s is not registered: %w", node, err))
	}
	if n.Status != state.NodeReady {
		// A node declared down must re-register (its sandboxes were given up).
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %s is %s (%s): register again", node, n.Status, n.StatusReason))
	}
	if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Heartbeat(node)
	}
	// Locality lists are written to the state only when they change (rarely): a
	// heartbeat itself never touches the Raft log.
	var u state.NodeUpdate
	if imgs := capList(req.Msg.GetImages()); req.Msg.GetImagesChanged() && !slices.Equal(imgs, n.Images) {
		u.Images = &imgs
	}
	if warm := capList(req.Msg.GetWarm()); req.Msg.GetWarmChanged() && !slices.Equal(warm, n.Warm) {
		u.Warm = &warm
	}
	if u.Images != nil || u.Warm != nil {
		u.Time = h.s.now()
		if _, err := h.s.store.UpdateNode(ctx, node, u); err != nil {
			return nil, toConnectError(err)
		}
	}
	h.s.pools.set(node, req.Msg.GetPools())
	return connect.NewResponse(&pb.HeartbeatResponse{RevokedEdgeCerts: h.s.store.RevokedEdgeCerts(time.Now())}), nil
}

// capList bounds a node's locality list (image digests, warm keys) in the state, sorted
// and without duplicates: the order means nothing, and a node listing the same set in
// another order must not cost a state write.
func capList(l []string) []string {
	const maxEntries, maxLen = 4096, 512
	var out []string
	for _, s := range l {
		if len(s) <= maxLen {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	out = slices.Compact(out)
	if len(out) > maxEntries {
		out = out[:maxEntries]
	}
	return out
}

// WatchAssignments streams the node's sandboxes and the warm-pool configuration whenever
// they change. It reads this server's copy of the state: the stream lives on the leader,
// and each change wakes it, so a change reaches the node at once.
func (h *nodeService) WatchAssignments(ctx context.Context, req *connect.Request[pb.WatchAssignmentsRequest], stream *connect.ServerStream[pb.Assignments]) error {
	if err := h.leaderOnly(); err != nil {
		return err
	}
	node, _ := agentFrom(ctx)
	var last *pb.Assignments
	var lastVer uint64
	var sandboxes [][]byte
	refresh := false
	// One timer for the stream's life (a stream wakes on every change anywhere).
	tick := time.NewTimer(rpc.AssignmentsRefresh)
	defer tick.Stop()
	for {
		changed := h.s.store.Changed()
		if !h.s.store.IsLeader() {
			return h.leaderOnly()
		}
		// Read from the leader's own copy (it leads: checked above): a linearizable
		// read per stream per commit would cost every node's stream a round trip to
		// the followers on every change anywhere.
		cur := &pb.Assignments{SandboxesJson: [][]byte{}, Snapshots: h.s.store.LocalSnapshotsOn(node)}
		for _, p := range h.s.store.LocalPools() {
			cur.Pools = append(cur.Pools, poolToPB(p))
		}
		// The node's sandboxes are marshalled again only when their version moved: every
		// stream wakes on every change anywhere, and most are not its.
		newSandboxes := false
		if ver := h.s.store.AssignedVersion(node); last == nil || ver != lastVer {
			// Its own, and those it has a part in: whose files it holds (a saved state
			// being resumed elsewhere, a fork's source: it serves them to the node
			// starting it), whose migration comes to it, whose volumes it serves.
			sbs, ver := h.s.store.Assigned(node)
			var next [][]byte
			for _, sb := range sbs {
				if sb.Node != node && sb.FilesOn() != node && sb.MigratingTo() != node {
					sb = sb.ForVolumeNode() // it only serves its volumes
				}
				b, err := json.Marshal(sb)
				if err != nil {
					return connect.NewError(connect.CodeInternal, err)
				}
				next = append(next, b)
			}
			newSandboxes = !slices.EqualFunc(next, sandboxes, bytes.Equal)
			sandboxes, lastVer = next, ver
		}
		// Shared, not copied: sandboxes is replaced, never changed, when the node's set
		// moves (a copy per stream per change was a tenth of the leader's CPU under a
		// stream of creates).
		cur.SandboxesJson = sandboxes
		if last == nil || newSandboxes || refresh || !slices.Equal(cur.Snapshots, last.Snapshots) || !poolsEqual(cur.Pools, last.Pools) {
			if err := stream.Send(cur); err != nil {
				return err
			}
			last = cur
		}
		refresh = false
		tick.Reset(rpc.AssignmentsRefresh)
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		case <-tick.C:
			// Also re-check leadership now and then when nothing changes, and send the
			// assignments again: the node takes a silent stream for a stuck one.
			refresh = true
		}
	}
}

// ReportSandbox applies an agent's progress report, taking only what a node may decide.
func (h *nodeService) ReportSandbox(ctx context.Context, req *connect.Request[pb.ReportSandboxRequest]) (*connect.Response[pb.ReportSandboxResponse], error) {
	if err := h.leaderOnly(); err != nil {
		return nil, err
	}
	node, _ := agentFrom(ctx)
	var u state.Update
	if err := json.Unmarshal(req.Msg.GetUpdateJson(), &u); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("decode sandbox report: %w", err))
	}
	// The leader's own copy is enough here (no round trip to confirm leadership): the
	// commit below re-checks that the sandbox is this node's, on the run it reports.
	sb, err := h.s.store.GetSandbox(state.WithStaleReads(ctx), req.Msg.GetSandbox())
	if err != nil || sb.ID != req.Msg.GetSandbox() || sb.Node != node {
		// A leader just elected may not have applied the placement yet: ask again,
		// linearizably, before refusing a report the node would give up on.
		sb, err = h.s.store.GetSandbox(ctx, req.Msg.GetSandbox())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if m := sb.Migration; sb.ID == req.Msg.GetSandbox() && m != nil && (m.To == node || m.From == node) && (u.CommitMigration != "" || u.EndMigration != "") {
		return h.reportMigration(ctx, sb, node, u)
	}
	if sb.ID != req.Msg.GetSandbox() || sb.Node != node {
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("sandbox %s is not assigned to node %s", req.Msg.GetSandbox(), node))
	}
	// A node reports what happened on it; placement, restarts and stop requests belong
	// to the control plane and users.
	// IfNode is the caller's own node: the state machine re-checks it at commit, with the
	// run the report is for, so a report racing a re-placement is refused.
	clean := state.Update{Status: u.Status, Reason: u.Reason, ExitCode: u.ExitCode, Signal: u.Signal,
		ImageDigest: u.ImageDigest, Accel: u.Accel, Runtime: u.Runtime, Time: h.s.now(),
		IfNode: &node, IfRestarts: u.IfRestarts, IfResumes: u.IfResumes, CancelPause: u.CancelPause}
	if u.Saved != nil {
		// Where the state is, the node's word on its size; only the node itself.
		saved := state.Saved{Node: node, Bytes: max(u.Saved.Bytes, 0), At: h.s.now()}
		for _, n := range h.s.store.LocalNodes() {
			if n.ID == node {
				saved.Address = n.Address // where a node resuming it elsewhere fetches it
			}
		}
		clean.Saved = &saved
	}
	if len(clean.CancelPause) > 1024 {
		clean.CancelPause = clean.CancelPause[:1024]
	}
	if clean.Status != nil && *clean.Status == state.StatusPending {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a node cannot make a sandbox pending"))
	}
	if len(clean.Reason) > 4096 {
		clean.Reason = clean.Reason[:4096]
	}
	if _, err := h.s.store.UpdateSandbox(ctx, sb.ID, clean); err != nil {
		return nil, toConnectError(err)
	}
	if clean.Status != nil && clean.Status.Terminal() {
		if cp := h.s.cluster.ControlPlane; cp != nil {
			cp.Notify() // capacity freed; restart policies may apply
		}
	}
	return connect.NewResponse(&pb.ReportSandboxResponse{}), nil
}

// reportMigration applies what the nodes of a live migration may write about it: its
// target commits the switch-over (the sandbox is its from that write), either ends it.
// The state machine refuses a commit after an end, an end after a commit, and either
// for another migration (see state.Migration).
func (h *nodeService) reportMigration(ctx context.Context, sb state.Sandbox, node string, u state.Update) (*connect.Response[pb.ReportSandboxResponse], error) {
	m := sb.Migration
	clean := state.Update{Time: h.s.now(), MigrationBy: node} // re-checked at commit
	switch {
	case u.CommitMigration != "" && m.To == node:
		clean.CommitMigration = u.CommitMigration
		if st := u.MigrationStats; st != nil {
			clean.MigrationStats = &state.MigrationStats{Downtime: max(st.Downtime, 0), Bytes: max(st.Bytes, 0), DiskBytes: max(st.DiskBytes, 0)}
		}
	case u.EndMigration != "":
		clean.EndMigration, clean.Reason = u.EndMigration, fmt.Sprintf("node %s: %s", node, u.Reason)
		if len(clean.Reason) > 1024 {
			clean.Reason = clean.Reason[:1024]
		}
	default:
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %s may not commit migration %s of sandbox %s", node, m.ID, sb.ID))
	}
	if _, err := h.s.store.UpdateSandbox(ctx, sb.ID, clean); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&pb.ReportSandboxResponse{}), nil
}

// joinNames reads the addresses a joining agent gives for its certificate: at most 8,
// each an IP address (not unspecified, multicast or broadcast) or a plain host name
// (letters, digits, inner hyphens and dots; no wildcard, not localhost). A certificate
// names no more than the agent's own addresses: nobody dials a node by anything else,
// and every dial also checks the node's name (its common name) and role.
func joinNames(addrs []string) (names []string, ips []net.IP, err error) {
	if len(addrs) > 8 {
		return nil, nil, fmt.Errorf("%d addresses: a node certificate names at most 8", len(addrs))
	}
	for _, a := range addrs {
		host := a
		if h, _, err := net.SplitHostPort(a); err == nil {
			host = h
		}
		if ip := net.ParseIP(host); ip != nil {
			if ip.IsUnspecified() || ip.IsMulticast() || ip.Equal(net.IPv4bcast) {
				return nil, nil, fmt.Errorf("address %q: not an address a node is reached at", a)
			}
			ips = append(ips, ip)
			continue
		}
		if err := validNodeName(host); err != nil || strings.EqualFold(host, "localhost") {
			return nil, nil, fmt.Errorf("address %q: want an IP address or a plain host name", a)
		}
		names = append(names, host)
	}
	return names, ips, nil
}

// validNodeName keeps node names usable in certificates, URLs and logs.
func validNodeName(n string) error {
	if n == "" || len(n) > 63 {
		return fmt.Errorf("node name %q: 1 to 63 characters", n)
	}
	for i, r := range n {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r >= 'A' && r <= 'Z'
		if !ok || ((r == '-' || r == '.') && (i == 0 || i == len(n)-1)) {
			return fmt.Errorf("node name %q: use letters, digits, inner dots and hyphens", n)
		}
	}
	return nil
}

type clusterService struct{ s *Server }

func (h *clusterService) ListNodes(ctx context.Context, _ *connect.Request[pb.ListNodesRequest]) (*connect.Response[pb.ListNodesResponse], error) {
	// Nodes, their addresses and what runs where are the operator's, not a tenant's.
	if _, err := requireAdmin(ctx, "listing nodes"); err != nil {
		return nil, err
	}
	nodes, err := h.s.store.ListNodes(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	sbs, err := h.s.store.ListSandboxes(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListNodesResponse{}
	for _, n := range nodes {
		resp.Nodes = append(resp.Nodes, h.s.nodeToPB(n, sbs))
	}
	return connect.NewResponse(resp), nil
}

func (h *clusterService) CordonNode(ctx context.Context, req *connect.Request[pb.NodeActionRequest]) (*connect.Response[pb.NodeActionResponse], error) {
	return h.nodeAction(ctx, req.Msg.GetNode(), "cordoning a node", state.NodeUpdate{Cordoned: ptr(true)})
}

func (h *clusterService) UncordonNode(ctx context.Context, req *connect.Request[pb.NodeActionRequest]) (*connect.Response[pb.NodeActionResponse], error) {
	return h.nodeAction(ctx, req.Msg.GetNode(), "uncordoning a node", state.NodeUpdate{Cordoned: ptr(false), Draining: ptr(false)})
}

func (h *clusterService) DrainNode(ctx context.Context, req *connect.Request[pb.NodeActionRequest]) (*connect.Response[pb.NodeActionResponse], error) {
	return h.nodeAction(ctx, req.Msg.GetNode(), "draining a node", state.NodeUpdate{Draining: ptr(true)})
}

func (h *clusterService) RemoveNode(ctx context.Context, req *connect.Request[pb.NodeActionRequest]) (*connect.Response[pb.NodeActionResponse], error) {
	who, err := requireAdmin(ctx, "removing a node")
	if err != nil {
		return nil, err
	}
	id := req.Msg.GetNode()
	if h.s.cluster.CA == nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("nodes are removed only on a cluster server; `fireworks dev` runs its own node"))
	}
	last, _ := h.s.store.GetNode(ctx, id)
	if err := h.s.store.RemoveNode(ctx, id, h.s.now()); err != nil {
		return nil, toConnectError(err)
	}
	h.s.log.Info("node removed; its certificates are refused from now on", "node", id, "by", who.TokenID)
	if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Notify()
	}
	return connect.NewResponse(&pb.NodeActionResponse{Node: h.s.nodeToPB(last, nil)}), nil
}

func (h *clusterService) nodeAction(ctx context.Context, node, what string, u state.NodeUpdate) (*connect.Response[pb.NodeActionResponse], error) {
	if _, err := requireAdmin(ctx, what); err != nil {
		return nil, err
	}
	u.Time = h.s.now()
	n, err := h.s.store.UpdateNode(ctx, node, u)
	if err != nil {
		return nil, toConnectError(err)
	}
	if cp := h.s.cluster.ControlPlane; cp != nil {
		cp.Notify()
	}
	sbs, _ := h.s.store.ListSandboxes(ctx)
	return connect.NewResponse(&pb.NodeActionResponse{Node: h.s.nodeToPB(n, sbs)}), nil
}

func ptr[T any](v T) *T { return &v }

func (s *Server) nodeToPB(n state.Node, sbs []state.Sandbox) *pb.Node {
	out := &pb.Node{
		Id: n.ID, Address: n.Address, Labels: n.Labels, Vcpus: int32(n.Capacity.VCPUs),
		MemoryMib: int64(n.Capacity.MemoryMiB), DiskMib: int64(n.Capacity.DiskMiB), Accel: n.Accel,
		Kernel: n.Kernel, Version: n.Version, Status: string(n.Status), StatusReason: n.StatusReason,
		Cordoned: n.Cordoned, Draining: n.Draining, Parked: n.Parked, Images: n.Images, Warm: n.Warm,
		RegisteredAt: timestamppb.New(n.RegisteredAt), UpdatedAt: timestamppb.New(n.UpdatedAt),
	}
	var cfg scheduler.Config
	if cp := s.cluster.ControlPlane; cp != nil {
		cfg = cp.Scheduling()
	}
	sc := cfg.Schedulable(scheduler.Resources{VCPUs: n.Capacity.VCPUs, MemoryMiB: n.Capacity.MemoryMiB})
	out.SchedulableVcpus, out.SchedulableMemoryMib = int32(sc.VCPUs), int64(sc.MemoryMiB)
	for _, sb := range sbs {
		if sb.Node != n.ID || sb.Status.Terminal() {
			continue
		}
		r := sb.Spec.Reserved()
		out.UsedVcpus += int32(r.VCPUs)
		out.UsedMemoryMib += int64(r.MemoryMiB)
		out.Sandboxes++
	}
	return out
}

// EnableCluster makes this server a cluster member (see ClusterOptions). Call before
// Handler.
func (s *Server) EnableCluster(o ClusterOptions) {
	if o.HeartbeatInterval == 0 {
		o.HeartbeatInterval = 5 * time.Second
	}
	s.cluster = o
	if vm, ok := o.ControlPlane.(interface {
		SetVolumeMover(func(context.Context, state.Volume) error)
	}); ok {
		// The leader runs volume moves; copying the data takes the nodes, which this
		// server reaches.
		vm.SetVolumeMover(s.MoveVolumeData)
	}
}

// poolsEqual compares two pool configurations as sent to nodes.
func poolsEqual(a, b []*pb.Pool) bool {
	return slices.EqualFunc(a, b, func(x, y *pb.Pool) bool { return proto.Equal(x, y) })
}
