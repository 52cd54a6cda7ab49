package state

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// A sandbox group is a main sandbox and its sidecars: other sandboxes (other images,
// their own VMs, logs, limits and exit codes) that run on the same node, reach each
// other by name on the group's private network, and live as long as the main does.
//
// Every member is a sandbox of its own in the state; each carries the whole Group in its
// spec, so that a node running one member knows its peers without asking. The state
// machine keeps a group whole:
//   - the members are created in one command, and placed in one: the main's placement
//     reserves room for all of them and puts the sidecars on its node (never half a
//     group on a node);
//   - when the main ends, the sidecars still running are stopped (GroupStopGrace) and
//     the ones not started yet end at once;
//   - a sidecar that ends and will not run again (its restart policy, or its restart
//     limit) fails the group: the leader stops the main, with the sidecar named.

// Group is a sandbox group as each member's spec records it.
type Group struct {
	Main    string        `json:"main"`    // the main sandbox's ID (Members[0])
	Members []GroupMember `json:"members"` // the main first, then the sidecars in order
}

// GroupMember is one member: its name on the group's network, its ID, and what it
// reserves (the main's placement reserves the whole group's).
type GroupMember struct {
	Name     string    `json:"name"`
	ID       string    `json:"id"`
	Reserved Resources `json:"reserved"`
	Ready    string    `json:"ready,omitempty"` // a sidecar's readiness check (its Spec.Ready)
}

const (
	// MaxSidecars bounds a group's sidecars.
	MaxSidecars = 8
	// GroupStopGrace is the grace the sidecars get when their main ends (SIGTERM, then a
	// kill after it).
	GroupStopGrace = 10 * time.Second
	// MainMemberName is the main's name on the group's network.
	MainMemberName = "main"
)

// IsSidecar says whether sb is a group's sidecar (not its main).
func (sb Sandbox) IsSidecar() bool { return sb.Spec.Group != nil && sb.Spec.Group.Main != sb.ID }

// IsGroupMain says whether sb is the main of a group with sidecars.
func (sb Sandbox) IsGroupMain() bool {
	return sb.Spec.Group != nil && sb.Spec.Group.Main == sb.ID && len(sb.Spec.Group.Members) > 1
}

// MemberName is id's name in g ("" if it is not a member).
func (g *Group) MemberName(id string) string {
	if g == nil {
		return ""
	}
	for _, m := range g.Members {
		if m.ID == id {
			return m.Name
		}
	}
	return ""
}

func (g *Group) clone() *Group {
	if g == nil {
		return nil
	}
	c := *g
	c.Members = append([]GroupMember(nil), g.Members...)
	return &c
}

// ValidateSidecarName checks a sidecar's name: a DNS label (what the members resolve),
// lower case, and not the main's.
func ValidateSidecarName(name string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("%w: sidecar name %q: want 1 to 63 characters", ErrInvalid, name)
	}
	for i, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' && i > 0 && i < len(name)-1) {
			return fmt.Errorf("%w: sidecar name %q: want lower-case letters, digits and inner '-' (a host name the group resolves)", ErrInvalid, name)
		}
	}
	if strings.Trim(name, "0123456789") == "" {
		return fmt.Errorf("%w: sidecar name %q: a name of digits only is an address to the resolver", ErrInvalid, name)
	}
	if name == MainMemberName {
		return fmt.Errorf("%w: sidecar name %q is taken (%q is the main's name on the group's network)", ErrInvalid, name, MainMemberName)
	}
	if name == "localhost" {
		return fmt.Errorf("%w: sidecar name %q is taken (every member's own address)", ErrInvalid, name)
	}
	return nil
}

// Probe is a sidecar's readiness check: what must pass before the main's command starts.
type Probe struct {
	TCPPort uint16 // a TCP connection to this guest port is accepted; 0 = ready once started
}

// ParseProbe reads "" (ready once its command started) or "tcp:PORT".
func ParseProbe(s string) (Probe, error) {
	if s == "" {
		return Probe{}, nil
	}
	kind, arg, _ := strings.Cut(s, ":")
	if kind != "tcp" {
		return Probe{}, fmt.Errorf("%w: readiness check %q: want tcp:PORT", ErrInvalid, s)
	}
	n, err := strconv.ParseUint(arg, 10, 16)
	if err != nil || n == 0 {
		return Probe{}, fmt.Errorf("%w: readiness check %q: want tcp:PORT with PORT in 1..65535", ErrInvalid, s)
	}
	return Probe{TCPPort: uint16(n)}, nil
}

