package pki

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

func newStream(t *testing.T, ca *CA, cert tls.Certificate) *RaftStreamLayer {
	t.Helper()
	s, err := NewRaftStreamLayer("127.0.0.1:0", "", ca, cert)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// acceptEcho accepts one connection on s and echoes one byte; it reports the error.
func acceptEcho(s *RaftStreamLayer) <-chan error {
	ch := make(chan error, 1)
	go func() {
		c, err := s.Accept()
		if err != nil {
			ch <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			ch <- err
			return
		}
		_, err = c.Write(b[:])
		ch <- err
	}()
	return ch
}

func echo(c net.Conn) error {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{7}); err != nil {
		return err
	}
	var b [1]byte
	_, err := io.ReadFull(c, b[:])
	return err
}

func recvErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("accept side did not finish")
		return nil
	}
}

func TestRaftStreamLayerServerToServer(t *testing.T) {
	ca := testCA(t, "c")
	a := newStream(t, ca, issue(t, ca, RoleServer, "s1"))
	b := newStream(t, ca, issue(t, ca, RoleServer, "s2"))
	got := acceptEcho(b)
	c, err := a.Dial(raft.ServerAddress(b.Addr().String()), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := echo(c); err != nil {
		t.Fatal(err)
	}
	if err := recvErr(t, got); err != nil {
		t.Fatal(err)
	}

	// A DNS name as the address is resolved at dial time.
	_, port, _ := net.SplitHostPort(b.Addr().String())
	got = acceptEcho(b)
	c, err = a.Dial(raft.ServerAddress("localhost:"+port), 5*time.Second)
	if err != nil {
		t.Fatalf("dial by name: %v", err)
	}
	if err := echo(c); err != nil {
		t.Fatal(err)
	}
	if err := recvErr(t, got); err != nil {
		t.Fatal(err)
	}
}

func TestRaftStreamLayerRejectsAgents(t *testing.T) {
	ca := testCA(t, "c")
	s := newStream(t, ca, issue(t, ca, RoleServer, "s1"))
	agent := issue(t, ca, RoleAgent, "a1")

	// An agent dialing the Raft port is refused by the listener.
	got := acceptEcho(s)
	cli := ClientTLS(ca, &agent, "localhost", RoleServer)
	_, cerr := roundTrip(s.Addr().String(), cli)
	if err := recvErr(t, got); err == nil || !strings.Contains(err.Error(), "role agent") {
		t.Fatalf("accept side err = %v, want a role rejection", err)
	}
	if cerr == nil {
		t.Fatal("agent completed a round trip over the Raft port")
	}

	// A listener holding an agent certificate is refused by Dial.
	addr, res := serveOnce(t, ServerTLS(ca, agent, true))
	if _, err := s.Dial(raft.ServerAddress(addr), 5*time.Second); err == nil || !strings.Contains(err.Error(), "role agent") {
		t.Fatalf("dial to agent err = %v, want a role rejection", err)
	}
	wait(t, res)

	// And an agent certificate cannot even build a stream layer.
	if _, err := NewRaftStreamLayer("127.0.0.1:0", "", ca, agent); err == nil {
		t.Fatal("stream layer accepted an agent certificate")
	}
}

func TestRaftStreamLayerAdvertise(t *testing.T) {
	ca := testCA(t, "c")
	cert := issue(t, ca, RoleServer, "s1")
	if _, err := NewRaftStreamLayer("0.0.0.0:0", "", ca, cert); err == nil {
		t.Error("wildcard listen without advertise accepted")
	}
	for _, adv := range []string{"0.0.0.0:7000", "nohost", ":7000", "h:0", "h:x"} {
		if _, err := NewRaftStreamLayer("127.0.0.1:0", adv, ca, cert); err == nil {
			t.Errorf("advertise %q accepted", adv)
		}
	}
	s, err := NewRaftStreamLayer("127.0.0.1:0", "fireworks-server-0.fireworks.default.svc:7000", ca, cert)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.Addr().String(); got != "fireworks-server-0.fireworks.default.svc:7000" {
		t.Errorf("Addr = %q, the advertised name must be kept as written", got)
	}
}

// logFSM records applied entries.
type logFSM struct {
	mu      sync.Mutex
	entries [][]byte
}

func (f *logFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = append(f.entries, bytes.Clone(l.Data))
	return len(f.entries)
}

func (f *logFSM) has(data []byte) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range f.entries {
		if bytes.Equal(e, data) {
			return true
		}
	}
	return false
}

func (f *logFSM) Snapshot() (raft.FSMSnapshot, error) { return noSnapshot{}, nil }
func (f *logFSM) Restore(rc io.ReadCloser) error      { return rc.Close() }

type noSnapshot struct{}

func (noSnapshot) Persist(sink raft.SnapshotSink) error { return sink.Close() }
func (noSnapshot) Release()                             {}

type testNode struct {
	id    raft.ServerID
	raft  *raft.Raft
	fsm   *logFSM
	trans *raft.NetworkTransport
}

