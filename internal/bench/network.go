package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// The network series: TCP between a guest and its host end (the node's side of the
// sandbox's veth pair), with the sandbox's eBPF policy attached and detached, and HTTP
// through the ingress. The guest side is busybox; the host side is this process.
//
// Guest tools are chosen so that they do not limit what is measured: a single process
// moves the bytes between the socket and /dev/zero or /dev/null in large buffers
// (`nc ... -e cat`). Under TCG a pipe between two guest processes costs far more than
// the network: `dd | nc`, the feasibility note's method, is measured once beside them
// (and its guest context switches counted) to show it.

// Network series keys: which side sends.
const (
	DirGuestToHost = "guest→host"
	DirHostToGuest = "host→guest"
	PolicyAttached = "attached"
	PolicyDetached = "detached"
)

// NetworkReport is the network series of one run.
type NetworkReport struct {
	// SecondsPerTransfer is how long each throughput sample streams.
	SecondsPerTransfer float64 `json:"seconds_per_transfer"`
	// Detached says what "detached" means.
	Detached   string          `json:"detached"`
	Throughput []ThroughputRow `json:"throughput"`
	RTT        []RTTRow        `json:"tcp_rtt"`
	// PolicyCounted is the packets each sandbox's policy programs counted over the
	// measurements: the detached one's stays 0, which shows nothing ran.
	PolicyCounted map[string]uint64 `json:"policy_counted_packets"`
	// ProgramCost is the kernel's run-time statistics of the attached sandbox's programs
	// over the measurements (BPF_ENABLE_STATS): the cost of enforcement itself.
	ProgramCost []ProgramCost `json:"ebpf_run_time,omitempty"`
	// MeasuredSeconds is the wall time of the measurements ProgramCost covers.
	MeasuredSeconds float64 `json:"measured_seconds,omitempty"`
	// ProgramCostNote says why ProgramCost is missing.
	ProgramCostNote string `json:"ebpf_run_time_note,omitempty"`
	// Pipeline is guest→host through `dd | nc` (attached): the tool chain the
	// feasibility note measured.
	Pipeline *PipelineRow `json:"dd_nc_pipeline,omitempty"`
	Guest    GuestNet     `json:"guest"`
	Ingress  *IngressRow  `json:"ingress,omitempty"`
	// IngressNote says why there is no ingress row.
	IngressNote string `json:"ingress_note,omitempty"`
}

// ThroughputRow is one direction with the policy attached or detached.
type ThroughputRow struct {
	Direction string    `json:"direction"`
	Policy    string    `json:"policy"`
	GuestTool string    `json:"guest_tool"`
	MBps      float64   `json:"mb_per_s_p50"` // 10^6 bytes per second, median of the samples
	Samples   []float64 `json:"mb_per_s_samples"`
	// FrameBytes is the mean size of the frames carrying the stream on the guest's tap
	// (what QEMU and the guest exchange; above 1514 means segmentation offload is used).
	FrameBytes float64 `json:"tap_frame_bytes_mean"`
	// QEMUCPU is the VM process's CPU time over the wall time of the samples, in % of one
	// CPU; BusiestThread is its busiest thread's (under TCG, the vCPU).
	QEMUCPU       float64 `json:"qemu_cpu_pct"`
	BusiestThread float64 `json:"qemu_busiest_thread_cpu_pct"`
	// GuestBusy is the share of the guest's vCPU time that was not idle (its own
	// /proc/stat, over the samples).
	GuestBusy float64 `json:"guest_cpu_busy_pct"`
}

// RTTRow is one-byte TCP round trips from the host to an echo in the guest.
type RTTRow struct {
	Policy string  `json:"policy"`
	N      int     `json:"n"`
	RTT    Summary `json:"rtt_ms"`
}

// PipelineRow is the `dd | nc` measurement.
type PipelineRow struct {
	MBps float64 `json:"mb_per_s"`
	// SwitchesPer8K is the guest's context switches per 8 KiB moved (nc's buffer).
	SwitchesPer8K float64 `json:"guest_context_switches_per_8KiB"`
	FrameBytes    float64 `json:"tap_frame_bytes_mean"`
	GuestBusy     float64 `json:"guest_cpu_busy_pct"`
}

// GuestNet is what the guest says about its network and clock.
type GuestNet struct {
	MTU int `json:"mtu"`
	// Offloads are the virtio-net features the guest driver negotiated that matter for
	// throughput.
	Offloads    []string `json:"virtio_net_features"`
	Clocksource string   `json:"clocksource"`
}

