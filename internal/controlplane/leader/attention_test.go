package leader

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A pass that reads only what attention selects does what a pass over every sandbox
// does: two clusters are driven through the same random histories (creates, groups,
// lifetimes, nodes' reports, stops, drains, nodes falling silent and coming back,
// restart policies), one with attention and one with every sandbox, and after every pass
// their states must be the same. The gatedStore check covers what the other tests set
// up; this covers the mixes nobody wrote down.
func TestAttentionPassMatchesAFullPass(t *testing.T) {
	for seed := range uint64(12) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { attentionHistory(t, seed) })
	}
}

func attentionHistory(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 19))
	a, b := newEnv(t), newEnv(t)
	a.m.attention = attention // production's filter; b keeps everything
	both := func(f func(e *env) error) {
		t.Helper()
		ea, eb := f(a), f(b)
		if (ea == nil) != (eb == nil) {
			t.Fatalf("the same step: %v with attention, %v with every sandbox", ea, eb)
		}
	}
	nodes := []string{"n1", "n2", "n3", "n4"}
	silent := map[string]bool{}
	both(func(e *env) error {
		for _, n := range nodes {
			e.node(n, 4, 2048, nil)
		}
		return nil
	})
	policies := []state.RestartPolicy{state.RestartNever, state.RestartOnFailure, state.RestartAlways}
	created := 0
	for step := range 160 {
		live := liveSandboxes(t, a)
		switch k := rng.IntN(10); {
		case k == 0 && created < 40: // a sandbox, maybe with a lifetime
			created++
			id := fmt.Sprintf("sb%014d", created)
			spec := state.SandboxSpec{Image: "alpine", MemoryMiB: 128 << rng.IntN(3), Restart: policies[rng.IntN(3)]}
			if rng.IntN(3) == 0 {
				spec.KeepAlive, spec.Lifetime = true, time.Duration(5+rng.IntN(20))*time.Second
			}
			both(func(e *env) error {
				return e.store.CreateSandbox(e.ctx, state.Sandbox{ID: id, Spec: spec, CreatedAt: e.clock.Now()})
			})
		case k == 1 && created < 40 && rng.IntN(3) == 0: // a group
			created++
			main := fmt.Sprintf("g%014d0", created) // its sidecar: the same but a last 1
			pols := []state.RestartPolicy{policies[rng.IntN(3)]}
			both(func(e *env) error { e.group(main, pols...); return nil })
		case k == 2 && len(live) > 0: // a node reports on one of its sandboxes
			sb := live[rng.IntN(len(live))]
			if sb.Node == "" || silent[sb.Node] || sb.Migration != nil {
				break
			}
			var u state.Update
			switch {
			case sb.Status == state.StatusPending && sb.Saved == nil:
				st := state.StatusRunning
				u = state.Update{Status: &st}
			case sb.Status == state.StatusRunning:
				st, code := state.StatusExited, rng.IntN(2)
				if rng.IntN(4) == 0 {
					st = state.StatusFailed
				}
				u = state.Update{Status: &st, ExitCode: &code, Reason: "command ended"}
			default:
				continue
			}
			both(func(e *env) error {
				u.Time = e.clock.Now()
				if u.Status != nil && *u.Status == state.StatusRunning {
					starting := state.StatusStarting
					if _, err := e.store.UpdateSandbox(e.ctx, sb.ID, state.Update{Status: &starting, Time: u.Time}); err != nil {
						return err
					}
				}
				_, err := e.store.UpdateSandbox(e.ctx, sb.ID, u)
				return err
			})
		case k == 3 && len(live) > 0 && rng.IntN(2) == 0: // a user stops one
			sb := live[rng.IntN(len(live))]
			grace := time.Second
			both(func(e *env) error {
				_, err := e.store.UpdateSandbox(e.ctx, sb.ID, state.Update{StopGrace: &grace, StopReason: "stopped by its user", Time: e.clock.Now()})
				return err
			})
		case k == 4 && rng.IntN(3) == 0: // a drain starts or ends
			n := nodes[rng.IntN(len(nodes))]
			drain := rng.IntN(2) == 0
			both(func(e *env) error {
				_, err := e.store.UpdateNode(e.ctx, n, state.NodeUpdate{Draining: &drain, Time: e.clock.Now()})
				return err
			})
		case k == 5 && rng.IntN(3) == 0: // a node falls silent, or comes back
			n := nodes[rng.IntN(len(nodes))]
			if silent[n] {
				delete(silent, n)
				both(func(e *env) error { e.node(n, 4, 2048, nil); return nil })
			} else if len(silent) < 2 {
				silent[n] = true
			}
		default: // time passes, the nodes that are up beat, and a pass runs
			d := time.Duration(1+rng.IntN(6)) * time.Second
			both(func(e *env) error {
				e.clock.Add(d)
				for _, n := range nodes {
					if !silent[n] {
						e.m.Heartbeat(n)
					}
				}
				return e.m.Pass(e.ctx)
			})
			if sa, sb := stateOf(t, a), stateOf(t, b); sa != sb {
				t.Fatalf("step %d (seed %d): after a pass the states differ\nwith attention:\n%s\nwith every sandbox:\n%s", step, seed, sa, sb)
			}
		}
	}
}

func liveSandboxes(t *testing.T, e *env) []state.Sandbox {
	t.Helper()
	return e.store.LocalSandboxesWhere(func(sb *state.Sandbox) bool { return !sb.Status.Terminal() })
}

// stateOf is the sandboxes and nodes as JSON, migration IDs (random) left out.
func stateOf(t *testing.T, e *env) string {
	t.Helper()
	sbs := e.store.LocalSandboxes()
	for i := range sbs {
		if m := sbs[i].Migration; m != nil {
			c := *m
			c.ID = ""
			sbs[i].Migration = &c
		}
		ms := make([]state.Migration, len(sbs[i].Migrations))
		for j, r := range sbs[i].Migrations {
			r.ID = ""
			ms[j] = r
		}
		sbs[i].Migrations = ms
	}
	b, err := json.MarshalIndent(struct {
		Sandboxes []state.Sandbox
		Nodes     []state.Node
	}{sbs, e.store.LocalNodes()}, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
