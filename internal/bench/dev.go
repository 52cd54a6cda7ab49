package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// devServer is a `fireworks dev` process owned by the bench.
type devServer struct {
	bin, config string
	cmd         *exec.Cmd
	exited      chan struct{}
}

// startDev starts `fireworks dev` with the bench's data dir and extra flags.
func startDev(ctx context.Context, cfg Config, work string, extra ...string) (*devServer, error) {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("bench data dir %s: %w", cfg.DataDir, err)
	}
	logPath := filepath.Join(work, "dev.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	d := &devServer{bin: cfg.Fireworks, config: filepath.Join(work, "cli.json"), exited: make(chan struct{})}
	// The server's lifetime is the bench's, not ctx's: stop() ends it with SIGTERM so it
	// cleans up its VMs.
	d.cmd = exec.Command(cfg.Fireworks, append([]string{"dev", "--data-dir", cfg.DataDir, "--listen", "127.0.0.1:0"}, extra...)...)
	d.cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+d.config)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s dev: %w", cfg.Fireworks, err)
	}
	go func() { _ = d.cmd.Wait(); logf.Close(); close(d.exited) }()
	deadline := time.Now().Add(5 * time.Minute) // the first start fetches the guest kernel
	for time.Now().Before(deadline) {
		select {
		case <-d.exited:
			tail, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("fireworks dev exited during start-up:\n%s", tail)
		case <-ctx.Done():
			d.stop()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if _, err := os.Stat(d.config); err == nil {
			if err := d.command("info").Run(); err == nil {
				return d, nil
			}
		}
	}
	d.stop()
	return nil, errors.New("fireworks dev did not answer within 5 minutes")
}

func (d *devServer) command(args ...string) *exec.Cmd {
	cmd := exec.Command(d.bin, args...)
	cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG="+d.config)
	return cmd
}

func (d *devServer) stop() { stopGracefully(d.cmd, d.exited) }

// stopGracefully sends cmd SIGTERM (a server or agent then stops its VMs and networks)
// and, if it has not exited within 30 s, kills its process group.
func stopGracefully(cmd *exec.Cmd, exited <-chan struct{}) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
}
