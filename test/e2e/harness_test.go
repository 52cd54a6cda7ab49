// Package e2e drives Fireworks from the outside, as a user would: it builds the real
// binaries, starts `fireworks dev` as a process, serves test images from an in-process OCI
// registry, and runs the `fireworks` CLI. Every sandbox here boots a real guest kernel
// (under TCG on these machines), so tests share one server and keep boots few.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// env is the shared world of the e2e tests.
type env struct {
	root     string // temp dir for everything below
	bin      string // fireworks binary
	initBin  string
	dataDir  string
	config   string // CLI config path
	registry string // host:port of the in-process registry
	// registryHandler serves it (tests serve it at other addresses too).
	registryHandler http.Handler
	skip            string // why the e2e tests cannot run here, if they cannot
	mu              sync.Mutex
	dev             *exec.Cmd
	devLog          *os.File
	devExited       chan struct{}
}

var world env

// assetCache keeps the guest kernel between runs (the first run fetches it with apt-get).
func assetCache() string { return testutil.AssetCache() }

func TestMain(m *testing.M) {
	code := func() int {
		for _, tool := range []string{"qemu-system-x86_64", "mkfs.ext4", "apt-get", "dpkg-deb", "lz4"} {
			if _, err := exec.LookPath(tool); err != nil {
				world.skip = tool + " not found (run ./scripts/install-deps.sh)"
				return m.Run()
			}
		}
		if os.Geteuid() != 0 {
			world.skip = "e2e tests need root (apt-get download of the guest kernel, VM disks)"
			return m.Run()
		}
		if rc, again := inPrivateNetNS(); again {
			return rc
		}
		root, err := os.MkdirTemp("", "fwe2e")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(root)
		world.root = root
		if err := world.build(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: build:", err)
			return 1
		}
		world.registryHandler = registry.New(registry.Logger(nopLogger()))
		reg := httptest.NewServer(world.registryHandler)
		defer reg.Close()
		world.registry = strings.TrimPrefix(reg.URL, "http://")
		if err := pushTestImages(world.registry); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: push test images:", err)
			return 1
		}
		world.dataDir = filepath.Join(root, "d")
		world.config = filepath.Join(root, "cli.json")
		if err := os.MkdirAll(world.dataDir, 0o700); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		// Share the guest kernel cache across runs; the initramfs is rebuilt when the
		// freshly built init differs.
		if err := os.MkdirAll(assetCache(), 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if err := os.Symlink(assetCache(), filepath.Join(world.dataDir, "assets")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if err := world.startDev(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: start fireworks dev:", err)
			world.dumpDevLog()
			return 1
		}
		defer stopKube()
		defer func() {
			world.stopDev()
			// A graceful stop leaves running VMs (and VMMs launched ahead) for the next
			// server to adopt; none comes, and the data dir goes with the run.
			world.killVMs()
		}()
		rc := m.Run()
		if rc != 0 {
			world.dumpDevLog()
		}
		return rc
	}()
	os.Exit(code)
}

func (e *env) build() error {
	var err error
	e.bin, e.initBin, err = testutil.BuildBinaries(e.root)
	return err
}

// startDev starts `fireworks dev` and waits until the API answers.
func (e *env) startDev() error { return e.startDevWith() }

// startDevWith is startDev with extra flags (later flags override earlier ones).
func (e *env) startDevWith(extra ...string) error { return e.startDevUntil("", extra...) }

// startDevUntil starts `fireworks dev` and, if stopAt is not empty, stops it (SIGTERM)
// as soon as its log from this start has a line containing stopAt; it fails if the server
// was ready or exited first. With stopAt empty it waits until the API answers.
func (e *env) startDevUntil(stopAt string, extra ...string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	logPath := filepath.Join(e.root, "dev.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	var from int64
	if fi, err := logf.Stat(); err == nil {
		from = fi.Size()
	}
	_ = os.Remove(e.config)
	args := append([]string{"dev", "--data-dir", e.dataDir, "--listen", "127.0.0.1:0", "--init-binary", e.initBin, "--log-level", "debug",
		"--metrics-listen", metricsAddr,
		"--registry-allow", "127.0.0.1/32"}, extra...) // the test registry, for pulls of user tokens' sandboxes
	cmd := exec.Command(e.bin, args...)
	cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+e.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Pdeathsig: a test binary that dies (a panic skips TestMain's cleanup) takes the dev
	// server with it instead of leaving it running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	e.dev, e.devLog, e.devExited = cmd, logf, exited
	// The first start fetches the guest kernel with apt-get: allow minutes.
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("fireworks dev exited during start-up")
		default:
		}
		if stopAt != "" {
			if b, err := os.ReadFile(logPath); err == nil && int64(len(b)) > from && strings.Contains(string(b[from:]), stopAt) {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-exited:
				case <-time.After(30 * time.Second):
					_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
					<-exited
					return fmt.Errorf("fireworks dev, stopped at %q, did not exit within 30s", stopAt)
				}
				e.dev = nil
				_ = logf.Close()
				return nil
			}
			if _, err := os.Stat(e.config); err == nil {
				return fmt.Errorf("fireworks dev was ready before its log said %q", stopAt)
			}
			time.Sleep(20 * time.Millisecond)
			continue
		}
		if _, err := os.Stat(e.config); err == nil {
			if r := e.cli(context.Background(), nil, "info"); r.code == 0 {
				return nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return errors.New("fireworks dev did not answer within 5 minutes")
}

// stopDev stops the server the way an operator would (SIGTERM) and waits for it.
func (e *env) stopDev() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.dev == nil {
		return
	}
	_ = e.dev.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.devExited:
	case <-time.After(30 * time.Second):
		_ = syscall.Kill(-e.dev.Process.Pid, syscall.SIGKILL)
		<-e.devExited
	}
	e.dev = nil
	_ = e.devLog.Close()
}

// killVMs kills every VMM whose run directory is under this run's data dir.
func (e *env) killVMs() {
	if e.dataDir == "" {
		return
	}
	_ = exec.Command("pkill", "-9", "-f", "qemu-system-x86_64 .*"+e.dataDir+"/run/").Run()
	// Volume servers outlive the agent too; once they are gone, the volumes' mounts go.
	_ = exec.Command("pkill", "-9", "-f", "fireworks-volume-server .*"+e.dataDir+"/").Run()
	time.Sleep(100 * time.Millisecond)
	mnts, _ := filepath.Glob(filepath.Join(e.dataDir, "volumes", "mnt", "*"))
	for _, m := range mnts {
		_ = exec.Command("umount", m).Run()
	}
}

// devLogText is everything dev logged so far (all its restarts).
func (e *env) devLogText() string {
	data, _ := os.ReadFile(filepath.Join(e.root, "dev.log"))
	return string(data)
}

func (e *env) dumpDevLog() {
	data, err := os.ReadFile(filepath.Join(e.root, "dev.log"))
	if err != nil {
		return
	}
	if len(data) > 20000 {
		data = data[len(data)-20000:]
	}
	fmt.Fprintf(os.Stderr, "---- fireworks dev log (tail) ----\n%s\n----\n", data)
}

// result is what one CLI invocation produced.
type result struct {
	stdout, stderr string
	code           int
}

// cli runs the fireworks CLI as a user would, with stdin from in (may be nil).
func (e *env) cli(ctx context.Context, in []byte, args ...string) result {
	return e.cliEnv(ctx, nil, in, args...)
}

// cliEnv is cli with extra environment variables (e.g. FIREWORKS_TOKEN=...).
func (e *env) cliEnv(ctx context.Context, extraEnv []string, in []byte, args ...string) result {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, args...)
	cmd.Env = append(append(os.Environ(), "FIREWORKS_CONFIG="+e.config), extraEnv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if in != nil {
		cmd.Stdin = bytes.NewReader(in)
	}
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			return result{stderr: err.Error(), code: -1}
		}
		code = ee.ExitCode()
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code}
}

// need skips a test, naming what is missing, when the e2e world could not be built here.
func need(t *testing.T) {
	t.Helper()
	if world.skip != "" {
		testutil.Skipf(t, "e2e: %s", world.skip)
	}
}

// fw runs the CLI and fails the test with full output when the exit code is not want.
func fw(t *testing.T, want int, args ...string) result {
	t.Helper()
	r := world.cli(context.Background(), nil, args...)
	if r.code != want {
		t.Fatalf("fireworks %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, want, r.stdout, r.stderr)
	}
	return r
}

// image is the ref of a test image in the in-process registry.
func image(name string) string { return world.registry + "/" + name }
