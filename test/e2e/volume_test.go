package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// pushLockImage pushes busybox plus /bin/guestlock (see internal/testutil/guestlock) as
// locks:latest and returns its ref.
func pushLockImage(t *testing.T) string { return pushToolImage(t, "guestlock", "locks:latest") }

// volumeDir is where the node keeps a volume's files (its mount on the node), found by
// the volume's ID: the tests read it to see what the guests wrote, from outside them.
func volumeDir(t *testing.T, name string) string {
	t.Helper()
	out := fw(t, 0, "volume", "inspect", name).stdout
	m := regexp.MustCompile(`(?m)^ID:\s+([0-9a-f]{16})$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("volume inspect %s shows no ID:\n%s", name, out)
	}
	return filepath.Join(world.dataDir, "volumes", "mnt", m[1])
}

// eventually retries check (a few times a second) until it passes or a minute is over.
func eventually(t *testing.T, what string, check func() (bool, string)) {
	t.Helper()
	eventuallyWithin(t, time.Minute, what, check)
}

// eventuallyWithin retries check until it passes or timeout is over; the failure says
// what check last reported.
func eventuallyWithin(t *testing.T, timeout time.Duration, what string, check func() (bool, string)) {
	t.Helper()
	testutil.Eventually(t, timeout, what, check)
}

// Two sandboxes running at once share a volume: each sees what the other writes,
// appends, renames and deletes, at once; a read-only mount cannot write; a full volume
// answers ENOSPC; the volume cannot be removed while used, outlives its sandboxes, and
// nothing of it is reachable from a sandbox that does not mount it.
func TestVolumesSharedBetweenRunningSandboxes(t *testing.T) {
	need(t)
	img := pushLockImage(t)
	ctx := context.Background()
	fw(t, 0, "volume", "create", "shared", "--size", "32M")
	t.Cleanup(func() { _ = world.cli(ctx, nil, "volume", "rm", "shared") })
	if r := world.cli(ctx, nil, "volume", "create", "shared"); r.code == 0 || !strings.Contains(r.stderr, "exists already") {
		t.Errorf("a second volume of the same name: exit %d %q", r.code, r.stderr)
	}
	writer := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "vol-writer", "-v", "shared:/data", img, "--", "sh", "-c",
		"i=0; while true; do i=$((i+1)); echo tick $i >> /data/log; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(ctx, nil, "rm", "-f", writer) })
	reader := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "vol-reader", "-v", "shared:/mnt/vol", img, "--", "sleep", "600").stdout)
	t.Cleanup(func() { _ = world.cli(ctx, nil, "rm", "-f", reader) })
	waitStatus(t, writer, "running")
	waitStatus(t, reader, "running")
	in := func(id string, script string) result {
		return world.cli(ctx, nil, "exec", id, "--", "sh", "-c", script)
	}

	// Appends: the reader sees the writer's log grow while both run.
	lines := func() int {
		n, err := strconv.Atoi(strings.Fields(in(reader, "wc -l < /mnt/vol/log").stdout + " -1")[0])
		if err != nil {
			return -1
		}
		return n
	}
	first := -1
	eventually(t, "the writer's log, read by the reader", func() (bool, string) { first = lines(); return first >= 3, strconv.Itoa(first) })
	eventually(t, "the log growing under the reader", func() (bool, string) { n := lines(); return n > first, strconv.Itoa(n) })

	// Writes, renames and deletes, both ways, seen at the next look (no cache to wait out).
	if r := in(reader, "echo from-reader > /mnt/vol/note && mkdir /mnt/vol/dir"); r.code != 0 {
		t.Fatalf("reader writes: %d %s", r.code, r.stderr)
	}
	if r := in(writer, "cat /data/note && test -d /data/dir"); r.code != 0 || strings.TrimSpace(r.stdout) != "from-reader" {
		t.Fatalf("the writer reads the reader's file: %d %q %s", r.code, r.stdout, r.stderr)
	}
	if r := in(writer, "mv /data/note /data/dir/renamed"); r.code != 0 {
		t.Fatalf("rename: %d %s", r.code, r.stderr)
	}
	if r := in(reader, "test ! -e /mnt/vol/note && cat /mnt/vol/dir/renamed"); r.code != 0 || strings.TrimSpace(r.stdout) != "from-reader" {
		t.Fatalf("the reader sees the rename: %d %q %s", r.code, r.stdout, r.stderr)
	}
	if r := in(writer, "rm -r /data/dir"); r.code != 0 {
		t.Fatalf("delete: %d %s", r.code, r.stderr)
	}
	if r := in(reader, "ls /mnt/vol"); r.code != 0 || strings.Fields(r.stdout)[0] != "log" || len(strings.Fields(r.stdout)) != 1 {
		t.Fatalf("the reader sees the delete: ls %q %s", r.stdout, r.stderr)
	}
	// File locks are the volume's, not each guest's: one sandbox's lock keeps the other
	// out (flock and fcntl, not waiting), and the other's waiting lock is granted once
	// it is let go.
	holder := make(chan result, 1)
	// (The holder's output goes to its own /tmp: a file on the volume would show its
	// lines only once closed.)
	go func() { holder <- in(writer, "/bin/guestlock -hold 4s /data/lock > /tmp/holder.out 2>&1") }()
	eventually(t, "the writer's lock", func() (bool, string) {
		out := in(writer, "cat /tmp/holder.out").stdout
		return strings.HasPrefix(out, "locked"), out
	})
	for _, mode := range []string{"", "-fcntl"} {
		if r := in(reader, "/bin/guestlock -nb "+mode+" /mnt/vol/lock"); r.code != 1 || strings.TrimSpace(r.stdout) != "busy" {
			t.Errorf("a lock (%q) held by another sandbox: exit %d %q %q", mode, r.code, r.stdout, r.stderr)
		}
	}
	if r := in(reader, "/bin/guestlock /mnt/vol/lock"); r.code != 0 || r.stdout != "locked\nreleased\n" {
		t.Errorf("a waiting lock: exit %d %q %q", r.code, r.stdout, r.stderr)
	}
	if out := in(writer, "cat /tmp/holder.out").stdout; out != "locked\nreleased\n" {
		t.Errorf("a waiting lock was granted while its holder still held it (the holder printed %q)", out)
	}
	if r := <-holder; r.code != 0 {
		t.Errorf("the lock's holder: exit %d %q", r.code, r.stderr)
	}
	if r := in(reader, "/bin/guestlock -nb -fcntl /mnt/vol/lock"); r.code != 0 {
		t.Errorf("a lock nobody holds: exit %d %q %q", r.code, r.stdout, r.stderr)
	}

	// What the guests wrote is on the node, in the volume, owned by root as the guests see it.
	data, err := os.ReadFile(filepath.Join(volumeDir(t, "shared"), "log"))
	if err != nil || !strings.HasPrefix(string(data), "tick 1\n") {
		t.Fatalf("the volume's log on the node: %q, %v", data, err)
	}

	// Read-only: reads work, every kind of write is refused by the server (EROFS).
	r := world.cli(ctx, nil, "run", "-v", "shared:/ro:ro", img, "--", "sh", "-c",
		"head -1 /ro/log; echo x > /ro/new; touch /ro/log; rm /ro/log; mkdir /ro/d; ls /ro")
	if strings.TrimSpace(strings.Split(r.stdout, "\n")[0]) != "tick 1" || strings.Count(r.stderr, "Read-only file system") != 4 {
		t.Errorf("a read-only mount: stdout %q stderr %q", r.stdout, r.stderr)
	}
	// Full: the guest gets ENOSPC, and the volume works on once space is freed.
	r = in(writer, "dd if=/dev/zero of=/data/fill bs=1M count=64; echo rc=$?; rm /data/fill; echo after > /data/after && cat /data/after")
	if !strings.Contains(r.stderr, "No space left on device") || !strings.Contains(r.stdout, "rc=1") || !strings.Contains(r.stdout, "after") {
		t.Errorf("filling the volume: stdout %q stderr %q", r.stdout, r.stderr)
	}

	// Nothing of it is reachable from a sandbox that does not mount it: its own
	// namespace has no server, and the others' are behind their policies.
	addr := str(details(t, inspect(t, writer)), "address")
	if r := in(writer, "nc -w 2 169.254.0.22 2049 </dev/null && echo reached-own"); !strings.Contains(r.stdout, "reached-own") {
		t.Fatalf("the probe cannot reach even the sandbox's own volume server: %q %q", r.stdout, r.stderr)
	}
	r = world.cli(ctx, nil, "run", img, "--", "sh", "-c",
		"nc -w 2 169.254.0.22 2049 </dev/null && echo reached-gateway; nc -w 2 "+addr+" 2049 </dev/null && echo reached-writer; echo done")
	if strings.Contains(r.stdout, "reached") || !strings.Contains(r.stdout, "done") {
		t.Errorf("a sandbox without the volume reached a volume server: %q %q", r.stdout, r.stderr)
	}

	// In use: not removable, and listed with its users.
	if r := world.cli(ctx, nil, "volume", "rm", "shared"); r.code == 0 || !strings.Contains(r.stderr, "in use") {
		t.Errorf("volume rm while used: exit %d %q", r.code, r.stderr)
	}
	if ls := fw(t, 0, "volume", "ls").stdout; !strings.Contains(ls, writer[:12]) || !strings.Contains(ls, reader[:12]) {
		t.Errorf("volume ls does not name its users:\n%s", ls)
	}

	// It outlives its sandboxes; removed, its data goes.
	fw(t, 0, "rm", "-f", writer, reader)
	if out := fw(t, 0, "run", "-v", "shared:/again", img, "--", "cat", "/again/after").stdout; strings.TrimSpace(out) != "after" {
		t.Errorf("a new sandbox reads %q", out)
	}
	dir := volumeDir(t, "shared")
	fw(t, 0, "volume", "rm", "shared")
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the removed volume's directory is still there: %v", err)
	}
	if r := world.cli(ctx, nil, "run", "-v", "shared:/x", img, "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("run with a removed volume: exit %d %q", r.code, r.stderr)
	}
}

// A sandbox with a volume keeps writing it across a pause and resume, a live migration,
// a fork and a restart of the node's agent and server (its volume server outlives the
// agent); a cold boot mounts volumes too. What it writes is read on the node.
func TestVolumeAcrossPauseMigrateForkRestart(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	ctx := context.Background()
	fw(t, 0, "volume", "create", "life", "--size", "16M")
	t.Cleanup(func() { _ = world.cli(ctx, nil, "volume", "rm", "life") })
	dir := volumeDir(t, "life")
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--boot", "cold", "-v", "life:/v", img, "--", "sh", "-c",
		"i=0; while true; do i=$((i+1)); echo $i > /v/count.$$; mv /v/count.$$ /v/count; sleep 0.2; done").stdout)
	t.Cleanup(func() { _ = world.cli(ctx, nil, "rm", "-f", id) })
	waitStatus(t, id, "running")
	count := func() int {
		b, _ := os.ReadFile(filepath.Join(dir, "count"))
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return -1
		}
		return n
	}
	grows := func(what string) {
		t.Helper()
		from := count()
		eventually(t, what, func() (bool, string) { n := count(); return n > from+2, strconv.Itoa(n) })
	}
	grows("the counter on the volume after a cold boot")
	servers := func() int {
		out, _ := exec.Command("pgrep", "-f", "fireworks-volume-server .*"+dir).Output()
		return len(strings.Fields(string(out)))
	}

	fw(t, 0, "pause", id)
	frozen := count()
	time.Sleep(time.Second)
	if n := count(); n != frozen {
		t.Errorf("the counter moved while paused: %d → %d", frozen, n)
	}
	if n := servers(); n != 0 {
		t.Errorf("%d volume servers while the only sandbox that mounts it is paused", n)
	}
	fw(t, 0, "resume", id)
	grows("the counter after the resume")

	if out := fw(t, 0, "migrate", id).stdout; !strings.Contains(out, "migrated") {
		t.Fatalf("migrate: %q", out)
	}
	grows("the counter after the migration")
	if d := details(t, inspect(t, id)); str(d, "start_mode") != "migrated" {
		t.Errorf("start mode after the migration: %q", str(d, "start_mode"))
	}
	if n := servers(); n != 1 {
		t.Errorf("%d volume servers after the migration, want 1 (the source's gone)", n)
	}
	// The server is bounded: its own cgroup (memory, processes, CPU).
	pid, _ := exec.Command("pgrep", "-f", "fireworks-volume-server .*"+dir).Output()
	if cg, err := os.ReadFile("/proc/" + strings.TrimSpace(string(pid)) + "/cgroup"); err != nil || !strings.Contains(string(cg), "/fireworks-vol-") {
		t.Errorf("the volume server's cgroups: %q %v", cg, err)
	}

	// A fork carries on as a new machine with the same mount.
	fork := strings.TrimSpace(fw(t, 0, "fork", id).stdout)
	t.Cleanup(func() { _ = world.cli(ctx, nil, "rm", "-f", fork) })
	if r := fw(t, 0, "exec", fork, "--", "sh", "-c", "echo forked > /v/from-fork"); r.code != 0 {
		t.Fatalf("the fork writes its volume: %s", r.stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "from-fork")); strings.TrimSpace(string(b)) != "forked" {
		t.Errorf("the fork's write on the node: %q", b)
	}
	fw(t, 0, "rm", "-f", fork)

	// The agent (with the server) restarts: the sandbox is adopted, its volume server
	// served on all along, and the counter goes on.
	world.stopDev()
	if err := world.startDev(); err != nil {
		world.dumpDevLog()
		t.Fatalf("restart fireworks dev: %v", err)
	}
	if sb := inspect(t, id); sb["status"] != "running" {
		t.Fatalf("after the restart the sandbox is %v (%v)", sb["status"], sb["reason"])
	}
	grows("the counter after the restart")
	if n := servers(); n != 1 {
		t.Errorf("%d volume servers after the restart, want 1", n)
	}
	// The adopted server dies: the agent serves the volume again, and the guest goes on.
	_ = exec.Command("pkill", "-9", "-f", "fireworks-volume-server .*"+dir).Run()
	grows("the counter after the adopted volume server was killed")
	fw(t, 0, "rm", "-f", id)
	if n := servers(); n != 0 {
		t.Errorf("%d volume servers after the sandbox was removed", n)
	}
	last := count()

	// Stopped with nothing using it, the node unmounts the volume (as a reboot would);
	// started again, it mounts it for the next sandbox, data and all.
	world.stopDev()
	if mounts, _ := os.ReadFile("/proc/self/mounts"); strings.Contains(string(mounts), dir) {
		t.Errorf("the volume is still mounted on the node after the server stopped")
	}
	if err := world.startDev(); err != nil {
		world.dumpDevLog()
		t.Fatalf("restart fireworks dev: %v", err)
	}
	if out := fw(t, 0, "run", "-v", "life:/v", img, "--", "cat", "/v/count").stdout; strings.TrimSpace(out) != strconv.Itoa(last) {
		t.Errorf("after a restart with the volume unmounted, a sandbox reads %q, want %d", out, last)
	}
}

// userToken makes a user token and returns its ID and the environment that uses it.
func userToken(t *testing.T, name string) (id string, env []string) {
	t.Helper()
	secret := strings.TrimSpace(fw(t, 0, "token", "create", "--role", "user", "--name", name).stdout)
	for _, line := range strings.Split(fw(t, 0, "token", "ls").stdout, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[1] == name {
			id = f[0]
		}
	}
	if id == "" {
		t.Fatalf("token %s not listed", name)
	}
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "token", "revoke", id) })
	return id, []string{"FIREWORKS_TOKEN=" + secret}
}

// Volumes are their token's: another user token finds them by neither name nor ID, can
// neither mount nor remove them; an admin shares one (here read-only), and the token it
// is shared with mounts it as shared, then no longer once unshared.
func TestVolumeOwnershipAndSharing(t *testing.T) {
	need(t)
	ctx := context.Background()
	img := image("busybox:latest")
	_, owner := userToken(t, "vol-owner")
	otherID, other := userToken(t, "vol-other")
	as := func(env []string, args ...string) result { return world.cliEnv(ctx, env, nil, args...) }
	if r := as(owner, "volume", "create", "mine", "--size", "16M"); r.code != 0 {
		t.Fatalf("user volume create: %d %s", r.code, r.stderr)
	}
	t.Cleanup(func() { _ = as(owner, "volume", "rm", "mine") })
	if r := as(owner, "run", "-v", "mine:/m", img, "--", "sh", "-c", "echo owners > /m/f"); r.code != 0 {
		t.Fatalf("the owner writes its volume: %d %s", r.code, r.stderr)
	}
	id := strings.Fields(strings.SplitN(as(owner, "volume", "ls").stdout, "\n", 3)[1])[1]
	for _, ref := range []string{"mine", id} {
		for _, args := range [][]string{{"volume", "inspect", ref}, {"volume", "rm", ref}, {"run", "-v", ref + ":/x", img, "--", "true"}} {
			if r := as(other, args...); r.code == 0 || !strings.Contains(r.stderr, "not found") {
				t.Errorf("another token %v: exit %d %q; want not found", args, r.code, r.stderr)
			}
		}
	}
	if r := as(owner, "volume", "share", "mine", otherID); r.code == 0 || !strings.Contains(r.stderr, "admin") {
		t.Errorf("a user shares a volume: exit %d %q", r.code, r.stderr)
	}
	fw(t, 0, "volume", "share", id, otherID, "--read-only")
	if ls := as(other, "volume", "ls").stdout; !strings.Contains(ls, "mine") || !strings.Contains(ls, "shared with this token, read-only") {
		t.Errorf("the shared volume in the other token's list:\n%s", ls)
	}
	if r := as(other, "run", "-v", "mine:/x", img, "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "read-only") {
		t.Errorf("a read-write mount of a volume shared read-only: exit %d %q", r.code, r.stderr)
	}
	if r := as(other, "run", "-v", "mine:/x:ro", img, "--", "cat", "/x/f"); r.code != 0 || strings.TrimSpace(r.stdout) != "owners" {
		t.Errorf("a read-only mount of the shared volume: exit %d %q %q", r.code, r.stdout, r.stderr)
	}
	if r := as(other, "volume", "rm", "mine"); r.code == 0 || !strings.Contains(r.stderr, "only its owner") {
		t.Errorf("the token it is shared with removes it: exit %d %q", r.code, r.stderr)
	}
	fw(t, 0, "volume", "unshare", id, otherID)
	if r := as(other, "run", "-v", "mine:/x:ro", img, "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("a mount once unshared: exit %d %q", r.code, r.stderr)
	}
}
