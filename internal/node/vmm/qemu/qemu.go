// Package qemu is the reference vmm driver: qemu-system-x86_64 -M microvm booting a PVH
// kernel directly, controlled over QMP, with the guest agent's channel on a virtio-serial
// port whose QEMU side dials the host's unix socket.
//
// Why QEMU dials rather than listens: a guest reading its virtio-serial port gets EOF while
// no host side is connected. With QEMU as the client (reconnect=1) the port is connected as
// soon as the host listens, including after a host restart or a snapshot restore.
package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
)

// Files in a VM's run directory.
const (
	// vmmDir is the part of a run directory the VMM writes: its QMP socket and console
	// log. It is the jailed VMM's own; the run directory itself stays the host's, so a VMM
	// taken over by its guest cannot replace the files the host keeps there (vm.json,
	// net-owner, the guest channel's socket).
	vmmDir      = "vmm"
	qmpSocket   = vmmDir + "/qmp.sock"
	consoleLog  = vmmDir + "/console.log"
	cmdlineFile = "qemu.cmdline"
	stderrFile  = "qemu.stderr"
	pidFile     = "qemu.pid"
	stateFile   = "vm.json"
	// migrateSocket is where Snapshot listens for QEMU's migration stream (QEMU's seccomp
	// sandbox forbids exec: URIs, and a socket needs no fd passing over QMP).
	migrateSocket = "migrate.sock"
	// mirrorSocket is where MigrateOut listens for the connections its VMM opens to
	// mirror the disks to the target (each is carried to the target by the caller);
	// nbdSocket is where a migration's target serves its disks for that mirror.
	mirrorSocket = "mirror.sock"
	nbdSocket    = vmmDir + "/nbd.sock"
)

// restoreFD is the descriptor a restored QEMU reads its device state from (-incoming fd:3,
// the first of exec.Cmd's ExtraFiles).
const restoreFD = 3

// tapFD is the descriptor QEMU finds NIC i's tap on: the ExtraFiles after the restore's
// state file, if any.
func tapFD(s vmm.Spec, i int) int {
	if s.Restore != nil {
		return restoreFD + 1 + i
	}
	return restoreFD + i
}

// maxSocketPath is the longest unix socket path the kernel accepts (sun_path is 108 bytes
// including the terminating NUL).
const maxSocketPath = 107

// Config configures the driver.
type Config struct {
	// Accel is "kvm" or "tcg" (see vmm.DetectAccel). Required.
	Accel string
	// Binary is the QEMU executable; default qemu-system-x86_64 from PATH.
	Binary string
	// CPU is the -cpu model; default "host" under KVM and "qemu64" under TCG, measured
	// ~0.5 s faster to boot than "max" (whose 5-level paging TCG emulates slowly). Images
	// built for x86-64-v2 need e.g. "max,la57=off" instead.
	CPU string
	// Limits bound each VM; zero values are derived from the host (all its CPUs, 64 MiB to
	// its total memory).
	Limits vmm.Limits
	// ConsoleLogMax bounds console.log: when it grows past this, it is cut down to its last
	// quarter. The guest writes the console, so it is untrusted output. Default 8 MiB.
	ConsoleLogMax int64
	// TCGCacheMiB, under TCG, is each VM's translation cache (tb-size); 0 is QEMU's
	// default (1 GiB).
	TCGCacheMiB int
	// Jail, when set, runs every QEMU jailed (see JailConfig); nil runs it as this
	// process's user, confined by QEMU's seccomp filter only.
	Jail   *JailConfig
	Logger *slog.Logger
}

// Driver is the QEMU driver.
type Driver struct {
	cfg  Config
	log  *slog.Logger
	uids uids // the jail users of live VMs
	// version is QEMU's --version line: device state formats change between releases,
	// so templates record it.
	version string

	cgroupWarn sync.Once
}

var _ vmm.Driver = (*Driver)(nil)

