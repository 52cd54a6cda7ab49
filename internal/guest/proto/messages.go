package proto

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"path"
	"strings"
	"time"
)

// Hello opens a connection (host to guest). The host may send it more than
// once until it gets a reply with the same Nonce: a hello written while the
// guest was reopening its port can be discarded by the guest's kernel.
type Hello struct {
	Version int    `json:"version"`
	Nonce   uint64 `json:"nonce"`
}

// HelloReply answers Hello. Version is the version the guest will speak.
type HelloReply struct {
	Version       int    `json:"version"`
	Nonce         uint64 `json:"nonce"`
	InitVersion   string `json:"init_version"`
	KernelRelease string `json:"kernel_release"`
	// Sessions lists the ids of sessions that outlive an earlier
	// connection (running or awaiting reattach), at most MaxHelloSessions
	// of them. The host must not start new sessions with these ids, and
	// may take them back with OpReattach. Guests that predate reattach
	// leave it empty.
	Sessions []uint32 `json:"sessions,omitempty"`
}

// MaxHelloSessions bounds HelloReply.Sessions so that a hello reply stays
// small (the host bounds it by MaxHelloReply).
const MaxHelloSessions = 1024

// MaxHelloReply bounds the payload of a HelloReply as read by the host:
// MaxHelloSessions ids plus the fixed fields.
const MaxHelloReply = 16 << 10

// Request operations.
const (
	OpSetup    = "setup"
	OpSetTime  = "set_time"
	OpPing     = "ping"
	OpShutdown = "shutdown"
	// OpReattach binds a session that outlived its connection to this
	// one. Guests that predate it answer "unknown request op", so it
	// needs no version bump.
	OpReattach = "reattach"
	// OpIdentity gives a set-up guest a new identity: a warm-pool VM set up
	// ahead of time becomes a particular sandbox when a start claims it.
	OpIdentity = "identity"
	// OpKillAll ends every process but init (SIGKILL) and answers once they
	// are gone: a VM prepared ahead of time keeps nothing running from its
	// preparation.
	OpKillAll = "kill_all"
	// OpDetach: the host goes away for a while (the VM is about to be saved whole, to be
	// resumed later): the connection's sessions wait for a reattach with their output
	// held and their stdin left open, and the host gets the answer only once they do,
	// so no output is sent into a connection nobody reads any more.
	OpDetach = "detach"
	// OpFreeze freezes the sandbox's writable filesystem (its scratch disk): writes wait,
	// and what was written is on the disk when the guest answers; OpThaw lets writes go
	// on. The host copies the disk in between (a filesystem snapshot). A guest thaws by
	// itself after FreezeLimit, so a host that went away cannot leave it frozen.
	OpFreeze = "freeze"
	OpThaw   = "thaw"
)

// IdleCommand, as an exec's whole argv, runs init's idle program: a process that waits
// until it is signalled, then exits 0. It is the main process of a sandbox with no
// command of its own (E2B's model: the sandbox lives until stopped; work comes through
// exec and envd). Init runs it as root whatever the request's user.
const IdleCommand = "fireworks-idle"

// BuildCommand, as an exec's argv[0], runs init's template-build helper (initd.Build):
// the steps of an E2B template build that must not depend on the image's tools (copy
// the uploaded files, make the working directory). Init runs it as root.
const BuildCommand = "fireworks-build"

// FreezeLimit bounds how long a guest stays frozen without a thaw.
const FreezeLimit = 60 * time.Second

// Request is a control request (host to guest). Exactly the field that
// matches Op is set.
type Request struct {
	Op       string    `json:"op"`
	Setup    *Setup    `json:"setup,omitempty"`
	SetTime  *SetTime  `json:"set_time,omitempty"`
	Reattach *Reattach `json:"reattach,omitempty"`
	Identity *Identity `json:"identity,omitempty"`
}

// Response answers a Request with the same id. An empty Error means success.
type Response struct {
	Error string `json:"error,omitempty"`
	// Reattached is set on a successful OpReattach.
	Reattached *Reattached `json:"reattached,omitempty"`
}

