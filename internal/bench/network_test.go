package bench

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func listenLocal(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// The sink counts what a sender pushes for the given time and then cuts it off.
func TestSinkOneCountsAStream(t *testing.T) {
	ln := listenLocal(t)
	var sent atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Write(buf)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	x, err := sinkOne(context.Background(), ln, 10*time.Second, 200*time.Millisecond)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if x.bytes <= 0 || x.bytes > sent.Load() || x.elapsed < 200*time.Millisecond || x.mbps() <= 0 {
		t.Fatalf("sink counted %d bytes in %s of %d sent", x.bytes, x.elapsed, sent.Load())
	}
}

// A sender that stops before the time is up is an error, not a slow sample.
func TestSinkOneSenderStopsEarly(t *testing.T) {
	ln := listenLocal(t)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Write([]byte("short"))
			c.Close()
		}
	}()
	if _, err := sinkOne(context.Background(), ln, 10*time.Second, 5*time.Second); err == nil || !strings.Contains(err.Error(), "ended after") {
		t.Fatalf("want an early-end error, got %v", err)
	}
	if _, err := sinkOne(context.Background(), ln, 100*time.Millisecond, time.Second); err == nil || !strings.Contains(err.Error(), "no connection") {
		t.Fatalf("nobody connecting: %v", err)
	}
}

// The source's count is exactly what the receiver read: it waits for the receiver to
// finish before it stops the clock.
func TestSourceToWaitsForTheReceiver(t *testing.T) {
	ln := listenLocal(t)
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		got <- n
	}()
	x, err := sourceTo(context.Background(), ln.Addr().String(), 10*time.Second, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if n := <-got; n != x.bytes || n == 0 {
		t.Fatalf("source says %d bytes, the receiver read %d", x.bytes, n)
	}
	// Nobody listening: an error naming the address, once the wait is over.
	addr := ln.Addr().String()
	ln.Close()
	if _, err := sourceTo(context.Background(), addr, 200*time.Millisecond, time.Second); err == nil || !strings.Contains(err.Error(), addr) {
		t.Fatalf("nobody listening: %v", err)
	}
}

func TestPingPongTimesEchoes(t *testing.T) {
	ln := listenLocal(t)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo until the bench closes
	}()
	rt, err := pingPong(context.Background(), ln, 10*time.Second, 5, 50)
	if err != nil {
		t.Fatal(err)
	}
	if len(rt) != 50 {
		t.Fatalf("%d round trips timed, want 50", len(rt))
	}
	for _, x := range rt {
		if x <= 0 {
			t.Fatalf("round trip of %v ms", x)
		}
	}
	// A peer that does not echo ends the measurement with an error, not a hang.
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Close()
		}
	}()
	if _, err := pingPong(context.Background(), ln, 10*time.Second, 0, 5); err == nil {
		t.Fatal("a closed peer answered round trips")
	}
}

