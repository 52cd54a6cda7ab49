// Package state is Fireworks' replicated state: the sandbox model, a deterministic Raft
// FSM over it, and a Store that runs hashicorp/raft with a bolt log and file snapshots.
//
// The JSON tags on the model types are the persisted format (Raft log entries and
// snapshots): renaming a Go field is safe, changing a tag is a format change.
package state

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Status is a sandbox's lifecycle state.
type Status string

const (
	StatusPending  Status = "pending"
	StatusStarting Status = "starting"
	StatusRunning  Status = "running"
	// StatusPaused: the node saved the whole VM (memory, devices, scratch disk) and ended
	// it; the sandbox holds no CPU or RAM until a resume (see Sandbox.Saved).
	StatusPaused Status = "paused"
	StatusExited Status = "exited"
	StatusFailed Status = "failed"
	StatusLost   Status = "lost"
)

// Terminal reports whether no transition may leave s.
func (s Status) Terminal() bool {
	return s == StatusExited || s == StatusFailed || s == StatusLost
}

func (s Status) valid() bool {
	switch s {
	case StatusPending, StatusStarting, StatusRunning, StatusPaused, StatusExited, StatusFailed, StatusLost:
		return true
	}
	return false
}

// transitions lists the allowed moves between different states. Terminal states have no
// entry: they are final. A paused sandbox becomes pending again only by a resume (the
// resume command, which checks its node's capacity), never by an update.
var transitions = map[Status][]Status{
	StatusPending:  {StatusStarting, StatusFailed, StatusExited},
	StatusStarting: {StatusRunning, StatusFailed, StatusLost, StatusExited},
	StatusRunning:  {StatusPaused, StatusExited, StatusFailed, StatusLost},
	StatusPaused:   {StatusExited, StatusFailed, StatusLost},
}

var (
	// ErrNotFound: no sandbox (or meta key) matches.
	ErrNotFound = errors.New("not found")
	// ErrAmbiguous: an ID prefix matches more than one sandbox.
	ErrAmbiguous = errors.New("ambiguous")
	// ErrNameTaken: another existing sandbox already has the name.
	ErrNameTaken = errors.New("name already in use")
	// ErrInUse: a sandbox still uses what is to be removed (a volume).
	ErrInUse = errors.New("in use")
	// ErrExists: a sandbox with the same ID already exists.
	ErrExists = errors.New("already exists")
	// ErrInvalidTransition: the lifecycle does not allow the requested status change.
	ErrInvalidTransition = errors.New("invalid status transition")
	// ErrInvalid: a command is malformed (missing ID, zero time, unknown status...).
	ErrInvalid = errors.New("invalid")
	// ErrNoRoom: the node that must take a sandbox (a resume's) has no room for it now.
	ErrNoRoom = errors.New("no room")
	// ErrStaleReport: an update meant for an earlier run of a sandbox.
	ErrStaleReport = errors.New("stale report")
	// ErrUnknownCommand: a log entry has a command type this FSM does not know and that
	// is not marked ignorable.
	ErrUnknownCommand = errors.New("unknown command type")
)

// checkTransition says whether a sandbox in from may move to to. The same state is an
// idempotent no-op, so a retried update does not fail.
func checkTransition(from, to Status) error {
	if !to.valid() {
		return fmt.Errorf("%w: unknown status %q", ErrInvalid, to)
	}
	if from == to {
		return nil
	}
	if from.Terminal() {
		return fmt.Errorf("%w: %s is final, cannot become %s", ErrInvalidTransition, from, to)
	}
	if slices.Contains(transitions[from], to) {
		return nil
	}
	return fmt.Errorf("%w: %s cannot become %s", ErrInvalidTransition, from, to)
}

