package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// soakDuration is how long TestSoak runs ($FIREWORKS_SOAK, e.g. 30m; CI's bounded run
// is the default).
func soakDuration() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("FIREWORKS_SOAK")); err == nil && d > 0 {
		return d
	}
	return time.Minute
}

// sample is one process's resources at one time.
type sample struct {
	rssKiB, fds, goroutines int
}

// A soak: short sandboxes run and are removed steadily on the cluster while every server
// and agent is sampled (resident memory, open descriptors, goroutines). After the first
// third (caches fill, pools warm), nothing may keep growing: a process whose last samples
// stand well above its samples after warm-up fails the run, naming what grew.
func TestSoak(t *testing.T) {
	need(t)
	d := soakDuration()
	c, err := client.New(client.Config{Server: "https://" + w.serverList(), CA: filepath.Join(w.caDir, "ca.pem"), Token: w.token, RequestTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), d)
	defer cancel()
	var mu sync.Mutex
	ran, failed := 0, 0
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				r, err := c.Sandboxes.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{
					Image: image(), InsecureRegistries: []string{w.registry}, Cmd: []string{"sh", "-c", "echo soak"}, MemoryMib: 128}}))
				if err != nil {
					continue // the run's end
				}
				id := r.Msg.GetSandbox().GetId()
				ok := false
				for end := time.Now().Add(time.Minute); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
					g, err := c.Sandboxes.GetSandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
					if err == nil && terminal(g.Msg.GetSandbox().GetStatus()) {
						ok = g.Msg.GetSandbox().GetStatus() == "exited" && g.Msg.GetSandbox().GetExitCode() == 0
						break
					}
				}
				_, _ = c.Sandboxes.RemoveSandbox(context.WithoutCancel(ctx), connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: id, Force: true}))
				mu.Lock()
				ran++
				if !ok {
					failed++
				}
				mu.Unlock()
			}
		}()
	}
	procs := map[string]*proc{}
	for i, s := range w.servers {
		procs[fmt.Sprintf("s%d", i)] = s
	}
	for i, a := range w.agents {
		procs[fmt.Sprintf("a%d", i)] = a
	}
	series := map[string][]sample{}
	tick := time.NewTicker(max(d/12, 5*time.Second))
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-tick.C:
		}
		for name, p := range procs {
			s, err := sampleOf(p)
			if err != nil {
				t.Errorf("sample %s: %v", name, err)
				continue
			}
			series[name] = append(series[name], s)
		}
	}
	wg.Wait()
	t.Logf("soak of %s: %d sandboxes ran and were removed (%d did not exit 0)", d, ran, failed)
	if ran < 10 {
		t.Errorf("only %d sandboxes ran in %s: the soak proved nothing", ran, d)
	}
	if failed > 0 {
		t.Errorf("%d of %d sandboxes did not exit 0", failed, ran)
	}
	for name, ss := range series {
		t.Logf("%s: %s", name, describeSeries(ss))
		if why := growing(ss); why != "" {
			t.Errorf("%s keeps growing: %s (%s)", name, why, describeSeries(ss))
		}
	}
}

// growing reports what in ss grows after warm-up: the mean of the last third against the
// largest sample of the middle third, past both a ratio and a floor (noise: GC cycles,
// connection pools, a VMM's buffers).
func growing(ss []sample) string {
	if len(ss) < 6 {
		return ""
	}
	mid, last := ss[len(ss)/3:2*len(ss)/3], ss[2*len(ss)/3:]
	var why []string
	for _, m := range []struct {
		name  string
		get   func(sample) int
		floor int
	}{
		{"resident memory (KiB)", func(s sample) int { return s.rssKiB }, 48 << 10},
		{"open descriptors", func(s sample) int { return s.fds }, 32},
		{"goroutines", func(s sample) int { return s.goroutines }, 64},
	} {
		peak := 0
		for _, s := range mid {
			peak = max(peak, m.get(s))
		}
		sum := 0
		for _, s := range last {
			sum += m.get(s)
		}
		mean := sum / len(last)
		if mean > peak+m.floor && float64(mean) > 1.25*float64(peak) {
			why = append(why, fmt.Sprintf("%s %d after warm-up, %d at the end", m.name, peak, mean))
		}
	}
	return strings.Join(why, "; ")
}

func describeSeries(ss []sample) string {
	var b strings.Builder
	for i, s := range ss {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%dM/%dfd/%dg", s.rssKiB>>10, s.fds, s.goroutines)
	}
	return b.String()
}

// sampleOf reads p's resident memory and descriptors from /proc and its goroutines from
// its runtime profiles (served on its host's loopback: read from inside its namespace).
func sampleOf(p *proc) (sample, error) {
	if p.cmd == nil {
		return sample{}, fmt.Errorf("%s is not running", p.log)
	}
	pid := p.cmd.Process.Pid // nsenter execs the binary: the same process
	var s sample
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			s.rssKiB, _ = strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return s, err
	}
	s.fds = len(fds)
	out, err := exec.Command("nsenter", "--net=/run/netns/"+p.h.NS, "--", "busybox", "wget", "-q", "-O", "-",
		"http://127.0.0.1:"+pprofPort+"/debug/pprof/goroutine?debug=1").Output()
	if err != nil {
		return s, fmt.Errorf("goroutines: %w", err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	if _, err := fmt.Sscanf(first, "goroutine profile: total %d", &s.goroutines); err != nil {
		return s, fmt.Errorf("goroutines: %q: %w", first, err)
	}
	return s, nil
}

// The soak's leak rule: flat series with noise pass, a steady climb fails, named.
func TestSoakLeakRule(t *testing.T) {
	flat := []sample{{100 << 10, 50, 200}, {120 << 10, 52, 230}, {110 << 10, 51, 210}, {115 << 10, 50, 220}, {118 << 10, 53, 215}, {112 << 10, 50, 225}}
	if why := growing(flat); why != "" {
		t.Errorf("a flat series was taken for a leak: %s", why)
	}
	var climb []sample
	for i := range 9 {
		climb = append(climb, sample{100 << 10, 50 + 40*i, 200})
	}
	if why := growing(climb); !strings.Contains(why, "open descriptors") || strings.Contains(why, "goroutines") {
		t.Errorf("a climbing descriptor count: %q", why)
	}
}
