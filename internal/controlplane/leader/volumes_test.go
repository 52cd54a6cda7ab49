package leader

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A drain of a volume's node moves the volumes no sandbox mounts to another ready node
// (run through the mover: here a test double above the seam, which records the move's
// end as the server's would after copying the data), and leaves a volume a running
// sandbox mounts with a note saying why; the note goes when the drain ends.
func TestDrainMovesIdleVolumes(t *testing.T) {
	e := newEnv(t)
	e.node("n1", 8, 4096, nil)
	e.node("n2", 8, 4096, nil)
	moved := make(chan state.Volume, 4)
	e.m.SetVolumeMover(func(ctx context.Context, v state.Volume) error {
		_, err := e.store.VolumeMoved(ctx, v.ID, v.Move.To, "", e.clock.Now())
		moved <- v
		return err
	})
	for _, id := range []string{"1000000000000001", "1000000000000002"} {
		if _, err := e.store.PutVolume(e.ctx, state.Volume{ID: id, Name: "v" + id[15:], Node: "n1", SizeMiB: 64, CreatedAt: e.clock.Now()}, 0); err != nil {
			t.Fatal(err)
		}
	}
	sb := state.Sandbox{ID: "busy", Spec: state.SandboxSpec{Image: "alpine", MemoryMiB: 256,
		Volumes: []state.VolumeMount{{Volume: "1000000000000002", Path: "/data"}}, VolumeNode: "n1"}, CreatedAt: e.clock.Now()}
	if err := e.store.CreateSandbox(e.ctx, sb); err != nil {
		t.Fatal(err)
	}
	e.pass()
	e.run("busy")
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Draining: ptr(true), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass() // records the move (and migrates the sandbox)
	e.pass() // runs it
	select {
	case v := <-moved:
		if v.ID != "1000000000000001" || v.Move.To != "n2" || !strings.Contains(v.Move.Why, "draining") {
			t.Fatalf("moved %s to %s (%s), want the idle volume to n2 for the drain", v.ID, v.Move.To, v.Move.Why)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the idle volume on the draining node was not moved")
	}
	e.m.moves.Wait()
	vols, _ := e.store.LocalVolumes()
	for _, v := range vols {
		switch v.ID {
		case "1000000000000001":
			if v.Node != "n2" || v.Move != nil {
				t.Errorf("the idle volume after its move: on %s, move %v", v.Node, v.Move)
			}
		case "1000000000000002":
			if v.Node != "n1" || v.Move != nil || !strings.Contains(v.MoveNote, "mounted by sandbox busy") {
				t.Errorf("the mounted volume on the draining node: on %s, move %v, note %q", v.Node, v.Move, v.MoveNote)
			}
		}
	}
	if _, err := e.store.UpdateNode(e.ctx, "n1", state.NodeUpdate{Draining: ptr(false), Cordoned: ptr(false), Time: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	e.pass()
	if v, err := e.store.GetVolume(e.ctx, "1000000000000002", "", true); err != nil || v.MoveNote != "" {
		t.Errorf("after the drain ended, the note: %q %v", v.MoveNote, err)
	}
}
