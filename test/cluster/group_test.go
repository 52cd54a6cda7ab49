package cluster

import (
	"fmt"
	"strings"
	"testing"
)

// A sandbox group migrates whole: its sidecar and its main move live to one other node,
// the main's state survives (its counter goes on), and on the target the main reaches
// the sidecar by name again.
func TestMigrateGroup(t *testing.T) {
	need(t)
	defer w.ensureRunning()
	agentsListening(t)
	server := "mkdir -p /tmp/www; echo pong-from-$(hostname) > /tmp/www/index.html; exec httpd -f -p 5432 -h /tmp/www"
	main := strings.TrimSpace(mustFW(t, "run", "-d", "--sidecar", "name=db,image="+image()+",ready=tcp:5432,cmd=sh -c '"+server+"'",
		image(), "--", "sh", "-c", counterCmd))
	defer mustFW(t, "rm", "-f", main)
	sb := waitSandbox(t, main, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	var db string
	g, _ := sb["group"].(map[string]any)
	ms, _ := g["members"].([]any)
	for _, m := range ms {
		if mm, _ := m.(map[string]any); mm["name"] == "db" {
			db, _ = mm["id"].(string)
		}
	}
	if db == "" {
		t.Fatalf("no sidecar db in the group %v", g)
	}
	from, _ := sb["node"].(string)
	if dbSB := waitSandbox(t, db, minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" }); dbSB["node"] != from {
		t.Fatalf("the sidecar runs on %v, its main on %s", dbSB["node"], from)
	}
	get := func() string {
		out, _, _ := w.cli(t.Context(), nil, "exec", main, "--", "sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 db 5432`)
		return out
	}
	if out := get(); !strings.Contains(out, "pong-from-db") {
		t.Fatalf("before the migration the main reaches db: %q", out)
	}
	waitFor(t, minute, "the counter", func() bool { return counterOf(t, main) > 0 })
	before := counterOf(t, main)
	out := mustFW(t, "migrate", main)
	t.Logf("fireworks migrate: %s", strings.TrimSpace(out))
	to := ""
	for _, id := range []string{db, main} {
		s := inspect(t, id)
		node, _ := s["node"].(string)
		if s["status"] != "running" || node == from || to != "" && node != to {
			t.Fatalf("after the group's migration member %s is %v on %s (was on %s, the other on %q)", id, s["status"], node, from, to)
		}
		to = node
		if migs, _ := s["migrations"].([]any); len(migs) != 1 || !strings.Contains(fmt.Sprint(migs[0]), "moved") {
			t.Errorf("member %s shows the migrations %v", id, migs)
		}
	}
	if after := counterOf(t, main); after < before {
		t.Errorf("the main's counter reads %d after the migration, %d before", after, before)
	}
	waitFor(t, minute, "the main reaching db on "+to, func() bool { return strings.Contains(get(), "pong-from-db") })
}
