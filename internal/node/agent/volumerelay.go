package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/volume"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A volume's data stays on the node it was made on. A sandbox placed on another node
// (the volume's node had no room, a migration, a drain) reaches it through its own
// node: that node's agent listens in the sandbox's namespace where a volume server
// would (volRelay), admits the guest kernel's connections as a server would (its address,
// reserved ports), and carries each over the cluster's mutual TLS to the volume's node,
// one stream per connection (VolumeDialer). There the agent checks in the state that the
// calling node runs that sandbox (or is its migration's target) and that the sandbox
// mounts volumes of this node, and hands the stream to a volume server of that sandbox's
// own (relayed: listening on unix sockets only the agent reaches), started on the first
// stream and kept while the sandbox lives anywhere but here. The guest sees what it sees
// on the volume's node: the same server, the same handles, the same locks; a sandbox
// that moves from node to node keeps its relayed server and so its locks.

// VolumeDialer opens a stream to the volume server of sandbox's volumes on node (whose
// node API is at address), to its listener index (a mount's, then the portmapper's,
// then the lock manager's). The agent's process provides it (it holds the node's
// certificate).
type VolumeDialer func(ctx context.Context, node, address, sandbox string, index int) (net.Conn, error)

// volumeDialWait bounds a relayed connection's dial (a dead volume node is not waited
// for: the guest's NFS client retries).
const volumeDialWait = 15 * time.Second