// Reattach asks the guest to bind Session, a session started on an earlier
// connection, to this connection. The guest keeps a session whose
// connection went away for a grace period (2 minutes by default), holding
// back its output and exit status; after the grace it discards both and
// the session can no longer be reattached.
//
// On success the guest answers with Reattached and then, on this
// connection and under the same session id: the output held back and any
// further output (send credit starts afresh at InitialWindow per stream,
// as for a new session), then the Exit frame. There is no Started frame.
// The session's stdin was closed when its connection went away; the host
// must not send stdin for it.
type Reattach struct {
	Session uint32 `json:"session"`
}

// Reattached describes a reattached session.
type Reattached struct {
	Pid int  `json:"pid"`
	TTY bool `json:"tty,omitempty"`
	// Stdin says the session's stdin is still open (its host detached with OpDetach
	// rather than going away): the new host may write StdinWindow bytes before the
	// guest grants more.
	Stdin       bool `json:"stdin,omitempty"`
	StdinWindow int  `json:"stdin_window,omitempty"`
}

// Setup turns the booted initramfs into the sandbox: it mounts the image
// disk read-only under an overlay whose writable layer lives on the scratch
// disk, switches root into it, and seeds hostname, clock and entropy. The
// guest accepts it once per boot.
type Setup struct {
	Hostname string `json:"hostname"`
	// RootDevice is the block device holding the image, e.g. /dev/vda.
	RootDevice string `json:"root_device"`
	// RootFSType is "ext4" or "erofs".
	RootFSType string `json:"root_fs_type"`
	// ScratchDevice is an ext4-formatted block device for the overlay's
	// upper layer, e.g. /dev/vdb. Empty means a tmpfs upper layer.
	ScratchDevice string `json:"scratch_device,omitempty"`
	// TimeUnixNano sets the guest clock when non-zero.
	TimeUnixNano int64 `json:"time_unix_nano,omitempty"`
	// Entropy is credited to the guest's random pool, then the CRNG is
	// reseeded.
	Entropy []byte `json:"entropy,omitempty"`
	// Env is the base environment of every exec session; ExecRequest.Env
	// entries override it by key.
	Env []string `json:"env,omitempty"`
	// Prefetch names files in the new root to read into the page cache, and
	// directories whose entries to look up (missing ones are skipped;
	// MaxPrefetch bytes at most): a template
	// snapshot taken after Setup then carries them, and restored VMs do
	// not read them from disk.
	Prefetch []string `json:"prefetch,omitempty"`
	// Net configures the guest's network interface; nil leaves the guest
	// without a network (lo stays down).
	Net *NetConfig `json:"net,omitempty"`
	// Nameservers replace /etc/resolv.conf in the new root (see
	// ValidateNameservers); empty leaves the image's file.
	Nameservers []string `json:"nameservers,omitempty"`
	// Envd as in Identity.
	Envd *Envd `json:"envd,omitempty"`
	// Volumes are mounted in the new root, in order, once the network is up.
	Volumes []VolumeMount `json:"volumes,omitempty"`
	// Hosts are names /etc/hosts resolves besides the guest's own (see ValidateHosts):
	// its sandbox group's members.
	Hosts []HostEntry `json:"hosts,omitempty"`
}

// NetConfig is the guest's network: the first ethernet interface (the
// VM's only NIC) gets Address, lo and it are brought up, and the default
// route goes via Gateway. IPv4 only for now.
type NetConfig struct {
	// Address is the interface's address with its prefix, e.g.
	// "169.254.0.21/30".
	Address string `json:"address"`
	// Gateway is the default route's next hop, inside Address's prefix.
	// Empty means no default route.
	Gateway string `json:"gateway,omitempty"`
	// MTU sets the interface's MTU (68..65535); 0 leaves the driver's.
	MTU int `json:"mtu,omitempty"`
}

// MaxNameservers is the most nameservers resolv.conf takes (glibc and musl
// read only the first three).
const MaxNameservers = 3