// New returns a driver. It checks that QEMU is installed.
func New(cfg Config) (*Driver, error) {
	if cfg.Accel != "kvm" && cfg.Accel != "tcg" {
		return nil, fmt.Errorf("qemu driver: accelerator %q is neither kvm nor tcg", cfg.Accel)
	}
	if cfg.Binary == "" {
		cfg.Binary = "qemu-system-x86_64"
	}
	bin, err := lookPath(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu driver: %s not found (apt-get install qemu-system-x86): %w", cfg.Binary, err)
	}
	version, err := checkVersion(bin)
	if err != nil {
		return nil, fmt.Errorf("qemu driver: %w", err)
	}
	if cfg.CPU == "" {
		cfg.CPU = "qemu64"
		if cfg.Accel == "kvm" {
			cfg.CPU = "host"
		}
	}
	if cfg.Limits.MaxVCPUs == 0 {
		cfg.Limits.MaxVCPUs = runtime.NumCPU()
	}
	if cfg.Limits.MinMemoryMiB == 0 {
		cfg.Limits.MinMemoryMiB = 64
	}
	if cfg.Limits.MaxMemoryMiB == 0 {
		cfg.Limits.MaxMemoryMiB = hostMemoryMiB()
	}
	if cfg.ConsoleLogMax == 0 {
		cfg.ConsoleLogMax = 8 << 20
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	d := &Driver{cfg: cfg, log: cfg.Logger.With("driver", "qemu"), version: version}
	if cfg.Accel == "tcg" {
		d.log.Warn("guests run under TCG software emulation: boots take seconds and CPU-bound work is several times slower")
	}
	return d, nil
}

// minVersion is the oldest QEMU the driver runs: 8.2 is the first whose memory-backend-file
// maps a file it opened read-only as private guest RAM (readonly=on,rom=off). Older ones
// open a template's memory read-write, so a VMM taken over by its guest could change the
// memory of every running VM restored from the same template.
var minVersion = [2]int{8, 2}

// checkVersion runs bin --version and refuses a QEMU older than minVersion, saying how to
// get a newer one. It returns the version line.
func checkVersion(bin string) (string, error) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", bin, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	line = strings.TrimSpace(line)
	major, minor, ok := parseVersion(line)
	if !ok {
		return "", fmt.Errorf("%s --version said %q: no QEMU version in it", bin, line)
	}
	if major < minVersion[0] || major == minVersion[0] && minor < minVersion[1] {
		return "", fmt.Errorf("%s is QEMU %d.%d; Fireworks needs %d.%d or later (restored VMs must map template memory their VMM cannot write). "+
			"On Debian 12: apt-get install -t bookworm-backports qemu-system-x86 (scripts/install-deps.sh does it)",
			bin, major, minor, minVersion[0], minVersion[1])
	}
	return line, nil
}

// parseVersion reads "QEMU emulator version 10.0.2 (Debian ...)".
func parseVersion(line string) (major, minor int, ok bool) {
	_, rest, found := strings.Cut(line, "version ")
	if !found {
		return 0, 0, false
	}
	num, _, _ := strings.Cut(rest, " ")
	parts := strings.SplitN(num, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	return major, minor, err1 == nil && err2 == nil
}

// Version is QEMU's --version line.
func (d *Driver) Version() string { return d.version }

// Name implements vmm.Driver.
func (d *Driver) Name() string { return "qemu" }

// Accel implements vmm.Driver.
func (d *Driver) Accel() string { return d.cfg.Accel }

// accelArg is QEMU's -accel value: the accelerator, under TCG with its cache size.
func (d *Driver) accelArg() string {
	if d.cfg.Accel == "tcg" && d.cfg.TCGCacheMiB > 0 {
		return "tcg,tb-size=" + strconv.Itoa(d.cfg.TCGCacheMiB)
	}
	return d.cfg.Accel
}

// Create implements vmm.Driver.
func (d *Driver) Create(ctx context.Context, spec vmm.Spec) (vmm.VM, error) {
	if err := d.validate(spec); err != nil {
		return nil, fmt.Errorf("create VM %s: %w", spec.ID, err)
	}
	if err := os.MkdirAll(filepath.Join(spec.Dir, vmmDir), 0o700); err != nil {
		return nil, fmt.Errorf("create VM %s: run directory: %w", spec.ID, err)
	}
	args := d.args(spec)
	var b strings.Builder
	b.WriteString(d.cfg.Binary + "\n")
	for _, a := range args {
		b.WriteString(a + "\n")
	}
	if err := os.WriteFile(filepath.Join(spec.Dir, cmdlineFile), []byte(b.String()), 0o600); err != nil {
		return nil, fmt.Errorf("create VM %s: write command line: %w", spec.ID, err)
	}
	v := newVM(d, spec.ID, spec.Dir, args)
	v.spec = spec
	v.memFile = spec.MemoryFile
	for _, n := range spec.NICs {
		v.taps = append(v.taps, n.Tap)
	}
	if spec.Restore != nil {
		v.restoreFrom = spec.Restore.StateFile
		if spec.Restore.Stream != nil {
			v.restoreFrom = "the incoming live migration"
		}
	}
	return v, nil
}

func (d *Driver) validate(s vmm.Spec) error {
	if err := d.cfg.Limits.Validate(s); err != nil {
		return err
	}
	var errs []error
	for what, p := range map[string]string{"kernel": s.Kernel, "initrd": s.Initrd} {
		if p == "" && what == "initrd" {
			continue
		}
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			errs = append(errs, fmt.Errorf("%s %s is not a readable file", what, p))
		}
	}
	for i, disk := range s.Disks {
		if fi, err := os.Stat(disk.Path); err != nil || !fi.Mode().IsRegular() {
			errs = append(errs, fmt.Errorf("disk %d: %s is not a file", i, disk.Path))
		}
	}
	if s.AgentSocket == "" {
		errs = append(errs, errors.New("no agent socket given"))
	}
	if s.Restore != nil {
		if s.MemoryFile != "" && s.Restore.MemoryFile != "" {
			errs = append(errs, errors.New("a VM restored from a memory file cannot also keep its memory in a file (only a whole save is flattened into one)"))
		}
		if s.Restore.Stream != nil {
			if s.Restore.StateFile != "" || s.Restore.MemoryFile != "" || s.MemoryFile != "" {
				errs = append(errs, errors.New("a live migration's incoming VM restores from its stream only"))
			}
		} else if s.Restore.MemoryFile == "" {
			// A whole-VM save (Saver): the RAM is in the state file.
		} else if fi, err := os.Stat(s.Restore.MemoryFile); err != nil || !fi.Mode().IsRegular() {
			errs = append(errs, fmt.Errorf("snapshot memory %s is not a readable file", s.Restore.MemoryFile))
		} else if fi.Size() != int64(s.MemoryMiB)<<20 {
			// QEMU would grow the file to fit, i.e. write to a shared snapshot.
			errs = append(errs, fmt.Errorf("snapshot memory %s holds %d bytes, not the %d MiB this VM has", s.Restore.MemoryFile, fi.Size(), s.MemoryMiB))
		}
		if fi, err := os.Stat(s.Restore.StateFile); s.Restore.Stream == nil && (err != nil || !fi.Mode().IsRegular()) {
			errs = append(errs, fmt.Errorf("snapshot state %s is not a readable file", s.Restore.StateFile))
		}
	}
	if s.MemoryFile != "" {
		if fi, err := os.Stat(filepath.Dir(s.MemoryFile)); err != nil || !fi.IsDir() {
			errs = append(errs, fmt.Errorf("memory file directory %s does not exist", filepath.Dir(s.MemoryFile)))
		}
		if len(filepath.Join(s.Dir, mirrorSocket)) > maxSocketPath {
			errs = append(errs, fmt.Errorf("run directory %s is too long for the migration socket", s.Dir))
		}
	}
	for _, p := range []string{filepath.Join(s.Dir, qmpSocket), s.AgentSocket} {
		if len(p) > maxSocketPath {
			errs = append(errs, fmt.Errorf("socket path %s is %d bytes, longer than the %d unix sockets allow (use a shorter run directory)", p, len(p), maxSocketPath))
		}
	}
	if strings.ContainsRune(s.Cmdline, '\n') {
		errs = append(errs, errors.New("kernel command line contains a newline"))
	}
	return errors.Join(errs...)
}

