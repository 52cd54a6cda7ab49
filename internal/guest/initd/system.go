package initd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"golang.org/x/sys/unix"
)

// pid1System implements System for the real guest.
type pid1System struct {
	log *slog.Logger
	// powerOffCmd is the reboot(2) command used to stop the VM.
	powerOffCmd int
	// addr is the guest's own address once its network is up (for /etc/hosts).
	addr netip.Addr
	// rooted: Setup has switched to the image's root, where /etc/hosts belongs.
	rooted bool
	// scratch is the writable filesystem's mount, held open from before the switch
	// of root (which hides its path) for Freeze; frozen says whether it is.
	scratch *os.File
	frozen  bool
	// modDir is the initramfs's /lib/modules, opened at boot (the switch of root hides
	// it); volumeMods says the NFS client's modules are loaded (see MountVolumes).
	modDir     *os.File
	volumeMods bool
	// locks are the portmapper and status monitor volume locks need (lockservices.go).
	locks *lockServices
}

// The filesystem freeze ioctls (linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int)).
const (
	fifreeze = 0xc0045877
	fithaw   = 0xc0045878
)

// Freeze freezes the scratch filesystem (FIFREEZE: running writes finish, new ones
// wait, and everything is on the disk when it returns).
func (p *pid1System) Freeze() error {
	if p.scratch == nil {
		return errors.New("freeze: no scratch filesystem (not set up, or a tmpfs scratch)")
	}
	if p.frozen {
		return nil
	}
	if err := unix.IoctlSetInt(int(p.scratch.Fd()), fifreeze, 0); err != nil {
		return fmt.Errorf("freeze the scratch filesystem: %w", err)
	}
	p.frozen = true
	return nil
}

// Thaw undoes Freeze; thawing a filesystem that is not frozen is not an error.
func (p *pid1System) Thaw() error {
	if p.scratch == nil || !p.frozen {
		return nil
	}
	if err := unix.IoctlSetInt(int(p.scratch.Fd()), fithaw, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("thaw the scratch filesystem: %w", err)
	}
	p.frozen = false
	return nil
}

const (
	// deviceWait bounds the wait for a disk's node after the host attached
	// it (virtio_blk probes asynchronously).
	deviceWait = 10 * time.Second
	// maxEntropy bounds the entropy accepted per request.
	maxEntropy = 4096
	// stopGrace is how long processes get between SIGTERM and SIGKILL on
	// shutdown.
	stopGrace = 3 * time.Second
)

// Staging directories in the initramfs.
const (
	imageMnt   = "/mnt/image"
	scratchMnt = "/mnt/scratch"
	newRoot    = "/mnt/root"
)

