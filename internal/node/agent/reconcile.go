package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Reconcile makes this node run what the control plane assigned to it. desired is the
// full set of sandboxes whose Node is this node, as the control plane sees them (any
// status); it is authoritative: a sandbox with files here that is not in it was removed.
//
// Assignment snapshots can arrive late (after the node already reported progress), so a
// start is keyed by the sandbox's incarnation (ID and restart count): each incarnation is
// started at most once by this process, whatever the snapshots say afterwards.
func (a *Agent) Reconcile(ctx context.Context, desired []state.Sandbox) {
	a.sweepRelays(desired)
	want := make(map[string]state.Sandbox, len(desired))
	holding := map[string]bool{}  // saved states this node keeps for a resume elsewhere
	coming := map[string]string{} // migrations in progress to this node, by sandbox
	for _, sb := range desired {
		if sb.Node == a.cfg.Node {
			want[sb.ID] = sb
		} else if sb.Saved != nil && sb.Saved.Node == a.cfg.Node {
			holding[sb.ID] = true
		}
		if sb.MigratingTo() == a.cfg.Node {
			holding[sb.ID] = true
			coming[sb.ID] = sb.Migration.ID
		}
	}
	for id, sb := range want {
		live := a.isLive(id)
		if sb.Status.Terminal() {
			// Over: a saved state it had (stopped while paused) goes now; its log stays
			// until the sandbox is removed.
			if _, err := os.Stat(a.savedDir(id)); err == nil {
				_ = os.RemoveAll(a.savedDir(id))
			}
		}
		switch {
		case !sb.StopRequestedAt.IsZero():
			if live && a.markStopping(sb) {
				a.background(func(ctx context.Context) {
					if err := a.Stop(ctx, id, sb.StopGrace); err != nil {
						a.log.Warn("stop assigned sandbox", "sandbox", id, "err", err)
					}
				})
			}
		case sb.Status == state.StatusRunning && sb.Migration != nil && sb.Migration.From == a.cfg.Node:
			// This node migrates it away (see migrateOut), once per migration.
			if a.markMigrating(sb.Migration.ID) {
				mig := *sb.Migration
				a.background(func(ctx context.Context) {
					if !live {
						_ = a.endMigration(ctx, id, mig, errors.New("the sandbox is not live on its node"))
						return
					}
					if mig.Started.Before(a.began) {
						// Begun by this node's previous agent, which went down during it:
						// the migration ends, and the guest (adopted) runs on here, unless
						// the switch-over was committed first.
						a.orphanedMigration(ctx, id, mig)
						return
					}
					if err := a.migrateOut(ctx, sb, mig); err != nil {
						a.log.Warn("live migration failed", "sandbox", id, "migration", mig.ID, "err", err)
					}
				})
			}
		case sb.Status == state.StatusRunning && !sb.PauseRequestedAt.IsZero():
			if live && a.markPausing(id, sb.Resumes) {
				a.background(func(ctx context.Context) {
					err := a.Pause(ctx, id)
					if errors.Is(err, errPauseRefused) {
						// Nothing changed: it runs on, and the request goes with the reason;
						// a later request is acted on again.
						a.log.Warn("pause refused", "sandbox", id, "err", err)
						a.mu.Lock()
						delete(a.stopsSent, fmt.Sprintf("pause %s/%d", id, sb.Resumes))
						a.mu.Unlock()
						r, res, node := sb.Restarts, sb.Resumes, a.cfg.Node
						a.report(id, state.Update{CancelPause: err.Error(), IfRestarts: &r, IfResumes: &res, IfNode: &node, Time: time.Now()})
					}
				})
			}
		case sb.Status.Terminal() && live:
			// The control plane has given the sandbox up (its node was declared down
			// and came back): it must not keep running here.
			if a.markStopping(sb) {
				a.background(func(ctx context.Context) { _ = a.Stop(ctx, id, 0) })
			}
		case sb.Status == state.StatusPending:
			if !a.claimIncarnation(id, sb.Restarts, sb.Resumes) {
				continue
			}
			live, leaving := a.previousRun(id)
			if live == nil && leaving == nil {
				a.startAssigned(sb)
				continue
			}
			// An earlier run of it is still here (a drain stopped it and it was placed
			// here again, maybe before this node heard of the stop): that run ends, and
			// its files go, before this one starts.
			a.background(func(ctx context.Context) {
				if live != nil {
					if err := a.Stop(ctx, id, 0); err != nil && !errors.Is(err, ErrNotRunning) {
						a.log.Warn("stop the earlier run of a sandbox placed here again", "sandbox", id, "err", err)
					}
					select {
					case <-live:
					case <-ctx.Done():
						return
					}
				}
				if leaving != nil {
					select {
					case <-leaving:
					case <-ctx.Done():
						return
					}
				}
				a.startAssigned(sb)
			})
		}
	}
	// A migration within this node that ended before its switch-over (a stop, its
	// deadline, the source's failure): its target run gives up now, not at the deadline.
	a.mu.Lock()
	incoming := make(map[string]*sandbox, len(a.incomingRuns))
	maps.Copy(incoming, a.incomingRuns)
	a.mu.Unlock()
	for id, s := range incoming {
		s.mu.Lock()
		mid := s.incomingMid
		s.mu.Unlock()
		if sb, ok := want[id]; ok && !migrationFailed(sb, mid) {
			continue // under way, or committed (the target takes over)
		}
		a.log.Info("migration within this node ended; its target gives up", "sandbox", id, "migration", mid)
		s.cancel()
	}
	// Live sandboxes that are no longer ours (removed, or moved by a drain): kill them,
	// and remove their files (once per sandbox: later assignment sets find it leaving).
	a.mu.Lock()
	var gone []string
	for id, s := range a.live {
		if s.incomingMid != "" && coming[id] == s.incomingMid {
			continue // migrating here (until the switch-over shows in the assignments)
		}
		if _, ok := want[id]; !ok && a.leaving[id] == nil {
			gone = append(gone, id)
			a.leaving[id] = make(chan struct{})
		}
	}
	a.mu.Unlock()
	for _, id := range gone {
		a.log.Info("sandbox no longer assigned here; stopping it", "sandbox", id)
		a.background(func(ctx context.Context) {
			defer func() {
				a.mu.Lock()
				close(a.leaving[id])
				delete(a.leaving, id)
				a.mu.Unlock()
			}()
			_ = a.Stop(ctx, id, 0)
			if err := a.Remove(id); err != nil {
				a.log.Warn("remove sandbox no longer assigned", "sandbox", id, "err", err)
			}
		})
	}
	// Files of sandboxes the control plane no longer knows: removed by a user.
	entries, _ := os.ReadDir(a.sandboxRoot())
	for _, e := range entries {
		id := e.Name()
		if _, ok := want[id]; ok || holding[id] || a.isLive(id) || strings.HasPrefix(id, ".") {
			continue
		}
		if err := a.Remove(id); err != nil {
			a.log.Warn("remove files of a removed sandbox", "sandbox", id, "err", err)
		}
	}
}

