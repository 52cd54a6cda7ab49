package cluster

import (
	"encoding/json"
	"testing"
	"time"
)

// A warm pool set through the API reaches every node over heartbeats; each node fills it
// and reports it back, and a start on any node claims a warm VM.
func TestWarmPoolOnTheCluster(t *testing.T) {
	need(t)
	mustFW(t, "pool", "set", image(), "--size", "1", "--insecure-registry", w.registry)
	defer w.fw(nil, "pool", "rm", image())
	ready := func() int {
		var resp struct {
			Pools []struct {
				Image string `json:"image"`
				Nodes []struct {
					Node  string `json:"node"`
					Ready int    `json:"ready"`
				} `json:"nodes"`
			} `json:"pools"`
		}
		if err := json.Unmarshal([]byte(mustFW(t, "pool", "ls", "--json")), &resp); err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, p := range resp.Pools {
			for _, nd := range p.Nodes {
				if p.Image == image() && nd.Ready >= 1 {
					n++
				}
			}
		}
		return n
	}
	waitFor(t, 4*minute, "every node reporting a ready warm VM", func() bool { return ready() == 3 })
	out := mustFW(t, "run", "--name", "warm-on-cluster", "--insecure-registry", w.registry, image(), "--", "hostname")
	if out != "warm-on-cluster\n" {
		t.Errorf("output %q", out)
	}
	d, _ := inspect(t, "warm-on-cluster")["details"].(map[string]any)
	if d["start_mode"] != "warm" {
		t.Errorf("start on a cluster with warm pools everywhere: mode %v (%v)", d["start_mode"], d["start_phases"])
	}
	mustFW(t, "pool", "rm", image())
	waitFor(t, time.Minute, "the pool gone from pool ls", func() bool { return ready() == 0 })
	mustFW(t, "rm", "warm-on-cluster")
}
