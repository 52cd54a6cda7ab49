package cluster

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Every state change is in the audit log with who made it, which only an admin reads;
// a state file taken with `state snapshot` restores the whole state on every server:
// what was created after it is forgotten and its VM stopped by its node, what ran before
// it runs on, and what was revoked after it stays revoked.
func TestAuditAndStateBackup(t *testing.T) {
	need(t)
	user := strings.TrimSpace(mustFW(t, "token", "create", "--name", "audit-user"))
	asUser := []string{"FIREWORKS_TOKEN=" + user}
	// The user's sandbox waits for a label no node has (a user may not name a plain-HTTP
	// registry); the admin's runs, and its node reports it.
	userSB, err := w.fw(asUser, "run", "-d", "--name", "users-own", "--constraint", "nosuch==x", image(), "--", "true")
	if err != nil {
		t.Fatal(err)
	}
	userSB = strings.TrimSpace(userSB)
	id := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "audited", "--insecure-registry", w.registry, image(), "--", "sleep", "600"))
	sb := waitSandbox(t, id, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	node, _ := sb["node"].(string)

	// Who created it, and which node reported it running, from the admin's view.
	type entry struct {
		Op, Target, Detail, Error     string
		ActorKind, ActorId, ActorName string
		ActorRole, Server             string
	}
	audit := func(args ...string) []entry {
		t.Helper()
		var r struct{ Entries []map[string]any }
		if err := json.Unmarshal([]byte(mustFW(t, append([]string{"audit", "--json"}, args...)...)), &r); err != nil {
			t.Fatal(err)
		}
		var out []entry
		for _, m := range r.Entries {
			s := func(k string) string { v, _ := m[k].(string); return v }
			out = append(out, entry{Op: s("op"), Target: s("target"), Detail: s("detail"), Error: s("error"), ActorKind: s("actor_kind"),
				ActorId: s("actor_id"), ActorName: s("actor_name"), ActorRole: s("actor_role"), Server: s("server")})
		}
		return out
	}
	created := audit("--actor", "audit-user", "--op", "create-sandbox")
	if len(created) != 1 || created[0].Target != userSB || created[0].ActorKind != "token" || created[0].ActorRole != "user" || !strings.HasPrefix(created[0].Server, "s") {
		t.Errorf("the user's create in the audit log: %+v", created)
	}
	reported := false
	for _, e := range audit("--target", id) {
		reported = reported || e.Op == "update-sandbox" && e.ActorKind == "node" && e.ActorId == node && strings.Contains(e.Detail, "status=running")
	}
	if !reported {
		t.Errorf("no entry of node %s reporting %s running: %+v", node, id, audit("--target", id))
	}
	if _, errOut, code := w.cli(context.Background(), asUser, "audit"); code == 0 || !strings.Contains(errOut, "admin") {
		t.Errorf("a user token read the audit log: exit %d %s", code, errOut)
	}
	if _, errOut, code := w.cli(context.Background(), asUser, "state", "snapshot", filepath.Join(t.TempDir(), "x")); code == 0 || !strings.Contains(errOut, "admin") {
		t.Errorf("a user token took a state snapshot: exit %d %s", code, errOut)
	}

	// Back up, then change things: a new sandbox, the user's token revoked.
	file := filepath.Join(t.TempDir(), "cluster.state")
	mustFW(t, "state", "snapshot", file)
	later := strings.TrimSpace(mustFW(t, "run", "-d", "--name", "after-backup", "--insecure-registry", w.registry, image(), "--", "sleep", "600"))
	waitSandbox(t, later, 2*minute, "running", func(sb map[string]any) bool { return sb["status"] == "running" })
	mustFW(t, "token", "revoke", strings.Split(user, "_")[1])
	if _, _, code := w.cli(context.Background(), asUser, "ps"); code == 0 {
		t.Fatal("a revoked token still works")
	}

	// Refused: no --yes, a corrupt file. Nothing changes.
	if _, errOut, code := w.cli(context.Background(), nil, "state", "restore", file); code == 0 || !strings.Contains(errOut, "--yes") {
		t.Errorf("restore without --yes: exit %d %s", code, errOut)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad.state")
	b[len(b)-2] ^= 1
	if err := os.WriteFile(bad, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code := w.cli(context.Background(), nil, "state", "restore", "--yes", bad); code == 0 || !strings.Contains(errOut, "checksum") {
		t.Errorf("restore of an altered file: exit %d %s", code, errOut)
	}
	if ps := psAll(t, false, ""); !hasName(ps, "after-backup") {
		t.Fatalf("a refused restore changed the state: %v", ps)
	}
	qemuOf := func(id string) bool {
		for _, a := range w.agents {
			if len(w.vmsOf(a, id)) > 0 {
				return true
			}
		}
		return false
	}
	if !qemuOf(later) {
		t.Fatalf("no QEMU process names %s (the check below would prove nothing)", later)
	}

	out := mustFW(t, "state", "restore", "--yes", file)
	if !strings.Contains(out, "restored the state taken at") {
		t.Errorf("restore: %q", out)
	}
	// Every server holds the restored state (stale reads of each one's own copy).
	for _, s := range w.servers {
		deadline := time.Now().Add(30 * time.Second)
		for {
			ps, err := tryPs(true, s.h.IP+":"+apiPort)
			if err == nil && hasName(ps, "audited") && !hasName(ps, "after-backup") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("server %s after the restore: %v %v", s.h.IP, ps, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// Revocations made since the file was taken stay made.
	if _, _, code := w.cli(context.Background(), asUser, "ps"); code == 0 {
		t.Errorf("the token revoked after the backup works again after the restore")
	}
	if out, err := w.fw(nil, "exec", "audited", "--", "echo", "still-here"); err != nil || strings.TrimSpace(out) != "still-here" {
		t.Errorf("the sandbox that ran before the backup: %q %v", out, err)
	}
	// The sandbox the state no longer knows is stopped by its node: no QEMU of it runs.
	deadline := time.Now().Add(time.Minute)
	for qemuOf(later) {
		if time.Now().After(deadline) {
			t.Fatalf("a QEMU of %s (created after the backup) still runs a minute after the restore", later)
		}
		time.Sleep(500 * time.Millisecond)
	}
	restored := audit("--op", "restore-state")
	if len(restored) != 1 || restored[0].ActorKind != "token" {
		t.Errorf("the restore in the audit log: %+v", restored)
	}
	mustFW(t, "rm", "-f", "audited", userSB)
}

// hasName reports whether a ps listing (short ID → name) holds a sandbox named name.
func hasName(ps map[string]string, name string) bool {
	for _, n := range ps {
		if n == name {
			return true
		}
	}
	return false
}
