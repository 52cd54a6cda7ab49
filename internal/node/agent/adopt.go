package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// adoptRecordFile, in a sandbox's run directory, is this node's local record of what a
// restarted agent needs to take a running sandbox back: the sandbox as it was started,
// its resolved process, and the guest session ID of its main process. (The VMM driver
// keeps its own record beside it.)
const adoptRecordFile = "sandbox.json"

type adoptRecord struct {
	Sandbox state.Sandbox `json:"sandbox"`
	Proc    process       `json:"proc"`
	Main    uint32        `json:"main_session"`
	RootFS  string        `json:"root_fs"`
}

func writeAdoptRecord(dir string, r adoptRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, adoptRecordFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, adoptRecordFile))
}

func readAdoptRecord(dir string) (adoptRecord, error) {
	var r adoptRecord
	b, err := os.ReadFile(filepath.Join(dir, adoptRecordFile))
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("parse %s: %w", adoptRecordFile, err)
	}
	return r, nil
}

func (s *sandbox) kept() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.keep
}

// detachForAdoption leaves a running sandbox's VM for the next agent: the VMM's host-side
// handles are released (QEMU keeps running and keeps trying to reconnect the guest
// channel) and the guest connection is dropped (the guest keeps the main process and its
// output for a reattach). It reports false when the VM cannot be detached.
func (a *Agent) detachForAdoption(s *sandbox, vm vmm.VM) bool {
	d, ok := vm.(vmm.Detacher)
	if !ok {
		return false
	}
	if _, err := os.Stat(filepath.Join(s.dir, adoptRecordFile)); err != nil {
		return false
	}
	s.mu.Lock()
	s.keep = true
	g := s.guest
	s.mu.Unlock()
	if err := d.Detach(); err != nil {
		a.log.Warn("detach VM for adoption", "sandbox", s.id, "err", err)
		s.mu.Lock()
		s.keep = false
		s.mu.Unlock()
		return false
	}
	if g != nil {
		_ = g.Close()
	}
	a.log.Info("left the VM running for the next agent", "sandbox", s.id)
	return true
}

// adoptTimeout bounds one sandbox's adoption (the guest channel's reconnect is most of it).
const adoptTimeout = 30 * time.Second

