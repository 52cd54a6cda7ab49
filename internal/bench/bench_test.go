package bench

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSummarizeNearestRank(t *testing.T) {
	var xs []float64
	for i := 100; i >= 1; i-- { // unsorted input
		xs = append(xs, float64(i))
	}
	s := summarize(xs)
	if s.P50 != 50 || s.P95 != 95 || s.P99 != 99 || s.Min != 1 || s.Max != 100 {
		t.Fatalf("summary of 1..100 = %+v", s)
	}
	if xs[0] != 100 {
		t.Fatal("summarize reordered its input")
	}
	if one := summarize([]float64{7}); one.P50 != 7 || one.P99 != 7 {
		t.Fatalf("one sample: %+v", one)
	}
	if none := summarize(nil); none != (Summary{}) {
		t.Fatalf("no samples: %+v", none)
	}
}

func TestPrintTable(t *testing.T) {
	var b strings.Builder
	met, missed := true, false
	PrintTable(&b, &Report{Accelerator: "tcg", Command: []string{"echo", "ready"}, TemplateBuildMs: 4100, Series: []Series{
		{Key: KeyCold, Name: "fireworks cold boot (tcg)", Runs: 3, FirstByte: Summary{P50: 3000, P95: 3500, P99: 3600}, Exit: Summary{P50: 3100, P95: 3600}},
		{Key: KeyPool, Name: "fireworks warm-pool claim (tcg)", Runs: 3, StartedBy: map[string]int{"warm": 2, "restore": 1},
			TargetP50: 100, TargetMet: &missed, FirstByte: Summary{P50: 140}},
		{Key: KeyRestore, Name: "fireworks snapshot restore (tcg)", Runs: 3, TargetP50: 400, TargetMet: &met, FirstByte: Summary{P50: 300}},
		{Key: KeyCrun, Name: "crun (no VM)", Runs: 3, FirstByte: Summary{P50: 17, P95: 29}, Exit: Summary{P50: 19, P95: 31}},
	}, Scheduler: []SchedulerRow{{Nodes: 10000, Allocations: 100000, P50Ms: 0.41, P99Ms: 0.98}}})
	out := b.String()
	for _, want := range []string{"accelerator: tcg", "template snapshot built in 4100 ms", "fireworks cold boot (tcg)", "3000.0", "3600.0",
		"crun (no VM)", "31.0", " 10000 nodes", "0.980ms", "<= 100     no", "<= 400     yes", "restore×1 warm×2"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

// A failed series is printed and written beside what was measured, never instead of it.
func TestFailedSeriesReported(t *testing.T) {
	rep := &Report{Accelerator: "tcg", Series: []Series{{Key: KeyCold, Name: "fireworks cold boot (tcg)", Runs: 3, FirstByte: Summary{P50: 3000}}}}
	rep.fail(slog.New(slog.DiscardHandler), "network", errors.New("exec sh -c nc: canceled"))
	var b strings.Builder
	PrintTable(&b, rep)
	if out := b.String(); !strings.Contains(out, "fireworks cold boot (tcg)") || !strings.Contains(out, "FAILED series") || !strings.Contains(out, "network: exec sh -c nc: canceled") {
		t.Errorf("table:\n%s", out)
	}
	data, _ := json.Marshal(rep)
	var back Report
	if err := json.Unmarshal(data, &back); err != nil || len(back.Errors) != 1 || back.Errors[0].Series != "network" || len(back.Series) != 1 {
		t.Errorf("JSON round trip: %s, %v", data, err)
	}
}

func TestMeasureSetsTargets(t *testing.T) {
	cfg := Config{Runs: 3, Log: slog.New(slog.DiscardHandler)}
	n := 0
	one := func() (sample, error) {
		n++
		return sample{first: time.Duration(n) * 50 * time.Millisecond, exit: time.Duration(n) * 60 * time.Millisecond, create: 5 * time.Millisecond, how: "warm"}, nil
	}
	s, err := measure(context.Background(), cfg, KeyPool, "pool", one)
	if err != nil {
		t.Fatal(err)
	}
	if s.FirstByte.P50 != 100 || s.Exit.Max != 180 || len(s.FirstBytes) != 3 || s.StartedBy["warm"] != 3 {
		t.Fatalf("series %+v", s)
	}
	if s.CreateCall == nil || s.CreateCall.P50 != 5 {
		t.Fatalf("create call: %+v", s.CreateCall)
	}
	if s.TargetP50 != 100 || s.TargetMet == nil || !*s.TargetMet {
		t.Fatalf("pool p50 of 100 ms against a 100 ms target: %+v", s)
	}
	s, err = measure(context.Background(), cfg, KeyCrun, "crun", one)
	if err != nil || s.TargetP50 != 0 || s.TargetMet != nil {
		t.Fatalf("crun has no target: %+v, %v", s, err)
	}
	bad := errors.New("boom")
	if _, err := measure(context.Background(), cfg, KeyCold, "cold", func() (sample, error) { return sample{}, bad }); !errors.Is(err, bad) {
		t.Fatalf("a failed run: %v", err)
	}
}

func TestAPIClientConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if _, err := newAPIClient(write("ok.json", `{"server":"http://127.0.0.1:7766","token":"fw_x"}`)); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for name, body := range map[string]string{
		"notoken.json": `{"server":"http://127.0.0.1:7766"}`,
		"tls.json":     `{"server":"https://a:1","token":"x"}`,
		"junk.json":    `{`,
	} {
		if _, err := newAPIClient(write(name, body)); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: want an error naming the file, got %v", name, err)
		}
	}
	if _, err := newAPIClient(filepath.Join(dir, "missing.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing config: %v", err)
	}
}

