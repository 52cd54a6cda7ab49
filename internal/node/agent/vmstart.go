package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/node/volume"
)

// vms makes this node's VMs: scratch disk, guest channel, network, the VMM (a boot or a
// restore, launched ahead or not) and the guest's handshake. Sandboxes, templates, warm
// pools and restore slots all get their VMs here; it knows the node's guest kernel,
// initramfs, VMM driver and accelerator, which is also what a template's key records.
type vms struct {
	driver      vmm.Driver
	kernel      *assets.Kernel
	initrd      *assets.Initramfs
	accel       vmm.AccelChoice
	kernelHash  string // sha256 of vmlinux (template snapshots depend on the exact kernel)
	vmmVersion  string
	scratch     string // an empty formatted scratch disk, copied for each VM
	scratchMiB  int
	nameservers []string
	bootTimeout time.Duration
	runRoot     string
	net         Networks
	volumes     *volume.Store // the node's volumes' data
	// volumeCgroup names the directory of this agent's volume servers' cgroups.
	volumeCgroup jail.Place
	// volumeServerBin is the agent's copy of the volume server binary (InstallServer);
	// volumeServerErr why there is none.
	volumeServerBin string
	volumeServerErr error
	// node is this node's name; dialVolume reaches the volumes of other nodes (nil: it
	// cannot, one node).
	node       string
	dialVolume VolumeDialer
	// exports are the volumes being moved to other nodes (not mounted here meanwhile).
	exportMu sync.Mutex
	exports  map[string]volumeExport
	log      *slog.Logger
}

// vmInput is one VM to start for a sandbox or a warm pool.
type vmInput struct {
	id, dir    string
	rootDisk   string
	vcpus, mem int
	// tmpl, if set, is restored instead of booting the kernel; its scratch disk is copied.
	tmpl *template
	// net gives the VM a network (owned by the run directory's name) with policy in
	// force, or, with closedNet, one that lets nothing through until a sandbox claims it.
	net       bool
	policy    NetPolicy
	closedNet bool
	// saved, if set, is a whole VM saved by a pause: restored from its state, on its own
	// scratch disk (linked, not copied: the saved file stays until the resume is done).
	saved *savedFiles
	// savedCopy copies the saved scratch disk instead of linking it (a fork: the saved
	// state stays its source's).
	savedCopy bool
	// scratchFrom, if set, is the disk a booted VM's scratch disk is copied from (a
	// filesystem snapshot's) instead of the node's empty one.
	scratchFrom string
	// memFile, with saved, makes a VM that flattens the save into this memory file
	// (vmm.Flattener) instead of running it.
	memFile string
	// incoming, if set, makes the VM a live migration's target (see migrate.go): it
	// restores from the stream, on an empty scratch disk of scratchBytes that the
	// source mirrors into.
	incoming     *vmm.Snapshot
	scratchBytes int64
	// volumes, with net, get a volume server in the VM's namespace before the VM runs
	// (a restored guest's client reconnects to it at once).
	volumes volumeUse
}

// savedFiles are a paused sandbox's VM files (see pause.go); mem, if set, is a flattened
// save's memory file (see flatten.go), state then its device state.
type savedFiles struct{ state, scratch, mem string }

// vmHandle is a started VM whose guest answered.
type vmHandle struct {
	vm      vmm.VM
	guest   *client.Client
	ln      net.Listener
	scratch string
	net     SandboxNet    // nil without a network
	vols    volumeService // nil without volumes
	tap     *os.File      // the tap for the VMM, closed once the VMM has its own copy
	netTime time.Duration // making the network (namespace, NAT, programs)
	vmmTime time.Duration // VMM create and start (with a restore: loading the state)
	guestT  time.Duration // until the guest's handshake
	ahead   bool          // the VMM was launched ahead (a restore slot)
}

// startVM makes the run directory's scratch disk and guest channel, starts the VMM (boot
// or restore) and completes the guest handshake. On error it undoes all of it.
func (m *vms) startVM(ctx context.Context, in vmInput) (*vmHandle, error) {
	h, err := m.prepareVM(ctx, in, false)
	if err != nil {
		return nil, err
	}
	if err := m.runVM(ctx, h); err != nil {
		return nil, err
	}
	return h, nil
}

