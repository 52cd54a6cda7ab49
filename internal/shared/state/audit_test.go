package state

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// Every change through the store is recorded with who made it, what it touched and the
// state's verdict; the log survives a restart (log replay) and a snapshot.
func TestAuditRecordsChanges(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, Options{Dir: dir, NodeID: "s1"})
	alice := WithActor(t.Context(), Actor{Kind: "token", ID: "fwk_alice", Name: "alice", Role: RoleUser})
	node := WithActor(t.Context(), Actor{Kind: "node", ID: "n1"})
	now := time.Now().UTC()

	if err := s.CreateSandbox(alice, Sandbox{ID: "sb-1", Name: "web", CreatedAt: now, Spec: SandboxSpec{Image: "debian:12"}}); err != nil {
		t.Fatal(err)
	}
	running, starting := StatusRunning, StatusStarting
	if _, err := s.UpdateSandbox(node, "sb-1", Update{Status: &starting, Node: ptr("n1"), Time: now}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateSandbox(node, "sb-1", Update{Status: &running, Time: now}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSandbox(alice, "sb-nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete of an unknown sandbox: %v", err)
	}
	admin := WithActor(t.Context(), Actor{Kind: "token", ID: "fwk_root", Name: "root", Role: RoleAdmin})
	if err := s.DeleteSandbox(admin, "sb-nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete of an unknown sandbox: %v", err)
	}
	if err := s.CreateToken(t.Context(), Token{ID: "fwk_bob", Name: "bob", Role: RoleUser, SecretHash: "SECRETHASH", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}

	check := func(s *Store) {
		t.Helper()
		all, err := s.Audit(t.Context(), AuditQuery{})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range all {
			if e.Server != "s1" || e.At.IsZero() || e.Index == 0 {
				t.Errorf("entry without server, time or index: %+v", e)
			}
			got = append(got, e.Op+" "+e.Target+" by "+e.By.String()+" ["+e.Detail+"]"+map[bool]string{true: " refused: " + e.Error}[e.Error != ""])
		}
		want := []string{
			"create-sandbox sb-1 by token fwk_alice (alice) [name=web image=debian:12]",
			"update-sandbox sb-1 by node n1 [status=starting node=n1]",
			"update-sandbox sb-1 by node n1 [status=running]",
			// alice's refused delete is not kept (a user's refusals could flush the log); the admin's is.
			"delete-sandbox sb-nope by token fwk_root (root) [] refused: not found",
			"create-token fwk_bob by system [role=user name=bob]",
		}
		// set-meta entries the store writes for itself may come first.
		for len(got) > 0 && strings.HasPrefix(got[0], "set-meta") {
			got = got[1:]
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("audit log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		b, _ := json.Marshal(all)
		if strings.Contains(string(b), "SECRETHASH") {
			t.Errorf("the audit log holds a token's secret hash: %s", b)
		}
		// Queries select by actor, target and op, and keep the newest under a limit.
		if q, _ := s.Audit(t.Context(), AuditQuery{Actor: "alice"}); len(q) != 1 {
			t.Errorf("alice's entries: %+v", q)
		}
		if q, _ := s.Audit(t.Context(), AuditQuery{Target: "sb-1", Limit: 1}); len(q) != 1 || q[0].Detail != "status=running" {
			t.Errorf("the newest entry on sb-1: %+v", q)
		}
		if q, _ := s.Audit(t.Context(), AuditQuery{Op: "create-token"}); len(q) != 1 {
			t.Errorf("create-token entries: %+v", q)
		}
		last := all[len(all)-1].Index
		if q, _ := s.Audit(t.Context(), AuditQuery{After: last - 1}); len(q) != 1 || q[0].Index != last {
			t.Errorf("entries after %d: %+v", last-1, q)
		}
		// Paging on from an index with a limit: the oldest after it, so that pages of 2
		// read every entry once, in order (an export misses nothing).
		// (An export starts after index 1: Raft's first entry is the cluster's
		// configuration, never a change.)
		if all[0].Index <= 1 {
			t.Fatalf("an audit entry at index %d", all[0].Index)
		}
		var paged []uint64
		for after := uint64(1); ; {
			q, err := s.Audit(t.Context(), AuditQuery{After: after, Limit: 2})
			if err != nil {
				t.Fatal(err)
			}
			if len(q) == 0 {
				break
			}
			for _, e := range q {
				paged = append(paged, e.Index)
			}
			after = q[len(q)-1].Index
		}
		var held []uint64
		for _, e := range all {
			held = append(held, e.Index)
		}
		if !slices.Equal(paged, held) {
			t.Errorf("paging by 2 read %v, the log holds %v", paged, held)
		}
		if q, _ := s.Audit(t.Context(), AuditQuery{After: math.MaxUint64}); len(q) != 0 {
			t.Errorf("entries after the largest index: %+v", q)
		}
	}
	check(s)

	// A restart replays the log (no snapshot yet): the same entries.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, Options{Dir: dir, NodeID: "s1"})
	check(s)

	// A snapshot carries the log.
	if err := s.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, Options{Dir: dir, NodeID: "s1"})
	check(s)
}

// A command written before the audit log (no stamp) is applied as before and recorded
// by its type; a stamped command is read by a server that knows no stamps (its body
// decodes with the stamp ignored).
func TestAuditStampCompatibility(t *testing.T) {
	f := newFSM(quietLogger(t))
	old := append([]byte{byte(cmdCreateSandbox)}, `{"sandbox":{"id":"sb-1","created_at":"2025-01-02T03:04:05Z"}}`...)
	if r := f.Apply(&raft.Log{Index: 7, Type: raft.LogCommand, Data: old}); r != nil {
		t.Fatalf("unstamped command: %v", r)
	}
	if e := f.queryAudit(AuditQuery{}); len(e) != 1 || e[0].Op != "create-sandbox" || e[0].By.Kind != "" || e[0].Index != 7 {
		t.Fatalf("entry of an unstamped command: %+v", e)
	}

	b, err := encodeCommand(cmdDeleteSandbox, deleteSandboxCmd{ID: "sb-1"}, newStamp(WithActor(t.Context(), Actor{Kind: "token", ID: "fwk_x"}), "s1", deleteSandboxCmd{ID: "sb-1"}, t0))
	if err != nil {
		t.Fatal(err)
	}
	var c deleteSandboxCmd
	if err := decodeBody(cmdDeleteSandbox, b[1:], &c); err != nil || c.ID != "sb-1" {
		t.Fatalf("stamped body does not decode as the command: %v %+v", err, c)
	}
	for _, body := range []string{"{}", "{ }", `{"a":1}`} {
		out, err := stampAudit([]byte(body), auditStamp{At: t0})
		if err != nil || !json.Valid(out) {
			t.Errorf("stamp %s: %v %s", body, err, out)
		}
	}
	if _, err := stampAudit([]byte("[]"), auditStamp{}); err == nil {
		t.Error("stamped a body that is not an object")
	}
}

// The log is bounded: the oldest entries go, at least MaxAudit stay, and long fields
// are clipped.
func TestAuditIsBounded(t *testing.T) {
	f := newFSM(quietLogger(t))
	long := strings.Repeat("é", 1000)
	ctx := WithActor(context.Background(), Actor{Kind: "token", ID: long})
	for i := range MaxAudit*2 + 7 {
		body := setMetaCmd{Key: "k", Value: []byte("v")}
		b, err := encodeCommand(cmdSetMeta, body, newStamp(ctx, "s1", body, t0))
		if err != nil {
			t.Fatal(err)
		}
		f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: b})
	}
	all := f.queryAudit(AuditQuery{})
	if len(all) < MaxAudit || len(all) > MaxAudit+MaxAudit/4 {
		t.Fatalf("%d entries kept, want %d..%d", len(all), MaxAudit, MaxAudit+MaxAudit/4)
	}
	if last := all[len(all)-1]; last.Index != MaxAudit*2+7 || len(last.By.ID) > auditField {
		t.Fatalf("newest entry: index %d, actor of %d bytes", last.Index, len(last.By.ID))
	}
	if !json.Valid([]byte(`"`+all[0].By.ID+`"`)) || !strings.HasSuffix(all[0].By.ID, "...") {
		t.Fatalf("clipped actor is not valid text: %q", all[0].By.ID)
	}
}
