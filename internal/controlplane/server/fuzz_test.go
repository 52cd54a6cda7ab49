package server

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
)

// FuzzCreateSandbox posts arbitrary bodies, as protobuf and as JSON, to CreateSandbox with
// a user's token (a server without a node, as a cluster server is): every answer is a
// verdict on the request (a 2xx or a 4xx with a Connect code), never an internal error,
// a panic or a hang.
func FuzzCreateSandbox(f *testing.F) {
	seed := func(m *pb.CreateSandboxRequest) {
		b, _ := proto.Marshal(m)
		f.Add(b, false)
	}
	seed(&pb.CreateSandboxRequest{Name: "web", Spec: &pb.SandboxSpec{Image: "busybox", Cmd: []string{"echo", "hi"}, Env: []string{"A=b"}}})
	seed(&pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox", Vcpus: 1 << 30, MemoryMib: -1, Policy: "default deny\nallow 1.2.3.4"}})
	seed(&pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "oci:/etc", InsecureRegistries: []string{"x"}}})
	f.Add([]byte(`{"name":"x","spec":{"image":"busybox","cmd":["true"],"ports":[{"port":8080,"public":true}]}}`), true)
	f.Add([]byte(`{"spec":{"image":"busybox","constraints":["a==b","!!"],"restart":"always"}}`), true)
	f.Add([]byte{0xff, 0xff, 0xff}, false)
	a := newTestAPI(f, func(s *Server) { s.SetLimits(Limits{SandboxesPerOwner: 100}) })
	url := a.url + fireworksv1connect.SandboxServiceCreateSandboxProcedure
	f.Fuzz(func(t *testing.T, body []byte, asJSON bool) {
		req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/proto")
		if asJSON {
			req.Header.Set("Content-Type", "application/json")
		}
		req.Header.Set("Authorization", "Bearer "+a.user)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("post: %v", err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode >= 500 || strings.Contains(string(out), `"code":"internal"`) || strings.Contains(string(out), `"code":"unknown"`) {
			t.Fatalf("body %q: HTTP %d %s", body, resp.StatusCode, out)
		}
	})
}
