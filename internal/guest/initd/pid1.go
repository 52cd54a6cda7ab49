package initd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PortName is the virtio-serial port name the host's QEMU exposes.
const PortName = "fireworks.0"

const (
	// portWait bounds the wait for the agent port after modules loaded.
	portWait = 10 * time.Second
	// reopenDelay paces reopening the port while the host is disconnected
	// (reads then return EOF at once).
	reopenDelay = 100 * time.Millisecond
)

// Main is the body of fireworks-init as PID 1. It never returns: on a
// fatal error it prints the reason to the console and powers off.
func Main(version string) {
	con := openConsole()
	log := slog.New(newConsoleHandler(con))
	p := &pid1{log: log, version: version}
	defer func() {
		if v := recover(); v != nil {
			p.fatal(fmt.Errorf("panic: %v\n%s", v, debug.Stack()))
		}
	}()
	p.run()
}

type pid1 struct {
	log     *slog.Logger
	version string
	cmdline map[string]string
}

func (p *pid1) fatal(err error) {
	p.log.Error("fatal: " + err.Error())
	unix.Sync()
	halt(p.log, p.powerOffCmd())
}

func (p *pid1) powerOffCmd() int {
	if p.cmdline["fw.poweroff"] == "reboot" {
		return unix.LINUX_REBOOT_CMD_RESTART
	}
	return unix.LINUX_REBOOT_CMD_POWER_OFF
}

func (p *pid1) run() {
	p.log.Info("starting", "version", p.version)
	if err := mountBase(); err != nil {
		p.fatal(err)
	}
	// The console may only be openable now that /dev exists.
	if con := openConsole(); con != nil {
		p.log = slog.New(newConsoleHandler(con))
	}
	cmdline, err := readCmdline()
	if err != nil {
		p.fatal(err)
	}
	p.cmdline = cmdline
	if err := loadModules(p.log, cmdline["fw.mods"]); err != nil {
		p.fatal(err)
	}
	// The volume modules load on a volume's first mount, after the switch of root has
	// hidden the initramfs: its module directory stays reachable through this.
	modDir, err := os.Open("/lib/modules")
	if err != nil {
		p.log.Warn("no module directory: volumes cannot be mounted", "err", err)
		modDir = nil
	}
	if v, ok := cmdline["fw.debug"]; ok && v != "0" {
		p.log = slog.New(newConsoleHandler(openConsole(), slog.LevelDebug))
	}
	p.handleSignals()

	srv := NewServer(Options{
		Root:        "/",
		InitVersion: p.version,
		ReapAll:     true,
		System:      &pid1System{log: p.log, powerOffCmd: p.powerOffCmd(), modDir: modDir},
		Logger:      p.log,
		OnPanic:     func(v any) { p.fatal(fmt.Errorf("panic: %v\n%s", v, debug.Stack())) },
	})
	dev, err := waitForPort(PortName, portWait)
	if err != nil {
		p.fatal(err)
	}
	p.log.Info("ready")
	p.serve(srv, dev)
}

// serve opens the port and serves connections forever. When the host side
// disconnects the port reads EOF; closing it discards stale data, and the
// host's next connection starts with a fresh hello.
func (p *pid1) serve(srv *Server, dev string) {
	ctx := context.Background()
	for {
		f, err := openPort(dev)
		if err != nil {
			p.log.Error("opening port", "dev", dev, "err", err)
			time.Sleep(time.Second)
			continue
		}
		// ServeConn logs connects and disconnects itself; while no host is
		// connected it returns EOF at once, which is not worth a line.
		_ = srv.ServeConn(ctx, f)
		time.Sleep(reopenDelay)
	}
}

// openPort opens the virtio port non-blocking so Go's poller serves it:
// Close then interrupts a read or a write stuck while the host is away.
func openPort(dev string) (*os.File, error) {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dev, err)
	}
	return os.NewFile(uintptr(fd), dev), nil
}

// handleSignals keeps signals sent to init from killing it (Go's default
// for SIGTERM is to exit, and PID 1 exiting panics the kernel). Notify
// instead of Ignore, because ignored dispositions are inherited by exec'd
// children and sessions must see default signal behaviour.
func (p *pid1) handleSignals() {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPWR, syscall.SIGQUIT)
	// Lives as long as PID 1, i.e. forever.
	go func() {
		for s := range ch {
			p.log.Info("ignoring signal", "signal", s.String())
		}
	}()
}

