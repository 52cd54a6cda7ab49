package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// One boot answers several questions: the streams are kept apart, and the guest runs its
// own kernel, with the image's env, workdir and user.
func TestRunStreamsKernelAndImageConfig(t *testing.T) {
	need(t)
	script := `echo to-stdout; echo to-stderr >&2; echo "kernel=$(uname -r)"; echo "foo=$FOO"; echo "pwd=$(pwd)"; echo "uid=$(id -u) gid=$(id -g)"; echo "host=$(hostname)"`
	r := fw(t, 0, "run", "--name", "streams", "--insecure-registry", world.registry, image("busybox:latest"), "--", "sh", "-c", script)
	if !strings.Contains(r.stdout, "to-stdout") || strings.Contains(r.stdout, "to-stderr") {
		t.Errorf("stdout should hold only stdout: %q", r.stdout)
	}
	if !strings.Contains(r.stderr, "to-stderr") || strings.Contains(r.stderr, "to-stdout") {
		t.Errorf("stderr should hold only stderr: %q", r.stderr)
	}
	hostRel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	kernel := field(r.stdout, "kernel=")
	if kernel == "" || kernel == strings.TrimSpace(string(hostRel)) || !strings.Contains(kernel, "cloud-amd64") {
		t.Errorf("uname -r in the guest = %q; want the Debian cloud guest kernel, not the host's %q", kernel, strings.TrimSpace(string(hostRel)))
	}
	for want, got := range map[string]string{
		"from-image": field(r.stdout, "foo="),
		"/home/app":  field(r.stdout, "pwd="),
		"1000":       strings.Fields(field(r.stdout, "uid="))[0],
		"streams":    field(r.stdout, "host="),
	} {
		if got != want {
			t.Errorf("got %q, want %q (image config not honoured?)\n%s", got, want, r.stdout)
		}
	}
	// inspect shows the accelerator and the lifecycle with timestamps.
	sb := inspect(t, "streams")
	if sb["status"] != "exited" || sb["accel"] == nil || sb["accel"] == "" {
		t.Errorf("inspect: status %v accel %v", sb["status"], sb["accel"])
	}
	events, _ := sb["events"].([]any)
	var seen []string
	for _, e := range events {
		ev := e.(map[string]any)
		seen = append(seen, ev["status"].(string))
		if len(seen) == 2 {
			seen[1] += "(" + fmt.Sprint(ev["reason"]) + ")"
		}
	}
	// dev is a one-node cluster: the sandbox is accepted, then placed on the node.
	want := "pending,pending(placed on node " + str(sb, "node") + "),starting,running,exited"
	if strings.Join(seen, ",") != want {
		t.Errorf("lifecycle events = %v, want %s", seen, want)
	}
}

// Request overrides beat the image config.
func TestRunOverridesEnvWorkdirUser(t *testing.T) {
	need(t)
	r := fw(t, 0, "run", "-e", "FOO=overridden", "-e", "BAR=new", "-w", "/tmp", "-u", "0:0", "--memory", "320M", "--cpus", "1",
		image("busybox:latest"), "--", "sh", "-c", `echo "$FOO $BAR $(pwd) $(id -u):$(id -g) $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"`)
	f := strings.Fields(r.stdout)
	if len(f) != 5 || f[0] != "overridden" || f[1] != "new" || f[2] != "/tmp" || f[3] != "0:0" {
		t.Fatalf("overrides not applied: %q", r.stdout)
	}
	var memKB int
	fmt.Sscan(f[4], &memKB)
	if memKB < 200*1024 || memKB > 320*1024 {
		t.Errorf("guest MemTotal %d kB does not match --memory 320M", memKB)
	}
}

// --non-root (Kubernetes' runAsNonRoot): the guest refuses to run the command as root —
// the image's user (root in a plain busybox) or a --user that resolves to uid 0 — and
// says so; the image's own non-root user (busybox:latest's app) runs, and so do execs
// as non-root users, not an exec as root.
func TestRunNonRoot(t *testing.T) {
	need(t)
	testimage.Push(t, world.registry, "root-user:1", testimage.Busybox(t))
	for i, c := range []struct{ img, user string }{{image("root-user:1"), ""}, {image("busybox:latest"), "root"}, {image("busybox:latest"), "0:0"}} {
		name := fmt.Sprintf("nonroot-%d", i)
		args := []string{"run", "--non-root", "--name", name}
		if c.user != "" {
			args = append(args, "--user", c.user)
		}
		r := world.cli(context.Background(), nil, append(args, c.img, "--", "echo", "ran")...)
		if r.code == 0 || strings.Contains(r.stdout, "ran") || !strings.Contains(r.stderr, "runAsNonRoot") {
			t.Errorf("--non-root, %s as %q: exit %d, stdout %q, stderr %q; want refused naming runAsNonRoot", c.img, c.user, r.code, r.stdout, r.stderr)
		}
	}
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--non-root", image("busybox:latest"), "--", "sleep", "600").stdout)
	t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", id) })
	waitStatus(t, id, "running")
	if got := fw(t, 0, "exec", id, "--", "id", "-u").stdout; got != "1000\n" {
		t.Errorf("an exec in a --non-root sandbox of an image whose user is app runs as %q", got)
	}
	// The rule holds for every exec, whatever user it names.
	if r := world.cli(context.Background(), nil, "exec", "--user", "root", id, "--", "id", "-u"); r.code == 0 || !strings.Contains(r.stderr, "runAsNonRoot") {
		t.Errorf("an exec as root in a --non-root sandbox: exit %d, %q %q; want refused naming runAsNonRoot", r.code, r.stdout, r.stderr)
	}
}