// adopt takes back a sandbox whose VM an earlier agent process left running: it
// reattaches to the VMM, lets QEMU reconnect the guest channel, reattaches to the main
// process in the guest and supervises it as if it had started it. An adoption that fails
// ends the VM, unless it failed because this agent is being stopped (ctx ended): then the
// VM, its network and its volumes are left as they were, for the next agent.
func (a *Agent) adopt(ctx context.Context, sb state.Sandbox) (err error) {
	a.log.Info("taking back a running sandbox", "sandbox", sb.ID)
	stopping := func() bool { return ctx.Err() != nil }
	actx, cancel := context.WithTimeout(ctx, adoptTimeout)
	defer cancel()
	dir := filepath.Join(a.runRoot(), sb.ID)
	rec, err := readAdoptRecord(dir)
	if err != nil {
		return fmt.Errorf("no adoption record: %w", err)
	}
	// A sandbox that claimed a warm VM has run/<id> linking to the VM's own directory,
	// which is what its VMM's command line names.
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("run directory: %w", err)
	}
	// The network's programs stayed attached through their pins; take them back with
	// the policy the state holds now (it may have changed while no agent ran).
	var sn SandboxNet
	defer func() {
		if err != nil && sn != nil && !stopping() {
			_ = sn.Remove() // the VM is gone (killed below), and so is its network
		}
	}()
	if rec.Sandbox.Spec.Network != state.NetworkNone {
		if sn, err = a.net.Adopt(real, policyOf(sb.Spec)); err != nil {
			return fmt.Errorf("sandbox network: %w", err)
		}
	}
	var vols volumeService
	if use := volumesOf(rec.Sandbox.ID, rec.Sandbox.Spec); len(use.mounts) > 0 && sn != nil {
		// Its server outlived the earlier agent (it is a process of its own); one that did
		// not is started again, and the guest's client reconnects. A relay to the
		// volumes' node died with that agent: this one relays from now on.
		nsPath := filepath.Join("/run/netns", sn.Namespace())
		if use.elsewhere(a.cfg.Node) {
			vols, err = a.vms.relayVolumes(nsPath, use)
		} else {
			vols, err = a.vms.adoptVolumes(actx, dir, nsPath, filepath.Base(dir), use.mounts)
		}
		if err != nil {
			return fmt.Errorf("volume server: %w", err)
		}
		defer func() {
			if err != nil && !stopping() {
				vols.Stop()
			}
		}()
	}
	vm, err := a.vms.driver.Adopt(actx, real)
	if err != nil {
		return err
	}
	// giveUp ends the VM of a failed adoption, or leaves it running when the agent stops.
	giveUp := func() {
		if d, ok := vm.(vmm.Detacher); ok && stopping() {
			_ = d.Detach()
			return
		}
		_ = vm.Kill()
	}
	sock := filepath.Join(dir, "agent.sock")
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		giveUp()
		return fmt.Errorf("listen on guest channel %s: %w", sock, err)
	}
	if err := vmm.ShareSocket(a.vms.driver, sock); err != nil {
		giveUp()
		return fmt.Errorf("listen on guest channel %s: %w", sock, err)
	}
	guest, err := a.vms.connectGuest(actx, ln, vm)
	if err != nil {
		ln.Close()
		giveUp()
		return fmt.Errorf("guest channel after adoption: %w", err)
	}
	main, err := guest.Reattach(actx, rec.Main)
	if err != nil {
		guest.Close()
		ln.Close()
		giveUp()
		return fmt.Errorf("reattach to the main process (session %d): %w", rec.Main, err)
	}
	w, err := a.openLog(sb)
	if err != nil {
		guest.Close()
		ln.Close()
		giveUp()
		return err
	}
	s := &sandbox{id: sb.ID, dir: dir, log: w, ready: make(chan struct{}), done: make(chan struct{}), spec: rec.Sandbox.Spec,
		vm: vm, guest: guest, main: main, proc: rec.Proc, restarts: sb.Restarts, resumes: sb.Resumes, node: sb.Node}
	close(s.ready)
	// A sidecar adopted was ready (its main's command started after it was).
	s.groupReady = make(chan struct{})
	close(s.groupReady)
	if d := sb.ImageDigest; d != "" {
		s.started.ImageDigest = &d // the image it runs from stays in the store (see imageInUse)
	} else if d := rec.Sandbox.ImageDigest; d != "" {
		s.started.ImageDigest = &d
	}
	s.ctx, s.cancel = context.WithCancel(a.ctx)
	a.mu.Lock()
	a.live[sb.ID] = s
	a.started[fmt.Sprintf("%s/%d/%d", sb.ID, sb.Restarts, sb.Resumes)] = true
	a.mu.Unlock()

	a.goSandbox(s, func() {
		defer s.log.Close()
		var cleanup cleanupStack
		defer cleanup.run(a.log)
		a.ownVM(s, &vmHandle{vm: vm, guest: guest, ln: ln, scratch: filepath.Join(dir, "scratch.img"), net: sn, vols: vols}, &cleanup)
		// Its group's peers, which this agent's networks do not know yet (the routes
		// in its namespace stayed; its policy's peers come back).
		a.refreshGroup(s.spec.Group)
		a.update(sb.ID, state.Update{Runtime: map[string]string{"pid": strconv.Itoa(vm.Info().PID), "adopted_at": time.Now().UTC().Format(time.RFC3339)}})
		reported := make(chan struct{})
		close(reported) // an adopted sandbox was reported running by the agent before
		a.supervise(s.ctx, s, rec.Sandbox, vm, main, reported)
	})
	return nil
}

// adoptAll tries to take back every sandbox the state says runs here; the ones that
// cannot be are returned with the reason, for the caller to mark lost.
func (a *Agent) adoptAll(ctx context.Context, sbs []state.Sandbox) map[string]error {
	failed := map[string]error{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, sb := range sbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := a.adopt(ctx, sb)
			if err == nil {
				a.log.Info("re-adopted a running sandbox", "sandbox", sb.ID)
				return
			}
			mu.Lock()
			failed[sb.ID] = err
			mu.Unlock()
		}()
	}
	wg.Wait()
	return failed
}
