package state

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// testCluster is three real Stores replicating over the mutual-TLS raft transport on
// loopback, each with its own directory, so servers can be stopped and restarted.
type testCluster struct {
	t      *testing.T
	ca     *pki.CA
	dirs   []string
	addrs  []string
	stores []*Store
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func newTestCluster(t *testing.T, n int) *testCluster {
	ca, err := pki.CreateCA(t.TempDir(), "test")
	if err != nil {
		t.Fatal(err)
	}
	c := &testCluster{t: t, ca: ca, stores: make([]*Store, n)}
	for range n {
		c.dirs = append(c.dirs, t.TempDir())
		c.addrs = append(c.addrs, freePort(t))
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() { defer wg.Done(); c.start(i) }()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, s := range c.stores {
			if s != nil {
				_ = s.Close()
			}
		}
	})
	return c
}

func (c *testCluster) peers() []Peer {
	var ps []Peer
	for i, a := range c.addrs {
		ps = append(ps, Peer{ID: fmt.Sprintf("s%d", i), Address: a})
	}
	return ps
}

// start opens server i; it returns once a leader is known, which needs a quorum up.
func (c *testCluster) start(i int) {
	t := c.t
	id := fmt.Sprintf("s%d", i)
	certPEM, keyPEM, err := c.ca.Issue(pki.IssueRequest{CommonName: id, Role: pki.RoleServer, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Error(err)
		return
	}
	cert, err := pki.KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Error(err)
		return
	}
	log := quietLogger(t)
	trans, err := pki.NewRaftTransport(c.addrs[i], "", c.ca, cert, newHCLog(log, "transport"))
	if err != nil {
		t.Error(err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Open(ctx, Options{Dir: filepath.Join(c.dirs[i], "state"), NodeID: id, Logger: log, Transport: trans, Peers: c.peers(), TrailingLogs: 8, SnapshotThreshold: 16})
	if err != nil {
		t.Errorf("open %s: %v", id, err)
		return
	}
	c.stores[i] = s
}

func (c *testCluster) leader() (int, *Store) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		for i, s := range c.stores {
			if s != nil && s.IsLeader() {
				return i, s
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatal("no leader within 20s")
	return -1, nil
}

func TestClusterReplicatesFailsOverAndRestarts(t *testing.T) {
	c := newTestCluster(t, 3)
	ctx := context.Background()
	li, leader := c.leader()
	for i := range 20 {
		if err := leader.CreateSandbox(ctx, newSandbox(fmt.Sprintf("%016x", i), "", t0.Add(time.Duration(i)*time.Second))); err != nil {
			t.Fatal(err)
		}
	}
	// A follower refuses linearizable reads and writes, naming the leader to go to.
	follower := c.stores[(li+1)%3]
	if _, err := follower.ListSandboxes(ctx); !errors.Is(err, ErrNotLeader) {
		t.Errorf("follower read: %v, want ErrNotLeader", err)
	}
	if err := follower.CreateSandbox(ctx, newSandbox("ffff000000000000", "", t0)); !errors.Is(err, ErrNotLeader) {
		t.Errorf("follower write: %v, want ErrNotLeader", err)
	}
	if id, _ := follower.Leader(); id != fmt.Sprintf("s%d", li) {
		t.Errorf("follower thinks the leader is %q, want s%d", id, li)
	}

	// Kill the leader: the other two elect a new one that has every committed write.
	_ = leader.Close()
	c.stores[li] = nil
	_, leader = c.leader()
	all, err := leader.ListSandboxes(ctx)
	if err != nil || len(all) != 20 {
		t.Fatalf("after failover: %d sandboxes, %v", len(all), err)
	}
	if err := leader.CreateSandbox(ctx, newSandbox("aaaa00000000beef", "after-failover", t0)); err != nil {
		t.Fatal(err)
	}

	// Restart every server: all state is intact (log + snapshots on disk).
	for i, s := range c.stores {
		if s != nil {
			_ = s.Close()
			c.stores[i] = nil
		}
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() { defer wg.Done(); c.start(i) }()
	}
	wg.Wait()
	_, leader = c.leader()
	all, err = leader.ListSandboxes(ctx)
	if err != nil || len(all) != 21 {
		t.Fatalf("after full restart: %d sandboxes, %v", len(all), err)
	}
	if sb, err := leader.GetSandbox(ctx, "after-failover"); err != nil || sb.ID != "aaaa00000000beef" {
		t.Fatalf("after full restart: %v %v", sb.ID, err)
	}
}
