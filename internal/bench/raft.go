package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// RaftRow is control-plane commit performance: sandbox creates committed through a
// 3-server cluster (real hashicorp/raft, bolt logs on disk, mutual-TLS transport on
// loopback), measured at the state store, the path every API write takes.
type RaftRow struct {
	Servers     int     `json:"servers"`
	Concurrency int     `json:"concurrency"`
	Creates     int     `json:"creates"`
	PerSecond   float64 `json:"creates_per_second"`
	P50Ms       float64 `json:"commit_p50_ms"`
	P99Ms       float64 `json:"commit_p99_ms"`
}

// BenchRaft starts a 3-server cluster in dir and commits creates at each concurrency.
func BenchRaft(ctx context.Context, dir string, creates int, concurrencies []int) ([]RaftRow, error) {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	ca, err := pki.CreateCA(filepath.Join(dir, "ca"), "bench")
	if err != nil {
		return nil, err
	}
	// Picked together: a port closed at once may be handed out again for the next (two
	// servers at one address).
	lns, err := freeLoopbackPorts(3)
	if err != nil {
		return nil, err
	}
	var peers []state.Peer
	for i := range 3 {
		peers = append(peers, state.Peer{ID: fmt.Sprintf("s%d", i), Address: lns[i]})
	}
	stores := make([]*state.Store, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			certPEM, keyPEM, err := ca.Issue(pki.IssueRequest{CommonName: peers[i].ID, Role: pki.RoleServer, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
			if err != nil {
				errs[i] = err
				return
			}
			cert, err := pki.KeyPair(certPEM, keyPEM)
			if err != nil {
				errs[i] = err
				return
			}
			// The transport's only errors here are the closed connections of the servers
			// stopping one after another at the end; a failing transport shows as failed
			// creates.
			trans, err := pki.NewRaftTransport(lns[i], "", ca, cert, state.HCLogger(slog.New(slog.DiscardHandler), "transport"))
			if err != nil {
				errs[i] = err
				return
			}
			stores[i], errs[i] = state.Open(ctx, state.Options{Dir: filepath.Join(dir, peers[i].ID), NodeID: peers[i].ID, Logger: log, Transport: trans, Peers: peers})
		}()
	}
	wg.Wait()
	defer func() {
		for _, s := range stores {
			if s != nil {
				_ = s.Close()
			}
		}
	}()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	var leader *state.Store
	deadline := time.Now().Add(20 * time.Second)
	for leader == nil && time.Now().Before(deadline) {
		for _, s := range stores {
			if s.IsLeader() {
				leader = s
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if leader == nil {
		return nil, errors.New("no leader")
	}
	var rows []RaftRow
	seq := 0
	for _, conc := range concurrencies {
		lat := make([]float64, creates)
		next := make(chan int)
		var mu sync.Mutex
		var firstErr error
		start := time.Now()
		var wg sync.WaitGroup
		for range conc {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range next {
					mu.Lock()
					seq++
					id := fmt.Sprintf("%016x", seq)
					mu.Unlock()
					t0 := time.Now()
					err := leader.CreateSandbox(ctx, state.Sandbox{ID: id, Spec: state.SandboxSpec{Image: "bench", Cmd: []string{"true"}}, CreatedAt: t0})
					lat[i] = ms(time.Since(t0))
					if err != nil {
						mu.Lock()
						firstErr = errors.Join(firstErr, err)
						mu.Unlock()
					}
				}
			}()
		}
		for i := range creates {
			next <- i
		}
		close(next)
		wg.Wait()
		if firstErr != nil {
			return nil, firstErr
		}
		el := time.Since(start)
		s := summarize(lat)
		rows = append(rows, RaftRow{Servers: 3, Concurrency: conc, Creates: creates, PerSecond: float64(creates) / el.Seconds(), P50Ms: s.P50, P99Ms: s.P99})
	}
	return rows, nil
}
