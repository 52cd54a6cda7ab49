package bench

import (
	"context"
	"fmt"
	"strings"
	"time"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// Series keys of group starts: a sandbox with n sidecars (KeyGroup0 is the lone
// sandbox, the baseline, measured the same way in the same run).
const (
	KeyGroup0 = "group+0"
	KeyGroup1 = "group+1"
	KeyGroup3 = "group+3"
)

// measureGroups measures the start of a sandbox group, from the create call to the main
// command's first output: the main alone, with one sidecar, with three (each `sleep`,
// ready once started). The main's command starts only once every sidecar is ready, so
// the first byte includes the sidecars' starts; each run checks that the group it
// measured had its sidecars and that the main waited for them.
func measureGroups(ctx context.Context, cfg Config, api *apiClient, ref, accel string) ([]Series, error) {
	var out []Series
	for _, g := range []struct {
		key string
		n   int
	}{{KeyGroup0, 0}, {KeyGroup1, 1}, {KeyGroup3, 3}} {
		name := fmt.Sprintf("fireworks group start: main + %d sidecars%s", g.n, accel)
		if g.n == 0 {
			name = "fireworks group start: main alone (baseline)" + accel
		}
		s, err := measure(ctx, cfg, g.key, name, func() (sample, error) {
			req := &pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: ref, Cmd: cfg.Command}}
			for i := range g.n {
				req.Sidecars = append(req.Sidecars, &pb.Sidecar{Name: fmt.Sprintf("side%d", i+1),
					Spec: &pb.SandboxSpec{Image: ref, Cmd: []string{"sleep", "3600"}}})
			}
			return api.startRequestOnce(ctx, req, 5*time.Minute, func(sb *pb.Sandbox) error {
				members := len(sb.GetGroup().GetMembers())
				phases := sb.GetDetails()["start_phases"]
				switch {
				case g.n == 0 && members != 0:
					return fmt.Errorf("the lone sandbox %s is in a group of %d", sb.GetId(), members)
				case g.n > 0 && members != g.n+1:
					return fmt.Errorf("sandbox %s: a group of %d members, want %d", sb.GetId(), members, g.n+1)
				case g.n > 0 && !strings.Contains(phases, "sidecars="):
					return fmt.Errorf("sandbox %s did not wait for its sidecars (phases %q)", sb.GetId(), phases)
				}
				return nil
			})
		})
		if err != nil {
			return out, err
		}
		out = append(out, s)
	}
	return out, nil
}