// ProgramCost is one eBPF program's runs and run time.
type ProgramCost struct {
	Program  string  `json:"program"` // out_link, in_link, guard_link: the link it runs behind
	Runs     uint64  `json:"runs"`
	TotalMs  float64 `json:"total_ms"`
	NsPerRun float64 `json:"ns_per_run"`
}

// IngressRow is HTTP GET latency to busybox httpd in a sandbox, straight to the
// sandbox's address and through the ingress, each on a new connection.
type IngressRow struct {
	Requests int     `json:"requests"`
	Direct   Summary `json:"direct_ms"`
	Ingress  Summary `json:"via_ingress_ms"`
}

// ingressTarget is the dev server's built-in ingress.
type ingressTarget struct {
	addr, domain string
}

const detachedMeaning = "the sandbox's policy programs (tcx out_link, in_link on the host end of its veth pair) and its guard (tcx guard_link on the tap) detached through their bpffs pins (BPF_LINK_DETACH): no eBPF on the path"

// httpdCmd serves "ok" on guest port 8080.
var httpdCmd = []string{"sh", "-c", "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"}

const httpdPort = 8080

// netSandbox is one sandbox of the network series.
type netSandbox struct {
	sandboxInfo
	policy   string // attached or detached
	hostEnd  netip.Addr
	lastPort int // the guest port the last host→guest stream listened on
}

// measureNetwork runs the network series on two sandboxes of ref, one with its policy
// attached and one with it detached, measured in turns so that a change in the
// machine's load hits both alike.
func measureNetwork(ctx context.Context, cfg Config, api *apiClient, ref string, ing *ingressTarget, ingressNote string) (*NetworkReport, error) {
	dur := cfg.NetSeconds
	rep := &NetworkReport{SecondsPerTransfer: dur.Seconds(), Detached: detachedMeaning, PolicyCounted: map[string]uint64{}, IngressNote: ingressNote}

	var sbs []*netSandbox
	defer func() {
		for _, s := range sbs {
			api.remove(context.WithoutCancel(ctx), s.id)
		}
	}()
	for _, pol := range []string{PolicyAttached, PolicyDetached} {
		id, err := api.startSpec(ctx, &pb.SandboxSpec{Image: ref, Cmd: httpdCmd, Ports: []*pb.Port{{Port: httpdPort}}})
		if err != nil {
			return nil, err
		}
		s := &netSandbox{sandboxInfo: sandboxInfo{id: id}, policy: pol}
		sbs = append(sbs, s)
		if s.sandboxInfo, err = api.sandboxInfo(ctx, id); err != nil {
			return nil, err
		}
		if s.hostEnd, err = hostEnd(s.address); err != nil {
			return nil, fmt.Errorf("sandbox %s: %w", id, err)
		}
		// By default a sandbox may not reach the node's addresses, its host end included.
		if err := api.setPolicy(ctx, id, fmt.Sprintf("default allow\nallow %s\n", s.hostEnd)); err != nil {
			return nil, err
		}
		if pol == PolicyDetached {
			if err := detachPolicy(s.netns); err != nil {
				return nil, fmt.Errorf("sandbox %s: %w", id, err)
			}
		}
	}
	attached := sbs[0]

	var err error
	if rep.Guest, err = guestNet(ctx, api, attached.id); err != nil {
		return nil, err
	}

	// Unmeasured: the first streams translate the guest's network code (TCG) and fill
	// the neighbour caches.
	cfg.Log.Info("network: warming up")
	for _, s := range sbs {
		if _, err := guestToHost(ctx, api, s, guestSender, 500*time.Millisecond); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
		if _, err := hostToGuest(ctx, api, s, 500*time.Millisecond); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
		if _, err := roundTrips(ctx, api, s, 20); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
	}

	// The kernel times eBPF programs only while someone holds a stats handle; it is
	// dropped (and timing stops, machine-wide) when the loop is done.
	var progBefore map[string]*ebpf.ProgramStats
	stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		rep.ProgramCostNote = fmt.Sprintf("eBPF run-time statistics not available: %v", err)
	} else {
		defer func() {
			if stats != nil {
				stats.Close()
			}
		}()
		if progBefore, err = programStats(attached.netns); err != nil {
			rep.ProgramCostNote = err.Error()
		}
	}
	loopStart := time.Now()
	before := map[string]uint64{}
	for _, s := range sbs {
		if before[s.policy], err = api.counters(ctx, s.id); err != nil {
			return nil, err
		}
	}
	type key struct{ dir, pol string }
	samples := map[key][]netSample{}
	rtts := map[string][]float64{}
	cfg.Log.Info("network: measuring", "repeats", cfg.NetRepeats, "seconds", dur.Seconds())
	for r := 0; r < cfg.NetRepeats; r++ {
		order := slices.Clone(sbs)
		if r%2 == 1 {
			slices.Reverse(order)
		}
		for _, s := range order {
			x, err := guestToHost(ctx, api, s, guestSender, dur)
			if err != nil {
				return nil, err
			}
			samples[key{DirGuestToHost, s.policy}] = append(samples[key{DirGuestToHost, s.policy}], x)
			if x, err = hostToGuest(ctx, api, s, dur); err != nil {
				return nil, err
			}
			samples[key{DirHostToGuest, s.policy}] = append(samples[key{DirHostToGuest, s.policy}], x)
			rt, err := roundTrips(ctx, api, s, 200)
			if err != nil {
				return nil, err
			}
			rtts[s.policy] = append(rtts[s.policy], rt...)
		}
	}
	rep.MeasuredSeconds = round2(time.Since(loopStart).Seconds())
	if progBefore != nil {
		after, err := programStats(attached.netns)
		if err != nil {
			rep.ProgramCostNote = err.Error()
		}
		for _, name := range pinnedLinks {
			b, a := progBefore[name], after[name]
			if a == nil || b == nil || a.RunCount < b.RunCount {
				continue
			}
			c := ProgramCost{Program: name, Runs: a.RunCount - b.RunCount, TotalMs: ms(a.Runtime - b.Runtime)}
			if c.Runs > 0 {
				c.NsPerRun = round2(float64(a.Runtime-b.Runtime) / float64(c.Runs))
			}
			rep.ProgramCost = append(rep.ProgramCost, c)
		}
	}
	if stats != nil {
		stats.Close()
		stats = nil
	}
	for _, s := range sbs {
		after, err := api.counters(ctx, s.id)
		if err != nil {
			return nil, err
		}
		rep.PolicyCounted[s.policy] = after - before[s.policy]
	}
	if n := rep.PolicyCounted[PolicyDetached]; n != 0 {
		return nil, fmt.Errorf("the detached sandbox's policy counted %d packets while measured: detaching did not take effect", n)
	}
	for _, dir := range []string{DirGuestToHost, DirHostToGuest} {
		for _, pol := range []string{PolicyAttached, PolicyDetached} {
			rep.Throughput = append(rep.Throughput, throughputRow(dir, pol, samples[key{dir, pol}]))
		}
	}
	for _, pol := range []string{PolicyAttached, PolicyDetached} {
		rep.RTT = append(rep.RTT, RTTRow{Policy: pol, N: len(rtts[pol]), RTT: summarize(rtts[pol])})
	}

	cfg.Log.Info("network: measuring the dd | nc pipeline")
	x, err := guestToHost(ctx, api, attached, pipelineSender, dur)
	if err != nil {
		return nil, err
	}
	rep.Pipeline = &PipelineRow{MBps: round2(x.mbps()), FrameBytes: float64(int(x.frameBytes)), GuestBusy: x.guest.busyPct()}
	if x.guest.switches > 0 && x.bytes > 0 {
		rep.Pipeline.SwitchesPer8K = round2(float64(x.guest.switches) / (float64(x.bytes) / 8192))
	}

	if ing != nil {
		cfg.Log.Info("network: measuring requests through the ingress")
		if rep.Ingress, err = measureIngress(ctx, attached.sandboxInfo, ing, max(cfg.Runs, 20)); err != nil {
			return nil, err
		}
	}
	return rep, nil
}