// mountBase mounts the pseudo filesystems the initramfs needs.
func mountBase() error {
	type m struct {
		src, target, fstype string
		flags               uintptr
		data                string
	}
	for _, mt := range []m{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	} {
		if err := os.MkdirAll(mt.target, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", mt.target, err)
		}
		err := unix.Mount(mt.src, mt.target, mt.fstype, mt.flags, mt.data)
		if errors.Is(err, unix.EBUSY) {
			continue // already mounted (e.g. devtmpfs by the kernel)
		}
		if err != nil {
			return fmt.Errorf("mounting %s on %s: %w", mt.fstype, mt.target, err)
		}
	}
	// udev would make these; programs (bash process substitution, tools
	// writing to /dev/stdout) expect them.
	for name, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
		"/dev/core": "/proc/kcore",
	} {
		if err := os.Symlink(target, name); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("linking %s: %w", name, err)
		}
	}
	if _, err := os.Lstat("/dev/ptmx"); errors.Is(err, os.ErrNotExist) {
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}
	return nil
}

// readCmdline parses /proc/cmdline into key=value pairs (flags map to "").
// The kernel also passes unknown k=v to init as environment, but not the
// ones containing a dot, which is why the file is read.
func readCmdline() (map[string]string, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return nil, fmt.Errorf("reading /proc/cmdline: %w", err)
	}
	return parseCmdline(string(b)), nil
}

func parseCmdline(s string) map[string]string {
	out := map[string]string{}
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		out[k] = strings.Trim(v, `"`)
	}
	return out
}

// loadModules loads /lib/modules/<name>.ko for each name in the comma
// separated list, in order (the list is already in dependency order).
func loadModules(log *slog.Logger, list string) error {
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		if strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
			return fmt.Errorf("bad module name %q", name)
		}
		path := filepath.Join("/lib/modules", name+".ko")
		if err := loadModule(path); err != nil {
			return err
		}
		log.Debug("loaded module", "name", name)
	}
	return nil
}

func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening module %s: %w", path, err)
	}
	defer unix.Close(fd)
	err = unix.FinitModule(fd, "", 0)
	if errors.Is(err, unix.ENOSYS) {
		var data []byte
		if data, err = os.ReadFile(path); err != nil {
			return fmt.Errorf("reading module %s: %w", path, err)
		}
		err = unix.InitModule(data, "")
	}
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("loading module %s: %w", path, err)
	}
	return nil
}

// waitForPort finds the device of the virtio port called name. Without
// udev there is no /dev/virtio-ports/<name> link, so sysfs is searched.
func waitForPort(name string, limit time.Duration) (string, error) {
	deadline := time.Now().Add(limit)
	for {
		if dev, ok := findPort(name); ok {
			if _, err := os.Stat(dev); err == nil {
				return dev, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio port %q did not appear within %s (are virtio_console and the transport modules loaded?)", name, limit)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func findPort(name string) (string, bool) {
	if _, err := os.Stat("/dev/virtio-ports/" + name); err == nil {
		return "/dev/virtio-ports/" + name, true
	}
	dirs, _ := filepath.Glob("/sys/class/virtio-ports/*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(d), true
		}
	}
	return "", false
}

// openConsole returns /dev/console for writing (nil if it cannot be
// opened yet) and makes sure fds 0-2 are open, so nothing init writes to
// stderr (e.g. a Go runtime crash) is lost.
func openConsole() io.Writer {
	f, err := os.OpenFile("/dev/console", os.O_WRONLY|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil
	}
	for fd := 0; fd <= 2; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			_ = unix.Dup3(int(f.Fd()), fd, 0)
		}
	}
	return f
}

// consoleHandler prints "fireworks-init: msg k=v ..." lines: short enough to
// read on a serial console while debugging a hung boot.
type consoleHandler struct {
	mu    *sync.Mutex
	w     io.Writer
	level slog.Level
	attrs []slog.Attr
}

func newConsoleHandler(w io.Writer, level ...slog.Level) *consoleHandler {
	h := &consoleHandler{mu: &sync.Mutex{}, w: w, level: slog.LevelInfo}
	if len(level) > 0 {
		h.level = level[0]
	}
	return h
}

func (h *consoleHandler) Enabled(_ context.Context, l slog.Level) bool {
	return h.w != nil && l >= h.level
}

func (h *consoleHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString("fireworks-init: ")
	if r.Level != slog.LevelInfo {
		b.WriteString(r.Level.String() + " ")
	}
	b.WriteString(r.Message)
	add := func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value.Any())
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	b.WriteString("\n")
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := io.WriteString(h.w, b.String())
	return err
}

func (h *consoleHandler) WithAttrs(as []slog.Attr) slog.Handler {
	n := *h
	n.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &n
}

func (h *consoleHandler) WithGroup(string) slog.Handler { return h }