func (p *pid1System) Setup(ctx context.Context, s proto.Setup) error {
	if err := checkDevice(s.RootDevice); err != nil {
		return fmt.Errorf("root device: %w", err)
	}
	if s.RootFSType != "ext4" && s.RootFSType != "erofs" {
		return fmt.Errorf("root filesystem type %q: want ext4 or erofs", s.RootFSType)
	}
	if s.ScratchDevice != "" {
		if err := checkDevice(s.ScratchDevice); err != nil {
			return fmt.Errorf("scratch device: %w", err)
		}
	}
	if len(s.Entropy) > maxEntropy {
		return fmt.Errorf("entropy of %d bytes exceeds %d", len(s.Entropy), maxEntropy)
	}
	for _, d := range []string{imageMnt, scratchMnt, newRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", d, err)
		}
	}
	if err := waitForPath(ctx, s.RootDevice, deviceWait); err != nil {
		return err
	}
	if err := unix.Mount(s.RootDevice, imageMnt, s.RootFSType, unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("mounting image %s (%s) read-only on %s: %w", s.RootDevice, s.RootFSType, imageMnt, err)
	}
	if s.ScratchDevice != "" {
		if err := waitForPath(ctx, s.ScratchDevice, deviceWait); err != nil {
			return err
		}
		if err := unix.Mount(s.ScratchDevice, scratchMnt, "ext4", unix.MS_NOATIME, ""); err != nil {
			return fmt.Errorf("mounting scratch %s on %s: %w", s.ScratchDevice, scratchMnt, err)
		}
		f, err := os.Open(scratchMnt)
		if err != nil {
			return fmt.Errorf("open the scratch filesystem: %w", err)
		}
		p.scratch = f
	} else if err := unix.Mount("tmpfs", scratchMnt, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mounting tmpfs scratch on %s: %w", scratchMnt, err)
	}
	upper, work := filepath.Join(scratchMnt, "upper"), filepath.Join(scratchMnt, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", d, err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", imageMnt, upper, work)
	if err := unix.Mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mounting overlay (%s) on %s: %w", opts, newRoot, err)
	}
	// /dev carries /dev/pts and /dev/shm along: MS_MOVE moves submounts.
	for _, d := range []string{"/proc", "/sys", "/dev"} {
		target := filepath.Join(newRoot, d)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", target, err)
		}
		if err := unix.Mount(d, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving %s to %s: %w", d, target, err)
		}
	}
	// pivot_root cannot leave the initramfs (rootfs cannot be unmounted),
	// so do what switch_root does: move the new root over / and chroot.
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("entering %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot into new root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir / in new root: %w", err)
	}
	p.log.Info("switched root", "image", s.RootDevice, "fstype", s.RootFSType, "scratch", s.ScratchDevice)
	if s.Net != nil {
		ifc, err := configureNet(ctx, s.Net)
		if err != nil {
			return fmt.Errorf("network: %w", err)
		}
		p.log.Info("network up", "interface", ifc, "address", s.Net.Address, "gateway", s.Net.Gateway)
		if pfx, err := netip.ParsePrefix(s.Net.Address); err == nil {
			p.addr = pfx.Addr()
		}
	} else if err := loopbackUp(); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	if len(s.Nameservers) > 0 {
		if err := p.SetNameservers(s.Nameservers); err != nil {
			return err
		}
	}
	if _, err := os.Lstat("/tmp"); errors.Is(err, fs.ErrNotExist) {
		if err := os.Mkdir("/tmp", 0o755); err != nil {
			return fmt.Errorf("creating /tmp: %w", err)
		}
		// Chmod, since the umask cleared bits of Mkdir's mode.
		if err := unix.Chmod("/tmp", 0o1777); err != nil {
			return fmt.Errorf("chmod /tmp: %w", err)
		}
	}
	p.rooted = true
	if err := p.SetHostname(s.Hostname, s.Hosts); err != nil {
		return err
	}
	prefetch(s.Prefetch)
	// Make the new mounts' on-disk state complete: a host that snapshots the VM now
	// copies the scratch disk for every VM restored from it.
	unix.Sync()
	return p.SetTime(ctx, proto.SetTime{TimeUnixNano: s.TimeUnixNano, Entropy: s.Entropy})
}

// prefetch reads the named files (in the new root) into the page cache, at most
// proto.MaxPrefetch bytes in all. Errors only mean less is cached.
func prefetch(paths []string) { prefetchIn("/", paths) }

// prefetchIn is prefetch with the paths taken inside root. The paths and everything they
// lead to come from the image, so init (PID 1, root, in a VM whose snapshot every
// sandbox of the image shares) must not open whatever they name: each path is resolved
// inside root without leaving its mount (an image's link to /proc/kmsg, a device under
// /dev) or following magic links, looked at through an O_PATH descriptor, and opened
// for reading only if it is a regular file or a directory. A FIFO or a device node in
// the image is never opened, so it can neither block the template's setup nor reach a
// driver.
func prefetchIn(root string, paths []string) {
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(rootFD)
	budget := int64(proto.MaxPrefetch)
	for _, p := range paths {
		if budget <= 0 || !filepath.IsAbs(p) {
			continue
		}
		f, fi, err := openPlain(rootFD, p)
		if err != nil {
			continue
		}
		switch {
		case fi.Mode().IsRegular():
			n, _ := io.Copy(io.Discard, io.LimitReader(f, budget))
			budget -= n
		case fi.IsDir():
			// Looking names up (PATH search) then finds the entries cached.
			if names, err := f.Readdirnames(4096); err == nil {
				for _, n := range names {
					_, _ = os.Lstat(filepath.Join(p, n)) // a lookup opens nothing
				}
			}
		}
		f.Close()
	}
}

// resolveHow resolves an image path inside the root, on the root's own mount, with no
// magic links.
var resolveHow = unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC,
	Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_XDEV | unix.RESOLVE_NO_MAGICLINKS}

// errNotPlain is openPlain's answer for something that is neither a regular file nor a
// directory (a FIFO, a device node, a socket).
var errNotPlain = errors.New("not a regular file or directory")

// openPlain opens p inside rootFD for reading if it is a regular file or a directory,
// and nothing else (errNotPlain), without opening anything else on the way.
func openPlain(rootFD int, p string) (*os.File, os.FileInfo, error) {
	fd, err := unix.Openat2(rootFD, p, &resolveHow)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, nil, &os.PathError{Op: "stat", Path: p, Err: err}
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG && t != unix.S_IFDIR {
		return nil, nil, &os.PathError{Op: "open", Path: p, Err: errNotPlain}
	}
	// Reopen the very file looked at (not the path again, which could have changed).
	rfd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(rfd), p)
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, fi, nil
}