// volRelay serves a sandbox's volumes in its namespace by relaying the guest's
// connections to the volume server on the volumes' node. Its owner (the VM handle)
// stops it.
type volRelay struct {
	vms       *vms
	use       volumeUse
	listeners []net.Listener
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// relayVolumes listens in the namespace at nsPath for use's volume connections and
// relays them to use.node.
func (m *vms) relayVolumes(nsPath string, use volumeUse) (*volRelay, error) {
	if m.dialVolume == nil {
		return nil, fmt.Errorf("the volumes are on node %s, and this node cannot reach other nodes' volumes (one node)", use.node)
	}
	if use.address == "" {
		return nil, fmt.Errorf("the address of node %s, which holds the volumes, is not known", use.node)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &volRelay{vms: m, use: use, ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	ports := volumePorts(len(use.mounts))
	err := network.Do(nsPath, func() error {
		for i, port := range ports {
			addr := net.JoinHostPort(network.GuestGateway.String(), strconv.Itoa(port))
			ln, err := net.Listen("tcp4", addr)
			if err != nil {
				return fmt.Errorf("listen for the volume relay (%d) on %s: %w", i, addr, err)
			}
			r.listeners = append(r.listeners, ln)
		}
		return nil
	})
	if err != nil {
		r.Stop()
		return nil, err
	}
	for i, ln := range r.listeners {
		// The portmapper is asked from any port (see volume.ServerSpec); the mounts
		// and the lock manager only from the guest kernel's reserved ones.
		reserved := ports[i] != portmapPort
		r.wg.Go(func() { r.serve(ln, i, reserved) })
	}
	m.log.Info("relaying a sandbox's volumes to their node", "sandbox", use.sandbox, "node", use.node)
	return r, nil
}

// serve accepts the guest's connections on listener index (at most
// volume.MaxConnsPerExport at a time, as a server would) and relays each.
func (r *volRelay) serve(ln net.Listener, index int, reserved bool) {
	sem := make(chan struct{}, volume.MaxConnsPerExport)
	for {
		select {
		case sem <- struct{}{}:
		case <-r.ctx.Done():
			return
		}
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if !volume.Admit(c.RemoteAddr(), network.GuestAddr, reserved) {
			c.Close()
			<-sem
			continue
		}
		r.wg.Go(func() {
			defer func() { <-sem }()
			r.relay(c, index)
		})
	}
}

// relay carries one guest connection to the volume's node and back.
func (r *volRelay) relay(c net.Conn, index int) {
	if !r.track(c) {
		c.Close()
		return
	}
	defer r.untrack(c)
	dctx, cancel := context.WithTimeout(r.ctx, volumeDialWait)
	up, err := r.vms.dialVolume(dctx, r.use.node, r.use.address, r.use.sandbox, index)
	cancel()
	if err != nil {
		r.vms.log.Warn("relay a volume connection", "sandbox", r.use.sandbox, "node", r.use.node, "listener", index, "err", err)
		c.Close()
		return
	}
	if !r.track(up) {
		up.Close()
		c.Close()
		return
	}
	defer r.untrack(up)
	pipe(c, up)
}

// pipe copies a and b into each other until both directions end, then closes both.
func pipe(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(b, a)
		closeWrite(b)
	}()
	_, _ = io.Copy(a, b)
	closeWrite(a)
	<-done
	a.Close()
	b.Close()
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	} else {
		c.Close()
	}
}

func (r *volRelay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns == nil {
		return false // stopped
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *volRelay) untrack(c net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, c)
}

// Stop closes the listeners and every relayed connection.
func (r *volRelay) Stop() {
	r.cancel()
	for _, ln := range r.listeners {
		ln.Close()
	}
	r.mu.Lock()
	conns := r.conns
	r.conns = nil
	r.mu.Unlock()
	for c := range conns {
		c.Close()
	}
	r.wg.Wait()
}

// relayedServer is the volume server this node runs for a sandbox on another node, and
// the streams it serves, by the node that opened them.
type relayedServer struct {
	v *volServer

	mu      sync.Mutex
	streams map[net.Conn]string
}

// relayRecord is what a relayed server's directory records of it, for the next agent.
type relayRecord struct {
	Sandbox string              `json:"sandbox"`
	Mounts  []state.VolumeMount `json:"mounts"`
}

const relayRecordFile = "relay.json"

// readRelayRecord reads what the relayed server's directory dir records.
func readRelayRecord(dir string) (relayRecord, error) {
	var rec relayRecord
	b, err := os.ReadFile(filepath.Join(dir, relayRecordFile))
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	return rec, err
}

func (a *Agent) relayRoot() string { return filepath.Join(a.cfg.DataDir, "volume-relays") }

// VolumeStream opens, for node peer, a connection to listener index of the volume
// server of sandbox id: peer must run the sandbox (or be its migration's target), and
// the sandbox must mount volumes of this node.
//
// The calling node may ask before this node's assignments show the sandbox there (they
// are the same commit, on two streams): it is waited for, a little.
func (a *Agent) VolumeStream(ctx context.Context, peer, id string, index int) (net.Conn, error) {
	if !routes.ValidSandbox(id) {
		return nil, fmt.Errorf("%w: %q is not a sandbox ID", state.ErrInvalid, id)
	}
	deadline := time.Now().Add(savedPeerWait)
	for {
		_, err := a.mayRelayVolumes(ctx, id, peer)
		if err == nil {
			break
		} else if time.Now().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	// Checked again, and the stream taken, under relayMu: a sweep (sweepRelays) that
	// stops the server or cuts this node's streams is wholly before or after.
	a.relayMu.Lock()
	defer a.relayMu.Unlock()
	sb, err := a.mayRelayVolumes(ctx, id, peer)
	if err != nil {
		return nil, err
	}
	if index < 0 || index >= len(sb.Spec.Volumes)+2 {
		return nil, fmt.Errorf("%w: sandbox %s has no volume listener %d", state.ErrInvalid, id, index)
	}
	rs, err := a.relayedServer(ctx, sb)
	if err != nil {
		return nil, err
	}
	c, err := net.Dial("unix", relaySocket(rs.v.dir, index))
	if err != nil {
		return nil, fmt.Errorf("reach the volume server of sandbox %s: %w", id, err)
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.streams == nil {
		c.Close()
		return nil, fmt.Errorf("the volume server of sandbox %s is stopping", id)
	}
	if len(rs.streams) >= volume.MaxConnsPerExport*(len(sb.Spec.Volumes)+2) {
		// As many as its listeners would admit from a guest: a node asking for more
		// is not relaying a guest kernel's.
		c.Close()
		return nil, fmt.Errorf("sandbox %s has %d volume streams open, the most there may be", id, len(rs.streams))
	}
	rs.streams[c] = peer
	return &relayedConn{Conn: c, done: func() {
		rs.mu.Lock()
		delete(rs.streams, c)
		rs.mu.Unlock()
	}}, nil
}

// mayRelayVolumes is VolumeStream's check.
func (a *Agent) mayRelayVolumes(ctx context.Context, id, peer string) (state.Sandbox, error) {
	sb, err := a.store.GetSandbox(ctx, id)
	switch {
	case err != nil:
		return sb, fmt.Errorf("sandbox %s: %w", id, err)
	case sb.ID != id || sb.Spec.VolumeNode != a.cfg.Node || len(sb.Spec.Volumes) == 0:
		return sb, fmt.Errorf("sandbox %s mounts no volume of this node", id)
	case sb.Status.Terminal():
		return sb, fmt.Errorf("sandbox %s is over", id)
	case peer == a.cfg.Node || (sb.Node != peer && sb.MigratingTo() != peer):
		return sb, fmt.Errorf("sandbox %s does not run on node %s", id, peer)
	}
	return sb, nil
}

type relayedConn struct {
	net.Conn
	once sync.Once
	done func()
}

func (c *relayedConn) Close() error {
	c.once.Do(c.done)
	return c.Conn.Close()
}

// relayedServer is sandbox sb's relayed volume server, started if it runs none (called
// with relayMu held).
func (a *Agent) relayedServer(ctx context.Context, sb state.Sandbox) (*relayedServer, error) {
	if rs := a.relays[sb.ID]; rs != nil {
		return rs, nil
	}
	if a.ctx.Err() != nil {
		return nil, errors.New("the agent is stopping")
	}
	dir := filepath.Join(a.relayRoot(), sb.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("relayed volume server's directory: %w", err)
	}
	b, err := json.Marshal(relayRecord{Sandbox: sb.ID, Mounts: sb.Spec.Volumes})
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, relayRecordFile), b, 0o600); err != nil {
		return nil, fmt.Errorf("record the relayed volume server: %w", err)
	}
	v, err := a.vms.startVolumeServer(ctx, dir, "", "relay-"+sb.ID, sb.Spec.Volumes)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("start the volume server of sandbox %s: %w", sb.ID, err)
	}
	rs := &relayedServer{v: v, streams: map[net.Conn]string{}}
	if a.relays == nil {
		a.relays = map[string]*relayedServer{}
	}
	a.relays[sb.ID] = rs
	a.log.Info("serving a sandbox's volumes to its node", "sandbox", sb.ID, "node", sb.Node)
	return rs, nil
}