// prepareVM makes the run directory's scratch disk and guest channel and creates the VM;
// with prestart it also launches the VMM ahead of the restore (vmm.Prestarter). On error
// it undoes all of it.
func (m *vms) prepareVM(ctx context.Context, in vmInput, prestart bool) (h *vmHandle, err error) {
	if err := os.MkdirAll(in.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create run directory: %w", err)
	}
	h = &vmHandle{scratch: filepath.Join(in.dir, "scratch.img")}
	defer func() {
		if err != nil {
			h.undo()
		}
	}()
	base := cmp.Or(in.scratchFrom, m.scratch)
	var snap *vmm.Snapshot
	if in.tmpl != nil {
		base, snap = in.tmpl.scratch(), in.tmpl.snapshot()
	}
	if in.incoming != nil {
		snap = in.incoming
		if err := emptyDisk(h.scratch, in.scratchBytes); err != nil {
			return h, fmt.Errorf("create the scratch disk the migration fills: %w", err)
		}
	} else if in.saved != nil {
		snap = &vmm.Snapshot{StateFile: in.saved.state, MemoryFile: in.saved.mem}
		_ = os.Remove(h.scratch)
		take := linkOrCopy
		if in.savedCopy {
			take = copySparse
		}
		if err := take(in.saved.scratch, h.scratch); err != nil {
			return h, fmt.Errorf("take the saved scratch disk: %w", err)
		}
	} else if err := copySparse(base, h.scratch); err != nil {
		return h, fmt.Errorf("create scratch disk: %w", err)
	}
	sock := filepath.Join(in.dir, "agent.sock")
	if len(sock) >= 100 {
		return h, fmt.Errorf("run directory path too long for a unix socket: %s (use a shorter --data-dir)", sock)
	}
	_ = os.Remove(sock)
	if h.ln, err = net.Listen("unix", sock); err != nil {
		return h, fmt.Errorf("listen on guest channel %s: %w", sock, err)
	}
	if err := vmm.ShareSocket(m.driver, sock); err != nil {
		return h, fmt.Errorf("listen on guest channel %s: %w", sock, err)
	}
	var nics []vmm.NIC
	if in.net {
		tn := time.Now()
		if h.net, err = m.net.Acquire(ctx, in.dir, in.policy, in.closedNet); err != nil {
			return h, fmt.Errorf("create the sandbox network: %w", err)
		}
		if h.tap, err = h.net.Tap(); err != nil {
			return h, err
		}
		nics = []vmm.NIC{{Tap: h.tap, MAC: network.GuestMAC}}
		h.netTime = time.Since(tn)
		if len(in.volumes.mounts) > 0 {
			if h.vols, err = m.serveVolumes(ctx, in.dir, filepath.Join("/run/netns", h.net.Namespace()), in.volumes); err != nil {
				return h, fmt.Errorf("serve the sandbox's volumes: %w", volumeError{err})
			}
		}
	} else if len(in.volumes.mounts) > 0 {
		return h, errors.New("volumes need the sandbox's network (they are served on it)")
	}
	t0 := time.Now()
	vm, err := m.driver.Create(ctx, vmm.Spec{
		ID: in.id, Dir: in.dir, Kernel: m.kernel.Vmlinux, Initrd: m.initrd.Path,
		Cmdline: m.cmdline(), VCPUs: in.vcpus, MemoryMiB: in.mem,
		Disks:       []vmm.Disk{{Path: in.rootDisk, ReadOnly: true}, {Path: h.scratch}},
		AgentSocket: sock, Restore: snap, NICs: nics, MemoryFile: in.memFile,
	})
	if err != nil {
		return h, fmt.Errorf("create VM: %w", err)
	}
	h.vm = vm
	if prestart {
		ps, ok := vm.(vmm.Prestarter)
		if !ok {
			return h, fmt.Errorf("the %s driver cannot launch VMMs ahead: %w", m.driver.Name(), vmm.ErrNotSupported)
		}
		if err := ps.Prestart(ctx); err != nil {
			return h, fmt.Errorf("launch VMM ahead: %w", err)
		}
		h.closeTap()
	}
	h.vmmTime = time.Since(t0)
	return h, nil
}

