package e2e

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// Tokens: an admin creates a user token; the user runs and sees only its own sandboxes,
// cannot touch the admin's or manage tokens; once revoked, the token is refused. Calls
// without a valid token change nothing.
func TestTokensAndRoles(t *testing.T) {
	need(t)
	ctx := context.Background()
	adminBox := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "admins-box", image("busybox:latest"), "--", "true").stdout)

	secret := strings.TrimSpace(fw(t, 0, "token", "create", "--role", "user", "--name", "e2e-user").stdout)
	if !strings.HasPrefix(secret, "fwk_") {
		t.Fatalf("token create printed %q", secret)
	}
	var userID string
	for _, line := range strings.Split(fw(t, 0, "token", "ls").stdout, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[1] == "e2e-user" && f[2] == "user" {
			userID = f[0]
		}
	}
	if userID == "" || strings.Contains(fw(t, 0, "token", "ls").stdout, secret) {
		t.Fatalf("token ls should list the token without its secret")
	}
	user := []string{"FIREWORKS_TOKEN=" + secret}

	r := world.cliEnv(ctx, user, nil, "run", "--name", "users-box", image("busybox:latest"), "--", "echo", "hi-from-user")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "hi-from-user" {
		t.Fatalf("user run: exit %d %q %q", r.code, r.stdout, r.stderr)
	}
	ps := world.cliEnv(ctx, user, nil, "ps", "-a")
	if !strings.Contains(ps.stdout, "users-box") || strings.Contains(ps.stdout, "admins-box") {
		t.Errorf("user ps should list only the user's sandboxes:\n%s", ps.stdout)
	}
	if ins := inspect(t, "users-box"); ins["owner"] != userID {
		t.Errorf("owner of users-box = %v, want %s", ins["owner"], userID)
	}
	// Another token's sandbox is not found by its ID, its name or a prefix of its ID: a
	// user learns nothing about it (not even that it exists).
	for _, args := range [][]string{{"inspect", adminBox}, {"rm", "-f", "admins-box"}, {"logs", "admins-box"}, {"inspect", adminBox[:6]}} {
		r := world.cliEnv(ctx, user, nil, args...)
		if r.code != 125 || !strings.Contains(r.stderr, "not found") {
			t.Errorf("user %v: exit %d stderr %q; want not found", args, r.code, r.stderr)
		}
	}
	for _, args := range [][]string{{"node", "ls"}, {"image", "ls"}, {"pool", "ls"}} {
		if r := world.cliEnv(ctx, user, nil, args...); r.code != 125 || !strings.Contains(r.stderr, "admin") {
			t.Errorf("user %v: exit %d stderr %q; want refused (admin only)", args, r.code, r.stderr)
		}
	}
	// Local image sources read the server's files: admins only.
	if r := world.cliEnv(ctx, user, nil, "run", "oci:/etc", "--", "true"); r.code != 125 || !strings.Contains(r.stderr, "admin token") {
		t.Errorf("user run oci:/etc: exit %d %q; want a permission error", r.code, r.stderr)
	}
	if r := world.cliEnv(ctx, user, nil, "token", "create"); r.code != 125 || !strings.Contains(r.stderr, "admin") {
		t.Errorf("user token create: exit %d %q", r.code, r.stderr)
	}
	if inspect(t, "admins-box")["status"] == nil {
		t.Error("admin's sandbox disappeared")
	}

	fw(t, 0, "token", "revoke", userID)
	if r := world.cliEnv(ctx, user, nil, "ps"); r.code != 125 || !strings.Contains(r.stderr, "revoked") {
		t.Errorf("revoked token: exit %d %q", r.code, r.stderr)
	}
	if r := world.cliEnv(ctx, []string{"FIREWORKS_TOKEN=fwk_nonsense"}, nil, "ps"); r.code != 125 || !strings.Contains(r.stderr, "invalid API token") {
		t.Errorf("malformed token: exit %d %q", r.code, r.stderr)
	}

	// Raw HTTP, as any client would: no token and a wrong token are refused with 401
	// before anything runs, on the JSON and on the gRPC protocol.
	var cfg struct{ Server string }
	data, _ := os.ReadFile(world.config)
	_ = json.Unmarshal(data, &cfg)
	for _, hdr := range []string{"", "Bearer fwk_0000000000000000_" + strings.Repeat("0", 64)} {
		req, _ := http.NewRequest("POST", cfg.Server+"/fireworks.v1.SandboxService/RemoveSandbox", strings.NewReader(`{"sandbox":"admins-box","force":true}`))
		req.Header.Set("Content-Type", "application/json")
		if hdr != "" {
			req.Header.Set("Authorization", hdr)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("RemoveSandbox with auth %q: HTTP %d, want 401", hdr, resp.StatusCode)
		}
	}
	if inspect(t, "admins-box")["id"] != adminBox {
		t.Error("an unauthenticated call removed a sandbox")
	}
}

