package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
)

// fakeAPI records the requests the CLI sends and answers with canned responses.
type fakeAPI struct {
	fireworksv1connect.UnimplementedImageServiceHandler
	fireworksv1connect.UnimplementedSandboxServiceHandler
	mu   sync.Mutex
	reqs []proto.Message
}

func (f *fakeAPI) record(m proto.Message) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reqs = append(f.reqs, m)
}

func (f *fakeAPI) last(t *testing.T) proto.Message {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.reqs) == 0 {
		t.Fatal("the CLI sent no request")
	}
	return f.reqs[len(f.reqs)-1]
}

func (f *fakeAPI) SetPool(_ context.Context, r *connect.Request[pb.SetPoolRequest]) (*connect.Response[pb.SetPoolResponse], error) {
	f.record(r.Msg)
	p := proto.CloneOf(r.Msg.GetPool())
	if p.Max == 0 {
		p.Max = p.Size
	}
	return connect.NewResponse(&pb.SetPoolResponse{Pool: p}), nil
}

func (f *fakeAPI) DeletePool(_ context.Context, r *connect.Request[pb.DeletePoolRequest]) (*connect.Response[pb.DeletePoolResponse], error) {
	f.record(r.Msg)
	return connect.NewResponse(&pb.DeletePoolResponse{}), nil
}

func (f *fakeAPI) ListPools(_ context.Context, r *connect.Request[pb.ListPoolsRequest]) (*connect.Response[pb.ListPoolsResponse], error) {
	f.record(r.Msg)
	return connect.NewResponse(&pb.ListPoolsResponse{Pools: []*pb.Pool{
		{Image: "reg/app:1", Size: 2, Max: 4, Nodes: []*pb.PoolNodeStatus{
			{Node: "n1", Image: "reg/app:1", Target: 3, Ready: 0, Filling: 3, ClaimsLastMinute: 12},
			{Node: "n2", Image: "reg/app:1", Target: 2, Error: "pull failed:\n\x1b[31mboom"},
		}},
		{Image: "reg/new:1", Size: 1, Max: 1, Vcpus: 2},
	}}), nil
}

func (f *fakeAPI) WarmImage(_ context.Context, r *connect.Request[pb.WarmImageRequest]) (*connect.Response[pb.WarmImageResponse], error) {
	f.record(r.Msg)
	return connect.NewResponse(&pb.WarmImageResponse{
		Template: &pb.Template{Key: "tkey123", Image: r.Msg.GetRef(), Digest: "sha256:d1", Vcpus: 1, MemoryMib: 256, Size: 3 << 20},
		Built:    true, BuildTime: durationpb.New(1500 * time.Millisecond),
	}), nil
}

func (f *fakeAPI) CreateSandbox(_ context.Context, r *connect.Request[pb.CreateSandboxRequest]) (*connect.Response[pb.CreateSandboxResponse], error) {
	f.record(r.Msg)
	return connect.NewResponse(&pb.CreateSandboxResponse{Sandbox: &pb.Sandbox{Id: "0123456789abcdef"}}), nil
}

func (f *fakeAPI) GetSandbox(_ context.Context, r *connect.Request[pb.GetSandboxRequest]) (*connect.Response[pb.GetSandboxResponse], error) {
	f.record(r.Msg)
	return connect.NewResponse(&pb.GetSandboxResponse{Sandbox: &pb.Sandbox{
		Id: "0123456789abcdef", Status: "failed", Spec: &pb.SandboxSpec{Image: "reg/app:1", Boot: "auto"}, Restarts: 5,
		Details: map[string]string{"start_mode": "warm", "start_phases": "claim=2ms guest=5ms exec=3ms", "vmm_pid": "42",
			"restart": "not restarted any more: 5 restarts within 10m0s (policy on-failure)"},
	}}), nil
}

