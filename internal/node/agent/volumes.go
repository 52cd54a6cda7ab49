package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/node/volume"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Volumes on a node: each volume's data is a filesystem image in the node's volume store
// (volume.Store); a sandbox that mounts volumes gets a server of its own (a jailed
// process, see volume.ServerCommand) answering NFSv3 on its namespace's gateway address,
// one port per mount. The namespace is the sandbox's alone, so no other sandbox can reach
// that server: volume traffic is admitted for the sandboxes that mount the volume and no
// other, by construction. A guest restored from a saved or migrated state finds its
// server at the same address and port, served by a new process in its new namespace; the
// server's file handles are the kernel's, so its NFS client goes on where it was.

// volumePortBase is the port of a sandbox's first volume mount; mount i is on base+i.
// The lock manager and the portmapper the guest's lock daemon asks for it are on their
// usual ports.
const (
	volumePortBase = 2049
	lockPort       = 4045
	portmapPort    = 111
)

// volumeServerUID is the user (and group) every volume server runs as: not root, no
// VMM's, of no group a VMM is in.
const volumeServerUID = 1_799_999_998

// volumeServerLimits bound each volume server: a guest's requests are bounded one by one
// (see volume.maxFragment); this bounds what all of them, and the server, can take.
var volumeServerLimits = jail.Limits{MemoryBytes: 384 << 20, Pids: 128, CPUs: 1}

// Files in a run directory of a sandbox with volumes.
const (
	volumeServerPID = "volume-server.pid"
	volumeServerLog = "volume-server.log"
	volumeJailRoot  = "volume-jail"
)

// guestVolumes is what the guest mounts for the sandbox's volume mounts: mount i on its
// port, in the order of their paths' depth (as Docker does), so that a mount inside
// another's path is mounted over it, whatever the order given.
func guestVolumes(mounts []state.VolumeMount) []proto.VolumeMount {
	var out []proto.VolumeMount
	for i, m := range mounts {
		out = append(out, proto.VolumeMount{Server: network.GuestGateway.String(), Port: uint16(volumePortBase + i), Path: m.Path, ReadOnly: m.ReadOnly})
	}
	slices.SortStableFunc(out, func(a, b proto.VolumeMount) int {
		return strings.Count(a.Path, "/") - strings.Count(b.Path, "/")
	})
	return out
}

// volumeError is a start's failure to serve its volumes: the sandbox's, not the VM's
// (a template that was to be restored is not to blame, nor would a boot do better).
type volumeError struct{ error }

func (e volumeError) Unwrap() error { return e.error }

// CreateVolume makes volume id's filesystem, sizeMiB large, on this node.
func (a *Agent) CreateVolume(ctx context.Context, id string, sizeMiB int) error {
	if err := a.vms.volumes.Create(ctx, id, sizeMiB); err != nil {
		if errors.Is(err, volume.ErrNoSpace) {
			return fmt.Errorf("%w: %v", state.ErrNoRoom, err)
		}
		return fmt.Errorf("%w: %v", state.ErrInvalid, err)
	}
	a.log.Info("volume created", "volume", id, "size_mib", sizeMiB)
	return nil
}

// RemoveVolume removes volume id's data; a sandbox of this node that still mounts it
// keeps it.
func (a *Agent) RemoveVolume(ctx context.Context, id string) error {
	if err := a.mountedHere(id); err != nil {
		return err
	}
	if a.relayedVolumes()[id] {
		return fmt.Errorf("%w: volume %s is mounted by a sandbox on another node", state.ErrInUse, id)
	}
	if err := a.vms.volumes.Remove(ctx, id); err != nil {
		return err
	}
	a.vms.setExport(id, "", time.Time{})
	a.log.Info("volume removed", "volume", id)
	return nil
}

// mountedHere refuses volume id while a sandbox live on this node mounts it.
func (a *Agent) mountedHere(id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var users []string
	for _, s := range a.live {
		if slices.ContainsFunc(s.spec.Volumes, func(m state.VolumeMount) bool { return m.Volume == id }) {
			users = append(users, s.id)
		}
	}
	if len(users) > 0 {
		return fmt.Errorf("%w: volume %s is mounted by sandbox %v on this node", state.ErrInUse, id, users)
	}
	return nil
}