func TestParseIPStats(t *testing.T) {
	out := `[{"ifindex":3,"ifname":"tap0","mtu":1500,"stats64":{"rx":{"bytes":1982576454,"packets":132078,"errors":0,"dropped":5},"tx":{"bytes":1405070034,"packets":110673,"errors":0}}}]`
	s, err := parseIPStats([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if s != (ifStats{1982576454, 132078, 1405070034, 110673}) {
		t.Fatalf("stats %+v", s)
	}
	d := s.sub(ifStats{1982576454 - 1000, 132078 - 2, 1405070034, 110673})
	if d != (ifStats{1000, 2, 0, 0}) {
		t.Fatalf("difference %+v", d)
	}
	for _, bad := range []string{"", "[]", "{", `[{},{}]`} {
		if _, err := parseIPStats([]byte(bad)); err == nil {
			t.Errorf("parseIPStats(%q) accepted it", bad)
		}
	}
}

func TestStatTicksAndCPU(t *testing.T) {
	// The command name may hold spaces and parentheses.
	line := "31110 (qemu (x) 86) S 30662 31106 28384 0 -1 138412224 5038 0 1 0 8247 355 0 0 20 0 4 0"
	if n, ok := statTicks(line); !ok || n != 8247+355 {
		t.Fatalf("statTicks = %d, %v", n, ok)
	}
	if _, ok := statTicks("1 (x) S 2 3"); ok {
		t.Fatal("a short line was read")
	}
	u := cpuSince(map[string]uint64{"1": 100, "2": 50}, map[string]uint64{"1": 250, "2": 60, "3": 40}, 2*time.Second)
	if u.total != 200 || u.busiest != 150 {
		t.Fatalf("cpu use %+v", u)
	}
	total, busiest := u.add(cpuUse{}).percent()
	if total != 100 || busiest != 75 {
		t.Fatalf("percent = %v, %v", total, busiest)
	}
	if (cpuSince(nil, map[string]uint64{"1": 1}, time.Second) != cpuUse{}) {
		t.Fatal("no first reading must give no figure")
	}
	// This process's own threads can be read.
	if own := threadTicks(strconv.Itoa(os.Getpid())); len(own) == 0 {
		t.Fatal("no thread times for this process")
	}
}

// What a real guest printed (microvm under TCG, virtio-mmio devices).
const guestNetOutput = `mtu 1500
clocksource refined-jiffies
virtio 0x0002 0010111001110110000000000000110010000000000000000000000000000000
virtio 0x0003 0100000000000000000000000000110010000000000000000000000000000000
virtio 0x0001 1110010111111111111101010000110010000000000000000000000000000000
`

func TestParseGuestNet(t *testing.T) {
	g := parseGuestNet(guestNetOutput)
	want := "CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 HOST_TSO4 HOST_TSO6 MRG_RXBUF RING_EVENT_IDX"
	if g.MTU != 1500 || g.Clocksource != "refined-jiffies" || strings.Join(g.Offloads, " ") != want {
		t.Fatalf("guest net %+v", g)
	}
	// No offloads negotiated: none listed.
	g = parseGuestNet("virtio 0x0001 0000010000000000000000000000000010000000\n")
	if len(g.Offloads) != 0 {
		t.Fatalf("offloads %v from a bare device", g.Offloads)
	}
}

func TestPinDir(t *testing.T) {
	d, err := pinDir("fw-b90d11-f56342128d520942")
	if err != nil || d != "/sys/fs/bpf/fireworks/b90d11/f56342128d520942" {
		t.Fatalf("pinDir = %q, %v", d, err)
	}
	for _, bad := range []string{"", "fw-", "fw-abc", "b90d11-x", "fw-a-../../x"} {
		if _, err := pinDir(bad); err == nil {
			t.Errorf("pinDir(%q) accepted it", bad)
		}
	}
}

func TestHostEnd(t *testing.T) {
	// 127.0.0.1 is on lo in every namespace: it is the host end of 127.0.0.2.
	if h, err := hostEnd("127.0.0.2"); err != nil || h.String() != "127.0.0.1" {
		t.Fatalf("hostEnd(127.0.0.2) = %v, %v", h, err)
	}
	for _, bad := range []string{"192.0.2.2", "junk", "::2"} {
		if _, err := hostEnd(bad); err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("hostEnd(%q): %v", bad, err)
		}
	}
}

func TestThroughputRow(t *testing.T) {
	xs := []netSample{
		{transfer: transfer{bytes: 200e6, elapsed: 2 * time.Second}, frames: 100, frameBytes: 60000, cpu: cpuUse{total: 300, busiest: 200, wall: 2 * time.Second}},
		{transfer: transfer{bytes: 100e6, elapsed: 2 * time.Second}, frames: 300, frameBytes: 1500, cpu: cpuUse{total: 100, busiest: 80, wall: 2 * time.Second}},
		{transfer: transfer{bytes: 300e6, elapsed: 2 * time.Second}},
	}
	r := throughputRow(DirHostToGuest, PolicyDetached, xs)
	if r.MBps != 100 || len(r.Samples) != 3 || r.Samples[2] != 150 || r.GuestTool != "nc -l -e cat >/dev/null" {
		t.Fatalf("row %+v", r)
	}
	if r.FrameBytes != float64(int((100*60000+300*1500)/400.0)) || r.QEMUCPU != 100 || r.BusiestThread != 70 {
		t.Fatalf("frames and cpu %+v", r)
	}
}

func TestPrintNetwork(t *testing.T) {
	var b strings.Builder
	n := &NetworkReport{SecondsPerTransfer: 2, Detached: detachedMeaning,
		Throughput: []ThroughputRow{
			{Direction: DirGuestToHost, Policy: PolicyAttached, GuestTool: "nc -e cat /dev/zero", MBps: 140.25, Samples: []float64{139, 140.25, 150}, FrameBytes: 49152, QEMUCPU: 98, BusiestThread: 71},
			{Direction: DirGuestToHost, Policy: PolicyDetached, GuestTool: "nc -e cat /dev/zero", MBps: 141, Samples: []float64{141, 141, 141}},
		},
		RTT:             []RTTRow{{Policy: PolicyAttached, N: 600, RTT: Summary{P50: 0.383, P99: 1.767}}},
		PolicyCounted:   map[string]uint64{PolicyAttached: 12345},
		ProgramCost:     []ProgramCost{{Program: "out_link", Runs: 1000, TotalMs: 0.25, NsPerRun: 250}, {Program: "in_link", Runs: 3000, TotalMs: 0.75, NsPerRun: 250}},
		MeasuredSeconds: 10,
		Pipeline:        &PipelineRow{MBps: 1.9, SwitchesPer8K: 14.25, FrameBytes: 1260, GuestBusy: 100},
		Guest:           parseGuestNet(guestNetOutput),
		IngressNote:     "not available (fireworks dev has no --ingress-listen/--ingress-domain)",
	}
	PrintTable(&b, &Report{Accelerator: "tcg", Network: n})
	out := b.String()
	for _, want := range []string{"network (tcg)", "3 x 2 s", "BPF_LINK_DETACH", "guest→host   attached", "140.2", "139.0 140.2 150.0", "49152",
		"1.90 MB/s, 14.2 guest context switches per 8 KiB, tap frame 1260 B, guest busy 100%", "0.383", "1.767", "attached 12345, detached 0",
		"ingress: not available", "clocksource refined-jiffies", "HOST_TSO4",
		"out_link 1000 runs x 250 ns, in_link 3000 runs x 250 ns; 1.0 ms in 10.0 s (0.010% of one CPU)"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	n.Ingress = &IngressRow{Requests: 20, Direct: Summary{P50: 12.5}, Ingress: Summary{P50: 14.75}}
	PrintTable(&b, &Report{Accelerator: "tcg", Network: n})
	if out := b.String(); !strings.Contains(out, "through the ingress") || !strings.Contains(out, "14.750") || strings.Contains(out, "not available") {
		t.Errorf("ingress rows:\n%s", out)
	}
}

func TestIngressSupport(t *testing.T) {
	dir := t.TempDir()
	fake := func(name, help string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\ncat <<'EOF'\n"+help+"\nEOF\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if ok, note := ingressSupport(context.Background(), fake("with", "      --ingress-listen string\n      --ingress-domain string")); !ok || note != "" {
		t.Errorf("a dev with the flags: %v %q", ok, note)
	}
	if ok, note := ingressSupport(context.Background(), fake("without", "      --listen string")); ok || !strings.Contains(note, "not available") {
		t.Errorf("a dev without the flags: %v %q", ok, note)
	}
	if ok, note := ingressSupport(context.Background(), filepath.Join(dir, "missing")); ok || !strings.Contains(note, "not available") {
		t.Errorf("no binary: %v %q", ok, note)
	}
}

func TestParseGuestStat(t *testing.T) {
	out := "cpu  41 0 307 728 3 0 5 0 0 0\nctxt 1000\nother noise\ncpu  48 0 559 733 3 0 99 0 0 0\nctxt 1400\n"
	g := parseGuestStat(out)
	// busy: user 7 + system 252 + softirq 94; idle 5.
	if g.busy != 353 || g.total != 358 || g.switches != 400 || g.busyPct() != 98.6 {
		t.Fatalf("guest stat %+v (%v%%)", g, g.busyPct())
	}
	if s := g.add(guestStat{busy: 0, total: 42}); s.busyPct() != 88.25 {
		t.Fatalf("sum %+v", s)
	}
	for _, bad := range []string{"", "cpu  1 2 3 4 5\n", "cpu  9 0 9 9 9\ncpu  1 0 1 1 1\n"} {
		if g := parseGuestStat(bad); g != (guestStat{}) {
			t.Errorf("parseGuestStat(%q) = %+v", bad, g)
		}
	}
}
