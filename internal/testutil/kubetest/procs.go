package kubetest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// procGroup runs the components of a control plane or a node, each logging to
// dir/<name>.log, and stops them the last started first.
type procGroup struct {
	logDir string
	mu     sync.Mutex
	procs  []*proc
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

// start runs cmd as component name (in a process group of its own, killed with the test
// process if that dies first).
func (g *procGroup) start(name string, cmd *exec.Cmd) error {
	logf, err := os.Create(filepath.Join(g.logDir, name+".log"))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	g.mu.Lock()
	g.procs = append(g.procs, p)
	g.mu.Unlock()
	return nil
}

// logTail is the end of a component's log (for a failure's message).
func (g *procGroup) logTail(name string, n int) string {
	b, _ := os.ReadFile(filepath.Join(g.logDir, name+".log"))
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// exited names a component that has ended, with its log's tail.
func (g *procGroup) exited() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, p := range g.procs {
		select {
		case <-p.done:
			return fmt.Errorf("%s exited:\n%s", p.name, g.logTail(p.name, 3000))
		default:
		}
	}
	return nil
}

// stopAll ends the components, the last started first (SIGTERM, then SIGKILL after 10
// seconds); before, if set, runs ahead of each one's end.
func (g *procGroup) stopAll(before func(name string)) {
	g.mu.Lock()
	procs := g.procs
	g.procs = nil
	g.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		if before != nil {
			before(p.name)
		}
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
}
