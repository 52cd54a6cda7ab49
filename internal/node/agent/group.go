package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// A sandbox group's members run on one node (the state machine places them together);
// this agent wires them up:
//   - the group's network: each member's guest reaches member i at network.GroupAddr(i),
//     which its namespace translates to that member's address on the node, and the
//     members' policies let each other through (refreshGroup, whenever a member's
//     network comes or goes);
//   - names: each guest's /etc/hosts names the others (groupHosts);
//   - readiness: a sidecar is ready once its check passes (probeSidecar); the main's
//     command starts once every sidecar is (waitSidecars).

// sidecarReadyTimeout bounds how long a main waits for its sidecars to become ready
// (their images pulled, their VMs started, their checks passed).
const sidecarReadyTimeout = 5 * time.Minute

// probeEvery is how often a sidecar's readiness check is tried.
const probeEvery = 200 * time.Millisecond

// refreshGroup gives every member of g running here the others that run here as peers.
func (a *Agent) refreshGroup(g *state.Group) {
	if g == nil || len(g.Members) < 2 {
		return
	}
	a.groupMu.Lock()
	defer a.groupMu.Unlock()
	type member struct {
		i   int
		net SandboxNet
	}
	var here []member
	for i, m := range g.Members {
		a.mu.Lock()
		s := a.live[m.ID]
		a.mu.Unlock()
		if s == nil {
			continue
		}
		s.mu.Lock()
		n := s.net
		s.mu.Unlock()
		if n != nil {
			here = append(here, member{i, n})
		}
	}
	for _, m := range here {
		var peers []Peer
		for _, o := range here {
			if o.i != m.i {
				peers = append(peers, Peer{Group: network.GroupAddr(o.i), Addr: o.net.Address()})
			}
		}
		if err := m.net.SetPeers(peers); err != nil {
			a.log.Warn("wire a sandbox group's network", "group", g.Main, "member", g.Members[m.i].Name, "err", err)
		}
	}
}

// groupHosts are the names a member of g resolves: every other member's.
func groupHosts(g *state.Group, self string) []proto.HostEntry {
	if g == nil {
		return nil
	}
	var out []proto.HostEntry
	for i, m := range g.Members {
		addr := network.GroupAddr(i)
		if m.ID == self {
			addr = network.GuestAddr // its own name is itself (the main's "main" too)
		}
		out = append(out, proto.HostEntry{Name: m.Name, Addr: addr.String()})
	}
	return out
}

// groupHostname is a sidecar's hostname: its name in the group (the main keeps its own).
func groupHostname(sb state.Sandbox) string {
	if sb.IsSidecar() {
		return sb.Spec.Group.MemberName(sb.ID)
	}
	return ""
}