// args builds QEMU's command line. Paths are escaped for QEMU's option syntax (a comma in a
// value is written twice).
func (d *Driver) args(s vmm.Spec) []string {
	esc := func(p string) string { return strings.ReplaceAll(p, ",", ",,") }
	// No i8254 PIT and no i8259 PIC: the guest keeps time with the TSC and the local APIC
	// and takes interrupts through the IOAPIC. Under QEMU 10's TCG the PIT, left to the
	// PIC before the kernel programs it, delivers a tick on vector 0 that the guest takes
	// as a divide error early in boot (most boots panicked); and two devices less is
	// less emulated surface for a guest to attack.
	machine := "microvm,acpi=on,pit=off,pic=off"
	// Guest RAM is always the backend object mem0, anonymous unless in a file: a save's
	// stream names RAM blocks by their object, so a VM saved whole (Saver) restores only
	// into a VM whose RAM has the same name, whichever way the saved one started.
	memObj := []string{"-object", "memory-backend-ram,id=mem0,size=" + strconv.Itoa(s.MemoryMiB) + "M"}
	machine += ",memory-backend=mem0"
	if s.MemoryFile != "" || (s.Restore != nil && s.Restore.MemoryFile != "") {
		// Guest RAM in a named file: shared while a template VM fills it, private
		// (copy-on-write over the page cache) in restored VMs. The x-ignore-shared
		// migration capability (set over QMP on both sides: it changes the stream's
		// format) keeps such RAM out of the device state.
		//
		// A restored VM's QEMU opens the template's memory read-only (readonly=on) and
		// still lets its guest write its private copy (rom=off): the file is shared by
		// every VM restored from the template, and a VMM taken over by its guest must not
		// be able to change what the others read.
		obj := "memory-backend-file,id=mem0,size=" + strconv.Itoa(s.MemoryMiB) + "M,mem-path=" + esc(s.MemoryFile) + ",share=on"
		if s.Restore != nil && s.Restore.MemoryFile != "" {
			obj = "memory-backend-file,id=mem0,size=" + strconv.Itoa(s.MemoryMiB) + "M,mem-path=" + esc(s.Restore.MemoryFile) + ",share=off,readonly=on,rom=off"
		}
		memObj = []string{"-object", obj}
	}
	a := []string{
		"-name", "guest=" + esc(s.ID),
		"-nodefaults", "-no-user-config", "-display", "none",
		// A guest reboot (panic=-1 makes a panic one) ends the VMM instead of rebooting.
		"-no-reboot",
		// Start paused: Start resumes once QMP is attached, so no event is missed.
		"-S",
		// QEMU's seccomp filter: no obsolete syscalls, no privilege changes, no fork/exec,
		// no scheduler or resource changes. (Consequence: migration to exec: URIs is not
		// possible; snapshots must use fd: or a socket.)
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-M", machine,
		"-accel", d.accelArg(),
		"-cpu", d.cfg.CPU,
		"-m", strconv.Itoa(s.MemoryMiB) + "M",
		"-smp", strconv.Itoa(s.VCPUs),
		// Modern (virtio 1.0) transports: virtio-fs needs them, and all drivers in the
		// guest kernel support them.
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", s.Kernel,
	}
	a = append(a, memObj...)
	if s.Restore != nil {
		// Start sets the migration capability, then has QEMU read the device state from
		// an inherited descriptor (migrate-incoming fd:3).
		a = append(a, "-incoming", "defer")
	}
	if s.Initrd != "" {
		a = append(a, "-initrd", s.Initrd)
	}
	a = append(a, "-append", s.Cmdline,
		"-chardev", "socket,id=qmp0,path="+esc(filepath.Join(s.Dir, qmpSocket))+",server=on,wait=off",
		"-mon", "chardev=qmp0,mode=control",
		// append=on: the driver may truncate the log to bound it, and QEMU's writes then
		// continue at the new end.
		"-chardev", "file,id=con0,path="+esc(filepath.Join(s.Dir, consoleLog))+",append=on",
		"-serial", "chardev:con0",
	)
	// Disks first, so that they are the first virtio-mmio devices (vda, vdb, ... in order).
	for i, disk := range s.Disks {
		ro := "off"
		if disk.ReadOnly {
			ro = "on"
		}
		id := "disk" + strconv.Itoa(i)
		opts := ""
		if !disk.ReadOnly {
			// A write the host cannot take (the node's disk is full: scratch disks are
			// sparse) is an I/O error the guest sees. QEMU's default stops the whole VM
			// until someone frees space, and a sandbox would hang "running".
			opts = ",werror=report,rerror=report"
		}
		if !disk.ReadOnly && s.Restore != nil && s.Restore.ReceiveDisks != nil {
			// A migration's target: the zeros the mirror writes over what the source
			// never wrote punch holes, so the disk stays as sparse as the source's.
			opts += ",discard=unmap"
		}
		a = append(a,
			// node-name: what a migration's target exports its disks by.
			"-drive", "file="+esc(disk.Path)+",if=none,id="+id+",node-name="+diskNode(i)+",format=raw,readonly="+ro+opts,
			"-device", "virtio-blk-device,drive="+id)
	}
	a = append(a,
		"-chardev", "socket,id=agent0,path="+esc(s.AgentSocket)+",reconnect=1",
		"-device", "virtio-serial-device,id=vs0",
		"-device", "virtserialport,bus=vs0.0,chardev=agent0,name=fireworks.0",
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-device,rng=rng0",
	)
	// NICs last, so that a VM without one has exactly the devices it always had. The tap
	// comes as an inherited descriptor: QEMU never opens or configures interfaces itself.
	vhost := "off"
	if len(s.NICs) > 0 && d.vhostNet() {
		vhost = "on"
	}
	for i, n := range s.NICs {
		id := "net" + strconv.Itoa(i)
		// guest_announce=off: after a restore QEMU would otherwise have the guest send
		// gratuitous ARPs (guest work on every start, for a point-to-point tap whose far
		// end never forgets the guest).
		dev := "virtio-net-device,netdev=" + id + ",guest_announce=off"
		if n.MAC != nil {
			dev += ",mac=" + n.MAC.String()
		}
		a = append(a,
			"-netdev", "tap,id="+id+",fd="+strconv.Itoa(tapFD(s, i))+",vhost="+vhost,
			"-device", dev)
	}
	return a
}

// vhostNet says whether NICs get the in-kernel virtio-net backend: only under KVM (TCG
// cannot use it) and only if /dev/vhost-net opens here.
func (d *Driver) vhostNet() bool {
	if d.cfg.Accel != "kvm" {
		return false
	}
	f, err := os.OpenFile("/dev/vhost-net", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

func hostMemoryMiB() int {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 1024
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err == nil {
				return kb / 1024
			}
		}
	}
	return 1024
}