// SandboxSpec is what the user asked for.
type SandboxSpec struct {
	Image string `json:"image"` // ref as the user gave it
	// Entrypoint and Cmd keep nil ("the image's") apart from empty, so no omitempty.
	Entrypoint []string      `json:"entrypoint"` // override; nil = the image's
	Cmd        []string      `json:"cmd"`        // args; nil = the image's Cmd (Docker semantics applied by the runtime)
	Env        []string      `json:"env,omitempty"`
	WorkingDir string        `json:"working_dir,omitempty"`
	User       string        `json:"user,omitempty"`
	VCPUs      int           `json:"vcpus,omitempty"`
	MemoryMiB  int           `json:"memory_mib,omitempty"`
	Timeout    time.Duration `json:"timeout,omitempty"` // 0 = none
	TTY        bool          `json:"tty,omitempty"`
	Stdin      bool          `json:"stdin,omitempty"`
	// InsecureRegistries are registry hosts the image may be pulled from over plain HTTP.
	InsecureRegistries []string `json:"insecure_registries,omitempty"`
	// Restart says what the control plane does when the sandbox ends or its node dies.
	Restart RestartPolicy `json:"restart,omitempty"`
	// Constraints select nodes by label ("zone==a", "gpu!=true", "ssd"); Spread asks the
	// scheduler to spread instead of bin-pack.
	Constraints []string `json:"constraints,omitempty"`
	Spread      bool     `json:"spread,omitempty"`
	// DiskMiB is the scratch disk the sandbox reserves on its node.
	DiskMiB int `json:"disk_mib,omitempty"`
	// Boot says how the node may start the VM (see BootMode); "" is BootAuto.
	Boot BootMode `json:"boot,omitempty"`
	// Network is "" (a network of its own: NAT to the outside under its policy) or
	// NetworkNone (no interface at all).
	Network string `json:"network,omitempty"`
	// Policy is the network policy in the policy file format (see netpolicy.ParsePolicy);
	// "" leaves only the node's defaults. Changed on a running sandbox by Update.Policy.
	Policy string `json:"policy,omitempty"`
	// PolicyAdmin records that an admin gave the policy: only an admin's policy may open
	// what nodes protect (their own addresses, link-local and metadata, other sandboxes).
	PolicyAdmin bool `json:"policy_admin,omitempty"`
	// Ports are guest TCP ports published through the ingress.
	Ports []Port `json:"ports,omitempty"`
	// PullPrivate records that an admin asked for the sandbox: its image may be pulled
	// from any address. A user's pull reaches only public addresses and the ones the node
	// allows (a user must not make a node fetch from its internal network).
	PullPrivate bool `json:"pull_private,omitempty"`
	// Snapshot, if set, is the ID of the filesystem snapshot the sandbox starts from (its
	// scratch disk a copy of the snapshot's), on SnapshotNode, which holds its files.
	Snapshot     string `json:"snapshot,omitempty"`
	SnapshotNode string `json:"snapshot_node,omitempty"`
	// ForkOf, if set, is the paused sandbox whose saved state (memory included) the
	// sandbox starts from, as a new machine, on ForkNode, which holds that state.
	ForkOf   string `json:"fork_of,omitempty"`
	ForkNode string `json:"fork_node,omitempty"`
	// ForkAddress is ForkNode's node API address, where another node fetches the saved
	// state from.
	ForkAddress string `json:"fork_address,omitempty"`
	// Volumes are mounted in the guest, in order (see VolumeMount); their data is on
	// VolumeNode (all of them on one), whose node API is at VolumeAddress. The scheduler
	// prefers that node; on another, the sandbox's node relays the guest's volume
	// traffic to it (the volume node is told of the sandbox: see VolumesOn).
	Volumes       []VolumeMount `json:"volumes,omitempty"`
	VolumeNode    string        `json:"volume_node,omitempty"`
	VolumeAddress string        `json:"volume_address,omitempty"`
	// Group, if set, is the sandbox group the sandbox is a member of (see Group); Ready
	// a sidecar's readiness check (see ParseProbe).
	Group *Group `json:"group,omitempty"`
	Ready string `json:"ready,omitempty"`
	// Metadata is the user's key/value labels (E2B's sandbox metadata): listed and
	// filtered on, never interpreted. Bounded by CheckMetadata.
	Metadata map[string]string `json:"metadata,omitempty"`
	// KeepAlive: the sandbox has no command of its own; its main process is init's idle
	// program and it runs until stopped, paused or its lifetime ends. Work comes through
	// exec and the in-sandbox API (E2B's model).
	KeepAlive bool `json:"keep_alive,omitempty"`
	// NonRoot: the command (and execs that take its user) must not run as uid 0; the
	// guest refuses to start it otherwise (Kubernetes' runAsNonRoot).
	NonRoot bool `json:"non_root,omitempty"`
	// Lifetime, if set, ends the sandbox that long after it was created, or resumed
	// (Sandbox.EndAt); OnEnd says how: LifetimeStop (default) or LifetimePause.
	Lifetime time.Duration `json:"lifetime,omitempty"`
	OnEnd    string        `json:"on_end,omitempty"`
	// Template names the named template the sandbox was made from (informational).
	Template string `json:"template,omitempty"`
}

// What happens when a sandbox's lifetime ends.
const (
	LifetimeStop  = "stop"
	LifetimePause = "pause"
)

// Metadata bounds: a sandbox's labels are state every replica holds and every list sends.
const (
	MaxMetadata      = 64
	MaxMetadataKey   = 128
	MaxMetadataValue = 1024
)

