package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// leader returns the index of the server that leads now.
func leader(t *testing.T) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		out, err := w.fw(nil, "info")
		if err == nil {
			if m := regexp.MustCompile(`leader (s\d)`).FindStringSubmatch(out); m != nil {
				var i int
				fmt.Sscanf(m[1], "s%d", &i)
				return i
			}
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatal("no leader within 30s")
	return -1
}

// psAll lists every sandbox (short ID → name), failing the test if the CLI fails.
func psAll(t *testing.T, stale bool, server string) map[string]string {
	t.Helper()
	m, err := tryPs(stale, server)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// tryPs is psAll that reports failure instead (for polling a server that is starting).
func tryPs(stale bool, server string) (map[string]string, error) {
	args := []string{"ps", "-a"}
	if stale {
		args = append([]string{"--stale"}, args...)
	}
	var env []string
	if server != "" {
		env = []string{"FIREWORKS_SERVER=https://" + server}
	}
	out, errOut, code := w.cli(context.Background(), env, args...)
	if code != 0 {
		return nil, fmt.Errorf("ps: exit %d %s", code, errOut)
	}
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) >= 2 {
			m[f[0]] = f[1]
		}
	}
	return m, nil
}

// Kill the leader while 100 sandboxes are being created: every create the API accepted
// exists exactly once afterwards. The sandboxes wait for a node label nobody has, so no
// VM boots.
func TestLeaderKilledDuringCreates(t *testing.T) {
	need(t)
	old := leader(t)
	defer w.ensureRunning()
	var (
		mu       sync.Mutex
		accepted = map[string]string{} // name → ID printed by run -d
		wg       sync.WaitGroup
		next     = make(chan int)
	)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				// No --name: the name check would hide duplicates. Each create is told
				// apart by its command instead.
				tag := fmt.Sprintf("burst-%03d", i)
				out, _, code := w.cli(context.Background(), nil, "run", "-d", "--constraint", "nosuch==x", image(), "--", "echo", tag)
				if code == 0 {
					mu.Lock()
					accepted[tag] = strings.TrimSpace(out)
					mu.Unlock()
				}
			}
		}()
	}
	for i := range 100 {
		if i == 30 {
			w.stop(w.servers[old], true)
		}
		next <- i
	}
	close(next)
	wg.Wait()
	// At most the creates in flight when the leader died may fail.
	if len(accepted) < 100-8 {
		t.Fatalf("only %d of 100 creates were accepted around a leader failover", len(accepted))
	}
	if nl := leader(t); nl == old {
		t.Fatalf("leader still s%d after it was killed", old)
	}
	// Every sandbox with a burst command, by its full command: each accepted create
	// exists exactly once, and nothing exists twice.
	count := map[string]int{}
	idOf := map[string]string{}
	for id := range psAll(t, false, "") {
		sb := inspect(t, id)
		spec, _ := sb["spec"].(map[string]any)
		cmd, _ := spec["cmd"].([]any)
		if len(cmd) == 2 && strings.HasPrefix(fmt.Sprint(cmd[1]), "burst-") {
			tag := fmt.Sprint(cmd[1])
			count[tag]++
			idOf[tag] = sb["id"].(string)
		}
	}
	for tag, id := range accepted {
		if count[tag] != 1 || idOf[tag] != id {
			t.Errorf("accepted create %s (%s): found %d times (id %s)", tag, id, count[tag], idOf[tag])
		}
	}
	byName := map[string]int{}
	for tag, n := range count {
		byName[tag] = n
		if n != 1 {
			t.Errorf("%s exists %d times", tag, n)
		}
	}
	// A pending sandbox says why it waits.
	sb := inspect(t, idOf["burst-000"])
	if reason, _ := sb["reason"].(string); sb["status"] != "pending" || !strings.Contains(reason, "nosuch==x") {
		t.Errorf("burst-000: status %v reason %q; want pending with the failing constraint", sb["status"], reason)
	}
	// Bring the old leader back as a follower; it catches up.
	w.ensureRunning()
	waitFor(t, time.Minute, "restarted server catches up", func() bool {
		got, _ := tryPs(true, w.servers[old].h.IP+":"+apiPort)
		for _, id := range idOf {
			if _, ok := got[id[:12]]; !ok {
				return false
			}
		}
		return true
	})
	for tag := range byName {
		mustFW(t, "rm", "-f", idOf[tag])
	}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s", what, d)
}