// runCLI runs one CLI command line against a fake API and returns its output.
func runCLI(t *testing.T, api *fakeAPI, args ...string) (string, error) {
	t.Helper()
	t.Setenv("FIREWORKS_CONFIG", filepath.Join(t.TempDir(), "none.json"))
	mux := http.NewServeMux()
	mux.Handle(fireworksv1connect.NewImageServiceHandler(api))
	mux.Handle(fireworksv1connect.NewSandboxServiceHandler(api))
	hs := httptest.NewUnstartedServer(mux)
	hs.Config.Protocols = new(http.Protocols)
	hs.Config.Protocols.SetHTTP1(true)
	hs.Config.Protocols.SetUnencryptedHTTP2(true)
	hs.Start()
	t.Cleanup(hs.Close)

	var out, errOut bytes.Buffer
	g := &globals{server: hs.URL, token: "test", stdin: strings.NewReader(""), stdout: &out, stderr: &errOut}
	root := &cobra.Command{Use: "fireworks", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(newPoolCmd(g), newImageCmd(g), newRunCmd(g), newInspectCmd(g))
	root.SetArgs(args)
	root.SetOut(&errOut)
	root.SetErr(&errOut)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestPoolSetFlags(t *testing.T) {
	api := &fakeAPI{}
	out, err := runCLI(t, api, "pool", "set", "reg/app:1", "--size", "2", "--max", "5", "--cpus", "2", "--memory", "1G", "--insecure-registry", "reg")
	if err != nil {
		t.Fatal(err)
	}
	got := api.last(t).(*pb.SetPoolRequest).GetPool()
	want := &pb.Pool{Image: "reg/app:1", Size: 2, Max: 5, Vcpus: 2, MemoryMib: 1024, InsecureRegistries: []string{"reg"}}
	if !proto.Equal(got, want) {
		t.Errorf("sent %v, want %v", got, want)
	}
	if !strings.Contains(out, "size 2, max 5, shape 2vCPU/1024M") {
		t.Errorf("output %q", out)
	}

	// Local image paths are made absolute, as for `image pull`.
	if _, err := runCLI(t, api, "pool", "set", "oci:rel/dir:tag", "--size", "1"); err != nil {
		t.Fatal(err)
	}
	if img := api.last(t).(*pb.SetPoolRequest).GetPool().GetImage(); !strings.HasPrefix(img, "oci:/") || !strings.HasSuffix(img, "/rel/dir:tag") {
		t.Errorf("local image sent as %q", img)
	}

	for _, tc := range []struct {
		args []string
		text string
	}{
		{[]string{"pool", "set", "x"}, `"size" not set`},
		{[]string{"pool", "set", "x", "--size", "65"}, "--size 65"},
		{[]string{"pool", "set", "x", "--size", "3", "--max", "2"}, "--max 2"},
		{[]string{"pool", "set", "x", "--size", "1", "--memory", "lots"}, "--memory"},
		{[]string{"pool", "set", "x", "--size", "1", "--cpus", "-1"}, "--cpus"},
	} {
		n := len(api.reqs)
		if _, err := runCLI(t, api, tc.args...); err == nil || !strings.Contains(err.Error(), tc.text) {
			t.Errorf("%v: %v, want an error about %s", tc.args, err, tc.text)
		}
		if len(api.reqs) != n {
			t.Errorf("%v: a bad command line reached the server", tc.args)
		}
	}
}

func TestPoolLsAndRm(t *testing.T) {
	api := &fakeAPI{}
	out, err := runCLI(t, api, "pool", "ls")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 rows:\n%s", out)
	}
	for _, col := range []string{"IMAGE", "SIZE", "MAX", "NODE", "TARGET", "READY", "FILLING", "CLAIMS/1m", "ERROR"} {
		if !strings.Contains(lines[0], col) {
			t.Errorf("header lacks %s: %q", col, lines[0])
		}
	}
	if f := strings.Fields(lines[1]); len(f) < 9 || f[0] != "reg/app:1" || f[4] != "n1" || f[5] != "3" || f[6] != "0" || f[7] != "3" || f[8] != "12" {
		t.Errorf("n1 row: %q", lines[1])
	}
	if !strings.Contains(lines[2], "pull failed: ?[31mboom") {
		t.Errorf("n2 row (error on one line, escapes neutralised): %q", lines[2])
	}
	if f := strings.Fields(lines[3]); len(f) < 5 || f[0] != "reg/new:1" || f[3] != "2vCPU/default-memory" || f[4] != "-" {
		t.Errorf("unreported pool row: %q", lines[3])
	}

	out, err = runCLI(t, api, "pool", "ls", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var resp struct {
		Pools []struct {
			Image string
			Nodes []map[string]any
		}
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	// Zero counts are present, so scripts can poll for readiness.
	if len(resp.Pools) != 2 || len(resp.Pools[0].Nodes) != 2 || resp.Pools[0].Nodes[0]["ready"] != float64(0) {
		t.Errorf("--json = %s", out)
	}

	if _, err := runCLI(t, api, "pool", "rm", "reg/app:1"); err != nil {
		t.Fatal(err)
	}
	if got := api.last(t).(*pb.DeletePoolRequest).GetImage(); got != "reg/app:1" {
		t.Errorf("rm sent %q", got)
	}
}

func TestImageWarm(t *testing.T) {
	api := &fakeAPI{}
	out, err := runCLI(t, api, "image", "warm", "reg/app:1", "--insecure-registry", "reg")
	if err != nil {
		t.Fatal(err)
	}
	req := api.last(t).(*pb.WarmImageRequest)
	if req.GetRef() != "reg/app:1" || len(req.GetInsecureRegistries()) != 1 {
		t.Errorf("sent %v", req)
	}
	for _, want := range []string{"tkey123", "sha256:d1", "yes, in 1.5s", "3.0 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRunBootFlag(t *testing.T) {
	api := &fakeAPI{}
	if _, err := runCLI(t, api, "run", "-d", "--boot", "restore", "reg/app:1", "--", "true"); err != nil {
		t.Fatal(err)
	}
	if b := api.last(t).(*pb.CreateSandboxRequest).GetSpec().GetBoot(); b != "restore" {
		t.Errorf("sent boot %q", b)
	}
	if _, err := runCLI(t, api, "run", "-d", "reg/app:1"); err != nil {
		t.Fatal(err)
	}
	if b := api.last(t).(*pb.CreateSandboxRequest).GetSpec().GetBoot(); b != "auto" {
		t.Errorf("default boot %q", b)
	}
	n := len(api.reqs)
	if _, err := runCLI(t, api, "run", "-d", "--boot", "fast", "reg/app:1"); err == nil || !strings.Contains(err.Error(), "--boot") {
		t.Errorf("--boot fast: %v", err)
	}
	if len(api.reqs) != n {
		t.Error("a bad --boot reached the server")
	}
}

func TestInspectShowsHowItStarted(t *testing.T) {
	api := &fakeAPI{}
	out, err := runCLI(t, api, "inspect", "--format", "text", "0123")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Started:") || !strings.Contains(out, "warm pool (claim=2ms guest=5ms exec=3ms)") || !strings.Contains(out, "vmm_pid") ||
		!strings.Contains(out, "5 (not restarted any more: 5 restarts within 10m0s") {
		t.Errorf("text inspect:\n%s", out)
	}
	// JSON stays the default, with every detail.
	out, err = runCLI(t, api, "inspect", "0123")
	if err != nil {
		t.Fatal(err)
	}
	var sb map[string]any
	if err := json.Unmarshal([]byte(out), &sb); err != nil {
		t.Fatalf("inspect JSON: %v\n%s", err, out)
	}
	if d, _ := sb["details"].(map[string]any); d["start_mode"] != "warm" || d["start_phases"] == nil {
		t.Errorf("details = %v", sb["details"])
	}
}

func TestParseWarmPool(t *testing.T) {
	for in, want := range map[string]state.Pool{
		"reg:5000/app:1=2":   {Image: "reg:5000/app:1", Size: 2, Max: 2},
		"reg:5000/app:1=1:4": {Image: "reg:5000/app:1", Size: 1, Max: 4},
	} {
		got, err := parseWarmPool(in)
		if err != nil || got.Image != want.Image || got.Size != want.Size || got.Max != want.Max {
			t.Errorf("parseWarmPool(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"app", "=2", "app=x", "app=-1", "app=2:1", "app=1:1000"} {
		if _, err := parseWarmPool(bad); err == nil {
			t.Errorf("parseWarmPool(%q) accepted", bad)
		}
	}
}
