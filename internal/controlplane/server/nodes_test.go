package server

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// recordingNode is a test double of a node's ImageService (above the node-API seam): it
// records the pulls it gets, with the caller headers, and answers in its own words.
type recordingNode struct {
	fireworksv1connect.UnimplementedImageServiceHandler
	mu    sync.Mutex
	pulls []http.Header
}

func (n *recordingNode) PullImage(_ context.Context, req *connect.Request[pb.PullImageRequest], stream *connect.ServerStream[pb.PullImageResponse]) error {
	n.mu.Lock()
	n.pulls = append(n.pulls, req.Header().Clone())
	n.mu.Unlock()
	_ = stream.Send(&pb.PullImageResponse{Msg: &pb.PullImageResponse_Progress{Progress: &pb.PullProgress{Layer: "l", Node: "liar"}}})
	return stream.Send(&pb.PullImageResponse{Msg: &pb.PullImageResponse_Image{Image: &pb.Image{Ref: req.Msg.GetRef(), Node: "liar"}}})
}

func (n *recordingNode) got() []http.Header {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]http.Header(nil), n.pulls...)
}

// Whom a node is told the server acts for is the server's to say: a user's headers never
// pass; a user's pull goes to one node of the cluster's choosing and does not learn its
// name; an admin's goes to every ready node, and what a node says its name is does not
// count.
func TestNodeCallsCarryTheCallerOnly(t *testing.T) {
	a := newTestAPI(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	nodes := map[string]*recordingNode{}
	for _, name := range []string{"n1", "n2"} {
		if _, err := a.store.RegisterNode(ctx, state.Node{ID: name, Address: "127.0.0.1:1", UpdatedAt: time.Now(),
			Capacity: state.Resources{VCPUs: 2, MemoryMiB: 1024}}); err != nil {
			t.Fatal(err)
		}
		n := &recordingNode{}
		nodes[name] = n
		mux := http.NewServeMux()
		mux.Handle(fireworksv1connect.NewImageServiceHandler(n))
		defer a.srv.AddLocalNode(ctx, name, mux)()
		defer cancel()
	}
	pull := func(token, node string, forge bool) ([]*pb.PullImageResponse, error) {
		req := as(token, &pb.PullImageRequest{Ref: "reg/app:1", Node: node})
		if forge {
			req.Header().Set(rpc.CallerAdminHeader, "true")
			req.Header().Set(rpc.CallerTokenHeader, "someone-else")
		}
		st, err := a.images.PullImage(ctx, req)
		if err != nil {
			return nil, err
		}
		var out []*pb.PullImageResponse
		for st.Receive() {
			out = append(out, st.Msg())
		}
		return out, st.Err()
	}

	_, err := pull(a.user, "n2", false)
	wantCode(t, "a user's pull naming a node", err, connect.CodePermissionDenied, "--node needs an admin")

	msgs, err := pull(a.user, "", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes["n1"].got()) != 1 || len(nodes["n2"].got()) != 0 {
		t.Fatalf("a user's pull reached n1 %d times, n2 %d times; want one node", len(nodes["n1"].got()), len(nodes["n2"].got()))
	}
	h := nodes["n1"].got()[0]
	if toks := h.Values(rpc.CallerTokenHeader); len(toks) != 1 || toks[0] == "someone-else" || toks[0] == "" || h.Get(rpc.CallerAdminHeader) != "false" {
		t.Errorf("the node was told the caller is %v (admin %q); want the user's own token, not an admin", toks, h.Get(rpc.CallerAdminHeader))
	}
	for _, m := range msgs {
		if m.GetProgress().GetNode() != "" || m.GetImage().GetNode() != "" {
			t.Errorf("a user's pull learnt a node name: %v", m)
		}
	}

	msgs, err = pull(a.admin, "", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes["n1"].got()) != 2 || len(nodes["n2"].got()) != 1 {
		t.Fatalf("an admin's pull did not reach every node")
	}
	if h := nodes["n2"].got()[0]; h.Get(rpc.CallerAdminHeader) != "true" {
		t.Errorf("an admin's pull was not told it is an admin's: %v", h)
	}
	var named []string
	for _, m := range msgs {
		if img := m.GetImage(); img != nil {
			named = append(named, img.GetNode())
		}
	}
	if len(named) != 2 || named[0] != "n1" || named[1] != "n2" {
		t.Errorf("the images pulled are said to be on %v, want [n1 n2] (not what the nodes claim)", named)
	}
}

// A node the autoscaler parked says so in the API (node ls shows it apart from an
// operator's cordon), and an operator's uncordon takes it back.
func TestParkedNodeShown(t *testing.T) {
	a := newTestAPI(t)
	ctx := t.Context()
	if _, err := a.store.RegisterNode(ctx, state.Node{ID: "n1", Address: "127.0.0.1:1", UpdatedAt: time.Now(),
		Capacity: state.Resources{VCPUs: 2, MemoryMiB: 2048, DiskMiB: 1000}}); err != nil {
		t.Fatal(err)
	}
	node := func() *pb.Node {
		t.Helper()
		r, err := a.cluster.ListNodes(ctx, as(a.admin, &pb.ListNodesRequest{}))
		if err != nil || len(r.Msg.GetNodes()) != 1 {
			t.Fatalf("list nodes: %v %v", r, err)
		}
		return r.Msg.GetNodes()[0]
	}
	if n := node(); n.GetParked() || n.GetCordoned() {
		t.Fatalf("a new node: parked %v cordoned %v", n.GetParked(), n.GetCordoned())
	}
	yes := true
	if _, err := a.store.UpdateNode(ctx, "n1", state.NodeUpdate{Time: time.Now(), Parked: &yes}); err != nil {
		t.Fatal(err)
	}
	if n := node(); !n.GetParked() || !n.GetCordoned() {
		t.Fatalf("a parked node: parked %v cordoned %v", n.GetParked(), n.GetCordoned())
	}
	if _, err := a.cluster.UncordonNode(ctx, as(a.admin, &pb.NodeActionRequest{Node: "n1"})); err != nil {
		t.Fatal(err)
	}
	if n := node(); n.GetParked() || n.GetCordoned() {
		t.Fatalf("a parked node uncordoned: parked %v cordoned %v", n.GetParked(), n.GetCordoned())
	}
}