// Validate checks a network configuration, naming the offending value.
func (n *NetConfig) Validate() error {
	if n == nil {
		return nil
	}
	pfx, err := netip.ParsePrefix(n.Address)
	if err != nil {
		return fmt.Errorf("network address %q: want an IPv4 address with its prefix length, e.g. 169.254.0.21/30", n.Address)
	}
	addr := pfx.Addr()
	if !addr.Is4() {
		return fmt.Errorf("network address %q: only IPv4 is supported", n.Address)
	}
	if pfx.Bits() == 0 || pfx.Bits() == 32 {
		return fmt.Errorf("network address %q: prefix length must be 1..31 (the gateway must be on the link)", n.Address)
	}
	if !unicast4(addr) {
		return fmt.Errorf("network address %q: not a unicast host address", n.Address)
	}
	if pfx.Bits() < 31 && (addr == pfx.Masked().Addr() || addr == broadcast4(pfx)) {
		return fmt.Errorf("network address %q: is the network's or its broadcast address", n.Address)
	}
	if n.Gateway != "" {
		gw, err := netip.ParseAddr(n.Gateway)
		switch {
		case err != nil || !gw.Is4():
			return fmt.Errorf("gateway %q: not an IPv4 address", n.Gateway)
		case !pfx.Contains(gw):
			return fmt.Errorf("gateway %s is outside the interface's network %s", gw, pfx.Masked())
		case gw == addr:
			return fmt.Errorf("gateway %s is the interface's own address", gw)
		case !unicast4(gw) || pfx.Bits() < 31 && (gw == pfx.Masked().Addr() || gw == broadcast4(pfx)):
			return fmt.Errorf("gateway %s: not a unicast host address of %s", gw, pfx.Masked())
		}
	}
	if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
		return fmt.Errorf("MTU %d is outside 68..65535", n.MTU)
	}
	return nil
}

// ValidateNameservers checks nameserver addresses for resolv.conf: at most
// MaxNameservers, each an IPv4 unicast address.
func ValidateNameservers(servers []string) error {
	if len(servers) > MaxNameservers {
		return fmt.Errorf("%d nameservers given; resolvers read at most %d", len(servers), MaxNameservers)
	}
	for _, s := range servers {
		a, err := netip.ParseAddr(s)
		switch {
		case err != nil:
			return fmt.Errorf("nameserver %q is not an IP address", s)
		case !a.Is4():
			return fmt.Errorf("nameserver %q: only IPv4 is supported", s)
		case a.IsUnspecified() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			return fmt.Errorf("nameserver %q is not a unicast address", s)
		}
	}
	return nil
}