// checkGroup checks that members (the main first) make one consistent group, before
// any of them is created.
func checkGroup(members []Sandbox) error {
	main := members[0]
	g := main.Spec.Group
	switch {
	case g == nil || g.Main != main.ID:
		return fmt.Errorf("%w: a group's first member must be its main", ErrInvalid)
	case len(g.Members) != len(members) || len(members) < 2:
		return fmt.Errorf("%w: the group names %d members, %d given", ErrInvalid, len(g.Members), len(members))
	case len(members)-1 > MaxSidecars:
		return fmt.Errorf("%w: %d sidecars: at most %d", ErrInvalid, len(members)-1, MaxSidecars)
	case main.Spec.Restart != "" && main.Spec.Restart != RestartNever:
		return fmt.Errorf("%w: a group's main runs once (restart policy %q): its end ends the group; give the sidecars restart policies", ErrInvalid, main.Spec.Restart)
	}
	names := map[string]bool{}
	ids := map[string]bool{}
	if g.Members[0].Name != MainMemberName || main.Spec.Ready != "" {
		return fmt.Errorf("%w: a group's main is named %q and has no readiness check", ErrInvalid, MainMemberName)
	}
	for i, m := range members {
		gm := g.Members[i]
		switch {
		case ids[m.ID]:
			return fmt.Errorf("%w: member %s twice in the group", ErrInvalid, m.ID)
		case gm.Ready != m.Spec.Ready:
			return fmt.Errorf("%w: member %q: the group records readiness check %q, its spec %q", ErrInvalid, gm.Name, gm.Ready, m.Spec.Ready)
		case gm.Reserved != m.Spec.Reserved():
			return fmt.Errorf("%w: member %q: the group records %+v reserved, its spec %+v", ErrInvalid, gm.Name, gm.Reserved, m.Spec.Reserved())
		case gm.ID != m.ID:
			return fmt.Errorf("%w: group member %d is %s, not %s", ErrInvalid, i, gm.ID, m.ID)
		case m.Spec.Group == nil || m.Spec.Group.Main != g.Main || len(m.Spec.Group.Members) != len(g.Members):
			return fmt.Errorf("%w: member %s does not record the group", ErrInvalid, m.ID)
		case m.Owner != main.Owner:
			return fmt.Errorf("%w: member %s has another owner", ErrInvalid, m.ID)
		case names[gm.Name]:
			return fmt.Errorf("%w: two members named %q", ErrInvalid, gm.Name)
		case m.Spec.ForkNode != main.Spec.ForkNode:
			return fmt.Errorf("%w: member %q is forked from a saved state on another node than its main's (a group starts on one node)", ErrInvalid, gm.Name)
		case m.Spec.SnapshotNode != main.Spec.SnapshotNode:
			return fmt.Errorf("%w: member %q starts from a snapshot on another node than its main's (a group starts on one node)", ErrInvalid, gm.Name)
		case m.Spec.Network == NetworkNone:
			return fmt.Errorf("%w: member %q: a group member needs the group's network (--network none)", ErrInvalid, gm.Name)
		}
		if i > 0 {
			if err := ValidateSidecarName(gm.Name); err != nil {
				return err
			}
			if _, err := ParseProbe(m.Spec.Ready); err != nil {
				return err
			}
		}
		for j := range g.Members {
			if m.Spec.Group.Members[j] != g.Members[j] {
				return fmt.Errorf("%w: member %s records another group", ErrInvalid, m.ID)
			}
		}
		names[gm.Name] = true
		ids[m.ID] = true
	}
	return nil
}

// createGroup creates a group's members in one step: all of them or none.
func (f *fsm) createGroup(c createGroupCmd) any {
	if len(c.Members) == 0 {
		return fmt.Errorf("%w: a group without members", ErrInvalid)
	}
	members := make([]Sandbox, len(c.Members))
	for i := range c.Members {
		members[i] = *c.Members[i].clone()
		if err := members[i].validateNew(); err != nil {
			return err
		}
	}
	if err := checkGroup(members); err != nil {
		return err
	}
	// Each is checked against the state as it would be with the ones before it (quota,
	// names), then none is kept: the real creation follows only if all pass.
	created := []string{}
	undo := func() {
		for _, id := range created {
			_ = f.deleteSandbox(id)
		}
	}
	for _, m := range members {
		if err, _ := f.createSandbox(m, c.Quota, true).(error); err != nil {
			undo()
			return fmt.Errorf("group member %q: %w", m.Spec.Group.MemberName(m.ID), err)
		}
		created = append(created, m.ID)
	}
	if c.Place != "" {
		f.placeSandboxes(placeSandboxesCmd{Plans: []Plan{{SandboxID: members[0].ID, NodeID: c.Place}}, Config: c.Scheduler, Time: members[0].CreatedAt})
	}
	return nil
}

type createGroupCmd struct {
	Members   []Sandbox        `json:"members"`
	Quota     Quota            `json:"quota"`
	Place     string           `json:"place,omitempty"`
	Scheduler scheduler.Config `json:"scheduler"`
}

// groupEnded ends what is left of main's group once main is over: sidecars not placed
// yet end at once, running ones are asked to stop (the restart policy no longer applies
// to them).
func (f *fsm) groupEnded(main *Sandbox, t time.Time) {
	for _, gm := range main.Spec.Group.Members[1:] {
		cur, ok := f.sandboxes[gm.ID]
		if !ok || cur.Status.Terminal() || !cur.StopRequestedAt.IsZero() && cur.Node != "" {
			continue
		}
		next := cur.clone()
		if next.StopRequestedAt.IsZero() {
			next.StopRequestedAt, next.StopGrace = t, GroupStopGrace
			next.StopReason = "stopped: its group's main ended (" + string(main.Status) + ")"
		}
		if next.Status == StatusPending && next.Node == "" || next.Status == StatusPaused {
			code := 128 + 15
			_ = next.apply(Update{Status: status(StatusExited), ExitCode: &code, Reason: "stopped with its group's main before it ran", Time: t})
		}
		f.putSandbox(next)
	}
}

func status(s Status) *Status { return &s }

// EndText says how an ended sandbox ended, in a few words: "exit code 3", "killed by
// signal 9", or its status and reason.
func (sb Sandbox) EndText() string {
	if sb.Status == StatusExited {
		if sb.Signal != 0 {
			return "killed by signal " + strconv.Itoa(sb.Signal)
		}
		return "exit code " + strconv.Itoa(sb.ExitCode)
	}
	return string(sb.Status) + ": " + sb.Reason
}
