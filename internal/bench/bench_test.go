package bench

import (
	"strings"
	"testing"
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
	PrintTable(&b, &Report{Accelerator: "tcg", Command: []string{"echo", "ready"}, Series: []Series{
		{Name: "fireworks cold boot (tcg)", Runs: 3, FirstByte: Summary{P50: 3000, P95: 3500}, Exit: Summary{P50: 3100, P95: 3600}},
		{Name: "crun (no VM)", Runs: 3, FirstByte: Summary{P50: 17, P95: 29}, Exit: Summary{P50: 19, P95: 31}},
	}, Scheduler: []SchedulerRow{{Nodes: 10000, Allocations: 100000, P50Ms: 0.41, P99Ms: 0.98}}})
	out := b.String()
	for _, want := range []string{"accelerator: tcg", "fireworks cold boot (tcg)", "3000.0ms", "crun (no VM)", "31.0ms", " 10000 nodes", "0.980ms"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
