package state

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// A state file taken on one cluster restores the state on another (every server of it),
// including after a restart; what changed after the file was taken is gone, and the
// restore is in the audit log.
func TestStateSnapshotRestore(t *testing.T) {
	ctx := t.Context()
	src := openStore(t, Options{Dir: t.TempDir(), NodeID: "old"})
	for i := range 5 {
		if err := src.CreateSandbox(ctx, newSandbox(fmt.Sprintf("%016x", i), fmt.Sprintf("sb%d", i), t0)); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.CreateToken(ctx, Token{ID: "fwk_keep", Role: RoleUser, SecretHash: "h", CreatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	var file bytes.Buffer
	h, err := src.SnapshotState(ctx, &file)
	if err != nil {
		t.Fatal(err)
	}
	if h.Index == 0 || h.Server != "old" || h.Format != StateFormat {
		t.Fatalf("header: %+v", h)
	}

	// Bad files are refused, whole, before anything changes.
	good := file.Bytes()
	nl := bytes.IndexByte(good, '\n')
	flipped := bytes.Clone(good)
	flipped[len(flipped)-3] ^= 1
	for name, b := range map[string][]byte{
		"empty":         nil,
		"not a state":   []byte("hello\nworld"),
		"no newline":    bytes.Repeat([]byte("x"), maxStateHeader+10),
		"truncated":     good[:len(good)-10],
		"trailing data": append(bytes.Clone(good), 'x'),
		"altered":       flipped,
		"other format":  bytes.Replace(bytes.Clone(good), []byte(StateFormat), []byte("fireworks-state/9"), 1),
		"absurd size":   []byte(strings.Replace(string(good[:nl+1]), fmt.Sprintf(`"size":%d`, h.Size), `"size":99999999999`, 1)),
	} {
		if _, _, err := ReadStateFile(bytes.NewReader(b)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}

	// Revoked after the file was taken, in the cluster it is restored into: stays revoked.
	if err := src.CreateToken(ctx, Token{ID: "fwk_gone", Role: RoleUser, SecretHash: "h", CreatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	var withGone bytes.Buffer
	if _, err := src.SnapshotState(ctx, &withGone); err != nil {
		t.Fatal(err)
	}
	if err := src.DeleteToken(ctx, "fwk_gone"); err != nil {
		t.Fatal(err)
	}
	if _, err := src.RestoreState(ctx, bytes.NewReader(withGone.Bytes())); err != nil {
		t.Fatal(err)
	}
	if _, err := src.LocalToken("fwk_gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("a token revoked after the file was taken is back after the restore: %v", err)
	}
	if _, err := src.LocalToken("fwk_keep"); err != nil {
		t.Errorf("a token in the file, never revoked, is gone: %v", err)
	}

	c := newTestCluster(t, 3)
	li, leader := c.leader()
	if err := leader.CreateSandbox(ctx, newSandbox("ffff000000000000", "later", t0)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.stores[(li+1)%3].RestoreState(ctx, bytes.NewReader(good)); !errors.Is(err, ErrNotLeader) {
		t.Errorf("restore on a follower: %v, want ErrNotLeader", err)
	}
	sum, err := leader.RestoreState(ctx, bytes.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	if sum.Sandboxes != 5 || sum.Tokens != 1 || sum.Header.SHA256 != h.SHA256 {
		t.Fatalf("restored: %+v", sum)
	}
	want := func(s *Store, who string) {
		t.Helper()
		got := map[string]bool{}
		for _, sb := range s.LocalSandboxes() {
			got[sb.Name] = true
		}
		if len(got) != 5 || !got["sb0"] || got["later"] {
			t.Errorf("%s holds sandboxes %v, want sb0..sb4", who, got)
		}
		if _, err := s.LocalToken("fwk_keep"); err != nil {
			t.Errorf("%s lost the token: %v", who, err)
		}
	}
	want(leader, "the leader")
	for i, s := range c.stores {
		if i == li {
			continue
		}
		deadline := time.Now().Add(10 * time.Second)
		for len(s.LocalSandboxes()) != 5 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		want(s, fmt.Sprintf("follower s%d", i))
	}
	a, err := leader.Audit(ctx, AuditQuery{Op: "restore-state"})
	if err != nil || len(a) != 1 || !strings.Contains(a[0].Detail, fmt.Sprintf("index %d", h.Index)) {
		t.Fatalf("audit of the restore: %+v %v", a, err)
	}
	// The file's own audit log came with it: the source's creates are there.
	if a, _ := leader.Audit(ctx, AuditQuery{Op: "create-sandbox"}); len(a) != 5 || a[0].Server != "old" {
		t.Errorf("restored audit log: %+v", a)
	}

	// New writes go on after the restore, and a restarted server comes back with it.
	if err := leader.CreateSandbox(ctx, newSandbox("eeee000000000000", "after", t0)); err != nil {
		t.Fatal(err)
	}
	fi := (li + 1) % 3
	if err := c.stores[fi].Close(); err != nil {
		t.Fatal(err)
	}
	c.start(fi)
	deadline := time.Now().Add(10 * time.Second)
	for len(c.stores[fi].LocalSandboxes()) != 6 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(c.stores[fi].LocalSandboxes()); n != 6 {
		t.Errorf("restarted follower holds %d sandboxes, want 6", n)
	}
}
