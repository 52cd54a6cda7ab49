package bench

import (
	"context"
	"log/slog"
	"os/exec"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// The node autoscaler's bench rows run on a real control plane: each names its path,
// measured every run (the paths are checked inside: one placeholder per node wanted,
// unschedulable, bound to the new node before it goes). No time is asserted.
func TestBenchNodeScale(t *testing.T) {
	if _, err := exec.LookPath("etcd"); err != nil {
		testutil.Skipf(t, "etcd not found (Debian's etcd-server; scripts/install-deps.sh installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rows, err := BenchNodeScale(ctx, "../..", t.TempDir(), 2, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatal(err)
	}
	keys := []string{KeyKubeUnschedulable, KeyScaleUpPlaceholder, KeyScaleUpOrder, KeyScaleUpRelease}
	if len(rows) != len(keys) {
		t.Fatalf("rows: %+v", rows)
	}
	for i, r := range rows {
		t.Logf("%-70s p50 %8.1f ms  max %8.1f ms", r.Path, r.Latency.P50, r.Latency.Max)
		if r.Key != keys[i] || r.Runs != 2 || r.Latency.Min <= 0 || r.Checked == "" {
			t.Errorf("row %d: %+v", i, r)
		}
	}
}