// One token's sandboxes on a node share a log budget (--log-mib-per-token): past it their
// output is cut with a notice, and removing finished ones makes room again.
func TestLogBudgetPerToken(t *testing.T) {
	need(t)
	restartDev(t, "--log-mib-per-token", "1")
	t.Cleanup(func() { restartDev(t) })
	ctx := context.Background()
	secret := strings.TrimSpace(fw(t, 0, "token", "create", "--role", "user", "--name", "log-budget").stdout)
	user := []string{"FIREWORKS_TOKEN=" + secret}
	run := func(name string) string {
		r := world.cliEnv(ctx, user, nil, "run", "--name", name, image("busybox:latest"), "--", "sh", "-c", "head -c 800000 /dev/zero | tr '\\0' x")
		if r.code != 0 {
			t.Fatalf("run %s: %d %s", name, r.code, r.stderr)
		}
		l := world.cliEnv(ctx, user, nil, "logs", name)
		return l.stdout + l.stderr // the notice is on stderr
	}
	if got := run("log-a"); strings.Count(got, "x") != 800000 {
		t.Fatalf("the first run's log holds %d bytes of output, want all 800000", strings.Count(got, "x"))
	}
	got := run("log-b") // 1.6 MB together: past the 1 MiB budget
	if n := strings.Count(got, "x"); n >= 800000 || !strings.Contains(got, "reached their limit") {
		t.Errorf("the second run's log kept %d bytes and no notice: the budget was not shared", n)
	}
	world.cliEnv(ctx, user, nil, "rm", "log-a", "log-b")
	if got := run("log-c"); strings.Count(got, "x") != 800000 {
		t.Errorf("after removing finished sandboxes, a run's log holds %d bytes, want all 800000", strings.Count(got, "x"))
	}
	world.cliEnv(ctx, user, nil, "rm", "log-c")
}

