package server

import (
	"slices"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

func TestBuildRoutes(t *testing.T) {
	ports := []state.Port{{Port: 8080, Public: true}, {Port: 22}}
	sbs := []state.Sandbox{
		{ID: "aaaaaaaaaaaaaaaa", Node: "n1", Status: state.StatusRunning, AccessToken: "tok-a", Spec: state.SandboxSpec{Ports: ports}},
		{ID: "bbbbbbbbbbbbbbbb", Node: "n2", Status: state.StatusRunning, AccessToken: "tok-b", Spec: state.SandboxSpec{Ports: ports[1:]}},
		{ID: "cccccccccccccccc", Node: "n1", Status: state.StatusExited, AccessToken: "tok-c", Spec: state.SandboxSpec{Ports: ports[:1]}},
		{ID: "dddddddddddddddd", Node: "n1", Status: state.StatusRunning, AccessToken: "tok-d"}, // publishes nothing
		{ID: "eeeeeeeeeeeeeeee", Node: "gone", Status: state.StatusRunning, AccessToken: "tok-e", Spec: state.SandboxSpec{Ports: ports[1:]}},
	}
	nodes := []state.Node{
		{ID: "n1", Address: "10.0.0.1:7768", Status: state.NodeReady},
		{ID: "n2", Address: "10.0.0.2:7768", Status: state.NodeDown},
	}
	got := buildRoutes(sbs, nodes)
	want := []routes.Route{
		{Sandbox: "aaaaaaaaaaaaaaaa", Port: 22, Token: "tok-a", Node: "n1", NodeAddr: "10.0.0.1:7768", Running: true},
		{Sandbox: "aaaaaaaaaaaaaaaa", Port: 8080, Public: true, Node: "n1", NodeAddr: "10.0.0.1:7768", Running: true},
		// Its node is down: kept, not running (the edge answers 502).
		{Sandbox: "bbbbbbbbbbbbbbbb", Port: 22, Token: "tok-b", Node: "n2", NodeAddr: "10.0.0.2:7768"},
		// Exited but not removed: kept, not running.
		{Sandbox: "cccccccccccccccc", Port: 8080, Public: true, Node: "n1", NodeAddr: "10.0.0.1:7768"},
		// Its node is unknown: not running.
		{Sandbox: "eeeeeeeeeeeeeeee", Port: 22, Token: "tok-e", Node: "gone"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("routes:\n got %+v\nwant %+v", got, want)
	}

}
