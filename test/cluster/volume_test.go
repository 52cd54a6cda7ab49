package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/fireworks-sandbox/fireworks/internal/node/network"
	"github.com/fireworks-sandbox/fireworks/internal/node/nodeapi"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// TestVolumeFromAnotherNode: a volume's data stays on its node (a0). A sandbox that
// mounts it goes there; one placed on another node (x) reaches the same volume,
// relayed by its node: the two exchange files while both run (writes, appends, renames)
// and one's lock keeps the other out. The relayed sandbox migrates live to a third node
// (y) and the one on the volume's node to x: both keep the volume. A sandbox without
// the volume, beside the relayed one, finds nothing to reach, and a node that does not
// run the sandbox is refused its volume stream. Once unused, the volume moves to
// another node with its data.
func TestVolumeFromAnotherNode(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	agentsListening(t)
	const vol = "xnode"
	mustFW(t, "volume", "create", vol, "--size", "64M", "--node", "a0")
	defer func() {
		if out, err := w.fw(nil, "volume", "rm", vol); err != nil {
			t.Errorf("volume rm %s: %v %s", vol, err, out)
		}
	}()
	img := pushLockImage(t)
	run := func(args ...string) string {
		t.Helper()
		id := strings.TrimSpace(mustFW(t, append(append([]string{"run", "-d"}, args...), img, "--", "sleep", "100000")...))
		waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
		return id
	}
	a := run("-v", vol+":/data")
	defer w.fw(nil, "rm", "-f", a)
	b := run("--constraint", "host!=a0", "-v", vol+":/data")
	defer w.fw(nil, "rm", "-f", b)
	if n := inspect(t, a)["node"]; n != "a0" {
		t.Fatalf("the sandbox mounting a volume of a0 was placed on %v, not on the volume's node", n)
	}
	// x runs b first, y later.
	x, _ := inspect(t, b)["node"].(string)
	y := map[string]string{"a1": "a2", "a2": "a1"}[x]
	if y == "" {
		t.Fatalf("the sandbox kept off a0 runs on %q", x)
	}
	sh := func(id, script string) string {
		t.Helper()
		out, errOut, code := w.cli(t.Context(), nil, "exec", id, "--", "sh", "-c", script)
		if code != 0 {
			t.Fatalf("exec in %s: %q: exit %d: %s %s", id, script, code, out, errOut)
		}
		return strings.TrimSpace(out)
	}
	sh(a, "echo from-a > /data/a.txt")
	if got := sh(b, "cat /data/a.txt; echo from-b > /data/b.txt; echo more-from-b >> /data/a.txt; mv /data/b.txt /data/b2.txt"); got != "from-a" {
		t.Fatalf("the sandbox on %s reads %q from the volume, want what a0's wrote", x, got)
	}
	if got := sh(a, "cat /data/a.txt /data/b2.txt; ls /data"); got != "from-a\nmore-from-b\nfrom-b\na.txt\nb2.txt" {
		t.Fatalf("the sandbox on a0 sees %q after the other's append and rename", got)
	}
	// The data is on a0's disk, and a0 runs the relayed sandbox's server.
	a0 := agentOf(t, "a0")
	dirs, _ := filepath.Glob(filepath.Join(a0.dataDir, "volumes", "mnt", volumeID(t, vol)+"*"))
	if len(dirs) != 1 {
		t.Fatalf("the volume's mount on a0: %v", dirs)
	}
	if b, err := os.ReadFile(filepath.Join(dirs[0], "b2.txt")); err != nil || string(b) != "from-b\n" {
		t.Fatalf("the volume's data on a0: %q %v", b, err)
	}
	relayDir := filepath.Join(a0.dataDir, "volume-relays", b)
	if _, err := os.Stat(filepath.Join(relayDir, "volume-server.pid")); err != nil {
		t.Fatalf("a0 runs no volume server for the sandbox on %s: %v", x, err)
	}

	// A lock held on one node keeps the other out, and is released.
	ctx, cancel := context.WithTimeout(t.Context(), minute)
	defer cancel()
	held := make(chan error, 1)
	go func() {
		out, errOut, code := w.cli(ctx, nil, "exec", a, "--", "sh", "-c", "/bin/guestlock -hold 8s /data/lk > /data/held")
		if code != 0 {
			held <- fmt.Errorf("exit %d: %s %s", code, out, errOut)
		}
		close(held)
	}()
	waitFor(t, minute, "the lock holder", func() bool {
		select {
		case err, ok := <-held:
			t.Fatalf("the lock holder on a0 ended before it held the lock: %v (ended: %v)", err, ok)
		default:
		}
		out, _, _ := w.cli(t.Context(), nil, "exec", b, "--", "cat", "/data/held")
		return strings.HasPrefix(out, "locked")
	})
	if got := sh(b, "/bin/guestlock -nb /data/lk; echo rc=$?"); got != "busy\nrc=1" {
		t.Fatalf("taking the lock a0's sandbox holds, from %s: %q, want busy", x, got)
	}
	if err := <-held; err != nil {
		t.Fatalf("holding the lock on a0: %v", err)
	}
	if got := sh(b, "/bin/guestlock -nb -fcntl /data/lk; echo rc=$?"); got != "locked\nreleased\nrc=0" {
		t.Fatalf("taking the lock once released: %q", got)
	}

	// A sandbox without the volume beside b finds nothing on the volume ports.
	c := run("--constraint", "host=="+x)
	defer w.fw(nil, "rm", "-f", c)
	for _, port := range []string{"2049", "111", "4045"} {
		if got := sh(c, "echo x | nc -w 3 "+network.GuestGateway.String()+" "+port+" >/dev/null 2>&1; echo rc=$?"); got == "rc=0" {
			t.Errorf("a sandbox without the volume reached port %s of its gateway", port)
		}
	}
	w.fw(nil, "rm", "-f", c)
	// A node that does not run the sandbox is refused its volume stream.
	if code, body := volumeStreamAs(t, y, "a0", b); code != http.StatusForbidden {
		t.Errorf("node %s asking a0 for the volume stream of a sandbox on %s: %d %q, want 403", y, x, code, body)
	}

	// The relayed sandbox moves to y, the one on a0 to x: both keep the volume.
	mustFW(t, "migrate", b, "--to", y)
	if n := inspect(t, b)["node"]; n != y {
		t.Fatalf("after migrate --to %s the sandbox is on %v", y, n)
	}
	mustFW(t, "migrate", a, "--to", x)
	if n := inspect(t, a)["node"]; n != x {
		t.Fatalf("after migrate --to %s the sandbox is on %v", x, n)
	}
	sh(b, "echo after-migrate > /data/m.txt")
	if got := sh(a, "cat /data/m.txt /data/a.txt"); got != "after-migrate\nfrom-a\nmore-from-b" {
		t.Fatalf("after both migrated, the volume reads %q", got)
	}
	if code, body := volumeStreamAs(t, x, "a0", b); code != http.StatusForbidden {
		t.Errorf("node %s, which ran the sandbox before it moved, asking for its volume stream: %d %q, want 403", x, code, body)
	}
	w.fw(nil, "rm", "-f", a)
	w.fw(nil, "rm", "-f", b)
	waitFor(t, minute, "a0 to stop the relayed volume servers", func() bool {
		entries, _ := os.ReadDir(filepath.Join(a0.dataDir, "volume-relays"))
		return len(entries) == 0
	})

	// Unused now, the volume moves to y with its data; a sandbox that mounts it goes
	// there, and a0 keeps nothing of it.
	if out := mustFW(t, "volume", "move", vol, "--to", y); !strings.Contains(out, "is on node "+y) {
		t.Fatalf("volume move: %q", out)
	}
	d := run("-v", vol+":/data")
	defer w.fw(nil, "rm", "-f", d)
	if n := inspect(t, d)["node"]; n != y {
		t.Errorf("a sandbox mounting the moved volume runs on %v, not on its new node %s", n, y)
	}
	if got := sh(d, "cat /data/m.txt /data/a.txt /data/b2.txt"); got != "after-migrate\nfrom-a\nmore-from-b\nfrom-b" {
		t.Errorf("the moved volume reads %q", got)
	}
	if imgs, _ := filepath.Glob(filepath.Join(a0.dataDir, "volumes", "images", "*")); len(imgs) != 0 {
		t.Errorf("a0 keeps volume images after the move: %v", imgs)
	}
	w.fw(nil, "rm", "-f", d)
}

