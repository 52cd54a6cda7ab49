package nodescale

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Provider is where agent nodes come from: the seam between the autoscaler's decisions
// and a platform's node pool.
type Provider interface {
	// Name says which provider it is (in logs and status).
	Name() string
	// Request keeps n new nodes on order beyond the registered ones (0 cancels what is
	// on order). It is called every pass with the current need; registered are the ready
	// nodes the cluster has (a node that came but whose agent has not registered yet is
	// still on order).
	Request(ctx context.Context, n int, registered []string) error
	// Keep protects the nodes the cluster uses from the platform's own scale-down (which
	// sees the agent, not the microVMs, on them).
	Keep(ctx context.Context, nodes []string) error
	// Release gives back a node the autoscaler drained and parked.
	Release(ctx context.Context, node string) error
}

// Store is what the autoscaler needs of the replicated state.
type Store interface {
	LocalNodes() []state.Node
	LocalSandboxes() []state.Sandbox
	UpdateNode(ctx context.Context, id string, u state.NodeUpdate) (state.Node, error)
}

// Autoscaler applies the plan of each pass: parks and unparks nodes in the state, and
// asks the provider for nodes. The leader calls Pass; a new leader's autoscaler starts
// with no memory of idle times, which only delays a scale-down.
type Autoscaler struct {
	cfg      Config
	sched    scheduler.Config
	provider Provider
	store    Store
	log      *slog.Logger

	mu       sync.Mutex
	mem      memory
	last     Plan
	lastPass time.Time
}

// New returns an autoscaler of provider's nodes.
func New(cfg Config, sched scheduler.Config, provider Provider, store Store, log *slog.Logger) (*Autoscaler, error) {
	if provider == nil {
		return nil, errors.New("node autoscaler: no provider")
	}
	if cfg.Min < 0 || cfg.Max < 0 || cfg.Max > 0 && cfg.Min > cfg.Max {
		return nil, fmt.Errorf("node autoscaler: min %d and max %d are not a range", cfg.Min, cfg.Max)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Autoscaler{cfg: cfg, sched: sched, provider: provider, store: store, log: log.With("component", "nodescale", "provider", provider.Name()),
		mem: memory{idleSince: map[string]time.Time{}}}, nil
}

// Interval is the shortest time between two passes that act: the leader's passes come
// every second and after every change users make, and each of the provider's costs API
// calls (a Kubernetes API server's, for one). A pass that finds sandboxes waiting for
// more than the last one ordered acts at once: that wait is what users feel.
const Interval = 5 * time.Second

// passTimeout bounds one pass's calls to the provider: a slow platform API delays the
// leader's other loops by no more.
const passTimeout = 10 * time.Second

// Pass decides, and acts at most once per Interval (by now) unless more is needed at
// once: nodes to take back or to order beyond the last pass's.
func (a *Autoscaler) Pass(ctx context.Context, now time.Time) error {
	ctx = state.WithActor(ctx, state.Actor{Kind: "system", Name: "node-autoscaler"})
	a.mu.Lock()
	defer a.mu.Unlock()
	// Deciding costs no API call; only acting does.
	p := plan(now, a.cfg, a.sched, a.store.LocalNodes(), a.store.LocalSandboxes(), &a.mem)
	recent := !a.lastPass.IsZero() && now.Sub(a.lastPass) < Interval && now.After(a.lastPass)
	if recent && len(p.Unpark) == 0 && p.Want <= a.last.Want {
		return nil
	}
	a.lastPass = now
	ctx, cancel := context.WithTimeout(ctx, passTimeout)
	defer cancel()
	var errs []error
	no, yes := false, true
	for _, id := range p.Unpark {
		if _, err := a.store.UpdateNode(ctx, id, state.NodeUpdate{Parked: &no, Draining: &no, Time: now}); err != nil {
			errs = append(errs, fmt.Errorf("take back parked node %s: %w", id, err))
			continue
		}
		a.log.Info("taking a parked node back", "node", id, "waiting", p.Waiting)
	}
	if p.Drain != "" {
		// The leader's drain moves (live) whatever lands on it meanwhile.
		if _, err := a.store.UpdateNode(ctx, p.Drain, state.NodeUpdate{Parked: &yes, Draining: &yes, Time: now}); err != nil {
			errs = append(errs, fmt.Errorf("give back idle node %s: %w", p.Drain, err))
		} else {
			a.log.Info("giving an idle node back: draining it", "node", p.Drain, "idle_for", now.Sub(a.mem.idleSince[p.Drain]).Round(time.Second))
		}
	}
	if err := a.provider.Keep(ctx, p.Keep); err != nil {
		errs = append(errs, fmt.Errorf("%s: protect the cluster's nodes: %w", a.provider.Name(), err))
	}
	for _, id := range p.Release {
		if err := a.provider.Release(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("%s: release node %s: %w", a.provider.Name(), id, err))
			continue
		}
		if _, err := a.store.UpdateNode(ctx, id, state.NodeUpdate{Draining: &no, Time: now}); err != nil {
			errs = append(errs, err)
			continue
		}
		a.log.Info("node given back", "node", id)
	}
	var registered []string
	for _, n := range a.store.LocalNodes() {
		if n.Status == state.NodeReady {
			registered = append(registered, n.ID)
		}
	}
	if err := a.provider.Request(ctx, p.Want, registered); err != nil {
		errs = append(errs, fmt.Errorf("%s: order %d nodes: %w", a.provider.Name(), p.Want, err))
	}
	if p.Want != a.last.Want || p.Unplaceable != a.last.Unplaceable || p.Capped != a.last.Capped {
		a.log.Info("nodes on order", "want", p.Want, "waiting_sandboxes", p.Waiting, "larger_than_a_node", p.Unplaceable, "beyond_max", p.Capped)
		if p.Capped > 0 {
			a.log.Warn("sandboxes wait for more nodes than the pool's max allows", "more_nodes_needed", p.Capped, "max", a.cfg.Max)
		}
	}
	a.last = p
	return errors.Join(errs...)
}

// Status is the last pass's plan.
func (a *Autoscaler) Status() Plan {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.last
	p.Keep, p.Idle, p.Unpark, p.Release = slices.Clone(p.Keep), slices.Clone(p.Idle), slices.Clone(p.Unpark), slices.Clone(p.Release)
	return p
}

// Static is the provider of a fixed fleet: it has no nodes to add or remove. The
// autoscaler still parks idle nodes (they take no sandboxes, so an operator may power
// them down) and takes them back when sandboxes wait.
type Static struct{}

func (Static) Name() string                                 { return "static" }
func (Static) Request(context.Context, int, []string) error { return nil }
func (Static) Keep(context.Context, []string) error         { return nil }
func (Static) Release(context.Context, string) error        { return nil }
