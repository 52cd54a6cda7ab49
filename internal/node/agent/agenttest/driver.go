// Package agenttest holds test doubles for the agent's seams, for tests only: a VMM
// driver that runs no VM (Driver) and guest assets that are not a kernel (Assets). The
// "guest" of a Driver VM is the real guest server (internal/guest/initd) running in the
// test process behind the VM's guest channel, so the agent's start, exec, output and exit
// paths run for real; commands run on the test host. With them, the agent's logic (the
// order of start paths and their fallbacks, failure reasons, capacity accounting) is
// tested in milliseconds; the e2e suite keeps booting real VMs.
package agenttest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/initd"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
)

// Assets gives the agent stand-ins for the guest kernel and initramfs (files that are
// no kernel): a Driver never reads them.
func Assets(ctx context.Context, dir string) (*assets.Kernel, *assets.Initramfs, error) {
	k := filepath.Join(dir, "vmlinux-fake")
	if err := os.WriteFile(k, []byte("not a kernel: agenttest.Assets\n"), 0o644); err != nil {
		return nil, nil, err
	}
	ird := filepath.Join(dir, "initramfs-fake")
	if err := os.WriteFile(ird, []byte("not an initramfs: agenttest.Assets\n"), 0o644); err != nil {
		return nil, nil, err
	}
	return &assets.Kernel{Vmlinux: k, Release: "agenttest"}, &assets.Initramfs{Path: ird, Version: "agenttest"}, nil
}

// Driver is a vmm.Driver test double: its VMs are guest servers in this process that
// connect to the VM's guest channel, and its snapshots record the guest's set-up, which
// a restore replays. Fail* inject failures; the counters say which paths ran.
type Driver struct {
	// FailBoot, FailRestore and FailSnapshot, if set, are returned by a boot's Start, a
	// restore's Start, and Snapshot; FailAhead by the Start of a VM launched ahead
	// (Prestart).
	FailBoot, FailRestore, FailSnapshot, FailAhead error
	// FailSave, if set, is returned by Save (a pause).
	FailSave error

	Boots, Restores, Snapshots, Prestarts, Saves atomic.Int32

	mu    sync.Mutex
	saved map[string]savedGuest // by token (see Save)
}

// savedGuest is a VM saved whole: its guest server, processes and sessions included
// (the double's "memory").
type savedGuest struct {
	srv *initd.Server
	sys *system
}

func (d *Driver) Name() string  { return "agenttest" }
func (d *Driver) Accel() string { return "none" }

// Create records spec; nothing runs before Start.
func (d *Driver) Create(_ context.Context, spec vmm.Spec) (vmm.VM, error) {
	if spec.AgentSocket == "" || spec.Dir == "" {
		return nil, errors.New("agenttest: spec without a run directory or guest channel")
	}
	return &VM{d: d, spec: spec, done: make(chan struct{})}, nil
}

// Adopt finds nothing: a Driver's VMs do not outlive the test process's agent.
func (d *Driver) Adopt(context.Context, string) (vmm.VM, error) {
	return nil, fmt.Errorf("agenttest: nothing to adopt: %w", vmm.ErrNotSupported)
}

// VM is one Driver VM.
type VM struct {
	d    *Driver
	spec vmm.Spec

	mu      sync.Mutex
	ahead   bool
	kept    bool // saved: its guest server lives on for the restore
	srv     *initd.Server
	sys     *system
	cancel  context.CancelFunc
	done    chan struct{}
	endOnce sync.Once
	exitErr error
}

func (v *VM) ID() string { return v.spec.ID }

// Start "boots" (or restores) the guest: a guest server that dials the guest channel. A
// restore first replays, on a connection of its own, the set-up the snapshot recorded.
func (v *VM) Start(ctx context.Context) error {
	v.mu.Lock()
	ahead := v.ahead
	v.mu.Unlock()
	if ahead && v.d.FailAhead != nil {
		return v.d.FailAhead
	}
	sys := &system{}
	srv := initd.NewServer(initd.Options{System: sys, InitVersion: "agenttest", ReattachGrace: time.Minute})
	if r := v.spec.Restore; r != nil && r.MemoryFile == "" {
		// A whole save (Save): the guest server it kept, with everything running in it.
		v.d.Restores.Add(1)
		if v.d.FailRestore != nil {
			return v.d.FailRestore
		}
		token, err := os.ReadFile(r.StateFile)
		if err != nil {
			return fmt.Errorf("agenttest: restore %s: %w", r.StateFile, err)
		}
		v.d.mu.Lock()
		g, ok := v.d.saved[string(token)]
		delete(v.d.saved, string(token))
		v.d.mu.Unlock()
		if !ok {
			return fmt.Errorf("agenttest: restore %s: no saved guest %q (restored already?)", r.StateFile, token)
		}
		_ = srv.Close()
		srv, sys = g.srv, g.sys
	} else if r != nil {
		v.d.Restores.Add(1)
		if v.d.FailRestore != nil {
			return v.d.FailRestore
		}
		setup, err := readSnapshot(r.StateFile)
		if err != nil {
			return fmt.Errorf("agenttest: restore %s: %w", r.StateFile, err)
		}
		if err := replaySetup(ctx, srv, setup); err != nil {
			return fmt.Errorf("agenttest: restore %s: %w", r.StateFile, err)
		}
	} else {
		v.d.Boots.Add(1)
		if v.d.FailBoot != nil {
			return v.d.FailBoot
		}
	}
	if v.spec.MemoryFile != "" {
		if err := os.WriteFile(v.spec.MemoryFile, []byte("agenttest guest memory\n"), 0o600); err != nil {
			return err
		}
	}
	conn, err := net.Dial("unix", v.spec.AgentSocket)
	if err != nil {
		return fmt.Errorf("agenttest: dial the guest channel: %w", err)
	}
	gctx, cancel := context.WithCancel(context.Background())
	v.mu.Lock()
	v.srv, v.sys, v.cancel = srv, sys, cancel
	v.mu.Unlock()
	sys.powerOff = func() { v.end(nil) }
	go func() { // ends with the connection (the VM's end closes it)
		_ = srv.ServeConn(gctx, conn)
	}()
	return nil
}

