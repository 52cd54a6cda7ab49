// Package vmm is the seam between Fireworks and the virtual machine monitors it drives
// (QEMU today, Firecracker later). One small core interface every driver implements,
// optional capabilities as extra interfaces discovered with a type assertion (the Nomad
// driver pattern), and a shared conformance suite in vmmtest that every driver runs.
//
// Lifetimes: a VM's life never hangs off a request. Create and Start use their context only
// for the setup they do; the VMM process runs until Stop, Kill, the guest powering off, or
// its own death, and it survives the controlling process (Adopt reattaches to it).
package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// ErrNotSupported is returned (wrapped) for operations a driver cannot do.
var ErrNotSupported = errors.New("operation not supported by this VMM driver")

// Disk is a raw disk image attached as a virtio block device, in order (/dev/vda, vdb, ...).
type Disk struct {
	Path     string
	ReadOnly bool
}

// Spec describes one VM.
type Spec struct {
	// ID names the VM in logs and in the VMM's process title.
	ID string
	// Dir is the VM's private run directory: control sockets, console.log, the VMM's
	// command line, its pid. Drivers persist there what Adopt needs. Unix socket paths
	// are limited to 107 bytes, so keep it short.
	Dir string
	// Kernel is an uncompressed PVH ELF kernel, Initrd an initramfs, Cmdline the kernel
	// command line.
	Kernel, Initrd, Cmdline string
	VCPUs                   int
	MemoryMiB               int
	Disks                   []Disk
	// AgentSocket is a unix socket the host listens on; the VMM connects to it and carries
	// the guest agent's channel (a virtio-serial port named "fireworks.0" under QEMU). The
	// VMM reconnects if the host side goes away, so a restarted host can listen again.
	AgentSocket string
	// MemoryFile, when set, backs guest RAM with this file, mapped shared: what the guest
	// writes lands in it. That is what lets Snapshotter save a VM without copying its
	// memory: the file is the snapshot's memory once the VM is stopped. With Restore (a
	// whole save), the VM only flattens (see Flattener): it never runs.
	MemoryFile string
	// NICs are the VM's network interfaces, in order (the guest's eth0, eth1, ...). A
	// spec without NICs gives a VM with no network device at all.
	//
	// A VM with a NIC and one without are different device sets: a snapshot (template)
	// of one cannot restore as the other, so templates with and without a network are
	// kept apart.
	NICs []NIC
	// Restore, when set, starts the VM from a snapshot instead of booting the kernel. The
	// rest of the spec (kernel, shape, disks in order and their read-only flags, the
	// number of NICs) must be what the snapshotted VM had; disk paths may differ (a fresh
	// scratch disk per VM), and so may the taps (a fresh tap per VM). The guest keeps the
	// MAC addresses it had when it was saved.
	Restore *Snapshot
}

// NIC is a virtio network interface backed by a tap.
type NIC struct {
	// Tap is an open tap queue (see network.OpenTap: IFF_TAP|IFF_NO_PI|IFF_VNET_HDR). The
	// VMM gets its own copy of the descriptor when it is launched; the caller keeps
	// ownership of this one, must keep it open until Start (or Prestart) has returned,
	// and closes it after that.
	Tap *os.File
	// MAC is the guest's hardware address: a unicast address, by convention locally
	// administered (02:...). Nil lets the VMM choose.
	MAC net.HardwareAddr
}

// Snapshot is a saved VM: guest RAM and the VMM's device state. Restored VMs map the memory
// file copy-on-write (private), so any number of them share one file and none can change
// it; the files must never be rewritten in place. A snapshot without MemoryFile holds the
// guest's RAM in StateFile (written by Saver): a restore reads it all into the VM's own
// memory.
type Snapshot struct {
	MemoryFile string
	StateFile  string
	// Stream, instead of StateFile, is a live migration's incoming stream (see
	// Migrator): Start reads it until the VM is whole, calls BeforeResume, and only if
	// that returns nil lets the guest run; otherwise the VM is ended (the source may run
	// on: there must never be two).
	Stream       io.Reader
	BeforeResume func(ctx context.Context) error
	// ReceiveDisks, with Stream, has the target take its writable disks' content from
	// the source, which mirrors them (MigrateOptions.DialDisks) instead of sharing the
	// files (another node): Start serves the disks, before it reads the stream, and
	// calls ReceiveDisks with the way to reach that service. The target's disks must be
	// as large as the source's; what they hold is overwritten.
	ReceiveDisks func(dial DialFunc)
}

// DialFunc opens a connection to a service a VM offers (a migration's disk service).
type DialFunc func(ctx context.Context) (net.Conn, error)