// adoptRelays, at start, takes back the relayed volume servers an earlier agent left
// running (their sandboxes' locks live in them), and removes what is left of the others.
// The first assignment set stops those no longer needed (sweepRelays).
func (a *Agent) adoptRelays(ctx context.Context) {
	entries, _ := os.ReadDir(a.relayRoot())
	for _, e := range entries {
		dir := filepath.Join(a.relayRoot(), e.Name())
		rec, err := readRelayRecord(dir)
		if err != nil || rec.Sandbox != e.Name() || runningVolumeServer(dir) == 0 {
			a.removeRelayDir(dir)
			continue
		}
		v, err := a.vms.adoptVolumes(ctx, dir, "", "relay-"+rec.Sandbox, rec.Mounts)
		if err != nil {
			a.log.Warn("take back a relayed volume server", "sandbox", rec.Sandbox, "err", err)
			continue
		}
		a.relayMu.Lock()
		if a.relays == nil {
			a.relays = map[string]*relayedServer{}
		}
		a.relays[rec.Sandbox] = &relayedServer{v: v, streams: map[net.Conn]string{}}
		a.relayMu.Unlock()
	}
}

// removeRelayDir removes a relayed server's directory, killing a server that runs there
// without an agent knowing it.
func (a *Agent) removeRelayDir(dir string) {
	if pid := runningVolumeServer(dir); pid > 0 {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	_ = os.RemoveAll(dir)
}

// sweepRelays, with every assignment set, stops the relayed volume servers of sandboxes
// that no longer run on another node (over, removed, or now here), and cuts the streams
// of nodes that no longer run theirs.
func (a *Agent) sweepRelays(desired []state.Sandbox) {
	byID := make(map[string]state.Sandbox, len(desired))
	for _, sb := range desired {
		byID[sb.ID] = sb
	}
	// Under relayMu, whole: a stream being opened (VolumeStream) sees the server and its
	// node's right to it before or after, and a server started again for the sandbox
	// finds its directory gone or new, never going.
	a.relayMu.Lock()
	defer a.relayMu.Unlock()
	for id, rs := range a.relays {
		sb, ok := byID[id]
		if !ok || sb.VolumesOn() != a.cfg.Node {
			a.log.Info("stopping the volume server of a sandbox no longer on another node", "sandbox", id)
			delete(a.relays, id)
			rs.cut(nil)
			rs.v.Stop()
			_ = os.RemoveAll(rs.v.dir)
			continue
		}
		rs.cut(func(peer string) bool { return peer != sb.Node && peer != sb.MigratingTo() })
	}
}

// cut closes the streams of the nodes drop says (all, with drop nil; no new ones come).
func (rs *relayedServer) cut(drop func(peer string) bool) {
	rs.mu.Lock()
	var conns []net.Conn
	for c, peer := range rs.streams {
		if drop == nil || drop(peer) {
			conns = append(conns, c)
		}
	}
	if drop == nil {
		rs.streams = nil
	}
	rs.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// releaseRelays, as the agent stops, leaves the relayed servers running for the next
// agent (their streams end with this process).
func (a *Agent) releaseRelays() {
	a.relayMu.Lock()
	defer a.relayMu.Unlock()
	for id, rs := range a.relays {
		rs.cut(nil)
		rs.v.release()
		delete(a.relays, id)
	}
}

// relayedVolumes are the volumes the relayed servers serve (kept mounted).
func (a *Agent) relayedVolumes() map[string]bool {
	a.relayMu.Lock()
	defer a.relayMu.Unlock()
	out := map[string]bool{}
	for _, rs := range a.relays {
		for _, e := range rs.v.mounts {
			out[e] = true
		}
	}
	return out
}