// checkDevice accepts only absolute paths under /dev, so a confused host
// cannot make init mount arbitrary files.
func checkDevice(dev string) error {
	if !strings.HasPrefix(dev, "/dev/") || filepath.Clean(dev) != dev {
		return fmt.Errorf("%q is not a device path under /dev", dev)
	}
	return nil
}

func waitForPath(ctx context.Context, path string, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		}
	}
}

// SetHostname sets the hostname and the other names /etc/hosts resolves; "" leaves
// both.
func (p *pid1System) SetHostname(name string, hosts []proto.HostEntry) error {
	if name == "" {
		return nil
	}
	if err := unix.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("setting hostname %q: %w", name, err)
	}
	if p.rooted {
		return writeHostFiles("/", name, p.addr, hosts)
	}
	return nil
}

// SetNameservers replaces /etc/resolv.conf of the root init runs in (after Setup, the
// sandbox's overlay).
func (p *pid1System) SetNameservers(servers []string) error {
	return writeResolvConf("/", servers)
}

func (p *pid1System) SetTime(_ context.Context, t proto.SetTime) error {
	if t.TimeUnixNano != 0 {
		ts := unix.NsecToTimespec(t.TimeUnixNano)
		if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
			return fmt.Errorf("setting clock: %w", err)
		}
	}
	if len(t.Entropy) > 0 {
		if err := addEntropy(t.Entropy); err != nil {
			return err
		}
	}
	return nil
}

// addEntropy credits b to the kernel pool and reseeds the CRNG, so clones
// of one snapshot stop producing the same random numbers.
func addEntropy(b []byte) error {
	if len(b) > maxEntropy {
		return fmt.Errorf("entropy of %d bytes exceeds %d", len(b), maxEntropy)
	}
	fd, err := unix.Open("/dev/urandom", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/urandom: %w", err)
	}
	defer unix.Close(fd)
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(b)+3)
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(b)))
	copy(buf[8:], b)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// KillAll sends SIGKILL to every process but init and waits up to 2 s for them to go
// (the reaper collects them).
func (p *pid1System) KillAll(_ context.Context) error {
	if err := unix.Kill(-1, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill all processes: %w", err)
	}
	for i := 0; i < 200 && userProcesses() > 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if n := userProcesses(); n > 0 {
		return fmt.Errorf("%d processes survived SIGKILL", n)
	}
	return nil
}

// PowerOff stops every process, syncs, unmounts what it can and powers
// off. It does not return.
func (p *pid1System) PowerOff(_ context.Context) {
	p.log.Info("shutting down")
	_ = unix.Kill(-1, unix.SIGTERM)
	deadline := time.Now().Add(stopGrace)
	for time.Now().Before(deadline) && userProcesses() > 0 {
		time.Sleep(50 * time.Millisecond)
	}
	_ = unix.Kill(-1, unix.SIGKILL)
	for i := 0; i < 20 && userProcesses() > 0; i++ {
		time.Sleep(25 * time.Millisecond)
	}
	unix.Sync()
	unmountAll(p.log)
	unix.Sync()
	halt(p.log, p.powerOffCmd)
}

// userProcesses counts processes other than init and kernel threads.
func userProcesses() int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	self := os.Getpid()
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid == 2 {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the parenthesised comm: state ppid ...
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 || f[1] == "2" || f[0] == "Z" {
			continue // kernel thread (child of kthreadd) or zombie
		}
		n++
	}
	return n
}

// unmountAll unmounts in reverse mount order and remounts / read-only;
// failures are expected for busy mounts and only logged.
func unmountAll(log *slog.Logger) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return
	}
	var targets []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 {
			targets = append(targets, fields[1])
		}
	}
	f.Close()
	for i := len(targets) - 1; i >= 0; i-- {
		switch t := targets[i]; t {
		case "/", "/proc", "/sys", "/dev":
		default:
			if err := unix.Unmount(t, 0); err != nil {
				log.Debug("unmount failed", "target", t, "err", err)
			}
		}
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		log.Debug("remounting / read-only failed", "err", err)
	}
}

// halt ends the VM. If reboot(2) returns, nothing else can be done: PID 1
// must not exit, so it sleeps forever.
func halt(log *slog.Logger, cmd int) {
	if cmd == 0 {
		cmd = unix.LINUX_REBOOT_CMD_POWER_OFF
	}
	err := unix.Reboot(cmd)
	log.Error("reboot failed", "err", err)
	if cmd != unix.LINUX_REBOOT_CMD_RESTART {
		// With QEMU's -no-reboot a restart ends the VM as well.
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	}
	for {
		time.Sleep(time.Hour)
	}
}