// VolumeUsage is the space volume id's filesystem uses.
func (a *Agent) VolumeUsage(ctx context.Context, id string) (int64, error) {
	if to := a.vms.exportedTo(id); to != "" {
		return 0, fmt.Errorf("volume %s is being moved to node %s", id, to)
	}
	if err := a.vms.volumes.Mount(ctx, id); err != nil {
		return 0, fmt.Errorf("volume %s: %w", id, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(a.vms.volumes.Dir(id), &st); err != nil {
		return 0, fmt.Errorf("volume %s: %w", id, err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize, nil
}

// volServer is the volume server of one sandbox's run: started here, or found running
// (an earlier agent's, after a restart). Its owner (the VM handle) stops it.
type volServer struct {
	log    *slog.Logger
	dir    string // the run directory
	nsPath string // the sandbox's network namespace ("" for a relayed server)
	spec   volume.ServerSpec
	mounts []string // the IDs of the volumes served
	// listeners are the mounts' sockets in the sandbox's namespace, held so that a server
	// that dies can be replaced without the guest's client noticing more than a pause
	// (nil for a server found running: its listeners are its own).
	listeners []*os.File
	stop      chan struct{}
	exit      chan struct{} // a started server's exit, for supervise
	done      chan struct{}

	mu  sync.Mutex
	pid int
	// adopted: the server is an earlier agent's (not this process's child).
	adopted bool
	// cgroupParent names the directory of the node's volume servers' cgroups, and
	// cgroupName the server's own in it.
	cgroupParent jail.Place
	cgroupName   string
}

// volumeUse is what a sandbox's VM needs served for its volumes: its mounts, whose data
// is on node (at address).
type volumeUse struct {
	sandbox       string
	mounts        []state.VolumeMount
	node, address string
}

// elsewhere says whether the volumes are on another node than node (relayed there).
func (u volumeUse) elsewhere(node string) bool { return u.node != "" && u.node != node }

func volumesOf(id string, spec state.SandboxSpec) volumeUse {
	return volumeUse{sandbox: id, mounts: spec.Volumes, node: spec.VolumeNode, address: spec.VolumeAddress}
}

// volumeService serves a sandbox's volumes in its namespace: a volume server of its own
// (volServer), or a relay to the server on the volumes' node (volRelay).
type volumeService interface{ Stop() }

// serveVolumes serves use's volumes to the sandbox whose run directory is dir and whose
// network namespace is at nsPath: from this node's volume store if they are here, else
// relayed to their node.
func (m *vms) serveVolumes(ctx context.Context, dir, nsPath string, use volumeUse) (volumeService, error) {
	if use.elsewhere(m.node) {
		return m.relayVolumes(nsPath, use)
	}
	return m.startVolumeServer(ctx, dir, nsPath, filepath.Base(dir), use.mounts)
}

// startVolumeServer starts a volume server for mounts: in the network namespace at
// nsPath, or, with nsPath "", on unix sockets in dir for the relayed calls of a sandbox
// on another node.
func (m *vms) startVolumeServer(ctx context.Context, dir, nsPath, name string, mounts []state.VolumeMount) (*volServer, error) {
	v, err := m.volumeServer(ctx, dir, nsPath, name, mounts)
	if err != nil {
		return nil, err
	}
	if err = v.listen(); err == nil {
		err = v.start()
	}
	if err != nil {
		v.closeListeners()
		jail.RemoveCgroups(v.spec.Cgroups)
		return nil, err
	}
	go v.supervise()
	return v, nil
}

// volumeServer prepares (not starts) the volume server of the run at dir (relayed, with
// nsPath ""): its volumes mounted, its jail's root and its cgroups (named name) made.
func (m *vms) volumeServer(ctx context.Context, dir, nsPath, name string, mounts []state.VolumeMount) (*volServer, error) {
	if m.volumes == nil {
		return nil, errors.New("this node keeps no volumes")
	}
	if m.volumeServerErr != nil {
		return nil, m.volumeServerErr
	}
	spec := volume.ServerSpec{Root: filepath.Join(dir, volumeJailRoot), UID: volumeServerUID, GID: volumeServerUID, NLMPort: lockPort,
		Peer: network.GuestAddr.String(), Binary: m.volumeServerBin}
	if nsPath == "" {
		spec.Peer, spec.Relayed = "", true
	}
	for _, mt := range mounts {
		if to := m.exportedTo(mt.Volume); to != "" {
			return nil, fmt.Errorf("volume %s is being moved to node %s", mt.Volume, to)
		}
		if err := m.volumes.Mount(ctx, mt.Volume); err != nil {
			return nil, fmt.Errorf("volume %s: %w", mt.Volume, err)
		}
		spec.Exports = append(spec.Exports, volume.Export{Dir: m.volumes.Dir(mt.Volume), ReadOnly: mt.ReadOnly})
	}
	if err := os.MkdirAll(spec.Root, 0o700); err != nil {
		return nil, fmt.Errorf("volume server's root: %w", err)
	}
	cgroups, missing, err := jail.MakeCgroups(m.volumeCgroup, name, volumeServerLimits)
	if err != nil {
		jail.RemoveCgroups(cgroups)
		return nil, fmt.Errorf("volume server's cgroup: %w", err)
	}
	if slices.Contains(missing, "memory") {
		jail.RemoveCgroups(cgroups)
		return nil, errors.New("the node has no memory cgroup controller mounted: a volume server is not run unbounded")
	}
	if len(missing) > 0 {
		m.log.Warn("cgroup controllers are not mounted: the volume server runs without their limits", "controllers", missing)
	}
	spec.Cgroups = cgroups
	ids := make([]string, len(mounts))
	for i, mt := range mounts {
		ids[i] = mt.Volume
	}
	return &volServer{log: m.log, dir: dir, nsPath: nsPath, spec: spec, mounts: ids, stop: make(chan struct{}), exit: make(chan struct{}), done: make(chan struct{}),
		cgroupParent: m.volumeCgroup, cgroupName: name}, nil
}

// volumePorts are the ports a sandbox with n volume mounts finds its volumes on: one per
// mount, the portmapper's and the lock manager's (in the order of a server's listeners).
func volumePorts(n int) []int {
	ports := make([]int, 0, n+2)
	for i := range n {
		ports = append(ports, volumePortBase+i)
	}
	return append(ports, portmapPort, lockPort)
}

// relaySocket is the unix socket of a relayed server's listener i in its directory.
func relaySocket(dir string, i int) string { return filepath.Join(dir, "s"+strconv.Itoa(i)) }

// listen makes the server's listeners: in the sandbox's namespace, one per mount, the
// portmapper's and the lock manager's; for a relayed server, unix sockets in its
// directory, in the same order.
func (v *volServer) listen() error {
	ports := volumePorts(len(v.spec.Exports))
	if v.spec.Relayed {
		for i := range ports {
			path := relaySocket(v.dir, i)
			_ = os.Remove(path)
			ln, err := net.Listen("unix", path)
			if err != nil {
				return fmt.Errorf("listen for the relayed volume server (%d): %w", i, err)
			}
			ul := ln.(*net.UnixListener)
			ul.SetUnlinkOnClose(false) // the server listens on it from now on
			f, err := ul.File()
			ul.Close()
			if err != nil {
				return err
			}
			v.listeners = append(v.listeners, f)
		}
		return nil
	}
	return network.Do(v.nsPath, func() error {
		for i, port := range ports {
			addr := net.JoinHostPort(network.GuestGateway.String(), strconv.Itoa(port))
			ln, err := net.Listen("tcp4", addr)
			if err != nil {
				return fmt.Errorf("listen for the volume server (%d) on %s: %w", i, addr, err)
			}
			f, err := ln.(*net.TCPListener).File()
			ln.Close()
			if err != nil {
				return err
			}
			v.listeners = append(v.listeners, f)
		}
		return nil
	})
}

// start launches the server process on the held listeners.
func (v *volServer) start() error {
	cmd, err := volume.ServerCommand(v.spec, v.listeners)
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(v.dir, volumeServerLog), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("volume server's log: %w", err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the volume server: %w", err)
	}
	v.mu.Lock()
	v.pid = cmd.Process.Pid
	v.mu.Unlock()
	if err := os.WriteFile(filepath.Join(v.dir, volumeServerPID), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("record the volume server: %w", err)
	}
	go func() {
		_ = cmd.Wait()
		v.mu.Lock()
		v.pid = 0
		v.mu.Unlock()
		select {
		case v.exit <- struct{}{}:
		case <-v.stop:
		}
	}()
	return nil
}

// supervise starts the server again when it dies (its guest's calls wait meanwhile, on
// listeners that stay open), at most once a second, until stopped.
func (v *volServer) supervise() {
	defer close(v.done)
	for {
		select {
		case <-v.stop:
			return
		case <-v.exit:
		}
		v.log.Warn("the volume server exited; starting it again", "run", filepath.Base(v.dir))
		select {
		case <-v.stop:
			return
		case <-time.After(time.Second):
		}
		if err := v.start(); err != nil {
			v.log.Error("restart the volume server", "run", filepath.Base(v.dir), "err", err)
			return
		}
	}
}

// Stop ends the server and releases its listeners.
func (v *volServer) Stop() {
	select {
	case <-v.stop:
		return
	default:
	}
	close(v.stop)
	v.mu.Lock()
	pid, adopted := v.pid, v.adopted
	v.mu.Unlock()
	if pid > 0 && (!adopted || runningVolumeServer(v.dir) == pid) {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	<-v.done
	v.closeListeners()
	// Whatever is left in its cgroup ends with it (an adopted server's is found by name).
	jail.RemoveCgroups(v.cgroups())
	_ = os.Remove(filepath.Join(v.dir, volumeServerPID))
}

// release stops watching the server and leaves it running, for the next agent (which
// adopts it).
func (v *volServer) release() {
	select {
	case <-v.stop:
		return
	default:
	}
	close(v.stop)
	<-v.done
	v.closeListeners()
}

// cgroups are the server's cgroup directories.
func (v *volServer) cgroups() []string {
	var dirs []string
	for _, p := range jail.CgroupParents(v.cgroupParent) {
		dirs = append(dirs, filepath.Join(p, v.cgroupName))
	}
	return dirs
}

func (v *volServer) closeListeners() {
	for _, f := range v.listeners {
		f.Close()
	}
	v.listeners = nil
}

// adoptVolumes finds the volume server an earlier agent left serving the run at dir, or
// starts a new one if it is gone. A server found running is watched: should it die, a
// new one takes its place, as for a server this agent started.
func (m *vms) adoptVolumes(ctx context.Context, dir, nsPath, name string, mounts []state.VolumeMount) (*volServer, error) {
	pid := runningVolumeServer(dir)
	if pid == 0 {
		return m.startVolumeServer(ctx, dir, nsPath, name, mounts)
	}
	v, err := m.volumeServer(ctx, dir, nsPath, name, mounts)
	if err != nil {
		return nil, err
	}
	v.pid, v.adopted = pid, true
	go v.superviseAdopted()
	return v, nil
}

// superviseAdopted watches an earlier agent's server (not this process's child: it is
// looked for, once a second) and, once it is gone, serves on new listeners (its own went
// with it) as supervise does.
func (v *volServer) superviseAdopted() {
	for {
		select {
		case <-v.stop:
			close(v.done)
			return
		case <-time.After(time.Second):
		}
		v.mu.Lock()
		pid := v.pid
		v.mu.Unlock()
		if runningVolumeServer(v.dir) == pid {
			continue
		}
		v.log.Warn("the volume server from before the agent's restart exited; starting it again", "run", filepath.Base(v.dir))
		v.mu.Lock()
		v.pid, v.adopted = 0, false
		v.mu.Unlock()
		err := v.listen()
		if err == nil {
			err = v.start()
		}
		if err != nil {
			v.log.Error("restart the volume server", "run", filepath.Base(v.dir), "err", err)
			close(v.done)
			return
		}
		v.supervise()
		return
	}
}

// runningVolumeServer is the PID of the volume server recorded in dir if that process
// still runs and is one (a PID can be reused), else 0.
func runningVolumeServer(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, volumeServerPID))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.HasPrefix(cmdline, []byte(volume.ServerName+"\x00")) {
		return 0
	}
	return pid
}

// unmountVolumes, as the agent stops, unmounts the volumes no volume server still serves
// (a VM left running for the next agent keeps its server, which keeps them).
func (a *Agent) unmountVolumes() {
	keep := map[string]bool{}
	dirs, _ := os.ReadDir(a.runRoot())
	for _, d := range dirs {
		dir := filepath.Join(a.runRoot(), d.Name())
		if runningVolumeServer(dir) == 0 {
			continue
		}
		rec, err := readAdoptRecord(dir)
		if err != nil {
			// A server without a record: keep every volume rather than guess.
			a.log.Warn("a volume server runs for a run without a record; leaving the volumes mounted", "run", d.Name())
			return
		}
		for _, m := range rec.Sandbox.Spec.Volumes {
			keep[m.Volume] = true
		}
	}
	// And the servers of sandboxes on other nodes (left running: see releaseRelays).
	relays, _ := os.ReadDir(a.relayRoot())
	for _, d := range relays {
		dir := filepath.Join(a.relayRoot(), d.Name())
		if runningVolumeServer(dir) == 0 {
			continue
		}
		rec, err := readRelayRecord(dir)
		if err != nil {
			a.log.Warn("a relayed volume server runs without a record; leaving the volumes mounted", "sandbox", d.Name())
			return
		}
		for _, m := range rec.Mounts {
			keep[m.Volume] = true
		}
	}
	ids, err := a.vms.volumes.Mounted()
	if err != nil {
		a.log.Warn("list mounted volumes", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, id := range ids {
		if keep[id] {
			continue
		}
		if err := a.vms.volumes.Unmount(ctx, id); err != nil {
			a.log.Warn("unmount volume", "volume", id, "err", err)
		}
	}
}

// volumeCgroupFor names the cgroup directory of the volume servers of the agent with
// data directory dataDir (two agents on a host keep theirs apart).
func volumeCgroupFor(dataDir string) string {
	h := fnv.New32a()
	h.Write([]byte(dataDir))
	return fmt.Sprintf("fireworks-vol-%03x", h.Sum32()%4096)
}