// CheckMetadata bounds a sandbox's metadata.
func CheckMetadata(m map[string]string) error {
	if len(m) > MaxMetadata {
		return fmt.Errorf("%w: %d metadata entries (at most %d)", ErrInvalid, len(m), MaxMetadata)
	}
	for k, v := range m {
		switch {
		case k == "" || len(k) > MaxMetadataKey:
			return fmt.Errorf("%w: metadata key %.40q: 1 to %d bytes", ErrInvalid, k, MaxMetadataKey)
		case len(v) > MaxMetadataValue:
			return fmt.Errorf("%w: metadata %.40q: value of %d bytes (at most %d)", ErrInvalid, k, len(v), MaxMetadataValue)
		case !utf8.ValidString(k) || !utf8.ValidString(v):
			return fmt.Errorf("%w: metadata %.40q: not UTF-8", ErrInvalid, k)
		}
	}
	return nil
}

// VolumesOn names the node that serves sb's volumes to another node while sb is not
// over, "" if none does (no volumes, or they are on sb's own node): that node is told
// of sb (its assignments include it) so that it serves them to the node sb runs on, and
// to no other.
func (sb Sandbox) VolumesOn() string {
	if v := sb.Spec.VolumeNode; v != "" && sb.Node != "" && !sb.Status.Terminal() && (v != sb.Node || sb.MigratingTo() != "") {
		return v
	}
	return ""
}

// ForVolumeNode is what the node serving sb's volumes to another node is told of sb:
// enough to check the node it runs on and the volumes it mounts, nothing of its
// command, environment, policy or tokens (that node runs nothing of it).
func (sb Sandbox) ForVolumeNode() Sandbox {
	out := Sandbox{ID: sb.ID, Status: sb.Status, Node: sb.Node, Restarts: sb.Restarts, Resumes: sb.Resumes,
		Spec: SandboxSpec{Volumes: sb.Spec.Volumes, VolumeNode: sb.Spec.VolumeNode}}
	if sb.Migration != nil {
		m := *sb.Migration
		out.Migration = &m
	}
	return out
}

// Involves says whether node has a part in sb: it runs it, holds files its start reads,
// is its migration's target, or serves its volumes (what a node's assignments hold).
func (sb Sandbox) Involves(node string) bool {
	return sb.Node == node || sb.FilesOn() == node || sb.MigratingTo() == node || sb.VolumesOn() == node
}

// FilesOn names the node holding the files sb's start reads when another node may have
// to fetch them from it: its own saved state's (paused, or being resumed), or, while a
// fork is being started, its source's. That node is told of sb (its assignments include
// it) so that it can serve them to the node sb is placed on, and to no other.
func (sb Sandbox) FilesOn() string {
	switch {
	case sb.Saved != nil:
		return sb.Saved.Node
	case sb.Spec.ForkOf != "" && sb.Restarts == 0 && (sb.Status == StatusPending || sb.Status == StatusStarting):
		return sb.Spec.ForkNode
	}
	return ""
}

// NetworkNone is SandboxSpec.Network for a sandbox without a network interface.
const NetworkNone = "none"

// Port is a published guest port: reachable through the ingress as
// <port>-<sandbox>.<domain>, by anyone if Public, else with the sandbox's access token.
type Port struct {
	Port   uint16 `json:"port"`
	Public bool   `json:"public,omitempty"`
	// All publishes every guest port (Port is 0): E2B's sandboxes, whose every port is
	// reachable at `<port>-<id>.<domain>`. A port listed on its own overrides it.
	All bool `json:"all,omitempty"`
}

// Publishes says whether the sandbox publishes guest port n, and how: its own entry,
// else the every-port one.
func (s SandboxSpec) Publishes(n uint16) (Port, bool) {
	if n == 0 {
		return Port{}, false
	}
	var all *Port
	for i, p := range s.Ports {
		switch {
		case p.All:
			all = &s.Ports[i]
		case p.Port == n:
			return p, true
		}
	}
	if all != nil {
		return Port{Port: n, Public: all.Public}, true
	}
	return Port{}, false
}

// ParsePort reads "PORT" or "PORT:public" (or "PORT:private").
func ParsePort(s string) (Port, error) {
	num, vis, _ := strings.Cut(s, ":")
	n, err := strconv.ParseUint(num, 10, 16)
	if err != nil || n == 0 {
		return Port{}, fmt.Errorf("%w: port %q: want PORT or PORT:public with PORT in 1..65535", ErrInvalid, s)
	}
	p := Port{Port: uint16(n)}
	switch vis {
	case "", "private":
	case "public":
		p.Public = true
	default:
		return Port{}, fmt.Errorf("%w: port %q: visibility %q, want public or private", ErrInvalid, s, vis)
	}
	return p, nil
}

// BootMode says how a node may start a sandbox's VM.
type BootMode string

const (
	// BootAuto: claim a warm-pool VM if the node has one for the image and shape, else
	// restore the image's template snapshot (building it on first use), else boot.
	BootAuto BootMode = "auto"
	// BootRestore: restore the template snapshot, never a pool VM.
	BootRestore BootMode = "restore"
	// BootCold: boot the guest kernel from scratch (for measuring and debugging).
	BootCold BootMode = "cold"
)