func TestNodePhases(t *testing.T) {
	got := parsePhases("pull=1.2ms rootdisk=0.4ms junk template=3ms vmm=85ms bad=x guest=1.5s")
	want := []phase{{"pull", 1.2}, {"rootdisk", 0.4}, {"template", 3}, {"vmm", 85}, {"guest", 1500}}
	if len(got) != len(want) {
		t.Fatalf("parsePhases = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("parsePhases = %v, want %v", got, want)
		}
	}
	sum := summarizePhases([]sample{
		{phases: []phase{{"pull", 1}, {"vmm", 80}}},
		{phases: []phase{{"pull", 3}, {"vmm", 90}, {"identity", 5}}},
		{phases: []phase{{"pull", 2}, {"vmm", 70}}},
		{},
	})
	if len(sum) != 3 || sum[0] != (PhaseP50{"pull", 2, 3}) || sum[1] != (PhaseP50{"vmm", 80, 3}) || sum[2] != (PhaseP50{"identity", 5, 1}) {
		t.Fatalf("summarizePhases = %+v", sum)
	}
	var b strings.Builder
	PrintTable(&b, &Report{TemplateReused: true, Series: []Series{{Name: "restore", FirstByte: Summary{P50: 300}, NodePhases: sum}}})
	if !strings.Contains(b.String(), "template snapshot: kept in the data dir") {
		t.Errorf("table does not say the template was reused:\n%s", b.String())
	}
	if !strings.Contains(b.String(), "restore, node phases p50 (sum 87.0 of first-byte p50 300.0): pull 2.0, vmm 80.0, identity 5.0") {
		t.Errorf("table lacks the phase line:\n%s", b.String())
	}
}

func TestLongestGap(t *testing.T) {
	out := []byte("gap 2500\nnoise\ngap 131000\r\n gap 7000\ngap x\n")
	if got := longestGap(out); got != 131 {
		t.Errorf("longestGap = %v, want 131", got)
	}
	if got := longestGap(nil); got != 0 {
		t.Errorf("longestGap(nil) = %v, want 0", got)
	}
}

func TestMemPathArg(t *testing.T) {
	args := []string{"qemu-system-x86_64", "-object", "memory-backend-file,id=mem0,size=256M,mem-path=/var/a,,b/memory,share=off,readonly=on"}
	if got := memPathArg(args); got != "/var/a,b/memory" {
		t.Errorf("memPathArg = %q", got)
	}
	if got := memPathArg([]string{"-object", "memory-backend-ram,id=mem0"}); got != "" {
		t.Errorf("memPathArg without a file = %q", got)
	}
}