// probeSidecar runs sidecar s's readiness check until it passes (then marks it ready)
// or ctx ends.
func (a *Agent) probeSidecar(ctx context.Context, s *sandbox, sb state.Sandbox) {
	p, err := state.ParseProbe(sb.Spec.Ready)
	if err != nil {
		a.log.Warn("sidecar readiness check", "sandbox", sb.ID, "err", err)
		return
	}
	t0 := time.Now()
	// Bounded like the main's wait: a check that never passes stops being tried (a
	// sidecar restarted beside a running main would otherwise be probed for its life).
	ctx, cancel := context.WithTimeout(ctx, sidecarReadyTimeout)
	defer cancel()
	if p.TCPPort != 0 {
		s.mu.Lock()
		n := s.net
		s.mu.Unlock()
		if n == nil {
			return
		}
		target := netip.AddrPortFrom(network.GuestAddr, p.TCPPort).String()
		for {
			// From inside the sidecar's namespace, to its guest: what a member's
			// connection takes, without its policy (the check is the node's).
			err := network.Do("/run/netns/"+n.Namespace(), func() error {
				d := net.Dialer{Timeout: time.Second}
				c, err := d.DialContext(ctx, "tcp", target)
				if err == nil {
					c.Close()
				}
				return err
			})
			if err == nil {
				break
			}
			select {
			case <-ctx.Done():
				if errors.Is(ctx.Err(), context.DeadlineExceeded) {
					a.log.Warn("sidecar never ready; no longer checked", "sandbox", sb.ID, "check", sb.Spec.Ready, "err", err)
					a.update(sb.ID, state.Update{Runtime: map[string]string{"ready": fmt.Sprintf("tcp:%d did not pass within %s", p.TCPPort, sidecarReadyTimeout)},
						IfNode: &a.cfg.Node, IfRestarts: &sb.Restarts, IfResumes: &sb.Resumes})
				}
				return
			case <-time.After(probeEvery):
			}
		}
	}
	s.markGroupReady()
	note := "ready once started"
	if p.TCPPort != 0 {
		note = fmt.Sprintf("tcp:%d passed after %s", p.TCPPort, time.Since(t0).Round(time.Millisecond))
	}
	a.log.Info("sidecar ready", "sandbox", sb.ID, "check", note)
	a.update(sb.ID, state.Update{Runtime: map[string]string{"ready": note}, IfNode: &a.cfg.Node, IfRestarts: &sb.Restarts, IfResumes: &sb.Resumes})
}

// waitSidecars returns once every sidecar of main's group is ready here, or the error
// that keeps the group from starting: a sidecar that ended, or did not become ready in
// time.
func (a *Agent) waitSidecars(ctx context.Context, main state.Sandbox) error {
	ctx, cancel := context.WithTimeout(ctx, sidecarReadyTimeout)
	defer cancel()
	g := main.Spec.Group
	lastRead := time.Time{}
	// Inspect says what the main waits for (once it has waited a moment), until it runs.
	said, t0 := "", time.Now()
	say := func(what string) {
		if what != said {
			said = what
			a.update(main.ID, state.Update{Runtime: map[string]string{"sidecars": what}})
		}
	}
	defer func() {
		if said != "" {
			say("")
		}
	}()
	for {
		waiting := ""
		for _, m := range g.Members[1:] {
			a.mu.Lock()
			s := a.live[m.ID]
			a.mu.Unlock()
			if s != nil {
				s.mu.Lock()
				ready := s.groupReady
				s.mu.Unlock()
				select {
				case <-ready: // nil (not made yet): never
					continue
				default:
				}
			}
			if waiting == "" {
				waiting = m.Name
			}
			// Not ready: ended? The state says (read at most once a second).
			if time.Since(lastRead) < time.Second {
				continue
			}
			sb, err := a.store.GetSandbox(ctx, m.ID)
			if errors.Is(err, state.ErrNotFound) {
				return fmt.Errorf("sidecar %q (%s) is gone", m.Name, m.ID)
			}
			if err == nil && sb.Status.Terminal() {
				return fmt.Errorf("sidecar %q (%s) ended before it was ready: %s", m.Name, m.ID, sb.EndText())
			}
		}
		if waiting == "" {
			return nil
		}
		if time.Since(t0) > 2*time.Second {
			check := ""
			for _, m := range g.Members[1:] {
				if m.Name == waiting {
					check = m.Ready
				}
			}
			if check == "" {
				check = "its start"
			}
			say(fmt.Sprintf("waiting for sidecar %q to be ready (%s; at most %s)", waiting, check, sidecarReadyTimeout))
		}
		if time.Since(lastRead) >= time.Second {
			lastRead = time.Now()
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("sidecar %q was not ready within %s", waiting, sidecarReadyTimeout)
			}
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// markGroupReady says the sidecar is ready (once; a sandbox made without the channel
// has nobody waiting on it).
func (s *sandbox) markGroupReady() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.groupReady == nil {
		s.groupReady = make(chan struct{})
	}
	select {
	case <-s.groupReady:
	default:
		close(s.groupReady)
	}
}