func TestExitCodes(t *testing.T) {
	need(t)
	cases := []struct {
		name string
		args []string
		want int
		err  string
	}{
		{"zero", []string{"true"}, 0, ""},
		{"three", []string{"sh", "-c", "exit 3"}, 3, ""},
		{"not-found", []string{"no-such-command"}, 127, "not found"},
		{"not-executable", []string{"/bin/notexec"}, 126, "not executable"},
		{"killed", []string{"sh", "-c", "kill -KILL $$"}, 137, ""},
	}
	var wg sync.WaitGroup
	for _, c := range cases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := world.cli(context.Background(), nil, append([]string{"run", image("busybox:latest"), "--"}, c.args...)...)
			if r.code != c.want {
				t.Errorf("%s: exit %d, want %d (stderr %q)", c.name, r.code, c.want, r.stderr)
			}
			if c.err != "" && !strings.Contains(r.stderr, c.err) {
				t.Errorf("%s: stderr %q should say %q", c.name, r.stderr, c.err)
			}
		}()
		// Two boots at a time on two cores.
		if c.name == "three" || c.name == "not-executable" {
			wg.Wait()
		}
	}
	wg.Wait()
}

func TestStdinAndLargeOutput(t *testing.T) {
	need(t)
	in := bytes.Repeat([]byte("fireworks stdin line\n"), 5000)
	r := world.cli(context.Background(), in, "run", "-i", image("busybox:latest"), "--", "sh", "-c", "sha256sum; yes 0123456789abcdef | head -c 10485760")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	sum := sha256.Sum256(in)
	if !strings.HasPrefix(r.stdout, hex.EncodeToString(sum[:])) {
		t.Errorf("stdin did not arrive intact: guest sha256 %q", r.stdout[:min(80, len(r.stdout))])
	}
	_, big, _ := strings.Cut(r.stdout, "\n")
	want := bytes.Repeat([]byte("0123456789abcdef\n"), 10485760/17+1)[:10485760]
	if len(big) != len(want) || big != string(want) {
		t.Errorf("10 MB of output: got %d bytes, want %d, equal=%v", len(big), len(want), big == string(want))
	}
}

func TestThreeSandboxesAtOnce(t *testing.T) {
	need(t)
	var wg sync.WaitGroup
	results := make([]result, 3)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = world.cli(context.Background(), nil, "run", image("busybox:latest"), "--", "sh", "-c", fmt.Sprintf("sleep 1; echo sandbox-%d", i))
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.code != 0 || strings.TrimSpace(r.stdout) != fmt.Sprintf("sandbox-%d", i) {
			t.Errorf("sandbox %d: exit %d stdout %q stderr %q", i, r.code, r.stdout, r.stderr)
		}
	}
}