func startNode(t *testing.T, id string, ca *CA, logs *testutil.Buffer) (*testNode, error) {
	t.Helper()
	logger := hclog.New(&hclog.LoggerOptions{Name: id, Output: logs, Level: hclog.Debug})
	trans, err := NewRaftTransport("127.0.0.1:0", "", ca, issue(t, ca, RoleServer, id), logger)
	if err != nil {
		return nil, err
	}
	conf := raft.DefaultConfig()
	conf.LocalID = raft.ServerID(id)
	conf.Logger = logger
	conf.HeartbeatTimeout = 500 * time.Millisecond
	conf.ElectionTimeout = 500 * time.Millisecond
	conf.LeaderLeaseTimeout = 250 * time.Millisecond
	conf.CommitTimeout = 20 * time.Millisecond
	fsm := &logFSM{}
	store := raft.NewInmemStore()
	r, err := raft.NewRaft(conf, fsm, store, store, raft.NewInmemSnapshotStore(), trans)
	if err != nil {
		trans.Close()
		return nil, fmt.Errorf("NewRaft %s: %w", id, err)
	}
	n := &testNode{id: conf.LocalID, raft: r, fsm: fsm, trans: trans}
	t.Cleanup(func() {
		_ = r.Shutdown().Error()
		_ = trans.Close()
	})
	return n, nil
}

func waitFor(t *testing.T, what string, logs *testutil.Buffer, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s\nraft logs:\n%s", what, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRaftClusterOverMutualTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: a 3-node Raft cluster over TLS takes seconds; run without -short (make test and CI do)")
	}
	ca := testCA(t, "c")
	logs := &testutil.Buffer{}
	var nodes []*testNode
	var servers []raft.Server
	for i := range 3 {
		n, err := startNode(t, fmt.Sprintf("server-%d", i), ca, logs)
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
		servers = append(servers, raft.Server{ID: n.id, Address: n.trans.LocalAddr()})
	}
	if err := nodes[0].raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatal(err)
	}

	var leader *testNode
	waitFor(t, "a leader", logs, func() bool {
		for _, n := range nodes {
			if n.raft.State() == raft.Leader {
				leader = n
				return true
			}
		}
		return false
	})
	entry := []byte("sandbox-1 created")
	if err := leader.raft.Apply(entry, 10*time.Second).Error(); err != nil {
		t.Fatalf("apply on leader: %v\n%s", err, logs)
	}
	waitFor(t, "the entry on every node", logs, func() bool {
		for _, n := range nodes {
			if !n.fsm.has(entry) {
				return false
			}
		}
		return true
	})

	// A node whose certificate comes from another CA cannot talk to the cluster in
	// either direction.
	intruderCA := testCA(t, "intruder")
	intruder, err := NewRaftStreamLayer("127.0.0.1:0", "", intruderCA, issue(t, intruderCA, RoleServer, "server-x"))
	if err != nil {
		t.Fatal(err)
	}
	defer intruder.Close()
	for _, n := range nodes {
		if c, err := intruder.Dial(n.trans.LocalAddr(), 5*time.Second); err == nil {
			c.Close()
			t.Errorf("intruder dialed %s", n.id)
		}
	}
	intruderTrans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: intruder, MaxPool: 1, Timeout: 5 * time.Second,
		Logger: hclog.New(&hclog.LoggerOptions{Name: "intruder", Output: logs}),
	})
	defer intruderTrans.Close()
	var resp raft.RequestVoteResponse
	err = intruderTrans.RequestVote(leader.id, leader.trans.LocalAddr(), &raft.RequestVoteRequest{
		RPCHeader: raft.RPCHeader{ID: []byte("server-x"), Addr: []byte(intruder.Addr().String())},
		Term:      1 << 40, LastLogIndex: 1 << 40, LastLogTerm: 1 << 40,
	}, &resp)
	if err == nil {
		t.Fatal("intruder's RequestVote reached the leader")
	}

	// Nor can it be reached: a cluster member's dial to it fails, so a leader told to
	// add it would never replicate to it.
	// (A second intruder listener: the first one's connections go to intruderTrans.)
	intruder2 := newStream(t, intruderCA, issue(t, intruderCA, RoleServer, "server-y"))
	got := acceptEcho(intruder2)
	member := newStream(t, ca, issue(t, ca, RoleServer, "server-1"))
	if c, err := member.Dial(raft.ServerAddress(intruder2.Addr().String()), 5*time.Second); err == nil {
		c.Close()
		t.Error("cluster node dialed the intruder")
	}
	if err := recvErr(t, got); err == nil {
		t.Error("intruder accepted a cluster node's connection")
	}

	// The cluster is undisturbed: same leader, still replicating.
	entry2 := []byte("sandbox-2 created")
	if err := leader.raft.Apply(entry2, 10*time.Second).Error(); err != nil {
		t.Fatalf("apply after intrusion attempts: %v\n%s", err, logs)
	}
	waitFor(t, "the second entry on every node", logs, func() bool {
		for _, n := range nodes {
			if !n.fsm.has(entry2) {
				return false
			}
		}
		return true
	})
	cfg := leader.raft.GetConfiguration()
	if err := cfg.Error(); err != nil || len(cfg.Configuration().Servers) != 3 {
		t.Fatalf("configuration %v %v, want the 3 original servers", cfg.Configuration().Servers, err)
	}
}