// Prestarter is implemented by VMs that can launch their VMM ahead of time: Prestart
// starts the VMM process and readies it (for a restore: ready to load Spec.Restore) with
// the guest not yet running; a later Start only loads the state and lets the guest run.
// What it saves is the VMM's own start-up (tens of ms), not guest work.
type Prestarter interface {
	Prestart(ctx context.Context) error
}

// SocketSharer is implemented by drivers whose VMMs run as users other than the host
// process's (jailed): a unix socket the host listens on for a VMM to connect to must be
// shared with them first (e.g. group-writable to the VMMs' group).
type SocketSharer interface {
	ShareSocket(path string) error
}

// CgroupSweeper is implemented by drivers that put VMMs in cgroups of their own: at a
// host process's start, SweepCgroups ends whatever runs in the cgroups of VMs it did not
// take back (keep says which), and removes them. A VMM its guest took over could change
// its command line to escape a sweep by process; not one by cgroup.
type CgroupSweeper interface {
	SweepCgroups(keep func(vmID string) bool)
}

// ShareSocket shares path with d's VMMs if d needs it.
func ShareSocket(d Driver, path string) error {
	if s, ok := d.(SocketSharer); ok {
		return s.ShareSocket(path)
	}
	return nil
}

// Snapshotter is implemented by VMs that can be saved. The VM must have been created with
// Spec.MemoryFile.
type Snapshotter interface {
	// Snapshot stops the guest's vCPUs and writes the device state to stateFile; guest
	// memory is Spec.MemoryFile as it stands. The VM stays stopped for good (resuming it
	// would change the snapshot's memory): the caller ends it after the save.
	Snapshot(ctx context.Context, stateFile string) error
}

// Saver is implemented by VMs that can be saved whole: Save stops the guest's vCPUs and
// writes its RAM and the device state to stateFile (a Snapshot without MemoryFile
// restores it), flushing its disks. As after Snapshot, the VM stays stopped for good: its
// disks belong to the saved state now; the caller ends it after the save. It works on
// any VM of the driver (booted, restored, with or without a memory file).
type Saver interface {
	Save(ctx context.Context, stateFile string) error
}

// Flattener is implemented by VMs that turn a whole save into a snapshot with a memory
// file: the VM is created with Spec.Restore a whole save (no MemoryFile) and
// Spec.MemoryFile the file to fill; Flatten loads the save into that file and writes the
// device state to stateFile, without ever running the guest, and ends the VMM. The result
// (Snapshot{MemoryFile, StateFile}) restores as templates do: any number of VMs map the
// one memory file copy-on-write, where each restore of the whole save would load all of
// its RAM into memory of its own (forks, snapshots with memory).
type Flattener interface {
	Flatten(ctx context.Context, stateFile string) error
}

// Migrator is implemented by VMs that can be migrated live: MigrateOut streams the
// running VM into w, pre-copy (its RAM while the guest runs, then a short stop for what
// changed since and the device state), and returns with the VM stopped but not ended:
// the caller ends it once the target runs, or resumes it (Pauser) if the target failed.
// The target is a VM of the same spec whose Restore.Stream reads w's bytes. Disks are
// not in the stream: the target opens the source's very files (one node), or the source
// mirrors them into the target's (MigrateOptions.DialDisks, Snapshot.ReceiveDisks) while
// the guest runs, in step with its writes once copied, and the stream's end waits for
// the mirror to be whole.
type Migrator interface {
	MigrateOut(ctx context.Context, w io.Writer, opts MigrateOptions) (MigrationStats, error)
}

// MigrateOptions tune a MigrateOut.
type MigrateOptions struct {
	// DialDisks reaches the target's disk service (Snapshot.ReceiveDisks), once per
	// connection the source's VMM opens; nil: the target shares the source's disk files.
	DialDisks DialFunc
}

// MigrationStats are what a live migration took.
type MigrationStats struct {
	Bytes     int64         // sent: RAM and device state
	DiskBytes int64         // sent by the disk mirror
	Downtime  time.Duration // the guest stopped, as the VMM measured it
	Total     time.Duration
	// Stopped is when the guest stopped for the switch-over (host clock): the target's
	// guest runs from the caller's switch-over on, which ends the downtime.
	Stopped time.Time
	// Mirrored is when the disk mirror was in step and the RAM copy began, and
	// MirrorEnded when, the guest stopped, the mirror had ended in step (both zero: no
	// disks mirrored). With Stopped they say where a migration's time went.
	Mirrored, MirrorEnded time.Time
}

// Info describes a started VM.
type Info struct {
	PID         int
	Accel       string
	ConsoleLog  string
	CmdlineFile string
}

