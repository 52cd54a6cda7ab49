package agentlink

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Link is the node's connection to the servers. It implements the agent's Store: progress
// reports go to the leader (retried until committed), reads come from the latest
// assignment set.
type Link struct {
	node   string
	log    *slog.Logger
	dialer *leaderDialer // nil in process: there is one server, which leads
	tr     *http.Transport
	client fireworksv1connect.NodeServiceClient

	mu       sync.Mutex
	assigned []state.Sandbox
	have     chan struct{} // closed once the first assignment set arrived
	haveOnce sync.Once

	// SilentLimit is how long the assignment stream may stay silent before the session
	// starts over (default 3 × rpc.AssignmentsRefresh); set it before Run.
	SilentLimit time.Duration
}

// New prepares a link to servers (API addresses, host:port) over mutual TLS.
func New(id *Identity, servers []string, log *slog.Logger) *Link {
	d := &leaderDialer{addrs: slices.Clone(servers), tlsFor: func(host string) *tls.Config {
		cfg := pki.ClientTLS(id.CA, &id.Cert, host, pki.RoleServer)
		cfg.NextProtos = []string{"h2"}
		return cfg
	}}
	tr := &http.Transport{DialTLSContext: d.DialTLSContext, ForceAttemptHTTP2: true}
	return newLink(id.Node, d, tr, "https://fireworks-servers", log)
}

// NewInProcess links node to the server of the same process (`fireworks dev`), whose
// node protocol tr reaches in memory: the same calls, streams and retries as across
// hosts; the server knows the caller's identity from the connection, not a certificate.
func NewInProcess(node string, tr *http.Transport, log *slog.Logger) *Link {
	return newLink(node, nil, tr, "http://fireworks-server", log)
}

func newLink(node string, d *leaderDialer, tr *http.Transport, base string, log *slog.Logger) *Link {
	if log == nil {
		log = slog.Default()
	}
	l := &Link{node: node, log: log.With("component", "agentlink"), dialer: d, tr: tr, have: make(chan struct{})}
	l.client = fireworksv1connect.NewNodeServiceClient(&http.Client{Transport: tr}, base)
	return l
}

// follow handles a follower's "not the leader" answer: the next connection goes to the
// leader it named. It reports whether a leader was named (a redirect, not a failure).
func (l *Link) follow(err error) bool {
	var ce *connect.Error
	if l.dialer != nil && errors.As(err, &ce) && ce.Code() == connect.CodeUnavailable {
		leader := ce.Meta().Get(leaderHeader)
		if leader != "" {
			l.dialer.prefer(leader)
		} else {
			l.dialer.skip()
		}
		l.tr.CloseIdleConnections()
		return leader != ""
	}
	return false
}

