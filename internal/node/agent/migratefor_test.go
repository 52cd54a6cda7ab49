package agent

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// oneSandboxStore is a test double of the agent's view of the state (unit test of the
// logic above the Store seam): it holds one sandbox.
type oneSandboxStore struct {
	Store
	sb state.Sandbox
}

func (s oneSandboxStore) GetSandbox(ctx context.Context, id string) (state.Sandbox, error) {
	return s.sb, nil
}

func TestMigrationForRefusesOtherNodesAtOnce(t *testing.T) {
	sb := state.Sandbox{ID: "sb1", Node: "src", Migration: &state.Migration{ID: "aa", From: "src", To: "tgt"}}
	a := &Agent{cfg: Config{Node: "tgt"}, log: slog.New(slog.DiscardHandler), store: oneSandboxStore{sb: sb}, migrationWaits: map[string]int{}}
	if _, err := a.migrationFor(t.Context(), "sb1", "aa", "src"); err != nil {
		t.Fatalf("the migration's own source was refused: %v", err)
	}
	// A call on the migration the state shows, from a node that is not its source, is
	// refused without waiting.
	for _, peer := range []string{"evil", "tgt"} {
		t0 := time.Now()
		if _, err := a.migrationFor(t.Context(), "sb1", "aa", peer); err == nil {
			t.Fatalf("node %s was let drive migration aa from src", peer)
		}
		if d := time.Since(t0); d > time.Second {
			t.Errorf("node %s was refused after %s, not at once", peer, d)
		}
	}
}

func TestMigrationForBoundsWaitsPerPeer(t *testing.T) {
	// The state shows no migration yet: a call may wait for it, a peer's calls only so
	// many at once; the others are refused at once, and another peer still waits.
	sb := state.Sandbox{ID: "sb1", Node: "src"}
	a := &Agent{cfg: Config{Node: "tgt"}, log: slog.New(slog.DiscardHandler), store: oneSandboxStore{sb: sb}, migrationWaits: map[string]int{}}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for range maxMigrationWaits {
		wg.Add(1)
		go func() { defer wg.Done(); _, _ = a.migrationFor(ctx, "sb1", "bb", "evil") }()
	}
	waitUntil := time.Now().Add(10 * time.Second)
	for {
		a.mu.Lock()
		n := a.migrationWaits["evil"]
		a.mu.Unlock()
		if n == maxMigrationWaits {
			break
		}
		if time.Now().After(waitUntil) {
			t.Fatalf("%d calls waiting, want %d", n, maxMigrationWaits)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t0 := time.Now()
	if _, err := a.migrationFor(ctx, "sb1", "bb", "evil"); err == nil || time.Since(t0) > time.Second {
		t.Errorf("a call past the bound: err %v after %s, want a refusal at once", err, time.Since(t0))
	}
	other := make(chan struct{})
	go func() { defer close(other); _, _ = a.migrationFor(ctx, "sb1", "bb", "src") }()
	select {
	case <-other:
		t.Error("another peer's call was refused while the first peer's calls filled their bound")
	case <-time.After(300 * time.Millisecond):
	}
	cancel()
	wg.Wait()
	<-other
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.migrationWaits) != 0 {
		t.Errorf("waits left counted: %v", a.migrationWaits)
	}
}