// One token's images on a node are bounded (--image-mib-per-token): past it the token's
// own least recently used images go, never another token's or the operator's, and when
// the rest is in use its pull is refused, naming the flag.
func TestImageSharePerToken(t *testing.T) {
	need(t)
	for _, tag := range []string{"share-a", "share-b", "share-c", "share-x"} {
		testimage.Push(t, world.registry, tag+":latest", testimage.Busybox(t, testimage.Cmd(tag)))
	}
	noise := make([]byte, 3<<20) // incompressible: the layer weighs 3 MiB
	if _, err := rand.Read(noise); err != nil {
		t.Fatal(err)
	}
	testimage.Push(t, world.registry, "share-big:latest", testimage.WithLayers(t, testimage.Busybox(t),
		testimage.Layer(t, testimage.Entry{Name: "noise", Body: string(noise)})))
	// A few compressed bytes that unpack to 16 MiB: its root disk alone passes the share.
	testimage.Push(t, world.registry, "share-zero:latest", testimage.WithLayers(t, testimage.Busybox(t, testimage.Cmd("zero")),
		testimage.Layer(t, testimage.Entry{Name: "zeros", Body: string(make([]byte, 16<<20))})))
	// Each busybox image is ~1.1 MB of layers and ~1.8 MB more once its root disk is built:
	// 6 MiB holds two pulled and one run, not a fourth.
	restartDev(t, "--image-mib-per-token", "6")
	t.Cleanup(func() { restartDev(t) })
	ctx := context.Background()
	tokenEnv := func(name string) []string {
		return []string{"FIREWORKS_TOKEN=" + strings.TrimSpace(fw(t, 0, "token", "create", "--role", "user", "--name", name).stdout)}
	}
	u1, u2 := tokenEnv("share-1"), tokenEnv("share-2")
	pull := func(env []string, tag string) result {
		return world.cliEnv(ctx, env, nil, "image", "pull", image(tag+":latest"))
	}
	for _, p := range []struct {
		env []string
		tag string
	}{{u1, "share-b"}, {u2, "share-b"}, {nil, "share-x"}, {u1, "share-x"}} {
		if p.env == nil {
			fw(t, 0, "image", "pull", image(p.tag+":latest"))
		} else if r := pull(p.env, p.tag); r.code != 0 {
			t.Fatalf("pull %s: %d %s", p.tag, r.code, r.stderr)
		}
	}
	// share-a is run (not only pulled): the node keeps a template of it, which must not
	// keep the token from letting it go.
	if r := world.cliEnv(ctx, u1, nil, "run", "--rm", image("share-a:latest"), "--", "true"); r.code != 0 {
		t.Fatalf("run share-a: %d %s", r.code, r.stderr)
	}
	if ts := fw(t, 0, "image", "templates").stdout; !strings.Contains(ts, "share-a") {
		t.Fatalf("no template of share-a after a start of it:\n%s", ts)
	}
	// Least recently used first: b and x are used again after a.
	for _, tag := range []string{"share-b", "share-x"} {
		if r := pull(u1, tag); r.code != 0 {
			t.Fatalf("pull %s: %d %s", tag, r.code, r.stderr)
		}
	}
	time.Sleep(2500 * time.Millisecond) // past the grace for a start between its pull and its VM
	if r := pull(u1, "share-c"); r.code != 0 {
		t.Fatalf("a pull past the share, with the token's older images unused: %d %s", r.code, r.stderr)
	}
	ls := fw(t, 0, "image", "ls").stdout
	if strings.Contains(ls, "share-a") {
		t.Errorf("the token's least recently used image, held by no one else, stayed:\n%s", ls)
	}
	if ts := fw(t, 0, "image", "templates").stdout; strings.Contains(ts, "share-a") {
		t.Errorf("the template of an image the token let go of stayed:\n%s", ts)
	}
	for _, kept := range []string{"share-b", "share-x", "share-c"} {
		if !strings.Contains(ls, kept) {
			t.Errorf("%s is gone (another token's, the operator's or the one just pulled):\n%s", kept, ls)
		}
	}
	// An image whose root disk passes the share: the start fails naming the flag (the
	// root disk counts, not only the compressed layers).
	if r := world.cliEnv(ctx, u1, nil, "run", "--boot", "cold", image("share-zero:latest"), "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "--image-mib-per-token") {
		t.Errorf("a start whose root disk passes the share: exit %d, %s (want refused naming --image-mib-per-token)", r.code, r.stderr)
	}
	// With its image in use, the token's pull of an image that does not fit beside it is
	// refused before it downloads; the image in use stays.
	id := strings.TrimSpace(world.cliEnv(ctx, u1, nil, "run", "-d", "--boot", "cold", image("share-c:latest"), "--", "sleep", "600").stdout)
	t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", id) })
	waitStatus(t, id, "running")
	time.Sleep(2500 * time.Millisecond)
	r := pull(u1, "share-big")
	if r.code == 0 || !strings.Contains(r.stderr, "--image-mib-per-token") || !strings.Contains(r.stderr, "MiB allowed") {
		t.Errorf("a pull over the share with the rest in use: exit %d, %s (want refused naming --image-mib-per-token)", r.code, r.stderr)
	}
	ls = fw(t, 0, "image", "ls").stdout
	if !strings.Contains(ls, "share-c") || strings.Contains(ls, "share-big") || !strings.Contains(ls, "share-b") || !strings.Contains(ls, "share-x") {
		t.Errorf("after the refused pull, want share-c, share-b (another token's) and share-x (the operator's) kept, share-big gone:\n%s", ls)
	}
	// The operator is not bounded by a token's share.
	fw(t, 0, "image", "pull", image("share-big:latest"))

	// A pool the agent-sandbox controller keeps for its namespaces is charged as their
	// pulls are, to a share of its own: a pool of an image whose root disk passes it does
	// not fill, and says why.
	cfg, err := client.ReadConfig(world.config)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	zero := image("share-zero:latest")
	if _, err := c.Images.SetPool(ctx, connect.NewRequest(&pb.SetPoolRequest{Pool: &pb.Pool{Image: zero, Size: 1, ManagedBy: "agent-sandbox"}})); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = c.Images.DeletePool(context.Background(), connect.NewRequest(&pb.DeletePoolRequest{Image: zero}))
	})
	eventuallyWithin(t, time.Minute, "the managed pool of share-zero refused, naming the share", func() (bool, string) {
		p, _ := poolOf(t, zero)
		if p.Ready > 0 {
			t.Fatalf("the managed pool of an image past the share filled: %+v", p)
		}
		return strings.Contains(p.Error, "--image-mib-per-token"), fmt.Sprintf("%+v", p)
	})
}