// UpdateSandbox reports progress of a sandbox to the leader, retrying until it is
// committed, ctx ends, or the server refuses it for good (the sandbox is gone or moved).
func (l *Link) UpdateSandbox(ctx context.Context, id string, u state.Update) (state.Sandbox, error) {
	body, err := json.Marshal(u)
	if err != nil {
		return state.Sandbox{}, err
	}
	backoff := 200 * time.Millisecond
	for {
		_, err := l.client.ReportSandbox(ctx, connect.NewRequest(&pb.ReportSandboxRequest{Sandbox: id, UpdateJson: body}))
		if err == nil {
			return l.GetSandbox(ctx, id)
		}
		var ce *connect.Error
		if errors.As(err, &ce) {
			switch ce.Code() {
			case connect.CodePermissionDenied, connect.CodeFailedPrecondition:
				// Moved off this node, or a report of an earlier run: nothing to do here.
				return state.Sandbox{}, fmt.Errorf("report sandbox %s: %w: %w", id, state.ErrStaleReport, err)
			case connect.CodeNotFound, connect.CodeInvalidArgument, connect.CodeUnauthenticated:
				return state.Sandbox{}, fmt.Errorf("report sandbox %s: %w", id, err)
			}
		}
		l.follow(err)
		select {
		case <-ctx.Done():
			return state.Sandbox{}, fmt.Errorf("report sandbox %s: %w (last error: %v)", id, ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// GetSandbox returns a sandbox from the latest assignment set.
func (l *Link) GetSandbox(ctx context.Context, id string) (state.Sandbox, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, sb := range l.assigned {
		if sb.ID == id {
			return sb, nil
		}
	}
	return state.Sandbox{}, fmt.Errorf("sandbox %s is not assigned to this node: %w", id, state.ErrNotFound)
}

// ListSandboxes returns the node's assignment set, fetching it first if none arrived yet
// (the agent's recovery at start runs before Run).
func (l *Link) ListSandboxes(ctx context.Context) ([]state.Sandbox, error) {
	select {
	case <-l.have:
	default:
		if err := l.fetchOnce(ctx); err != nil {
			return nil, err
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.assigned), nil
}

func (l *Link) fetchOnce(ctx context.Context) error {
	backoff := 200 * time.Millisecond
	for {
		sctx, cancel := context.WithCancel(ctx)
		st, err := l.client.WatchAssignments(sctx, connect.NewRequest(&pb.WatchAssignmentsRequest{Node: l.node}))
		if err == nil && st.Receive() {
			err = l.setAssigned(st.Msg())
			cancel()
			st.Close()
			return err
		}
		if err == nil {
			err = st.Err()
			st.Close()
		}
		cancel()
		l.follow(err)
		l.log.Warn("fetch assignments", "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("fetch this node's assignments: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (l *Link) setAssigned(m *pb.Assignments) error {
	var out []state.Sandbox
	for _, b := range m.GetSandboxesJson() {
		var sb state.Sandbox
		if err := json.Unmarshal(b, &sb); err != nil {
			return fmt.Errorf("decode assignment: %w", err)
		}
		// Its own, and those it has a part in (see WatchAssignments); a server
		// that sent another node's would be wrong, and is not followed.
		if !sb.Involves(l.node) {
			continue
		}
		out = append(out, sb)
	}
	l.mu.Lock()
	l.assigned = out
	l.mu.Unlock()
	l.haveOnce.Do(func() { close(l.have) })
	return nil
}

// Node describes this node at registration.
type Node struct {
	Info    func() *pb.Node
	Images  func() []string
	Running func() []string
	// Reconcile is called with every assignment set.
	Reconcile func(ctx context.Context, assigned []state.Sandbox)
	// Warm lists the image digests and references the node holds a template snapshot or
	// warm pool for (scheduler locality); sent at registration and when it changes.
	Warm func() []string
	// Pools reports the node's warm pools with every heartbeat.
	Pools func() []*pb.PoolNodeStatus
	// SetPools applies the cluster's warm-pool configuration, which comes with the
	// assignments; it is called when that configuration changes (and once per
	// registration).
	SetPools func([]state.Pool)
	// SetRevokedEdges takes the serials of revoked edge certificates every heartbeat reply
	// carries (the whole list each time).
	SetRevokedEdges func([]string)
	// SetSnapshots takes the IDs of the snapshots the state records on this node, with
	// every assignment set.
	SetSnapshots func(ids []string)
}

// warm is n.Warm sorted, so that the same set is never sent as a change.
func (n Node) warm() []string {
	if n.Warm == nil {
		return nil
	}
	w := slices.Clone(n.Warm())
	slices.Sort(w)
	return slices.Compact(w)
}

func (n Node) pools() []*pb.PoolNodeStatus {
	if n.Pools == nil {
		return nil
	}
	return n.Pools()
}

// poolsFromPB is the pool configuration the assignments carry.
func poolsFromPB(in []*pb.Pool) []state.Pool {
	out := make([]state.Pool, 0, len(in))
	for _, p := range in {
		sp := state.Pool{Image: p.GetImage(), Size: int(p.GetSize()), Max: int(p.GetMax()), VCPUs: int(p.GetVcpus()),
			MemoryMiB: int(p.GetMemoryMib()), InsecureRegistries: p.GetInsecureRegistries(), ManagedBy: p.GetManagedBy()}
		if t := p.GetUpdatedAt(); t != nil {
			sp.UpdatedAt = t.AsTime()
		}
		out = append(out, sp)
	}
	return out
}

// Run registers the node and keeps it connected until ctx ends: heartbeats, and
// assignments applied through n.Reconcile. Connection failures are retried forever; a
// server that no longer knows the node (or declared it down) gets a new registration.
//
// A node is declared down after a few missed heartbeats, so reconnecting is quick: a
// session that got registered starts the backoff over, and a follower's answer naming
// the leader is followed at once (twice in a row at most, so hints that go round in
// circles during an election still back off).
func (l *Link) Run(ctx context.Context, n Node) error {
	const firstBackoff = 200 * time.Millisecond
	backoff, redirects := firstBackoff, 0
	for ctx.Err() == nil {
		began := time.Now()
		registered, err := l.session(ctx, n)
		if ctx.Err() != nil {
			return nil
		}
		if registered && time.Since(began) > 5*time.Second {
			// A session that lasted: start over. (A server that registers and then fails
			// at once must not make the agent spin.)
			backoff, redirects = firstBackoff, 0
		}
		if l.follow(err) && redirects < 2 {
			redirects++
			l.log.Info("following the servers to the leader", "err", err)
			continue
		}
		redirects = 0
		l.log.Warn("control plane connection lost; reconnecting", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
	return nil
}

// session is one registration: it ends with the first error, and reports whether the
// node got registered.
func (l *Link) session(ctx context.Context, n Node) (bool, error) {
	info := n.Info()
	info.Id = l.node
	info.Images = n.Images()
	info.Warm = n.warm()
	reg, err := l.client.Register(ctx, connect.NewRequest(&pb.RegisterRequest{Node: info, Running: n.Running()}))
	if err != nil {
		return false, fmt.Errorf("register: %w", err)
	}
	return true, l.registered(ctx, n, info, reg.Msg)
}

// registered runs a registered session: heartbeats, and assignments until the first error.
func (l *Link) registered(ctx context.Context, n Node, info *pb.Node, reg *pb.RegisterResponse) error {
	interval := reg.GetHeartbeatInterval().AsDuration()
	if interval <= 0 {
		interval = 5 * time.Second
	}
	l.log.Info("registered with the control plane", "node", l.node, "heartbeat", interval)

	// The heartbeats stop when the session ends, however it ends: cancel runs before the
	// wait (defers run last first). Waiting first left a session whose stream broke
	// while heartbeats still went through waiting for them for good.
	var wg sync.WaitGroup
	defer wg.Wait()
	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	wg.Add(1)
	go func() {
		defer wg.Done()
		lastImgs, lastWarm := info.Images, info.Warm
		t := time.NewTicker(interval)
		defer t.Stop()
		// The first beat goes out at once: its reply says which edges are revoked.
		for first := true; ; first = false {
			if !first {
				select {
				case <-sctx.Done():
					return
				case <-t.C:
				}
			}
			imgs, warm := n.Images(), n.warm()
			hctx, hcancel := context.WithTimeout(sctx, interval)
			resp, err := l.client.Heartbeat(hctx, connect.NewRequest(&pb.HeartbeatRequest{
				Node: l.node, Images: imgs, ImagesChanged: !slices.Equal(imgs, lastImgs),
				Warm: warm, WarmChanged: !slices.Equal(warm, lastWarm), Pools: n.pools(),
			}))
			hcancel()
			if err != nil {
				if sctx.Err() == nil {
					cancel(fmt.Errorf("heartbeat: %w", err))
				}
				return
			}
			lastImgs, lastWarm = imgs, warm
			if n.SetRevokedEdges != nil {
				n.SetRevokedEdges(resp.Msg.GetRevokedEdgeCerts())
			}
		}
	}()

	// The leader sends the assignments at least every rpc.AssignmentsRefresh: a stream
	// silent for much longer (not even answering the call, or nothing since) is stuck — a
	// server on the way lost its upstream and never said so — and the session starts over.
	limit := cmp.Or(l.SilentLimit, 3*rpc.AssignmentsRefresh)
	silent := time.AfterFunc(limit, func() {
		cancel(fmt.Errorf("watch assignments: nothing from the servers for %s", limit))
	})
	defer silent.Stop()
	st, err := l.client.WatchAssignments(sctx, connect.NewRequest(&pb.WatchAssignmentsRequest{Node: l.node}))
	if err != nil {
		if cause := context.Cause(sctx); cause != nil && !errors.Is(cause, context.Canceled) {
			return cause
		}
		return fmt.Errorf("watch assignments: %w", err)
	}
	defer st.Close()
	var lastPools []state.Pool
	applied := false
	for st.Receive() {
		silent.Reset(limit)
		if err := l.setAssigned(st.Msg()); err != nil {
			return err
		}
		if pools := poolsFromPB(st.Msg().GetPools()); n.SetPools != nil && (!applied || !reflect.DeepEqual(pools, lastPools)) {
			n.SetPools(pools)
			lastPools, applied = pools, true
		}
		l.mu.Lock()
		cur := slices.Clone(l.assigned)
		l.mu.Unlock()
		if n.SetSnapshots != nil {
			n.SetSnapshots(st.Msg().GetSnapshots())
		}
		n.Reconcile(sctx, cur)
	}
	if cause := context.Cause(sctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	if err := st.Err(); err != nil {
		return fmt.Errorf("watch assignments: %w", err)
	}
	return errors.New("the server ended the assignment stream")
}

// leaderDialer dials the servers in turn (TLS with each server's own name), starting
// with the one most recently named leader or that last answered.
type leaderDialer struct {
	tlsFor func(host string) *tls.Config
	mu     sync.Mutex
	addrs  []string
	next   int
}

// maxServerAddrs bounds the addresses a dialer keeps: the configured ones and the
// leaders servers named since.
const maxServerAddrs = 16

func (d *leaderDialer) prefer(addr string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := slices.Index(d.addrs, addr)
	if i < 0 {
		if len(d.addrs) >= maxServerAddrs {
			d.addrs = d.addrs[:maxServerAddrs-1] // the newest hint replaces the last one
		}
		d.addrs = append(d.addrs, addr)
		i = len(d.addrs) - 1
	}
	d.next = i
}

func (d *leaderDialer) skip() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.addrs) > 0 {
		d.next = (d.next + 1) % len(d.addrs)
	}
}

func (d *leaderDialer) DialTLSContext(ctx context.Context, network, _ string) (net.Conn, error) {
	d.mu.Lock()
	addrs, start := slices.Clone(d.addrs), d.next
	d.mu.Unlock()
	var errs []error
	for i := range addrs {
		idx := (start + i) % len(addrs)
		host, _, err := net.SplitHostPort(addrs[idx])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := (&tls.Dialer{NetDialer: &net.Dialer{}, Config: d.tlsFor(host)}).DialContext(dctx, network, addrs[idx])
		cancel()
		if err == nil {
			d.mu.Lock()
			d.next = idx
			d.mu.Unlock()
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("no server answered: %w", errors.Join(errs...))
}
