package bench

import (
	"context"
	"testing"
)

// The control-plane bench runs a real 3-server cluster and commits every create.
func TestBenchRaftCommitsEverything(t *testing.T) {
	rows, err := BenchRaft(context.Background(), t.TempDir(), 20, []int{1, 4})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 || rows[0].Creates != 20 || rows[1].Concurrency != 4 || rows[0].PerSecond <= 0 || rows[1].P99Ms < rows[1].P50Ms {
		t.Fatalf("rows: %+v", rows)
	}
}