// pushLockImage pushes busybox plus /bin/guestlock (see internal/testutil/guestlock).
func pushLockImage(t *testing.T) string {
	t.Helper()
	bin, err := testutil.BuildGuestTool(t.TempDir(), "guestlock")
	if err != nil {
		t.Fatal(err)
	}
	body, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	img := testimage.WithLayers(t, testimage.Busybox(t), testimage.Layer(t, testimage.Entry{Name: "bin/guestlock", Mode: 0o755, Body: string(body)}))
	ref := w.registry + "/locks:latest"
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

// volumeID is the ID of the volume named name as volume ls shows it (its start).
func volumeID(t *testing.T, name string) string {
	t.Helper()
	for _, line := range strings.Split(mustFW(t, "volume", "ls"), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 1 && f[0] == name {
			return f[1]
		}
	}
	t.Fatalf("no volume %s in volume ls", name)
	return ""
}

// volumeStreamAs opens, with node as's certificate, the volume stream of sandbox id on
// node to, and returns the status and the start of the body.
func volumeStreamAs(t *testing.T, as, to, id string) (int, string) {
	t.Helper()
	cert, pool := loadCertDir(t, filepath.Join(agentOf(t, as).dataDir, "pki"), "node")
	host := agentAddr(to)
	tr := &http.Transport{TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: strings.Split(host, ":")[0]}, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+host+nodeapi.VolumePath+id+"/0", strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("volume stream as %s to %s: %v", as, to, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return resp.StatusCode, strings.TrimSpace(string(b))
}