// A detached sandbox serves exec, logs and stop.
func TestDetachedExecLogsStop(t *testing.T) {
	need(t)
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "bg", "-e", "RUNENV=yes", image("busybox:latest"), "--", "sh", "-c", "echo started; trap 'echo got-term; exit 0' TERM; while true; do sleep 0.2; done").stdout)
	waitStatus(t, id, "running")
	// exec runs like the main process (its env, workdir and user), as docker exec does,
	// unless told otherwise.
	if r := fw(t, 0, "exec", "bg", "--", "sh", "-c", `echo "$FOO $RUNENV $(pwd) $(id -u)"`); strings.TrimSpace(r.stdout) != "from-image yes /home/app 1000" {
		t.Errorf("exec environment: %q, want the main process's", r.stdout)
	}
	if r := fw(t, 0, "exec", "-u", "0", "-w", "/tmp", "-e", "RUNENV=no", "bg", "--", "sh", "-c", `echo "$RUNENV $(pwd) $(id -u)"`); strings.TrimSpace(r.stdout) != "no /tmp 0" {
		t.Errorf("exec overrides: %q", r.stdout)
	}
	r := fw(t, 0, "exec", "bg", "--", "sh", "-c", "echo exec-out; echo exec-err >&2; hostname")
	if !strings.Contains(r.stdout, "exec-out") || !strings.Contains(r.stdout, "bg") || !strings.Contains(r.stderr, "exec-err") {
		t.Errorf("exec output: %q / %q", r.stdout, r.stderr)
	}
	fw(t, 4, "exec", "bg", "--", "sh", "-c", "exit 4")
	// A file written by exec is seen by the next exec (same root filesystem).
	fw(t, 0, "exec", "bg", "--", "sh", "-c", "echo kept > /tmp/f")
	if r := fw(t, 0, "exec", "bg", "--", "cat", "/tmp/f"); strings.TrimSpace(r.stdout) != "kept" {
		t.Errorf("file written by an earlier exec: %q", r.stdout)
	}
	if r := fw(t, 0, "ps"); !strings.Contains(r.stdout, "bg") {
		t.Errorf("ps does not list the running sandbox: %s", r.stdout)
	}
	fw(t, 0, "stop", "bg")
	sb := waitStatus(t, id, "exited")
	if logs := fw(t, 0, "logs", "bg").stdout; !strings.Contains(logs, "started") || !strings.Contains(logs, "got-term") {
		t.Errorf("logs after stop: %q", logs)
	}
	// It exited by itself on SIGTERM, so it keeps its own exit code.
	if sb["exit_code"] != float64(0) {
		t.Errorf("exit code after a graceful stop = %v, want 0", sb["exit_code"])
	}
	fw(t, 0, "rm", "bg")
	r = world.cli(context.Background(), nil, "inspect", "bg")
	if r.code != 125 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("inspect after rm: exit %d %q", r.code, r.stderr)
	}
}

func TestTimeout(t *testing.T) {
	need(t)
	r := world.cli(context.Background(), nil, "run", "--timeout", "3s", image("busybox:latest"), "--", "sleep", "600")
	if r.code != 124 || !strings.Contains(r.stderr, "timed out") {
		t.Errorf("timeout: exit %d stderr %q", r.code, r.stderr)
	}
}

func TestBadInputGetsClearErrors(t *testing.T) {
	need(t)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"run", "--memory", "100000G", image("busybox:latest"), "--", "true"}, "memory"},
		{[]string{"run", "--cpus", "999", image("busybox:latest"), "--", "true"}, "cpus"},
		{[]string{"run", "--memory", "lots", image("busybox:latest"), "--", "true"}, "invalid --memory"},
		{[]string{"inspect", "no-such-sandbox"}, "not found"},
		{[]string{"exec", "no-such-sandbox", "--", "true"}, "not found"},
		{[]string{"--token", "wrong", "ps"}, "not authenticated"},
	}
	before := fw(t, 0, "ps", "-a", "-q").stdout
	for _, c := range cases {
		r := world.cli(context.Background(), nil, c.args...)
		if r.code != 125 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("fireworks %s: exit %d stderr %q; want 125 and %q", strings.Join(c.args, " "), r.code, r.stderr, c.want)
		}
	}
	// A refused request creates nothing.
	if after := fw(t, 0, "ps", "-a", "-q").stdout; after != before {
		t.Errorf("refused requests changed the sandbox list:\nbefore %q\nafter  %q", before, after)
	}
	// An image that does not exist fails the sandbox with a reason naming it.
	r := world.cli(context.Background(), nil, "run", image("does-not-exist:v1"), "--", "true")
	if r.code != 125 || !strings.Contains(r.stderr, "does-not-exist") {
		t.Errorf("missing image: exit %d stderr %q", r.code, r.stderr)
	}
}

func field(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func inspect(t *testing.T, id string) map[string]any {
	t.Helper()
	r := fw(t, 0, "inspect", id)
	var m map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatalf("inspect %s: %v\n%s", id, err, r.stdout)
	}
	return m
}

// waitStatus polls inspect until the sandbox reaches status (state changes are async).
func waitStatus(t *testing.T, id, status string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	var sb map[string]any
	for time.Now().Before(deadline) {
		sb = inspect(t, id)
		if sb["status"] == status {
			return sb
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("sandbox %s did not reach %s: %v", id, status, sb)
	return nil
}

// A command that cannot even start (unknown user) is a Fireworks error (125) with the
// reason, not a mysterious exit code; a missing working directory is created, as Docker does.
func TestStartErrorsAndWorkdirCreation(t *testing.T) {
	need(t)
	r := world.cli(context.Background(), nil, "run", "-u", "nosuchuser", image("busybox:latest"), "--", "true")
	if r.code != 125 || !strings.Contains(r.stderr, "nosuchuser") {
		t.Errorf("unknown user: exit %d stderr %q; want 125 naming the user", r.code, r.stderr)
	}
	r = fw(t, 0, "run", "-w", "/new/dir", image("busybox:latest"), "--", "pwd")
	if strings.TrimSpace(r.stdout) != "/new/dir" {
		t.Errorf("-w /new/dir: pwd printed %q", r.stdout)
	}
}
