package bench

import (
	"log/slog"
	"os"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// The API throughput rows run: three real servers, simulated nodes through the agent
// protocol, user tokens over HTTP/2; every create is placed on a simulated node, and
// creates sent to followers are forwarded. (Figures are make bench's; none is asserted.)
func TestBenchAPI(t *testing.T) {
	bin, _, err := testutil.BuildBinaries(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rows, err := BenchAPI(t.Context(), bin, t.TempDir(), 60, []int{1, 6}, 10, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		t.Logf("%+v", r)
		if r.Placed != r.Creates || r.Nodes != 10 || r.Servers != 3 {
			t.Errorf("row %+v: want every create placed on one of 10 simulated nodes of 3 servers", r)
		}
	}
	if rows[1].Forwarded == 0 {
		t.Errorf("6 clients over 3 servers sent nothing through a follower: %+v", rows[1])
	}
}