// startAssigned starts a sandbox the control plane placed here; a start that cannot
// begin is reported failed (nothing else would ever report on it).
func (a *Agent) startAssigned(sb state.Sandbox) {
	if err := a.Start(sb); err != nil {
		a.log.Warn("start assigned sandbox", "sandbox", sb.ID, "err", err)
		a.background(func(ctx context.Context) {
			r, node := sb.Restarts, a.cfg.Node
			_, _ = a.store.UpdateSandbox(ctx, sb.ID, state.Update{Status: status(state.StatusFailed), Reason: "the node could not start it: " + err.Error(),
				IfRestarts: &r, IfNode: &node, Time: time.Now()})
		})
	}
}

// previousRun reports what of an earlier run of sandbox id is still on this node: its
// live run (closed when it ends) and the removal of its files (closed when done); nil
// for what there is none of.
func (a *Agent) previousRun(id string) (live, leaving <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s := a.live[id]; s != nil {
		live = s.done
	}
	if ch := a.leaving[id]; ch != nil {
		leaving = ch
	}
	return live, leaving
}

func (a *Agent) isLive(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.live[id]
	return ok
}

// claimIncarnation records that (id, restarts, resumes) is being started; false if it
// already was.
func (a *Agent) claimIncarnation(id string, restarts, resumes int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := fmt.Sprintf("%s/%d/%d", id, restarts, resumes)
	if a.started[key] {
		return false
	}
	a.started[key] = true
	return true
}

// markPausing records that a pause of run (id, resumes) was started by Reconcile; false
// if it already was.
func (a *Agent) markPausing(id string, resumes int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := fmt.Sprintf("pause %s/%d", id, resumes)
	if a.stopsSent[key] {
		return false
	}
	a.stopsSent[key] = true
	return true
}

// markMigrating records that migration mid was started by Reconcile; false if it
// already was.
func (a *Agent) markMigrating(mid string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := "migrate " + mid
	if a.stopsSent[key] {
		return false
	}
	a.stopsSent[key] = true
	return true
}

// markStopping records that a stop of id was started by Reconcile; false if it already was.
// The mark is per run (restart and resume count): a later run of the sandbox is stopped
// again.
func (a *Agent) markStopping(sb state.Sandbox) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := fmt.Sprintf("stop %s/%d/%d", sb.ID, sb.Restarts, sb.Resumes)
	if a.stopsSent[key] {
		return false
	}
	a.stopsSent[key] = true
	return true
}

// background runs fn on the agent's lifetime, not a request's: a stop must finish even if
// the stream that asked for it ends.
func (a *Agent) background(fn func(ctx context.Context)) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		ctx, cancel := context.WithTimeout(a.ctx, 10*time.Minute)
		defer cancel()
		fn(ctx)
	}()
}

// Running returns the IDs of the sandboxes live on this node.
func (a *Agent) Running() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	ids := make([]string, 0, len(a.live))
	for id := range a.live {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// ImageDigests returns the digests of the images whose root disk this node holds, for
// the scheduler's locality preference.
func (a *Agent) ImageDigests(ctx context.Context) []string {
	imgs, err := a.images.List(ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, img := range imgs {
		if img.RootDisk != "" && !slices.Contains(out, img.Digest) {
			out = append(out, img.Digest)
		}
	}
	slices.Sort(out)
	return out
}

// migrationFailed says whether sb's history has migration mid ended other than moved.
func migrationFailed(sb state.Sandbox, mid string) bool {
	for _, m := range sb.Migrations {
		if m.ID == mid {
			return m.Outcome != state.MigrationMoved
		}
	}
	return false
}
