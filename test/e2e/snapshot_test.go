package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A filesystem snapshot of a sandbox that writes records without pause: the sandbox runs
// on, and a sandbox started from the snapshot finds every record whole (none torn, none
// missing before the last), the files written before it, and the image's own files; the
// snapshot is listed with its size, and once removed it is gone from its node and cannot
// be started from.
func TestSnapshotFilesystemRestore(t *testing.T) {
	need(t)
	img := image("busybox:latest")
	writer := strings.TrimSpace(fw(t, 0, "run", "-d", "-u", "0", "--name", "writer", img, "--", "sh", "-c",
		"mkdir -p /data && echo before > /data/marker && i=0; while true; do i=$((i+1)); "+
			"echo \"$i $(echo $i | md5sum | cut -c1-32)\" >> /data/records; done").stdout)
	t.Cleanup(func() { _ = world.cli(context.Background(), nil, "rm", "-f", writer) })
	waitStatus(t, writer, "running")
	records := func(id string) int {
		r := world.cli(context.Background(), nil, "exec", id, "--", "sh", "-c", "wc -l < /data/records")
		n, _ := strconv.Atoi(strings.TrimSpace(r.stdout))
		return n
	}
	deadline := time.Now().Add(2 * time.Minute)
	for records(writer) < 20 {
		if time.Now().After(deadline) {
			t.Fatal("the writer wrote no records")
		}
		time.Sleep(200 * time.Millisecond)
	}
	before, _ := filepath.Glob(filepath.Join(world.dataDir, "snapshots", "*")) // other tests'
	out := fw(t, 0, "snapshot", "create", "writer", "snap-one").stdout
	if !strings.HasPrefix(out, "snap-one") || !strings.Contains(out, "MiB") {
		t.Errorf("snapshot create printed %q", out)
	}
	// The writer runs on.
	n := records(writer)
	time.Sleep(time.Second)
	if records(writer) <= n {
		t.Error("the writer stopped writing after the snapshot")
	}
	if ls := fw(t, 0, "snapshot", "ls").stdout; !strings.Contains(ls, "snap-one") || !strings.Contains(ls, "busybox") {
		t.Errorf("snapshot ls:\n%s", ls)
	}
	if r := world.cli(context.Background(), nil, "snapshot", "create", "writer", "snap-one"); r.code == 0 || !strings.Contains(r.stderr, "exists") {
		t.Errorf("a second snapshot of the same name: exit %d %q", r.code, r.stderr)
	}

	// Started from it: the image, with the snapshot's files, every record whole.
	check := fw(t, 0, "run", "--snapshot", "snap-one", "-u", "0", "--", "sh", "-c",
		"cat /data/marker; awk '{ n++; if (NF != 2 || $1 != n || length($2) != 32) { print \"torn\", NR, $0; bad = 1 } } END { print \"records\", n; exit bad }' /data/records; "+
			"tail -n 1 /data/records | { read i s; [ \"$(echo $i | md5sum | cut -c1-32)\" = \"$s\" ] && echo last-ok; }; ls /bin/busybox").stdout
	lines := strings.Split(strings.TrimSpace(check), "\n")
	if len(lines) < 4 || lines[0] != "before" || !strings.HasPrefix(lines[1], "records ") || lines[2] != "last-ok" || lines[3] != "/bin/busybox" {
		t.Fatalf("the sandbox started from the snapshot saw:\n%s", check)
	}
	if got, _ := strconv.Atoi(strings.TrimPrefix(lines[1], "records ")); got < 20 {
		t.Errorf("only %d records in the snapshot", got)
	}

	// Removed: its files go from the node, and it cannot be started from.
	snaps, _ := filepath.Glob(filepath.Join(world.dataDir, "snapshots", "*"))
	snaps = slices.DeleteFunc(snaps, func(d string) bool { return slices.Contains(before, d) })
	if len(snaps) == 0 {
		t.Fatal("no snapshot files on the node")
	}
	fw(t, 0, "snapshot", "rm", "snap-one")
	for _, d := range snaps {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("snapshot files %s left after rm", d)
		}
	}
	if r := world.cli(context.Background(), nil, "run", "--snapshot", "snap-one", "--", "true"); r.code == 0 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("run from a removed snapshot: exit %d %q", r.code, r.stderr)
	}
}