func unicast4(a netip.Addr) bool {
	return a.Is4() && !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// broadcast4 is the last address of an IPv4 prefix.
func broadcast4(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	v := binary.BigEndian.Uint32(b[:]) | (1<<(32-p.Bits()) - 1)
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// MaxPrefetch bounds the bytes Setup.Prefetch reads.
const MaxPrefetch = 64 << 20

// Identity makes a guest that is already set up (root mounted) a
// particular sandbox: hostname, the base environment of every later exec
// session, the clock, and fresh entropy (the CRNG is reseeded: VMs restored
// from one snapshot must not share random numbers).
type Identity struct {
	Hostname     string   `json:"hostname"`
	Env          []string `json:"env,omitempty"`
	TimeUnixNano int64    `json:"time_unix_nano,omitempty"`
	Entropy      []byte   `json:"entropy,omitempty"`
	// Nameservers replace /etc/resolv.conf, as in Setup; empty leaves it
	// as it is (and costs nothing).
	Nameservers []string `json:"nameservers,omitempty"`
	// Volumes are mounted, in order, after the rest (see Setup.Volumes).
	Volumes []VolumeMount `json:"volumes,omitempty"`
	// Hosts as in Setup (written with the hostname).
	Hosts []HostEntry `json:"hosts,omitempty"`
	// Envd, if set, has init serve E2B's in-sandbox API (package envd) on the guest's
	// network, port 49983.
	Envd *Envd `json:"envd,omitempty"`
}

// Envd configures the in-sandbox API: the token every call must carry, and the user of
// calls that name none (as an image's USER; "" root).
type Envd struct {
	Token string `json:"token"`
	User  string `json:"user,omitempty"`
	// Env is the environment of the processes envd starts (the sandbox's: its image's
	// and its spec's), over the identity's Env; a call's own variables override it.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory of the processes envd starts that name none (E2B's
	// template working directory); "" the user's home.
	Dir string `json:"dir,omitempty"`
	// NonRoot: envd acts as no user that resolves to uid 0 (the sandbox's runAsNonRoot).
	NonRoot bool `json:"non_root,omitempty"`
}

// MaxEnvdToken bounds Envd.Token.
const MaxEnvdToken = 256

// HostEntry is a name /etc/hosts resolves to an IPv4 address.
type HostEntry struct {
	Name string `json:"name"`
	Addr string `json:"addr"`
}

// MaxHosts bounds Setup.Hosts and Identity.Hosts.
const MaxHosts = 32

// ValidateHosts checks host entries: host names (letters, digits, '-' and '.', at most
// 253 bytes) at unicast IPv4 addresses; nothing that could add another line or field.
func ValidateHosts(hosts []HostEntry) error {
	if len(hosts) > MaxHosts {
		return fmt.Errorf("%d host entries: at most %d", len(hosts), MaxHosts)
	}
	for _, h := range hosts {
		if h.Name == "" || len(h.Name) > 253 || strings.Trim(h.Name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.") != "" {
			return fmt.Errorf("host entry name %q: want letters, digits, '-' and '.'", h.Name)
		}
		if a, err := netip.ParseAddr(h.Addr); err != nil || !unicast4(a) || a.String() != h.Addr {
			return fmt.Errorf("host entry %q: address %q is not a unicast IPv4 address", h.Name, h.Addr)
		}
	}
	return nil
}

// VolumeMount is a volume the guest mounts over NFSv3 from Server:Port (MOUNT and NFS
// on that one port: the guest needs no helper program) at Path. The node serves each
// mount of a sandbox on a port of its own, so that a mount is one connection the node
// can tell apart (a read-only mount's server refuses writes whatever the guest does).
type VolumeMount struct {
	Server   string `json:"server"`
	Port     uint16 `json:"port"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// MaxVolumeMounts bounds a sandbox's volume mounts.
const MaxVolumeMounts = 16

// MaxVolumePath bounds a mount path's length.
const MaxVolumePath = 1024

// ValidateVolumePath checks where a volume is mounted: an absolute, clean path that is
// not the root nor in the kernel's filesystems (/proc, /sys, /dev), which init needs as
// they are.
func ValidateVolumePath(p string) error {
	switch {
	case len(p) > MaxVolumePath:
		return fmt.Errorf("mount path of %d bytes: at most %d", len(p), MaxVolumePath)
	case !path.IsAbs(p) || path.Clean(p) != p || strings.ContainsAny(p, ",:") || strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return fmt.Errorf("mount path %q: want an absolute path without a trailing '/', '.' or '..' parts, ',', ':' or control characters", p)
	case p == "/":
		return fmt.Errorf("mount path %q: a volume cannot be mounted over the root", p)
	}
	for _, sys := range []string{"/proc", "/sys", "/dev"} {
		if p == sys || strings.HasPrefix(p, sys+"/") {
			return fmt.Errorf("mount path %q: %s is the kernel's", p, sys)
		}
	}
	return nil
}

// ValidateVolumes checks a list of mounts: at most MaxVolumeMounts, each path valid and
// used once, each server an IPv4 address, each port its own.
func ValidateVolumes(vs []VolumeMount) error {
	if len(vs) > MaxVolumeMounts {
		return fmt.Errorf("%d volume mounts: at most %d", len(vs), MaxVolumeMounts)
	}
	paths, ports := map[string]bool{}, map[uint16]bool{}
	for _, v := range vs {
		if err := ValidateVolumePath(v.Path); err != nil {
			return err
		}
		if a, err := netip.ParseAddr(v.Server); err != nil || !a.Is4() || !unicast4(a) {
			return fmt.Errorf("volume server %q: want an IPv4 unicast address", v.Server)
		}
		if v.Port == 0 || ports[v.Port] {
			return fmt.Errorf("volume port %d: zero or used twice", v.Port)
		}
		if paths[v.Path] {
			return fmt.Errorf("mount path %q used twice", v.Path)
		}
		paths[v.Path], ports[v.Port] = true, true
	}
	return nil
}

// SetTime sets the guest clock and optionally refreshes its entropy, which
// is what a guest needs after being restored from a snapshot (its clock is
// stale and its CRNG state is shared with every other clone).
type SetTime struct {
	TimeUnixNano int64  `json:"time_unix_nano"`
	Entropy      []byte `json:"entropy,omitempty"`
}

// ExecRequest starts a process in a new session.
type ExecRequest struct {
	// Argv is the command; Argv[0] is looked up in PATH (of the session's
	// environment) unless it contains a slash, like execvp.
	Argv []string `json:"argv"`
	// Env overrides the base environment from Setup by key ("K=V").
	Env []string `json:"env,omitempty"`
	// Dir is the absolute working directory; empty means "/".
	Dir string `json:"dir,omitempty"`
	// CreateDir makes Dir (owned by root, mode 0755) if it does not exist,
	// as Docker does for an image's WORKDIR on run.
	CreateDir bool `json:"create_dir,omitempty"`
	// User is "", "name", "uid", "uid:gid", "name:group" (or mixed), looked
	// up in the guest root's /etc/passwd and /etc/group. Empty means root.
	User string `json:"user,omitempty"`
	// NonRoot refuses to start the process if User resolves to uid 0 (Kubernetes'
	// runAsNonRoot).
	NonRoot bool `json:"non_root,omitempty"`
	// TTY runs the process on a pseudo-terminal: one output stream
	// (TypeStdout) and a controlling terminal sized Rows x Cols.
	TTY  bool   `json:"tty,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// Stdin connects the host's stdin stream; otherwise stdin is /dev/null.
	Stdin bool `json:"stdin,omitempty"`
}

// Started tells the host that the session's process runs.
type Started struct {
	Pid int `json:"pid"`
}

// Signal asks the guest to send a signal to a session's process.
type Signal struct {
	Signal int `json:"signal"`
}

// Resize changes a TTY session's window size.
type Resize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Error kinds of ExitStatus. They let the host report what Docker reports
// distinctly.
const (
	// ErrKindNotFound: argv[0] does not exist (Docker exit code 127).
	ErrKindNotFound = "not_found"
	// ErrKindNotExecutable: argv[0] exists but cannot be executed (126).
	ErrKindNotExecutable = "not_executable"
	// ErrKindSetup: the session could not be prepared (bad user, bad
	// working directory, no pty, ...). It is a Fireworks error, not an exit
	// code of the user's command.
	ErrKindSetup = "setup"
)

// MaxErrLen bounds ExitStatus.Err as kept by the host.
const MaxErrLen = 4096

// ExitStatus ends a session.
type ExitStatus struct {
	// Code is the exit code; 128+n if the process was killed by signal n;
	// 127 for ErrKindNotFound, 126 for ErrKindNotExecutable, -1 for
	// ErrKindSetup.
	Code int `json:"code"`
	// Signal is the signal that killed the process, or 0.
	Signal int `json:"signal,omitempty"`
	// Err describes why the process did not start.
	Err     string `json:"err,omitempty"`
	ErrKind string `json:"err_kind,omitempty"`
}

// Window grants the peer Increment more bytes of send credit on Stream
// (TypeStdin, TypeStdout or TypeStderr) of the frame's session. It is
// encoded as [stream u8][increment u32].
type Window struct {
	Stream    Type
	Increment uint32
}

// WindowSize is the encoded size of a Window.
const WindowSize = 5

// Encode returns the payload of a Window frame.
func (w Window) Encode() []byte {
	b := make([]byte, 0, WindowSize)
	b = append(b, byte(w.Stream))
	return binary.BigEndian.AppendUint32(b, w.Increment)
}

// DecodeWindow parses a Window payload, rejecting anything but a data
// stream and a positive increment.
func DecodeWindow(p []byte) (Window, error) {
	if len(p) != WindowSize {
		return Window{}, fmt.Errorf("window payload has %d bytes, want %d", len(p), WindowSize)
	}
	w := Window{Stream: Type(p[0]), Increment: binary.BigEndian.Uint32(p[1:])}
	switch w.Stream {
	case TypeStdin, TypeStdout, TypeStderr:
	default:
		return Window{}, fmt.Errorf("window for %s: not a data stream", w.Stream)
	}
	if w.Increment == 0 || w.Increment > MaxPayload*16 {
		return Window{}, fmt.Errorf("window increment %d out of range", w.Increment)
	}
	return w, nil
}

// JSONFrame builds a frame with v encoded as JSON.
func JSONFrame(t Type, id uint32, v any) (Frame, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return Frame{}, fmt.Errorf("encoding %s payload: %w", t, err)
	}
	return Frame{Type: t, ID: id, Payload: b}, nil
}

// Decode parses a JSON payload of frame f into v.
func Decode(f Frame, v any) error {
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("decoding %s frame %d: %w", f.Type, f.ID, err)
	}
	return nil
}