// Driver creates and adopts VMs of one VMM kind.
type Driver interface {
	// Name is the driver's name, e.g. "qemu".
	Name() string
	// Accel is the accelerator its VMs run with, e.g. "kvm" or "tcg".
	Accel() string
	// Create validates spec and prepares the VM without starting it.
	Create(ctx context.Context, spec Spec) (VM, error)
	// Adopt reattaches to a VMM that a previous process started in dir (after a host
	// process restart), from what Create and Start persisted there.
	Adopt(ctx context.Context, dir string) (VM, error)
}

// VM is one virtual machine.
type VM interface {
	ID() string
	// Start launches the VMM and returns once the guest is running. ctx bounds only the
	// launch; cancelling it later does not affect the VM.
	Start(ctx context.Context) error
	// Stop ends the VM, asking the VMM to quit and escalating to signals if it does not
	// within grace. It returns once the VMM is gone (or ctx ends).
	Stop(ctx context.Context, grace time.Duration) error
	// Kill ends the VMM at once (SIGKILL) and does not wait; use Wait.
	Kill() error
	// Wait is closed when the VMM process has ended, however it ended.
	Wait() <-chan struct{}
	// ExitError says why the VM ended: nil while it runs and after a clean end (the guest
	// powered off, or Stop succeeded without force); otherwise an *ExitError.
	ExitError() error
	Info() Info
}

// Pauser is implemented by drivers that can freeze and thaw a VM's vCPUs.
type Pauser interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
}

// Detacher is implemented by VMs whose host-side handles (control connections, watchers) can
// be released while the VM keeps running, so another process (or a test) can Adopt it.
// An agent that shuts down without stopping its VMs detaches them.
type Detacher interface {
	Detach() error
}

// ExitError describes an unclean end of a VM.
type ExitError struct {
	// Reason is a short human-readable cause, e.g. "guest reset (kernel panic or reboot)"
	// or "VMM killed by signal SIGKILL".
	Reason string
	// Code is the VMM's exit code, -1 if it was killed by a signal or is unknown.
	Code int
	// Signal is the signal that killed the VMM, 0 if none or unknown.
	Signal syscall.Signal
	// ConsoleTail is the end of the guest's serial console log.
	ConsoleTail string
}

func (e *ExitError) Error() string {
	var b strings.Builder
	b.WriteString(e.Reason)
	if tail := strings.TrimSpace(e.ConsoleTail); tail != "" {
		fmt.Fprintf(&b, "; console log ends with:\n%s", tail)
	}
	return b.String()
}

// Limits bound the resources of one VM.
type Limits struct {
	MaxVCPUs     int
	MinMemoryMiB int
	MaxMemoryMiB int
}

// Validate checks a spec's resources and paths against limits, with errors that name the
// offending value and the allowed range.
func (l Limits) Validate(s Spec) error {
	var errs []error
	if s.ID == "" {
		errs = append(errs, errors.New("VM id is empty"))
	}
	if s.Dir == "" {
		errs = append(errs, errors.New("VM run directory is empty"))
	}
	if s.Kernel == "" {
		errs = append(errs, errors.New("no kernel given"))
	}
	if s.VCPUs < 1 || s.VCPUs > l.MaxVCPUs {
		errs = append(errs, fmt.Errorf("vcpus %d is outside 1..%d (this host's limit)", s.VCPUs, l.MaxVCPUs))
	}
	if s.MemoryMiB < l.MinMemoryMiB || s.MemoryMiB > l.MaxMemoryMiB {
		errs = append(errs, fmt.Errorf("memory %d MiB is outside %d..%d MiB (this host's limit)", s.MemoryMiB, l.MinMemoryMiB, l.MaxMemoryMiB))
	}
	for i, n := range s.NICs {
		if err := n.validate(); err != nil {
			errs = append(errs, fmt.Errorf("nic %d: %w", i, err))
		}
	}
	return errors.Join(errs...)
}

func (n NIC) validate() error {
	if n.Tap == nil {
		return errors.New("no tap given")
	}
	if fi, err := n.Tap.Stat(); err != nil {
		return fmt.Errorf("tap %s: %w", n.Tap.Name(), err)
	} else if fi.Mode()&os.ModeCharDevice == 0 {
		return fmt.Errorf("tap %s is not a tun/tap character device", n.Tap.Name())
	}
	if n.MAC == nil {
		return nil
	}
	if len(n.MAC) != 6 {
		return fmt.Errorf("MAC %s is not a 6-byte ethernet address", n.MAC)
	}
	if n.MAC[0]&1 != 0 {
		return fmt.Errorf("MAC %s is a multicast address", n.MAC)
	}
	if bytes.Equal(n.MAC, make([]byte, 6)) {
		return fmt.Errorf("MAC %s is all zeros", n.MAC)
	}
	return nil
}
