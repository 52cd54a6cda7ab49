package leader

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// VolumeMover copies a volume's data to the node its move names and records the move's
// end (the server provides it: it reaches the nodes). It may be run again for a move an
// earlier leader began.
type VolumeMover func(ctx context.Context, v state.Volume) error

// SetVolumeMover gives the leader the way to move volumes; without one, moves recorded
// wait.
func (m *Manager) SetVolumeMover(f func(ctx context.Context, v state.Volume) error) {
	m.mu.Lock()
	m.mover = f
	m.mu.Unlock()
}

// volumeMoveRetry is how long a drain waits before it tries again to move a volume whose
// move failed.
const volumeMoveRetry = time.Minute

// Notes on volumes a drain leaves where they are start so.
const drainVolumeNote = "stays on draining node "

// volumes runs the volume moves recorded (one at a time, in the background), and moves
// the volumes off draining nodes: one that no sandbox mounts is moved to another node;
// one that sandboxes mount stays, with a note saying so (they reach it from wherever
// they run), and moves once none does.
func (m *Manager) volumes(ctx context.Context, now time.Time, nodes []state.Node) error {
	m.mu.Lock()
	mover := m.mover
	m.mu.Unlock()
	if mover == nil {
		return nil
	}
	vols, users := m.store.LocalVolumes()
	draining := map[string]bool{}
	for _, n := range nodes {
		draining[n.ID] = n.Draining
	}
	var errs []error
	started := false
	for _, v := range vols {
		if v.Move != nil {
			started = m.startMove(ctx, mover, v) || started
			continue
		}
		if !draining[v.Node] || v.Lost != "" {
			if strings.HasPrefix(v.MoveNote, drainVolumeNote) {
				// The drain ended (uncordon): its word goes.
				if _, err := m.store.NoteVolume(ctx, v.ID, "", now); err != nil {
					errs = append(errs, err)
				}
			}
			continue
		}
		note := ""
		switch {
		case len(users[v.ID]) > 0:
			note = fmt.Sprintf("%s%s: mounted by sandbox %s (which reach it from the nodes they run on); it moves once no sandbox mounts it",
				drainVolumeNote, v.Node, strings.Join(users[v.ID], ", "))
		case v.MoveNote != "" && !strings.HasPrefix(v.MoveNote, drainVolumeNote) && now.Sub(v.MoveNoteAt) < volumeMoveRetry:
			continue // the last move failed just now: tried again in a while
		case started:
			continue // one move at a time
		default:
			to := state.VolumeTarget(nodes, vols, v.Node)
			if to == "" {
				note = drainVolumeNote + v.Node + ": no other ready node to move it to"
				break
			}
			if _, err := m.store.MoveVolume(ctx, v.ID, to, "node "+v.Node+" is draining", now); err != nil {
				errs = append(errs, err)
				continue
			}
			m.log.Info("moving a volume off a draining node", "volume", v.ID, "from", v.Node, "to", to)
			started = true
			m.Notify() // the next pass runs it
			continue
		}
		if v.MoveNote != note {
			if _, err := m.store.NoteVolume(ctx, v.ID, note, now); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// startMove runs v's move in the background unless it runs already; it reports whether
// a move is under way here (one at a time).
func (m *Manager) startMove(ctx context.Context, mover VolumeMover, v state.Volume) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.moving) > 0 {
		return true // this one, or another: one at a time
	}
	if m.moving == nil {
		m.moving = map[string]bool{}
	}
	m.moving[v.ID] = true
	m.moves.Go(func() {
		if err := mover(ctx, v); err != nil {
			m.log.Warn("volume move failed", "volume", v.ID, "to", v.Move.To, "err", err)
		}
		m.mu.Lock()
		delete(m.moving, v.ID)
		m.mu.Unlock()
		m.Notify()
	})
	return true
}