// netSample is one stream with what the machine saw while it ran.
type netSample struct {
	transfer
	frameBytes float64 // mean frame size on the tap in the stream's direction
	frames     uint64
	cpu        cpuUse
	guest      guestStat // the guest's own account of its CPU over the stream
}

// statProbe prints the guest's CPU times and context switches; the guest side of a
// stream runs between two of them.
const statProbe = "grep -E '^(cpu|ctxt) ' /proc/stat"

// Guest-side senders for guestToHost: HOST and PORT are replaced.
const (
	guestSender    = statProbe + "; nc HOST PORT -e cat /dev/zero 2>/dev/null; " + statProbe
	pipelineSender = statProbe + "; dd if=/dev/zero bs=64k 2>/dev/null | nc HOST PORT 2>/dev/null; " + statProbe
)

// guestToHost streams from the guest (script, see guestSender) to a listener on the
// sandbox's host end for dur, counted by the host.
func guestToHost(ctx context.Context, api *apiClient, s *netSandbox, script string, dur time.Duration) (netSample, error) {
	ln, err := net.Listen("tcp", netip.AddrPortFrom(s.hostEnd, 0).String())
	if err != nil {
		return netSample{}, fmt.Errorf("listen on the host end of sandbox %s: %w", s.id, err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	script = strings.NewReplacer("HOST", s.hostEnd.String(), "PORT", port).Replace(script)
	w := startWatch(ctx, s)
	g := api.background(ctx, s.id, []string{"sh", "-c", script})
	x, err := sinkOne(ctx, ln, 30*time.Second, dur)
	res, gerr := g.wait(30 * time.Second)
	if err != nil {
		return netSample{}, fmt.Errorf("%s from sandbox %s (%s): %w%s", DirGuestToHost, s.id, script, err, guestSays(res))
	}
	if gerr = senderEnded(ctx, s.id, gerr); gerr != nil {
		return netSample{}, gerr
	}
	out := w.stop(ctx, x, true)
	out.guest = parseGuestStat(res.stdout)
	return out, nil
}

// hostToGuest streams from this process to a listener in the guest for dur; the guest
// reads everything into /dev/null before its side closes.
func hostToGuest(ctx context.Context, api *apiClient, s *netSandbox, dur time.Duration) (netSample, error) {
	// A port of its own per stream: a listener a failed stream left cannot be in the way.
	s.lastPort = max(s.lastPort+1, 5201)
	port := s.lastPort
	w := startWatch(ctx, s)
	g := api.background(ctx, s.id, []string{"sh", "-c", fmt.Sprintf(`%s; nc -l -p %d -e sh -c "exec cat >/dev/null"; %s`, statProbe, port, statProbe)})
	x, err := sourceTo(ctx, net.JoinHostPort(s.address, strconv.Itoa(port)), 30*time.Second, dur)
	res, gerr := g.wait(30 * time.Second)
	if err != nil {
		return netSample{}, fmt.Errorf("%s, sandbox %s: %w%s", DirHostToGuest, s.id, err, guestSays(res))
	}
	if gerr = senderEnded(ctx, s.id, gerr); gerr != nil {
		return netSample{}, gerr
	}
	out := w.stop(ctx, x, false)
	out.guest = parseGuestStat(res.stdout)
	return out, nil
}

// roundTrips times n one-byte round trips from the host end to `cat` in the guest.
func roundTrips(ctx context.Context, api *apiClient, s *netSandbox, n int) ([]float64, error) {
	ln, err := net.Listen("tcp", netip.AddrPortFrom(s.hostEnd, 0).String())
	if err != nil {
		return nil, fmt.Errorf("listen on the host end of sandbox %s: %w", s.id, err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	g := api.background(ctx, s.id, []string{"nc", s.hostEnd.String(), port, "-e", "cat"})
	rt, err := pingPong(ctx, ln, 30*time.Second, 10, n)
	res, gerr := g.wait(30 * time.Second)
	if err != nil {
		return nil, fmt.Errorf("round trips to sandbox %s: %w%s", s.id, err, guestSays(res))
	}
	return rt, gerr
}

// senderEnded judges the guest side of a stream the host has already counted: if it did
// not end by itself within its grace and had to be ended (seen once on a loaded first
// run: a guest nc that outlived its closed connection), the bytes are still measured and
// only the guest's CPU figures of that sample are missing, so that is not a failure.
func senderEnded(ctx context.Context, id string, err error) error {
	if err != nil && ctx.Err() == nil && (errors.Is(err, context.Canceled) || connect.CodeOf(err) == connect.CodeCanceled) {
		slog.Warn("the guest side of a measured stream did not end by itself and was ended; its CPU figures are missing", "sandbox", id)
		return nil
	}
	return err
}

func guestSays(r execResult) string {
	if s := strings.TrimSpace(r.stderr + r.stdout); s != "" {
		return " (guest: " + s + ")"
	}
	return ""
}

// watch samples the tap's counters and the VM's CPU time around a stream.
type watch struct {
	s      *netSandbox
	start  time.Time
	tap    ifStats
	tapErr error
	cpu    map[string]uint64
}

func startWatch(ctx context.Context, s *netSandbox) *watch {
	w := &watch{s: s, start: time.Now()}
	w.tap, w.tapErr = tapStats(ctx, s.netns)
	w.cpu = threadTicks(s.pid)
	return w
}

// stop finishes the sample of stream x; fromGuest says which of the tap's directions
// carried it. What cannot be read is left 0: it is a diagnosis, not the measurement.
func (w *watch) stop(ctx context.Context, x transfer, fromGuest bool) netSample {
	out := netSample{transfer: x}
	out.cpu = cpuSince(w.cpu, threadTicks(w.s.pid), time.Since(w.start))
	if after, err := tapStats(ctx, w.s.netns); err == nil && w.tapErr == nil {
		d := after.sub(w.tap)
		bytes, pkts := d.txBytes, d.txPackets // the tap's tx is what goes to the guest
		if fromGuest {
			bytes, pkts = d.rxBytes, d.rxPackets
		}
		if pkts > 0 {
			out.frames, out.frameBytes = pkts, float64(bytes)/float64(pkts)
		}
	}
	return out
}

func throughputRow(dir, pol string, xs []netSample) ThroughputRow {
	row := ThroughputRow{Direction: dir, Policy: pol, GuestTool: "nc -e cat /dev/zero"}
	if dir == DirHostToGuest {
		row.GuestTool = "nc -l -e cat >/dev/null"
	}
	var frameBytes, frames float64
	var cpu cpuUse
	var guest guestStat
	for _, x := range xs {
		row.Samples = append(row.Samples, round2(x.mbps()))
		frameBytes += x.frameBytes * float64(x.frames)
		frames += float64(x.frames)
		cpu = cpu.add(x.cpu)
		guest = guest.add(x.guest)
	}
	row.GuestBusy = guest.busyPct()
	row.MBps = round2(summarize(row.Samples).P50)
	if frames > 0 {
		row.FrameBytes = float64(int(frameBytes / frames))
	}
	row.QEMUCPU, row.BusiestThread = cpu.percent()
	return row
}

func round2(f float64) float64 { return float64(int64(f*100+0.5)) / 100 }

// hostEnd is the node's end of the veth pair of a sandbox at address: the address
// before it in its block (see network.Block), which must be one of this namespace's.
func hostEnd(address string) (netip.Addr, error) {
	a, err := netip.ParseAddr(address)
	if err != nil || !a.Is4() {
		return netip.Addr{}, fmt.Errorf("sandbox address %q: want IPv4", address)
	}
	h := a.Prev()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list this namespace's addresses: %w", err)
	}
	for _, x := range addrs {
		if p, err := netip.ParsePrefix(x.String()); err == nil && p.Addr() == h {
			return h, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("host end %s of sandbox address %s is not an address of the bench's network namespace (is the dev server in another?)", h, address)
}

// bpffsRoot is where the agent pins a sandbox's programs:
// <root>/fireworks/<agent tag>/<owner>, the owner being what its namespace
// fw-<agent tag>-<owner> names.
const bpffsRoot = "/sys/fs/bpf"

func pinDir(netns string) (string, error) {
	rest, ok := strings.CutPrefix(netns, "fw-")
	tag, owner, ok2 := strings.Cut(rest, "-")
	if !ok || !ok2 || tag == "" || owner == "" || strings.ContainsAny(rest, "/.") {
		return "", fmt.Errorf("network namespace %q: want fw-<tag>-<owner>", netns)
	}
	return filepath.Join(bpffsRoot, "fireworks", tag, owner), nil
}

// detachPolicy detaches the tcx links pinned for the sandbox in netns: its policy in
// both directions and its guard. The pins stay (the agent removes them with the
// sandbox); the programs no longer run.
func detachPolicy(netns string) error {
	dir, err := pinDir(netns)
	if err != nil {
		return err
	}
	for _, name := range pinnedLinks {
		path := filepath.Join(dir, name)
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return fmt.Errorf("load pinned link %s: %w", path, err)
		}
		err = l.Detach()
		l.Close()
		if err != nil {
			return fmt.Errorf("detach %s: %w", path, err)
		}
	}
	return nil
}

// pinnedLinks are the links the agent pins for a sandbox: the policy on the host end of
// the veth pair (both directions) and the guard on the tap.
var pinnedLinks = []string{"out_link", "in_link", "guard_link"}

// programStats reads the kernel's statistics of the programs behind the sandbox's links.
func programStats(netns string) (map[string]*ebpf.ProgramStats, error) {
	dir, err := pinDir(netns)
	if err != nil {
		return nil, err
	}
	out := map[string]*ebpf.ProgramStats{}
	for _, name := range pinnedLinks {
		path := filepath.Join(dir, name)
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return nil, fmt.Errorf("load pinned link %s: %w", path, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, fmt.Errorf("link info of %s: %w", path, err)
		}
		p, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			return nil, fmt.Errorf("program %d behind %s: %w", info.Program, path, err)
		}
		st, err := p.Stats()
		p.Close()
		if err != nil {
			return nil, fmt.Errorf("statistics of program %d behind %s: %w", info.Program, path, err)
		}
		out[name] = st
	}
	return out, nil
}

// ifStats are an interface's counters.
type ifStats struct{ rxBytes, rxPackets, txBytes, txPackets uint64 }

func (a ifStats) sub(b ifStats) ifStats {
	return ifStats{a.rxBytes - b.rxBytes, a.rxPackets - b.rxPackets, a.txBytes - b.txBytes, a.txPackets - b.txPackets}
}

// tapStats reads the counters of the guest's tap in netns.
func tapStats(ctx context.Context, netns string) (ifStats, error) {
	out, err := exec.CommandContext(ctx, "ip", "-j", "-s", "-n", netns, "link", "show", network.Tap).Output()
	if err != nil {
		return ifStats{}, fmt.Errorf("ip -s -n %s link show %s: %w", netns, network.Tap, err)
	}
	return parseIPStats(out)
}

// parseIPStats reads `ip -j -s link show DEV`.
func parseIPStats(data []byte) (ifStats, error) {
	type dir struct {
		Bytes   uint64 `json:"bytes"`
		Packets uint64 `json:"packets"`
	}
	var links []struct {
		Stats struct {
			RX dir `json:"rx"`
			TX dir `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(data, &links); err != nil {
		return ifStats{}, fmt.Errorf("parse ip -j -s output: %w", err)
	}
	if len(links) != 1 {
		return ifStats{}, fmt.Errorf("ip -j -s output lists %d links, want 1", len(links))
	}
	s := links[0].Stats
	return ifStats{s.RX.Bytes, s.RX.Packets, s.TX.Bytes, s.TX.Packets}, nil
}

// cpuUse is CPU time (clock ticks) over wall time.
type cpuUse struct {
	total, busiest uint64
	wall           time.Duration
}

func (a cpuUse) add(b cpuUse) cpuUse {
	return cpuUse{a.total + b.total, a.busiest + b.busiest, a.wall + b.wall}
}

// clockTick is USER_HZ, the unit of /proc's CPU times (100 on every Linux ABI Go runs on).
const clockTick = 100

func (a cpuUse) percent() (total, busiest float64) {
	if a.wall <= 0 {
		return 0, 0
	}
	f := func(t uint64) float64 { return round2(float64(t) / clockTick / a.wall.Seconds() * 100) }
	return f(a.total), f(a.busiest)
}

// threadTicks is the CPU time (user+system, clock ticks) of each thread of process pid;
// nil if it cannot be read.
func threadTicks(pid string) map[string]uint64 {
	if pid == "" {
		return nil
	}
	dir := filepath.Join("/proc", pid, "task")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	out := map[string]uint64{}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name(), "stat"))
		if err != nil {
			continue
		}
		if t, ok := statTicks(string(data)); ok {
			out[e.Name()] = t
		}
	}
	return out
}

// statTicks reads utime+stime from a /proc stat line (fields 14 and 15; the command
// name, field 2, is in parentheses and may hold spaces).
func statTicks(line string) (uint64, bool) {
	i := strings.LastIndexByte(line, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(line[i+1:]) // from field 3 on
	if len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return u + s, true
}

func cpuSince(before, after map[string]uint64, wall time.Duration) cpuUse {
	if before == nil || after == nil {
		return cpuUse{}
	}
	u := cpuUse{wall: wall}
	for tid, t := range after {
		d := t - before[tid]
		if t < before[tid] {
			d = 0
		}
		u.total += d
		u.busiest = max(u.busiest, d)
	}
	return u
}

// guestNet asks the guest about eth0, its virtio-net features and its clock.
func guestNet(ctx context.Context, api *apiClient, id string) (GuestNet, error) {
	out, err := api.runOK(ctx, id, []string{"sh", "-c",
		`echo mtu $(cat /sys/class/net/eth0/mtu); echo clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); ` +
			`for d in /sys/bus/virtio/devices/*; do echo virtio $(cat $d/device) $(cat $d/features); done`})
	if err != nil {
		return GuestNet{}, fmt.Errorf("read the guest's network settings: %w", err)
	}
	return parseGuestNet(out), nil
}

// virtioNetFeatures are the virtio-net feature bits (virtio spec 5.1.3) that decide how
// much work a byte costs: checksums and segmentation done by the other side, mergeable
// receive buffers, and interrupt suppression.
var virtioNetFeatures = []struct {
	bit  int
	name string
}{
	{0, "CSUM"}, {1, "GUEST_CSUM"}, {7, "GUEST_TSO4"}, {8, "GUEST_TSO6"}, {11, "HOST_TSO4"},
	{12, "HOST_TSO6"}, {15, "MRG_RXBUF"}, {29, "RING_EVENT_IDX"},
}

// parseGuestNet reads guestNet's output. The features file is a string of 0 and 1,
// bit 0 first; virtio-net is device 0x0001.
func parseGuestNet(out string) GuestNet {
	var g GuestNet
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "mtu":
			g.MTU, _ = strconv.Atoi(f[1])
		case len(f) == 2 && f[0] == "clocksource":
			g.Clocksource = f[1]
		case len(f) == 3 && f[0] == "virtio" && f[1] == "0x0001":
			for _, feat := range virtioNetFeatures {
				if feat.bit < len(f[2]) && f[2][feat.bit] == '1' {
					g.Offloads = append(g.Offloads, feat.name)
				}
			}
		}
	}
	return g
}

// measureIngress times n HTTP GETs of / from busybox httpd in sandbox s, in turns
// straight to the sandbox's address and through the ingress (with the sandbox's access
// token: the port is private). Each request opens its connection: busybox httpd closes
// it after one answer anyway.
func measureIngress(ctx context.Context, s sandboxInfo, ing *ingressTarget, n int) (*IngressRow, error) {
	client := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	defer client.CloseIdleConnections()
	direct := func() (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(s.address, strconv.Itoa(httpdPort))+"/", nil)
	}
	viaIngress := func() (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ing.addr+"/", nil)
		if err != nil {
			return nil, err
		}
		req.Host = routes.Host(httpdPort, s.id, ing.domain)
		req.Header.Set(routes.TokenHeader, s.token)
		return req, nil
	}
	get := func(mk func() (*http.Request, error)) (time.Duration, error) {
		req, err := mk()
		if err != nil {
			return 0, err
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		took := time.Since(start)
		if err != nil {
			return 0, fmt.Errorf("GET %s (Host %s): %w", req.URL, req.Host, err)
		}
		if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "ok" {
			return 0, fmt.Errorf("GET %s (Host %s): %s %q", req.URL, req.Host, resp.Status, strings.TrimSpace(string(body)))
		}
		return took, nil
	}
	// The route reaches the ingress shortly after the sandbox runs; wait for it, and let
	// both paths serve once before timing them.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := get(viaIngress)
		if err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("sandbox %s through the ingress at %s: %w", s.id, ing.addr, errors.Join(err, ctx.Err()))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := get(direct); err != nil {
		return nil, fmt.Errorf("sandbox %s directly: %w", s.id, err)
	}
	var d, v []float64
	for i := 0; i < n; i++ {
		t, err := get(direct)
		if err != nil {
			return nil, fmt.Errorf("sandbox %s directly, request %d: %w", s.id, i+1, err)
		}
		d = append(d, ms(t))
		if t, err = get(viaIngress); err != nil {
			return nil, fmt.Errorf("sandbox %s through the ingress, request %d: %w", s.id, i+1, err)
		}
		v = append(v, ms(t))
	}
	return &IngressRow{Requests: n, Direct: summarize(d), Ingress: summarize(v)}, nil
}

// ingressSupport says whether the fireworks binary's dev command has the built-in
// ingress, and if not, why not.
func ingressSupport(ctx context.Context, bin string) (bool, string) {
	out, err := exec.CommandContext(ctx, bin, "dev", "--help").CombinedOutput()
	if err != nil {
		return false, fmt.Sprintf("not available (%s dev --help: %v)", bin, err)
	}
	if !strings.Contains(string(out), "--ingress-listen") || !strings.Contains(string(out), "--ingress-domain") {
		return false, "not available (fireworks dev has no --ingress-listen/--ingress-domain)"
	}
	return true, ""
}

// freeLoopbackAddr picks a loopback port for the dev server's ingress to listen on.
func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("pick a port for the ingress: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// printNetwork writes the network series as tables.
func printNetwork(w io.Writer, n *NetworkReport, accel string) {
	reps := 0
	if len(n.Throughput) > 0 {
		reps = len(n.Throughput[0].Samples)
	}
	fmt.Fprintf(w, "\nnetwork (%s): guest busybox <-> this process on the sandbox's host end; %d x %.0f s per throughput row, MB = 10^6 bytes\n", accel, reps, n.SecondsPerTransfer)
	fmt.Fprintf(w, "detached = %s\n", n.Detached)
	fmt.Fprintf(w, "%-12s %-9s %-24s %9s  %-26s %12s %10s %14s %11s\n", "direction", "policy", "guest tool", "MB/s p50", "samples", "tap frame B", "qemu cpu%", "busiest thr %", "guest busy%")
	for _, r := range n.Throughput {
		var xs []string
		for _, x := range r.Samples {
			xs = append(xs, fmt.Sprintf("%.1f", x))
		}
		fmt.Fprintf(w, "%-12s %-9s %-24s %9.1f  %-26s %12.0f %10.0f %14.0f %11.0f\n", r.Direction, r.Policy, r.GuestTool, r.MBps, strings.Join(xs, " "), r.FrameBytes, r.QEMUCPU, r.BusiestThread, r.GuestBusy)
	}
	if p := n.Pipeline; p != nil {
		fmt.Fprintf(w, "%s through `dd | nc` (the feasibility note's tool chain), attached: %.2f MB/s, %.1f guest context switches per 8 KiB, tap frame %.0f B, guest busy %.0f%%\n",
			DirGuestToHost, p.MBps, p.SwitchesPer8K, p.FrameBytes, p.GuestBusy)
	}
	fmt.Fprintf(w, "%-32s %6s %9s %9s %9s %9s %9s\n", "TCP round trip, 1 byte (ms)", "n", "p50", "p95", "p99", "min", "max")
	for _, r := range n.RTT {
		fmt.Fprintf(w, "  %-30s %6d %9.3f %9.3f %9.3f %9.3f %9.3f\n", r.Policy, r.N, r.RTT.P50, r.RTT.P95, r.RTT.P99, r.RTT.Min, r.RTT.Max)
	}
	fmt.Fprintf(w, "packets the policy programs counted while measured: attached %d, detached %d\n", n.PolicyCounted[PolicyAttached], n.PolicyCounted[PolicyDetached])
	if len(n.ProgramCost) > 0 {
		var parts []string
		total := 0.0
		for _, c := range n.ProgramCost {
			parts = append(parts, fmt.Sprintf("%s %d runs x %.0f ns", c.Program, c.Runs, c.NsPerRun))
			total += c.TotalMs
		}
		share := 0.0
		if n.MeasuredSeconds > 0 {
			share = total / (n.MeasuredSeconds * 1000) * 100
		}
		fmt.Fprintf(w, "eBPF run time of the attached sandbox while measured: %s; %.1f ms in %.1f s (%.3f%% of one CPU)\n", strings.Join(parts, ", "), total, n.MeasuredSeconds, share)
	} else if n.ProgramCostNote != "" {
		fmt.Fprintf(w, "eBPF run time: %s\n", n.ProgramCostNote)
	}
	if i := n.Ingress; i != nil {
		fmt.Fprintf(w, "%-32s %6s %9s %9s %9s %9s %9s\n", "HTTP GET, busybox httpd (ms)", "n", "p50", "p95", "p99", "min", "max")
		for _, r := range []struct {
			name string
			s    Summary
		}{{"direct to the sandbox address", i.Direct}, {"through the ingress", i.Ingress}} {
			fmt.Fprintf(w, "  %-30s %6d %9.3f %9.3f %9.3f %9.3f %9.3f\n", r.name, i.Requests, r.s.P50, r.s.P95, r.s.P99, r.s.Min, r.s.Max)
		}
	} else if n.IngressNote != "" {
		fmt.Fprintf(w, "ingress: %s\n", n.IngressNote)
	}
	g := n.Guest
	fmt.Fprintf(w, "guest: eth0 mtu %d, clocksource %s, virtio-net features %s\n", g.MTU, g.Clocksource, strings.Join(g.Offloads, " "))
}

// guestStat is the guest's CPU ticks and context switches over a stream, from two
// statProbe readings.
type guestStat struct {
	busy, total, switches uint64
}

func (a guestStat) add(b guestStat) guestStat {
	return guestStat{a.busy + b.busy, a.total + b.total, a.switches + b.switches}
}

func (a guestStat) busyPct() float64 {
	if a.total == 0 {
		return 0
	}
	return round2(float64(a.busy) / float64(a.total) * 100)
}

// parseGuestStat reads two statProbe outputs ("cpu  user nice system idle iowait irq
// softirq steal ..." and "ctxt N", twice) into the difference; zero if they are not there.
func parseGuestStat(out string) guestStat {
	type reading struct {
		busy, total, ctxt uint64
		cpu, sw           bool
	}
	var rs []reading
	var cur reading
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 5 && f[0] == "cpu":
			if cur.cpu {
				rs, cur = append(rs, cur), reading{}
			}
			for i, v := range f[1:] {
				n, _ := strconv.ParseUint(v, 10, 64)
				cur.total += n
				if i != 3 && i != 4 { // idle and iowait
					cur.busy += n
				}
			}
			cur.cpu = true
		case len(f) == 2 && f[0] == "ctxt":
			cur.ctxt, _ = strconv.ParseUint(f[1], 10, 64)
			cur.sw = true
		}
	}
	if cur.cpu {
		rs = append(rs, cur)
	}
	if len(rs) != 2 || rs[1].total < rs[0].total || rs[1].busy < rs[0].busy {
		return guestStat{}
	}
	g := guestStat{busy: rs[1].busy - rs[0].busy, total: rs[1].total - rs[0].total}
	if rs[0].sw && rs[1].sw && rs[1].ctxt >= rs[0].ctxt {
		g.switches = rs[1].ctxt - rs[0].ctxt
	}
	return g
}
