package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// get is a shell command that GETs / from HOST:PORT (or "HOST PORT") and prints the
// answer (busybox's nc: Debian's static busybox wget crashes in the guest).
func get(hostPort string) string {
	return fmt.Sprintf(`printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 %s`, strings.Replace(hostPort, ":", " ", 1))
}

// groupMembers is the group a sandbox's inspect shows: member name -> ID.
func groupMembers(t *testing.T, id string) map[string]string {
	t.Helper()
	g, _ := inspect(t, id)["group"].(map[string]any)
	ms, _ := g["members"].([]any)
	out := map[string]string{}
	for _, m := range ms {
		mm, _ := m.(map[string]any)
		name, _ := mm["name"].(string)
		mid, _ := mm["id"].(string)
		out[name] = mid
	}
	if len(out) == 0 {
		t.Fatalf("inspect %s shows no group: %v", id, inspect(t, id))
	}
	return out
}

// A group: the main talks to a database-like sidecar by name over the group's private
// network; the sidecar's readiness check holds the main's command back until it passes
// (the sidecar listens only after 3 s, and the main tries once); when the main exits,
// the sidecar is stopped and the group's exit code is the main's. Each member has its
// own logs and inspect. A sandbox outside the group reaches neither the group's
// addresses nor the sidecar's address on the node, while the group's main does.
func TestGroupMainTalksToSidecarByName(t *testing.T) {
	need(t)
	ctx := context.Background()
	bb := image("busybox:latest")
	server := "sleep 3; mkdir -p /tmp/www; echo pong-from-$(hostname) > /tmp/www/index.html; echo db-started; exec httpd -f -p 5432 -h /tmp/www"

	// Attached: the CLI's exit code is the main's, its output the main's.
	r := world.cli(ctx, nil, "run", "--name", "grp-once",
		"--sidecar", "name=db,image="+bb+",ready=tcp:5432,cmd=sh -c '"+server+"'",
		bb, "--", "sh", "-c", get("db:5432")+" && exit 3")
	if r.code != 3 || !strings.Contains(r.stdout, "pong-from-db") {
		t.Logf("ps: %s\nmain: %v", world.cli(ctx, nil, "ps", "-a").stdout, inspect(t, "grp-once"))
		for _, id := range groupMembers(t, "grp-once") {
			sb := inspect(t, id)
			t.Logf("member %s: %v %v %v logs %q", id, sb["status"], sb["events"], sb["details"], world.cli(ctx, nil, "logs", id).stdout)
		}
		t.Fatalf("group run: exit %d (want 3, the main's) stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
	members := groupMembers(t, "grp-once")
	db := members["db"]
	if db == "" || members["main"] == "" {
		t.Fatalf("group members %v", members)
	}
	t.Cleanup(func() { world.cli(ctx, nil, "rm", "-f", "grp-once") })
	// The sidecar is stopped with its main: it ends without anyone asking.
	sc := waitStatus(t, db, "exited")
	if logs := fw(t, 0, "logs", db).stdout; !strings.Contains(logs, "db-started") {
		t.Errorf("the sidecar's own log: %q", logs)
	}
	if d, _ := sc["details"].(map[string]any); d == nil || !strings.Contains(fmt.Sprint(d["ready"]), "tcp:5432 passed") {
		t.Errorf("the sidecar's details say nothing of its readiness: %v", sc["details"])
	}
	// rm of a sidecar alone is refused while the group runs; here it has ended, so rm of
	// the main takes the sidecar along.
	fw(t, 0, "rm", "grp-once")
	if r := world.cli(ctx, nil, "inspect", db); r.code == 0 {
		t.Errorf("the sidecar outlived its main's rm: %s", r.stdout)
	}

	// A running group, and a foreign sandbox beside it.
	main := strings.TrimSpace(fw(t, 0, "run", "-d", "--name", "grp-live",
		"--sidecar", "name=db,image="+bb+",ready=tcp:5432,cmd=sh -c '"+server+"'",
		bb, "--", "sleep", "600").stdout)
	t.Cleanup(func() { world.cli(ctx, nil, "rm", "-f", main) })
	waitStatus(t, main, "running")
	db = groupMembers(t, main)["db"]
	dbSB := waitStatus(t, db, "running")
	if r := world.cli(ctx, nil, "rm", db); r.code == 0 || !strings.Contains(r.stderr, "remove the group's main") {
		t.Errorf("rm of a running group's sidecar: exit %d %q", r.code, r.stderr)
	}
	nodeAddr := ""
	if n, _ := dbSB["network"].(map[string]any); n != nil {
		nodeAddr, _ = n["address"].(string)
	}
	if nodeAddr == "" {
		t.Fatalf("the sidecar's inspect shows no address: %v", dbSB["network"])
	}
	if out := fw(t, 0, "exec", main, "--", "sh", "-c", get("db:5432")).stdout; !strings.Contains(out, "pong-from-db") {
		t.Errorf("the main's exec reaches db: %q", out)
	}
	// The sidecar knows the main by name too, and is known by its own.
	if r := fw(t, 0, "exec", db, "--", "sh", "-c", "hostname; cat /etc/hosts"); !strings.Contains(r.stdout, "169.254.20.10\tmain") || !strings.HasPrefix(r.stdout, "db\n") {
		t.Errorf("the sidecar's hostname and hosts: %q", r.stdout)
	}
	for _, target := range []string{"169.254.20.11:5432", nodeAddr + ":5432"} {
		host, port, _ := strings.Cut(target, ":")
		r := world.cli(ctx, nil, "run", "--rm", bb, "--", "sh", "-c", get(host+" "+port))
		if strings.Contains(r.stdout, "pong") {
			t.Errorf("a sandbox outside the group reached %s: exit %d %q", target, r.code, r.stdout)
		}
	}
	// Pause and resume act on the whole group; the members reach each other after it
	// (their addresses on the node changed, their names and group addresses did not).
	fw(t, 0, "pause", db)
	for _, id := range []string{main, db} {
		if st := inspect(t, id)["status"]; st != "paused" {
			t.Errorf("after pausing the group's sidecar, member %s is %v", id, st)
		}
	}
	fw(t, 0, "resume", main)
	waitStatus(t, db, "running")
	if out := fw(t, 0, "exec", main, "--", "sh", "-c", get("db:5432")).stdout; !strings.Contains(out, "pong-from-db") {
		t.Errorf("after the group's resume, the main's exec reaches db: %q", out)
	}
	// A snapshot of the group is a snapshot of each member; a start from it starts the
	// whole group again: from its files (each sidecar's command runs again, on its
	// files), or with memory (every member's processes carry on).
	fw(t, 0, "snapshot", "create", main, "grp-files")
	t.Cleanup(func() { world.cli(ctx, nil, "snapshot", "rm", "grp-files") })
	if ls := fw(t, 0, "snapshot", "ls").stdout; !strings.Contains(ls, "group + db") || strings.Contains(ls, "grp-files/db") {
		t.Errorf("snapshot ls shows the group's snapshot as:\n%s", ls)
	}
	if r := world.cli(ctx, nil, "snapshot", "rm", "grp-files/db"); r.code == 0 || !strings.Contains(r.stderr, "part of the sandbox group's snapshot grp-files") {
		t.Errorf("rm of a part of a group's snapshot: exit %d %q", r.code, r.stderr)
	}
	if r := world.cli(ctx, nil, "run", "--rm", "--snapshot", "grp-files", "--", "sh", "-c", get("db:5432")); r.code != 0 || !strings.Contains(r.stdout, "pong-from-db") {
		t.Errorf("a group started from the group's snapshot: exit %d %q %q", r.code, r.stdout, r.stderr)
	}
	fw(t, 0, "snapshot", "create", "--memory", main, "grp-mem")
	t.Cleanup(func() { world.cli(ctx, nil, "snapshot", "rm", "grp-mem") })
	waitStatus(t, main, "running")
	copyID := strings.TrimSpace(fw(t, 0, "run", "-d", "--snapshot", "grp-mem").stdout)
	t.Cleanup(func() { world.cli(ctx, nil, "rm", "-f", copyID) })
	waitStatus(t, copyID, "running")
	copyDB := groupMembers(t, copyID)["db"]
	if copyDB == "" || copyDB == db {
		t.Fatalf("the copy's group: %v", groupMembers(t, copyID))
	}
	waitStatus(t, copyDB, "running")
	eventually(t, "the copy's main reaching its own db", func() (bool, string) {
		out := world.cli(ctx, nil, "exec", copyID, "--", "sh", "-c", get("db:5432")).stdout
		return strings.Contains(out, "pong-from-db"), out
	})
	fw(t, 0, "rm", "-f", copyID)
	fw(t, 0, "snapshot", "rm", "grp-mem", "grp-files")
	// A fork of a member forks the whole group: a new group carrying on from the
	// instant, whose main reaches its own db; the source runs on.
	forkOut := strings.Fields(fw(t, 0, "fork", db).stdout)
	if len(forkOut) != 1 {
		t.Fatalf("fork of the group printed %q, want one new main's ID", forkOut)
	}
	forkMain := forkOut[0]
	t.Cleanup(func() { world.cli(ctx, nil, "rm", "-f", forkMain) })
	forkDB := groupMembers(t, forkMain)["db"]
	if forkDB == "" || forkDB == db || forkMain == main {
		t.Fatalf("the fork's group %v (source %s, %s)", groupMembers(t, forkMain), main, db)
	}
	waitStatus(t, forkDB, "running")
	eventually(t, "the fork's main reaching its own db", func() (bool, string) {
		out := world.cli(ctx, nil, "exec", forkMain, "--", "sh", "-c", get("db:5432")).stdout
		return strings.Contains(out, "pong-from-db"), out
	})
	waitStatus(t, main, "running")
	fw(t, 0, "rm", "-f", forkMain)
	if ls := fw(t, 0, "snapshot", "ls").stdout; strings.Contains(ls, "grp-") {
		t.Errorf("after removing the group's snapshots, snapshot ls shows:\n%s", ls)
	}
	// The main stopped: the sidecar follows.
	fw(t, 0, "stop", main)
	waitStatus(t, db, "exited")
}

// A sidecar that ends for good (restart policy never) fails its group: the main is
// stopped, and inspect says which sidecar and why. A group file says the same as flags.
func TestGroupSidecarFailureStopsGroup(t *testing.T) {
	need(t)
	ctx := context.Background()
	bb := image("busybox:latest")
	file := filepath.Join(t.TempDir(), "group.yaml")
	spec := fmt.Sprintf(`name: grp-fail
image: %[1]s
command: [sleep, "600"]
sidecars:
  - name: flaky
    image: %[1]s
    command: [sh, -c, "sleep 2; exit 4"]
  - name: steady
    image: %[1]s
    command: [sleep, "600"]
`, bb)
	if err := os.WriteFile(file, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	main := strings.TrimSpace(fw(t, 0, "run", "-d", "-f", file).stdout)
	t.Cleanup(func() { world.cli(ctx, nil, "rm", "-f", main) })
	members := groupMembers(t, main)
	if len(members) != 3 {
		t.Fatalf("group file made members %v", members)
	}
	deadline := time.Now().Add(2 * time.Minute)
	var sb map[string]any
	for time.Now().Before(deadline) {
		if sb = inspect(t, main); sb["status"] == "exited" || sb["status"] == "failed" {
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	d, _ := sb["details"].(map[string]any)
	if sb["status"] != "failed" || !strings.Contains(fmt.Sprint(sb["reason"]), `sidecar "flaky"`) || !strings.Contains(fmt.Sprint(d["group"]), "exit code 4") {
		t.Fatalf("after its sidecar exited 4 the main is %v (%v), details %v", sb["status"], sb["reason"], d)
	}
	steady := waitStatus(t, "grp-fail/steady", "exited") // named MAIN/NAME
	if !strings.Contains(fmt.Sprint(steady["reason"]), "main ended") {
		t.Errorf("the other sidecar, stopped with its main, says %q", steady["reason"])
	}
	if ps := fw(t, 0, "ps", "-a").stdout; !strings.Contains(ps, "grp-fail/steady") {
		t.Errorf("ps does not name the sidecar grp-fail/steady:\n%s", ps)
	}
	// A bad group file is refused before anything is created, naming the mistake.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("image: "+bb+"\nsidecars:\n  - name: DB\n    image: "+bb+"\n"), 0o644)
	if r := world.cli(ctx, nil, "run", "-d", "-f", bad); r.code == 0 || !strings.Contains(r.stderr, `"DB"`) {
		t.Errorf("a sidecar named DB: exit %d %q", r.code, r.stderr)
	}
	os.WriteFile(bad, []byte("image: "+bb+"\nsidecar:\n  - name: db\n"), 0o644)
	if r := world.cli(ctx, nil, "run", "-d", "-f", bad); r.code == 0 || !strings.Contains(r.stderr, "sidecar") {
		t.Errorf("a misspelt key: exit %d %q", r.code, r.stderr)
	}
}

// A group from what users bring: a Debian root (glibc, its NSS reading /etc/hosts) as the
// main, talking by name to a busybox sidecar with bash's /dev/tcp; and as a sidecar, whose
// hostname is its name and which resolves the main.
func TestGroupWithDebianMembers(t *testing.T) {
	need(t)
	ctx := context.Background()
	deb, bb := debianImage(t), image("busybox:latest")
	server := "mkdir -p /tmp/www; echo pong-from-$(hostname) > /tmp/www/index.html; exec httpd -f -p 5432 -h /tmp/www"
	r := world.cli(ctx, nil, "run", "--rm",
		"--sidecar", "name=web,image="+bb+",ready=tcp:5432,cmd=sh -c '"+server+"'",
		"--sidecar", "name=deb,image="+deb+",cmd=sleep 600",
		deb, "--", "bash", "-c", `getent hosts web deb main && exec 3<>/dev/tcp/web/5432 && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
	if r.code != 0 || !strings.Contains(r.stdout, "pong-from-web") || !strings.Contains(r.stdout, "169.254.20.11") || !strings.Contains(r.stdout, "169.254.20.12") {
		t.Fatalf("a Debian main reaching its busybox sidecar by name: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
}