// end ends the VM once: the guest server stops (its processes are killed) and Wait is
// closed.
func (v *VM) end(err error) {
	v.endOnce.Do(func() {
		v.mu.Lock()
		v.exitErr = err
		srv, cancel, kept := v.srv, v.cancel, v.kept
		v.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		if srv != nil && !kept {
			_ = srv.Close()
		}
		close(v.done)
	})
}

func (v *VM) Stop(ctx context.Context, _ time.Duration) error {
	v.end(nil)
	return nil
}

func (v *VM) Kill() error {
	v.end(&vmm.ExitError{Reason: "VMM killed by signal SIGKILL", Code: -1})
	return nil
}

func (v *VM) Wait() <-chan struct{} { return v.done }

func (v *VM) ExitError() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.exitErr
}

func (v *VM) Info() vmm.Info {
	return vmm.Info{Accel: "none", ConsoleLog: filepath.Join(v.spec.Dir, "console.log")}
}

// Prestart "launches the VMM ahead": it only marks the VM (vmm.Prestarter).
func (v *VM) Prestart(context.Context) error {
	v.d.Prestarts.Add(1)
	v.mu.Lock()
	v.ahead = true
	v.mu.Unlock()
	return nil
}

// Pause and Resume do nothing: the guest server has no vCPUs to freeze.
func (v *VM) Pause(context.Context) error  { return nil }
func (v *VM) Resume(context.Context) error { return nil }

// Snapshot records the guest's set-up in stateFile: what a restore replays.
func (v *VM) Snapshot(_ context.Context, stateFile string) error {
	v.d.Snapshots.Add(1)
	if v.d.FailSnapshot != nil {
		return v.d.FailSnapshot
	}
	v.mu.Lock()
	sys := v.sys
	v.mu.Unlock()
	if sys == nil {
		return errors.New("agenttest: snapshot of a VM that is not running")
	}
	b, err := json.Marshal(sys.lastSetup())
	if err != nil {
		return err
	}
	// The memory file is final before the state file (a template whose memory is newer
	// than its state is refused).
	return os.WriteFile(stateFile, b, 0o600)
}

// Save (vmm.Saver) keeps the guest server, with its processes and their sessions, for
// a restore of stateFile; the VM then ends as a saved one does.
func (v *VM) Save(_ context.Context, stateFile string) error {
	v.d.Saves.Add(1)
	if v.d.FailSave != nil {
		return v.d.FailSave
	}
	v.mu.Lock()
	srv, sys := v.srv, v.sys
	if srv != nil {
		v.kept = true
	}
	v.mu.Unlock()
	if srv == nil {
		return errors.New("agenttest: save of a VM that is not running")
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	token := hex.EncodeToString(b)
	v.d.mu.Lock()
	if v.d.saved == nil {
		v.d.saved = map[string]savedGuest{}
	}
	v.d.saved[token] = savedGuest{srv: srv, sys: sys}
	v.d.mu.Unlock()
	return os.WriteFile(stateFile, []byte(token), 0o600)
}

func readSnapshot(path string) (proto.Setup, error) {
	var s proto.Setup
	b, err := os.ReadFile(path)
	if err == nil {
		err = json.Unmarshal(b, &s)
	}
	return s, err
}

// replaySetup puts srv in the state the snapshotted guest was in: set up.
func replaySetup(ctx context.Context, srv *initd.Server, s proto.Setup) error {
	host, guest := net.Pipe()
	served := make(chan error, 1)
	go func() { served <- srv.ServeConn(context.Background(), guest) }()
	c, err := client.Handshake(ctx, host)
	if err == nil {
		err = c.Setup(ctx, s)
		c.Close()
	}
	host.Close()
	<-served
	return err
}

// system stands in for the guest's privileged operations: it mounts nothing and records
// the set-up.
type system struct {
	mu       sync.Mutex
	setup    proto.Setup
	powerOff func()
}

func (s *system) lastSetup() proto.Setup {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.setup
}

func (s *system) Setup(_ context.Context, su proto.Setup) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.setup = su
	return nil
}

func (s *system) SetTime(context.Context, proto.SetTime) error { return nil }
func (s *system) SetHostname(string, []proto.HostEntry) error  { return nil }
func (s *system) SetNameservers([]string) error                { return nil }
func (s *system) KillAll(context.Context) error                { return nil }
func (s *system) Freeze() error                                { return nil }
func (s *system) Thaw() error                                  { return nil }

// MountVolumes: this test double's guest has no NFS client; volumes are refused.
func (s *system) MountVolumes(vols []proto.VolumeMount) error {
	if len(vols) > 0 {
		return errors.New("the test driver's guest cannot mount volumes")
	}
	return nil
}

func (s *system) PowerOff(context.Context) {
	if s.powerOff != nil {
		go s.powerOff()
	}
}