// A partitioned follower misses writes; healed, it catches up.
func TestPartitionedFollowerCatchesUp(t *testing.T) {
	need(t)
	l := leader(t)
	f := (l + 1) % 3
	fh := w.servers[f].h
	userTok := strings.TrimSpace(mustFW(t, "token", "create", "--role", "user", "--name", "revoked-in-partition"))
	userID := strings.Split(userTok, "_")[1]
	waitFor(t, time.Minute, "the follower knows the user token", func() bool {
		_, err := w.fw([]string{"FIREWORKS_SERVER=https://" + fh.IP + ":" + apiPort, "FIREWORKS_TOKEN=" + userTok}, "--stale", "ps")
		return err == nil
	})
	if err := run("ip", "link", "set", fh.Veth, "down"); err != nil {
		t.Fatal(err)
	}
	healed := false
	defer func() {
		if !healed {
			_ = run("ip", "link", "set", fh.Veth, "up")
		}
	}()
	// The majority still commits.
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "during-partition", "--constraint", "nosuch==x", image(), "--", "true"))
	if got := psAll(t, true, ""); got[id[:12]] != "during-partition" {
		t.Fatalf("write during partition not visible: %v", got)
	}
	// The follower really is cut off: its own copy does not have the write. (Read it
	// through the namespace, since the test host cannot reach it now.)
	cmd := exec.Command("ip", "netns", "exec", fh.NS, w.bin, "--stale", "ps", "-a")
	cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG=/nonexistent", "FIREWORKS_SERVER=https://"+fh.IP+":"+apiPort,
		"FIREWORKS_TOKEN="+w.token, "FIREWORKS_CA="+filepath.Join(w.caDir, "ca.pem"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("stale read on the partitioned follower (from its own host): %v: %s", err, out)
	}
	if strings.Contains(string(out), id[:12]) {
		t.Fatalf("the partitioned follower already has the write: it was not partitioned\n%s", out)
	}
	// A token revoked during the partition stops reading there once the follower's copy
	// is older than --max-stale: its stale reads go to the leader, which it cannot reach.
	mustFW(t, "token", "revoke", userID)
	waitFor(t, time.Minute, "the revoked token is refused on the cut-off follower", func() bool {
		cmd := exec.Command("ip", "netns", "exec", fh.NS, w.bin, "--stale", "--request-timeout", "5s", "ps")
		cmd.Env = append(os.Environ(), "FIREWORKS_CONFIG=/nonexistent", "FIREWORKS_SERVER=https://"+fh.IP+":"+apiPort,
			"FIREWORKS_TOKEN="+userTok, "FIREWORKS_CA="+filepath.Join(w.caDir, "ca.pem"))
		return cmd.Run() != nil
	})
	if err := run("ip", "link", "set", fh.Veth, "up"); err != nil {
		t.Fatal(err)
	}
	healed = true
	waitFor(t, time.Minute, "healed follower has the write", func() bool {
		got, _ := tryPs(true, fh.IP+":"+apiPort)
		return got[id[:12]] == "during-partition"
	})
	mustFW(t, "rm", "-f", id)
}

// Every server restarted: all state is intact.
func TestRestartEveryServer(t *testing.T) {
	need(t)
	mustFW(t, "run", "-d", "--name", "kept-across-restart", "--constraint", "nosuch==x", image(), "--", "true")
	user := strings.TrimSpace(mustFW(t, "token", "create", "--name", "kept-user"))
	before := psAll(t, false, "")
	for _, s := range w.servers {
		w.stop(s, false)
	}
	for i := range w.servers {
		if err := w.start(w.servers[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.waitAPI(time.Minute); err != nil {
		t.Fatal(err)
	}
	after := psAll(t, false, "")
	for id, name := range before {
		if after[id] != name {
			t.Errorf("sandbox %s (%s) lost across the restart", id, name)
		}
	}
	if _, errOut, code := w.cli(context.Background(), []string{"FIREWORKS_TOKEN=" + user}, "ps"); code != 0 {
		t.Errorf("token created before the restart: %s", errOut)
	}
	if err := w.waitNodes(3, "ready", time.Minute); err != nil {
		t.Error(err)
	}
	mustFW(t, "rm", "-f", "kept-across-restart")
}
