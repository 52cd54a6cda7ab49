package standalone

import (
	"log/slog"
	"testing"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/ingress"
)

func TestTableFromPB(t *testing.T) {
	tb := TableFromPB(&pb.RouteTable{Version: 7, Routes: []*pb.IngressRoute{
		{Sandbox: "0123456789abcdef", Port: 8080, Public: true, Node: "n1", NodeAddress: "10.0.0.1:7768", Running: true},
		{Sandbox: "0123456789abcdef", Port: 0},
		{Sandbox: "0123456789abcdef", Port: 70000},
	}})
	if tb.Version != 7 || len(tb.Routes) != 2 || tb.Routes[0].Port != 8080 || !tb.Routes[0].Public || tb.Routes[0].NodeAddr != "10.0.0.1:7768" || tb.Routes[1].Port != 0 {
		t.Errorf("TableFromPB = %+v (ports above 65535 must be dropped; port 0 is a sandbox's every port)", tb)
	}
}

// A table from a new stream (after a reconnect, maybe to a server whose counter is
// lower) replaces what the proxy has: tables are numbered above the proxy's.
func TestApplyTableRenumbers(t *testing.T) {
	p := ingress.NewProxy("example.test", nil, slog.Default())
	apply := applyTable(p, slog.Default())
	apply(&pb.RouteTable{Version: 100, Routes: []*pb.IngressRoute{{Sandbox: "0123456789abcdef", Port: 1, Running: true}}})
	apply(&pb.RouteTable{Version: 5, Routes: []*pb.IngressRoute{{Sandbox: "0123456789abcdef", Port: 2, Running: true}}})
	if v := p.TableVersion(); v != 101 {
		t.Errorf("version after a lower-numbered table: %d, want 101", v)
	}
}