// ParseBootMode accepts "", auto, restore and cold.
func ParseBootMode(s string) (BootMode, error) {
	switch BootMode(s) {
	case "", BootAuto:
		return BootAuto, nil
	case BootRestore, BootCold:
		return BootMode(s), nil
	}
	return "", fmt.Errorf("%w: boot mode %q (want auto, restore or cold)", ErrInvalid, s)
}

// Pool asks every node to keep warm VMs of an image ready: restored from the image's
// template snapshot, root filesystem mounted, paused until a start claims one.
type Pool struct {
	// Image is the reference as users start it (the pool serves starts of this ref).
	Image string `json:"image"`
	// Size is the number of warm VMs each node keeps at least; Max bounds what the
	// node's autoscaler may grow the pool to from the recent claim rate (0 = Size).
	Size int `json:"size"`
	Max  int `json:"max,omitempty"`
	// VCPUs and MemoryMiB are the shape of the pool's VMs (0 = the node's defaults); only
	// starts asking for this shape claim them.
	VCPUs     int `json:"vcpus,omitempty"`
	MemoryMiB int `json:"memory_mib,omitempty"`
	// InsecureRegistries as in SandboxSpec, for pulling Image.
	InsecureRegistries []string  `json:"insecure_registries,omitempty"`
	UpdatedAt          time.Time `json:"updated_at"`
	// ManagedBy names who manages the pool for others ("" = an operator's own): such a
	// pool's image is pulled as a user's pull is.
	ManagedBy string `json:"managed_by,omitempty"`
}

// MaxPoolManager bounds Pool.ManagedBy.
const MaxPoolManager = 63

// MaxPoolSize bounds Pool.Size and Pool.Max per node.
const MaxPoolSize = 64

// RestartPolicy is what happens when a sandbox ends or is lost.
type RestartPolicy string

const (
	// RestartNever (the default): a sandbox runs once.
	RestartNever RestartPolicy = "never"
	// RestartOnFailure: re-run after a non-zero exit, a failure, or a lost node.
	RestartOnFailure RestartPolicy = "on-failure"
	// RestartAlways: re-run whenever it ends, unless a user stopped it.
	RestartAlways RestartPolicy = "always"
)

// RestartGivenUp is the detail (Runtime key) in which the leader says it gave up
// restarting a sandbox (its restart limit).
const RestartGivenUp = "restart"

// MayRestart says whether sb, over, may still run again under its restart policy (the
// leader restarts it unless it gives up): what it mounts is not free yet.
func (sb Sandbox) MayRestart() bool {
	if !sb.Status.Terminal() || !sb.StopRequestedAt.IsZero() || sb.Runtime[RestartGivenUp] != "" {
		return false
	}
	switch sb.Spec.Restart {
	case RestartAlways:
		return true
	case RestartOnFailure:
		return !(sb.Status == StatusExited && sb.ExitCode == 0 && sb.Signal == 0)
	}
	return false
}

// ParseRestartPolicy accepts "", never, on-failure and always.
func ParseRestartPolicy(s string) (RestartPolicy, error) {
	switch RestartPolicy(s) {
	case "", RestartNever:
		return RestartNever, nil
	case RestartOnFailure, RestartAlways:
		return RestartPolicy(s), nil
	}
	return "", fmt.Errorf("%w: restart policy %q (want never, on-failure or always)", ErrInvalid, s)
}

// Event records one status transition.
type Event struct {
	Time   time.Time `json:"time"`
	Status Status    `json:"status"`
	Reason string    `json:"reason,omitempty"`
}