// runVM starts a prepared VM (a prestarted one only loads its state and resumes) and
// completes the guest handshake. On error it undoes the VM and its files.
func (m *vms) runVM(ctx context.Context, h *vmHandle) error {
	t0 := time.Now()
	err := h.vm.Start(ctx)
	h.closeTap()
	if err != nil {
		h.undo()
		return fmt.Errorf("start VMM: %w", err)
	}
	t1 := time.Now()
	h.vmmTime += t1.Sub(t0)
	if h.guest, err = m.connectGuest(ctx, h.ln, h.vm); err != nil {
		h.undo()
		return err
	}
	h.guestT = time.Since(t1)
	return nil
}

func (h *vmHandle) closeTap() {
	if h.tap != nil {
		h.tap.Close()
		h.tap = nil
	}
}

// undo ends whatever of the VM exists and removes its scratch disk and network.
func (h *vmHandle) undo() {
	defer func() {
		if h.vols != nil {
			h.vols.Stop()
		}
		if h.net != nil {
			_ = h.net.Remove()
		}
	}()
	h.closeTap()
	if h.guest != nil {
		h.guest.Close()
	}
	if h.vm != nil {
		_ = h.vm.Kill()
		<-h.vm.Wait()
	}
	if h.ln != nil {
		h.ln.Close()
	}
	_ = os.Remove(h.scratch)
}