// Sandbox is one sandbox as the cluster knows it.
type Sandbox struct {
	ID          string            `json:"id"`
	Name        string            `json:"name,omitempty"`
	Spec        SandboxSpec       `json:"spec"`
	Status      Status            `json:"status"`
	Reason      string            `json:"reason,omitempty"`
	ExitCode    int               `json:"exit_code"`
	Signal      int               `json:"signal,omitempty"`
	Node        string            `json:"node,omitempty"`
	ImageDigest string            `json:"image_digest,omitempty"`
	Accel       string            `json:"accel,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	StartedAt   time.Time         `json:"started_at"`
	FinishedAt  time.Time         `json:"finished_at"`
	Events      []Event           `json:"events,omitempty"`  // every transition, with time and reason
	Runtime     map[string]string `json:"runtime,omitempty"` // free-form node-side details, set by the runtime
	// Owner is the ID of the token that created the sandbox ("" for the dev token).
	Owner string `json:"owner,omitempty"`
	// Restarts counts how many times the control plane re-ran the sandbox.
	Restarts int `json:"restarts,omitempty"`
	// StopRequestedAt is set when a user asked for the sandbox to stop: the node stops it
	// (SIGTERM, then a kill after StopGrace) and the restart policy no longer applies.
	StopRequestedAt time.Time     `json:"stop_requested_at,omitzero"`
	StopGrace       time.Duration `json:"stop_grace,omitempty"`
	// StopReason, set with a stop the control plane asked for (a sandbox group's), is
	// the reason its end records instead of the node's ("stopped by request"); with
	// StopFails the end is a failure (a group that a sidecar failed).
	StopReason string `json:"stop_reason,omitempty"`
	StopFails  bool   `json:"stop_fails,omitempty"`
	// AccessToken opens the sandbox's private ports through the ingress (header
	// Fireworks-Access-Token). Made at creation; shown only to its owner and admins.
	AccessToken string `json:"access_token,omitempty"`
	// PauseRequestedAt is set when a user asked for the running sandbox to be paused: its
	// node saves it and reports it paused. A resume clears it.
	PauseRequestedAt time.Time `json:"pause_requested_at,omitzero"`
	// PausedFor, set with the pause request, names the call that paused the sandbox for
	// its save and resumes it when done (a fork, a snapshot with memory): a leader that
	// finds one paused with no such call running (the server that made it went down)
	// resumes it. A resume or the end clears it.
	PausedFor string `json:"paused_for,omitempty"`
	// Resumes counts the resumes: each is a new run of the sandbox on its node (reports
	// from the run before the pause must not land on it).
	Resumes int `json:"resumes,omitempty"`
	// Saved is where the sandbox's saved state is while it is paused or resuming; nil
	// otherwise.
	Saved *Saved `json:"saved,omitempty"`
	// Migration is the live migration in progress, if any; Migrations the ones that
	// ended (the latest few).
	Migration  *Migration  `json:"migration,omitempty"`
	Migrations []Migration `json:"migrations,omitempty"`
	// EndAt is when the sandbox's lifetime ends (Spec.Lifetime from its creation or
	// last resume, or as Update.EndAt last set it); zero: no end. The leader stops or
	// pauses it then (Spec.OnEnd).
	EndAt time.Time `json:"end_at,omitzero"`
}

// Saved describes a paused sandbox's saved state: on which node (and its address, where
// another node resuming it fetches it), how large, when taken.
type Saved struct {
	Node    string    `json:"node"`
	Address string    `json:"address,omitempty"`
	Bytes   int64     `json:"bytes"`
	At      time.Time `json:"at"`
}

// Update is a partial change to a sandbox. Nil pointers leave fields alone.
type Update struct {
	// Status, if set, is validated against the lifecycle and, when it changes, appended
	// to Events with Time and Reason. Setting the current status again is a no-op.
	Status *Status `json:"status,omitempty"`
	// Reason goes with a status change; it is ignored when the status does not change so
	// that the first reason for a state (usually the root cause) is kept.
	Reason   string  `json:"reason,omitempty"`
	ExitCode *int    `json:"exit_code,omitempty"`
	Signal   *int    `json:"signal,omitempty"`
	Node     *string `json:"node,omitempty"`
	// ImageDigest and Accel are what the runtime actually used.
	ImageDigest *string `json:"image_digest,omitempty"`
	Accel       *string `json:"accel,omitempty"`
	// Runtime is merged into Sandbox.Runtime; an empty value deletes the key.
	Runtime map[string]string `json:"runtime,omitempty"`
	// Restart re-runs the sandbox: it must come with Status pending, is allowed from any
	// status (even a final one), clears the node and exit details and counts a restart.
	Restart bool `json:"restart,omitempty"`
	// StopGrace, when set, records a user's stop request (at Time) with this grace;
	// StopReason and StopFails go with it (see Sandbox.StopReason).
	StopGrace  *time.Duration `json:"stop_grace,omitempty"`
	StopReason string         `json:"stop_reason,omitempty"`
	StopFails  bool           `json:"stop_fails,omitempty"`
	// IfNode, IfRestarts and IfResumes, when set, make the update apply only to that run
	// of the sandbox (on that node, after that many restarts and resumes): a late report
	// from an earlier run must not land on a new one.
	IfNode     *string `json:"if_node,omitempty"`
	IfRestarts *int    `json:"if_restarts,omitempty"`
	IfResumes  *int    `json:"if_resumes,omitempty"`
	// RequestPause records a user's pause request (at Time) on a running sandbox;
	// PauseFor, with it, the call that resumes it (see Sandbox.PausedFor).
	RequestPause bool   `json:"request_pause,omitempty"`
	PauseFor     string `json:"pause_for,omitempty"`
	// Saved, with Status paused, is the node's record of the state it saved.
	Saved *Saved `json:"saved,omitempty"`
	// CancelPause withdraws a pause request the node refused (nothing changed: the
	// sandbox runs on), with the reason, which inspect shows.
	CancelPause string `json:"cancel_pause,omitempty"`
	// Policy, when set, replaces the sandbox's network policy (Spec.Policy, and
	// Spec.PolicyAdmin from PolicyAdmin).
	Policy      *string `json:"policy,omitempty"`
	PolicyAdmin bool    `json:"policy_admin,omitempty"`
	// PendingReason replaces the reason of a pending sandbox (why it waits, e.g. "no node
	// fits: ...") without an event; ignored in any other status.
	PendingReason *string `json:"pending_reason,omitempty"`
	// StartMigration begins a live migration of the running sandbox; CommitMigration
	// (its ID, with MigrationStats) commits its switch-over: the sandbox is on the
	// target from here; EndMigration (its ID, with Reason) ends it without: the sandbox
	// stays on the source. See Migration.
	StartMigration  *Migration      `json:"start_migration,omitempty"`
	CommitMigration string          `json:"commit_migration,omitempty"`
	EndMigration    string          `json:"end_migration,omitempty"`
	MigrationStats  *MigrationStats `json:"migration_stats,omitempty"`
	// MigrationBy, with a commit or an end, is the node writing it: the commit applies
	// only if it is the migration's target, the end only if it takes part.
	MigrationBy string `json:"migration_by,omitempty"`
	// EndAt, when set, moves the end of the sandbox's lifetime (a zero time: no end).
	EndAt *time.Time `json:"end_at,omitempty"`
	// Time is when the change happened (required). It is an input rather than read by the
	// FSM so that every replica, and every replay, computes the same state.
	Time time.Time `json:"time"`
}

// NewID returns a random sandbox ID: 16 hex characters (64 bits), short enough to type
// and, with prefix lookup, collision-free in practice. The FSM still rejects duplicates.
//
// Its first 12 characters (the short ID, and the guest's default hostname) always hold
// a letter: a name of digits only is a number to the resolver (glibc never looks it up
// in /etc/hosts), so `getent hosts $(hostname)` would fail in ~0.4% of sandboxes.
func NewID() string {
	for {
		var b [8]byte
		_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (it aborts the program instead)
		id := hex.EncodeToString(b[:])
		if strings.Trim(id[:12], "0123456789") != "" {
			return id
		}
	}
}

// clone returns a deep copy: the FSM shares stored sandboxes with snapshots in progress and
// hands copies to callers, so nobody may alias its slices or maps.
func (sb *Sandbox) clone() *Sandbox {
	c := *sb
	c.Spec.Entrypoint = slices.Clone(sb.Spec.Entrypoint)
	c.Spec.Cmd = slices.Clone(sb.Spec.Cmd)
	c.Spec.Env = slices.Clone(sb.Spec.Env)
	c.Spec.InsecureRegistries = slices.Clone(sb.Spec.InsecureRegistries)
	c.Events = slices.Clone(sb.Events)
	c.Runtime = maps.Clone(sb.Runtime)
	c.Spec.Constraints = slices.Clone(sb.Spec.Constraints)
	c.Spec.Ports = slices.Clone(sb.Spec.Ports)
	c.Spec.Group = sb.Spec.Group.clone()
	if sb.Saved != nil {
		saved := *sb.Saved
		c.Saved = &saved
	}
	if sb.Migration != nil {
		m := *sb.Migration
		c.Migration = &m
	}
	c.Migrations = slices.Clone(sb.Migrations)
	c.Spec.Metadata = maps.Clone(sb.Spec.Metadata)
	return &c
}

// normalize puts every time in UTC without a monotonic reading, so that the value a
// caller passed and the value decoded from the log or a snapshot compare equal.
func (sb *Sandbox) normalize() {
	sb.CreatedAt = utc(sb.CreatedAt)
	sb.StartedAt = utc(sb.StartedAt)
	sb.FinishedAt = utc(sb.FinishedAt)
	sb.StopRequestedAt = utc(sb.StopRequestedAt)
	sb.PauseRequestedAt = utc(sb.PauseRequestedAt)
	sb.EndAt = utc(sb.EndAt)
	if sb.Saved != nil {
		sb.Saved.At = utc(sb.Saved.At)
	}
	if m := sb.Migration; m != nil {
		m.Started, m.Deadline = utc(m.Started), utc(m.Deadline)
	}
	for i := range sb.Migrations {
		m := &sb.Migrations[i]
		m.Started, m.Deadline, m.Ended = utc(m.Started), utc(m.Deadline), utc(m.Ended)
	}
	for i := range sb.Events {
		sb.Events[i].Time = utc(sb.Events[i].Time)
	}
}

func utc(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC()
}

// validateNew checks a sandbox about to be created and fills in what creation implies.
func (sb *Sandbox) validateNew() error {
	if sb.ID == "" {
		return fmt.Errorf("%w: no ID", ErrInvalid)
	}
	if sb.CreatedAt.IsZero() {
		return fmt.Errorf("%w: no creation time", ErrInvalid)
	}
	if sb.Status == "" {
		sb.Status = StatusPending
	}
	if sb.Status != StatusPending {
		return fmt.Errorf("%w: a sandbox is created %s, not %s", ErrInvalid, StatusPending, sb.Status)
	}
	if len(sb.Events) == 0 {
		sb.Events = []Event{{Time: sb.CreatedAt, Status: sb.Status, Reason: "created"}}
	}
	if err := CheckMetadata(sb.Spec.Metadata); err != nil {
		return err
	}
	switch sb.Spec.OnEnd {
	case "", LifetimeStop, LifetimePause:
	default:
		return fmt.Errorf("%w: on-end %q: want %s or %s", ErrInvalid, sb.Spec.OnEnd, LifetimeStop, LifetimePause)
	}
	if sb.Spec.Lifetime < 0 {
		return fmt.Errorf("%w: negative lifetime", ErrInvalid)
	}
	if sb.Spec.Lifetime > 0 && sb.EndAt.IsZero() {
		sb.EndAt = sb.CreatedAt.Add(sb.Spec.Lifetime)
	}
	return nil
}

// Bounds on a sandbox's history in the replicated state: a sandbox restarted forever, or
// reasons quoting a guest's output, must not grow every server's state without end.
const (
	maxEvents      = 64
	maxReasonBytes = 1024
)

// addEvent appends e, keeping the first event (the creation) and the latest ones.
func (sb *Sandbox) addEvent(e Event) {
	e.Reason = boundReason(e.Reason)
	sb.Events = append(sb.Events, e) // sb is a clone: its Events are its own
	if n := len(sb.Events); n > maxEvents {
		sb.Events = append(sb.Events[:1], sb.Events[n-maxEvents+1:]...)
	}
}

// boundReason cuts a status reason to maxReasonBytes.
func boundReason(r string) string {
	if len(r) > maxReasonBytes {
		return r[:maxReasonBytes] + "…"
	}
	return r
}

// apply changes sb in place according to u; on error sb may be partly changed, so callers
// apply to a clone.
func (sb *Sandbox) apply(u Update) error {
	if u.Time.IsZero() {
		return fmt.Errorf("%w: update has no time", ErrInvalid)
	}
	t := utc(u.Time)
	if (u.IfNode != nil && *u.IfNode != sb.Node) || (u.IfRestarts != nil && *u.IfRestarts != sb.Restarts) ||
		(u.IfResumes != nil && *u.IfResumes != sb.Resumes) {
		return fmt.Errorf("%w: report for an earlier run of the sandbox", ErrStaleReport)
	}
	if u.Restart {
		if u.Status == nil || *u.Status != StatusPending {
			return fmt.Errorf("%w: a restart must set status %s", ErrInvalid, StatusPending)
		}
		if !sb.StopRequestedAt.IsZero() {
			return fmt.Errorf("%w: sandbox was stopped by a user, it is not restarted", ErrInvalidTransition)
		}
		sb.Status = StatusPending
		sb.Reason = boundReason(u.Reason)
		sb.addEvent(Event{Time: t, Status: StatusPending, Reason: u.Reason})
		sb.Restarts++
		sb.Node, sb.ExitCode, sb.Signal = "", 0, 0
		sb.StartedAt, sb.FinishedAt = time.Time{}, time.Time{}
		sb.Runtime = nil
		if m := sb.Migration; m != nil {
			sb.endMigration(*m, t, "failed: the sandbox was re-run ("+boundReason(u.Reason)+")")
		}
		u.Status = nil // handled
	}
	if u.Policy != nil {
		if sb.Migration != nil {
			// The target makes its network from the policy as the migration began.
			return fmt.Errorf("%w: sandbox is migrating; change its policy once it is done", ErrInvalidTransition)
		}
		sb.Spec.Policy, sb.Spec.PolicyAdmin = *u.Policy, u.PolicyAdmin
	}
	if u.EndAt != nil {
		if sb.Status.Terminal() {
			return fmt.Errorf("%w: sandbox is %s", ErrInvalidTransition, sb.Status)
		}
		sb.EndAt = utc(*u.EndAt)
	}
	if u.PendingReason != nil && sb.Status == StatusPending {
		sb.Reason = boundReason(*u.PendingReason)
	}
	if u.StopGrace != nil && sb.StopRequestedAt.IsZero() {
		sb.StopRequestedAt, sb.StopGrace = t, *u.StopGrace
		sb.StopReason, sb.StopFails = boundReason(u.StopReason), u.StopFails
		if m := sb.Migration; m != nil {
			// A stop wins over a migration in progress: it cannot commit after this.
			sb.endMigration(*m, t, "failed: the sandbox was stopped")
		}
	}
	if err := sb.applyMigration(u, t); err != nil {
		return err
	}
	if u.RequestPause && sb.PauseRequestedAt.IsZero() {
		switch {
		case sb.Status == StatusPaused:
			// Paused already: nothing to do.
		case sb.Status != StatusRunning:
			return fmt.Errorf("%w: sandbox is %s; only a running sandbox can be paused", ErrInvalidTransition, sb.Status)
		case !sb.StopRequestedAt.IsZero():
			return fmt.Errorf("%w: sandbox is stopping", ErrInvalidTransition)
		case sb.Migration != nil:
			return fmt.Errorf("%w: sandbox is migrating", ErrInvalidTransition)
		default:
			sb.PauseRequestedAt, sb.PausedFor = t, boundReason(u.PauseFor)
		}
	}
	if u.CancelPause != "" && !sb.PauseRequestedAt.IsZero() && sb.Status == StatusRunning {
		sb.PauseRequestedAt, sb.PausedFor = time.Time{}, ""
		if sb.Runtime == nil {
			sb.Runtime = map[string]string{}
		}
		sb.Runtime["pause_refused"] = boundReason(u.CancelPause)
	}
	if u.Saved != nil {
		if u.Status == nil || *u.Status != StatusPaused {
			return fmt.Errorf("%w: saved state comes with status %s", ErrInvalid, StatusPaused)
		}
		if sb.PauseRequestedAt.IsZero() {
			return fmt.Errorf("%w: nobody asked for a pause", ErrInvalidTransition)
		}
	}
	if u.Saved != nil && !sb.StopRequestedAt.IsZero() {
		// A stop came while it was being saved: it is over, as a stop of a paused one.
		exited, code, sig := StatusExited, 128+15, 0
		u.Saved, u.Status, u.ExitCode, u.Signal = nil, &exited, &code, &sig
		u.Reason = "stopped by request while it was being paused"
	}
	if u.Saved != nil {
		saved := *u.Saved
		saved.At = utc(saved.At)
		sb.Saved = &saved
	}
	if u.Status != nil {
		to := *u.Status
		if err := checkTransition(sb.Status, to); err != nil {
			return err
		}
		if to.Terminal() && !sb.StopRequestedAt.IsZero() && sb.StopReason != "" && to != sb.Status {
			// Stopped for a reason of the control plane's: that is how it ended.
			u.Reason = sb.StopReason
			if sb.StopFails {
				to = StatusFailed
			}
		}
		if to != sb.Status {
			sb.Status = to
			sb.Reason = boundReason(u.Reason)
			sb.addEvent(Event{Time: t, Status: to, Reason: u.Reason})
			if to == StatusRunning && sb.Saved == nil {
				sb.StartedAt = t
			}
			if to == StatusRunning || to.Terminal() {
				// Resumed (the node lets its saved state go), or over.
				sb.Saved, sb.PausedFor = nil, ""
			}
			if to.Terminal() {
				sb.FinishedAt = t
				if m := sb.Migration; m != nil {
					sb.endMigration(*m, t, "failed: the sandbox ended ("+string(to)+")")
				}
			}
		}
	}
	if u.ExitCode != nil {
		sb.ExitCode = *u.ExitCode
	}
	if u.Signal != nil {
		sb.Signal = *u.Signal
	}
	if u.Node != nil {
		sb.Node = *u.Node
	}
	if u.ImageDigest != nil {
		sb.ImageDigest = *u.ImageDigest
	}
	if u.Accel != nil {
		sb.Accel = *u.Accel
	}
	for k, v := range u.Runtime {
		if v == "" {
			delete(sb.Runtime, k)
			continue
		}
		if sb.Runtime == nil {
			sb.Runtime = map[string]string{}
		}
		sb.Runtime[k] = v
	}
	if len(sb.Runtime) == 0 {
		sb.Runtime = nil // one representation for "no details", so replays compare equal
	}
	return nil
}

// ValidateEnv rejects malformed entries so a typo is an error, not a silently dropped var.
func ValidateEnv(env []string) error {
	for _, kv := range env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsAny(k, "\x00") {
			return fmt.Errorf("invalid environment entry %q: want KEY=VALUE", kv)
		}
	}
	return nil
}

// Reference prefixes of local image sources: an OCI layout directory (oci:DIR[:TAG]) or
// a `docker save` tarball (docker-archive:FILE[:TAG]), read from the filesystem of the
// process that pulls (so only admins may name them).
const (
	OCIPrefix           = "oci:"
	DockerArchivePrefix = "docker-archive:"
)