// emptyDisk creates path as an empty (sparse) file of size bytes.
func emptyDisk(path string, size int64) error {
	_ = os.Remove(path)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// phases records how long each step of a start took, for inspect.
type phases struct {
	names []string
	took  []time.Duration
	last  time.Time
}

func newPhases() *phases { return &phases{last: time.Now()} }

// mark ends the phase called name at now.
func (p *phases) mark(name string) {
	now := time.Now()
	p.add(name, now.Sub(p.last))
	p.last = now
}

func (p *phases) add(name string, d time.Duration) {
	p.names = append(p.names, name)
	p.took = append(p.took, d)
}

func (p *phases) String() string {
	var b strings.Builder
	for i, n := range p.names {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%s", n, fmtMs(p.took[i]))
	}
	return b.String()
}

func fmtMs(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%dms", d.Milliseconds())
}

// ownVM makes a started VM the sandbox's: the cleanup stack ends it with the sandbox
// (unless it was left running for the next agent to adopt).
func (a *Agent) ownVM(s *sandbox, h *vmHandle, cleanup *cleanupStack) {
	cleanup.push("remove scratch disk", func() error {
		if s.kept() {
			return nil // the VM was left running for adoption and still uses it
		}
		return os.Remove(h.scratch)
	})
	// Pushed before the VM's stop, so it runs after it: a guest powering off writes back
	// and unmounts its volumes through the server. (A VM made ahead gets its server only
	// once claimed, after this: h.vols is read when the cleanup runs.)
	cleanup.push("stop the volume server", func() error {
		if h.vols != nil && !s.kept() {
			h.vols.Stop()
		}
		return nil
	})
	if h.net != nil {
		cleanup.push("remove sandbox network", func() error {
			if s.kept() {
				return nil // the VM was left running for adoption and still uses it
			}
			// Its group's members stop reaching its address before the address can go
			// to another sandbox.
			s.mu.Lock()
			if s.net == h.net {
				s.net = nil
			}
			s.mu.Unlock()
			a.refreshGroup(s.spec.Group)
			return h.net.Remove()
		})
	}
	cleanup.push("close guest channel listener", h.ln.Close)
	cleanup.push("stop VM", func() error {
		if s.kept() {
			return nil
		}
		sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		return h.vm.Stop(sctx, 5*time.Second)
	})
	cleanup.push("close guest channel", func() error {
		s.mu.Lock()
		g := s.guest // a failed migration's reconnect may have replaced it
		s.mu.Unlock()
		if g != nil && g != h.guest {
			g.Close()
		}
		return h.guest.Close()
	})
	s.mu.Lock()
	s.vm, s.net, s.guestLn = h.vm, h.net, h.ln
	s.mu.Unlock()
}

// adoptPoolVM turns a claimed warm VM into the sandbox's: its run directory becomes the
// sandbox's (run/<id> links to it, so adoption, inspect and removal find it by ID), and
// it is resumed. It returns nil if the VM cannot be used, after ending it.
func (a *Agent) adoptPoolVM(s *sandbox, pv *poolVM, cleanup *cleanupStack) *vmHandle {
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	if p, ok := pv.h.vm.(vmm.Pauser); ok {
		if err := p.Resume(ctx); err != nil {
			a.log.Warn("resume warm VM", "sandbox", s.id, "err", err)
			pv.destroy()
			return nil
		}
	}
	if err := pv.claim(s.dir); err != nil {
		a.log.Warn("claim warm VM", "sandbox", s.id, "err", err)
		return nil
	}
	a.ownVM(s, pv.h, cleanup)
	return pv.h
}

// useSlot restores the sandbox's VM in a VMM launched ahead: run/<id> links to the slot's
// directory, and only the state is loaded. On error the slot and the link are gone, so the
// caller can start afresh in run/<id>.
func (a *Agent) useSlot(ctx context.Context, s *sandbox, sl *slot) (*vmHandle, error) {
	if err := sl.claim(s.dir); err != nil {
		return nil, err
	}
	if sl.h.net != nil {
		// Made ahead with a network that lets nothing through: this sandbox's policy now.
		if err := sl.h.net.Open(policyOf(s.spec)); err != nil {
			sl.destroy()
			_ = a.removeRunDir(s.id)
			return nil, fmt.Errorf("network policy: %w", err)
		}
	}
	sl.h.vmmTime, sl.h.netTime, sl.h.ahead = 0, 0, true // its launch and network are not part of this start
	if err := a.vms.runVM(ctx, sl.h); err != nil {
		_ = a.removeRunDir(s.id)
		return nil, err
	}
	return sl.h, nil
}

// shape fills in the node's default vCPUs and memory where a request names none.
func (a *Agent) shape(vcpus, memMiB int) (int, int) {
	return cmp.Or(vcpus, a.cfg.DefaultVCPUs), cmp.Or(memMiB, a.cfg.DefaultMemoryMiB)
}

// sandboxUsage is what the sandboxes live on this node reserve.
func (a *Agent) sandboxUsage() (vcpus, memMiB int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, s := range a.live {
		v, m := a.shape(s.spec.VCPUs, s.spec.MemoryMiB)
		vcpus += v
		memMiB += m
	}
	return vcpus, memMiB
}

func (m *vms) cmdline() string { return assets.KernelCmdline(m.initrd.Modules) }

// connectGuest waits for the VM to dial the guest channel and completes the handshake,
// racing the VMM's death and the boot deadline.
func (m *vms) connectGuest(ctx context.Context, ln net.Listener, vm vmm.VM) (*client.Client, error) {
	bootCtx, cancel := context.WithTimeout(ctx, m.bootTimeout)
	defer cancel()
	type result struct {
		c   *client.Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				res <- result{err: fmt.Errorf("accept guest channel: %w", err)}
				return
			}
			c, err := client.Handshake(bootCtx, conn)
			if err != nil {
				// QEMU reconnects; a failed handshake before the guest is up is retried
				// until the boot deadline.
				conn.Close()
				if bootCtx.Err() != nil {
					res <- result{err: fmt.Errorf("guest handshake: %w", err)}
					return
				}
				continue
			}
			res <- result{c: c}
			return
		}
	}()
	select {
	case r := <-res:
		return r.c, r.err
	case <-vm.Wait():
		ln.Close()
		<-res
		return nil, fmt.Errorf("VMM exited during boot: %v", vm.ExitError())
	case <-bootCtx.Done():
		ln.Close()
		<-res
		if ctx.Err() != nil {
			return nil, fmt.Errorf("guest did not answer: %w (see the console log %s)", context.Cause(ctx), vm.Info().ConsoleLog)
		}
		return nil, fmt.Errorf("guest did not answer within %s (see the console log %s)", m.bootTimeout, vm.Info().ConsoleLog)
	}
}
