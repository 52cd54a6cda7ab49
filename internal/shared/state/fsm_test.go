package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)

func quietLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func mustCmd(t *testing.T, typ cmdType, body any) []byte {
	t.Helper()
	b, err := encodeCommand(typ, body, auditStamp{})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ptr[T any](v T) *T { return &v }

// memSink is a raft.SnapshotSink in memory.
type memSink struct {
	bytes.Buffer
	cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { return nil }

func persist(t *testing.T, f *fsm) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	return sink.Bytes()
}

// persistState is persist without the audit log: what refused commands must not change
// (they are recorded in the audit log, with why they were refused).
func persistState(t *testing.T, f *fsm) []byte {
	t.Helper()
	var d snapshotData
	if err := json.Unmarshal(persist(t, f), &d); err != nil {
		t.Fatal(err)
	}
	d.Audit = nil
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// applyAll applies the entries in order and returns each result.
func applyAll(f *fsm, data [][]byte) []any {
	var out []any
	for i, d := range data {
		out = append(out, f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: d}))
	}
	return out
}

// testLog is a log with valid and invalid commands of every kind.
func testLog(t *testing.T) [][]byte {
	sb := func(id, name string, at time.Duration) Sandbox {
		return Sandbox{ID: id, Name: name, Spec: SandboxSpec{Image: "alpine", Cmd: []string{"echo", id}}, CreatedAt: t0.Add(at)}
	}
	upd := func(id string, st Status, reason string, at time.Duration) updateSandboxCmd {
		return updateSandboxCmd{ID: id, Update: Update{Status: ptr(st), Reason: reason, Time: t0.Add(at)}}
	}
	return [][]byte{
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("aaaa0001", "web", 0)}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("aaaa0002", "", time.Second)}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("aaaa0003", "web", 2*time.Second)}), // name taken
		mustCmd(t, cmdUpdateSandbox, upd("aaaa0001", StatusStarting, "", 3*time.Second)),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "aaaa0001", Update: Update{Node: ptr("n1"), Runtime: map[string]string{"pid": "42", "dir": "/run/x"}, Time: t0.Add(4 * time.Second)}}),
		mustCmd(t, cmdUpdateSandbox, upd("aaaa0001", StatusRunning, "", 5*time.Second)),
		mustCmd(t, cmdUpdateSandbox, upd("aaaa0001", StatusPending, "", 6*time.Second)), // invalid
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "aaaa0001", Update: Update{Status: ptr(StatusExited), ExitCode: ptr(3), Time: t0.Add(7 * time.Second)}}),
		mustCmd(t, cmdUpdateSandbox, upd("aaaa0002", StatusFailed, "image not found", 8*time.Second)),
		mustCmd(t, cmdSetMeta, setMetaCmd{Key: "k", Value: []byte("v")}),
		{byte(cmdIgnorable | 7), '{', '}'},
		{99, 'x'},
		mustCmd(t, cmdDeleteSandbox, deleteSandboxCmd{ID: "aaaa0002"}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("aaaa0004", "db", 9*time.Second)}),
		// 15..: nodes and tokens, in an order where map iteration could matter.
		mustCmd(t, cmdUpsertNode, upsertNodeCmd{Node{ID: "n2", Address: "b:1", Labels: map[string]string{"z": "2", "a": "1"}, UpdatedAt: t0}}),
		mustCmd(t, cmdUpsertNode, upsertNodeCmd{Node{ID: "n1", Address: "a:1", UpdatedAt: t0}}),
		mustCmd(t, cmdUpdateNode, updateNodeCmd{ID: "n2", Update: NodeUpdate{Cordoned: ptr(true), Time: t0.Add(10 * time.Second)}}),
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "tok-b", Role: RoleUser, SecretHash: "hb", CreatedAt: t0}}),
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "tok-a", Role: RoleAdmin, SecretHash: "ha", CreatedAt: t0}}),
		mustCmd(t, cmdUpdateNode, updateNodeCmd{ID: "ghost", Update: NodeUpdate{Cordoned: ptr(true), Time: t0}}), // 20: not found
	}
}

func TestFSMReplayIsDeterministic(t *testing.T) {
	log := testLog(t)
	a, b := newFSM(quietLogger(t)), newFSM(quietLogger(t))
	ra, rb := applyAll(a, log), applyAll(b, log)
	for i := range ra {
		if (ra[i] == nil) != (rb[i] == nil) {
			t.Fatalf("entry %d: results differ: %v vs %v", i+1, ra[i], rb[i])
		}
	}
	sa, sbytes := persist(t, a), persist(t, b)
	if !bytes.Equal(sa, sbytes) {
		t.Fatalf("same log, different state:\n%s\n%s", sa, sbytes)
	}
	// The state is what the log says, not trivially empty.
	for _, want := range []string{`"aaaa0001"`, `"aaaa0004"`, `"exited"`, `"pid":"42"`, `"n2"`, `"cordoned":true`, `"tok-a"`} {
		if !strings.Contains(string(sa), want) {
			t.Errorf("snapshot lacks %s: %s", want, sa)
		}
	}
	if strings.Contains(string(sa), `"aaaa0002"`) || strings.Contains(string(sa), `"aaaa0003"`) {
		t.Errorf("snapshot holds a deleted or rejected sandbox: %s", sa)
	}

	// Restoring the snapshot gives the same state again.
	c := newFSM(quietLogger(t))
	if err := c.Restore(io.NopCloser(bytes.NewReader(sa))); err != nil {
		t.Fatal(err)
	}
	if sc := persist(t, c); !bytes.Equal(sa, sc) {
		t.Fatalf("restored state differs:\n%s\n%s", sa, sc)
	}
	got, err := c.get("web")
	if err != nil || got.ID != "aaaa0001" {
		t.Fatalf("get web after restore = %v, %v", got.ID, err)
	}
}

func TestFSMResults(t *testing.T) {
	f := newFSM(quietLogger(t))
	res := applyAll(f, testLog(t))
	wantErr := map[int]error{
		3:  ErrNameTaken,
		7:  ErrInvalidTransition,
		12: ErrUnknownCommand,
		20: ErrNotFound,
	}
	for i, r := range res {
		idx := i + 1
		err, _ := r.(error)
		if want := wantErr[idx]; want != nil {
			if !errors.Is(err, want) {
				t.Errorf("entry %d: got %v, want %v", idx, r, want)
			}
			continue
		}
		if err != nil {
			t.Errorf("entry %d: unexpected error %v", idx, err)
		}
	}
	sb, err := f.get("aaaa0001")
	if err != nil {
		t.Fatal(err)
	}
	if sb.Status != StatusExited || sb.ExitCode != 3 || sb.Node != "n1" {
		t.Errorf("sandbox = %+v", sb)
	}
	if !sb.StartedAt.Equal(t0.Add(5*time.Second)) || !sb.FinishedAt.Equal(t0.Add(7*time.Second)) {
		t.Errorf("started %v finished %v", sb.StartedAt, sb.FinishedAt)
	}
	var statuses []Status
	for _, e := range sb.Events {
		statuses = append(statuses, e.Status)
	}
	if got, want := statuses, []Status{StatusPending, StatusStarting, StatusRunning, StatusExited}; !equalStatuses(got, want) {
		t.Errorf("events = %v, want %v", got, want)
	}
	if _, err := f.get("aaaa0002"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted sandbox: %v", err)
	}
}

func equalStatuses(a, b []Status) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestTransitions(t *testing.T) {
	all := []Status{StatusPending, StatusStarting, StatusRunning, StatusExited, StatusFailed, StatusLost}
	allowed := map[[2]Status]bool{
		{StatusPending, StatusStarting}: true,
		{StatusPending, StatusFailed}:   true,
		{StatusPending, StatusExited}:   true, // stopped by a user before it started
		{StatusStarting, StatusExited}:  true,
		{StatusStarting, StatusRunning}: true,
		{StatusStarting, StatusFailed}:  true,
		{StatusStarting, StatusLost}:    true,
		{StatusRunning, StatusExited}:   true,
		{StatusRunning, StatusFailed}:   true,
		{StatusRunning, StatusLost}:     true,
	}
	for _, from := range all {
		for _, to := range all {
			err := checkTransition(from, to)
			switch {
			case from == to:
				if err != nil {
					t.Errorf("%s→%s (idempotent): %v", from, to, err)
				}
			case allowed[[2]Status{from, to}]:
				if err != nil {
					t.Errorf("%s→%s: %v", from, to, err)
				}
			default:
				if !errors.Is(err, ErrInvalidTransition) {
					t.Errorf("%s→%s: got %v, want ErrInvalidTransition", from, to, err)
				}
			}
		}
	}
	if err := checkTransition(StatusExited, StatusRunning); err == nil || !strings.Contains(err.Error(), "final") {
		t.Errorf("leaving a terminal state: %v, want an error saying it is final", err)
	}
	if err := checkTransition(StatusPending, "bogus"); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown status: %v", err)
	}
}

func TestFSMRejectedUpdateChangesNothing(t *testing.T) {
	f := newFSM(quietLogger(t))
	applyAll(f, [][]byte{mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "id1", CreatedAt: t0}})})
	before := persistState(t, f)
	// Invalid status together with other fields: nothing of it may land.
	r := f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{
		ID: "id1", Update: Update{Status: ptr(StatusRunning), Node: ptr("n"), Time: t0},
	})})
	if err, _ := r.(error); !errors.Is(err, ErrInvalidTransition) {
		t.Fatalf("pending→running: %v", r)
	}
	r = f.Apply(&raft.Log{Index: 3, Type: raft.LogCommand, Data: mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{
		ID: "id1", Update: Update{Node: ptr("n")},
	})})
	if err, _ := r.(error); !errors.Is(err, ErrInvalid) {
		t.Fatalf("update without time: %v", r)
	}
	if after := persistState(t, f); !bytes.Equal(before, after) {
		t.Fatalf("rejected updates changed state:\n%s\n%s", before, after)
	}
}

func TestFSMTerminalIsFinalButIdempotent(t *testing.T) {
	f := newFSM(quietLogger(t))
	upd := func(i uint64, st Status, reason string) any {
		return f.Apply(&raft.Log{Index: i, Type: raft.LogCommand, Data: mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{
			ID: "id1", Update: Update{Status: ptr(st), Reason: reason, Time: t0.Add(time.Duration(i) * time.Second)},
		})})
	}
	applyAll(f, [][]byte{mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "id1", CreatedAt: t0}})})
	if r := upd(2, StatusFailed, "boom"); r == nil {
		t.Fatal("update returned nil, want the sandbox")
	}
	r := upd(3, StatusFailed, "again")
	sb, ok := r.(Sandbox)
	if !ok {
		t.Fatalf("failed→failed: %v, want the unchanged sandbox", r)
	}
	if len(sb.Events) != 2 || sb.Reason != "boom" || !sb.FinishedAt.Equal(t0.Add(2*time.Second)) {
		t.Errorf("idempotent update changed the sandbox: %+v", sb)
	}
	for _, to := range []Status{StatusRunning, StatusPending, StatusExited, StatusLost} {
		if err, _ := upd(4, to, "").(error); !errors.Is(err, ErrInvalidTransition) {
			t.Errorf("failed→%s: %v", to, err)
		}
	}
}

func TestFSMUnknownAndMalformedCommands(t *testing.T) {
	f := newFSM(quietLogger(t))
	before := persistState(t, f)
	cases := []struct {
		name string
		data []byte
		want error // nil: skipped without error
	}{
		{"ignorable", []byte{0x80, 1, 2, 3}, nil},
		{"ignorable high", []byte{0xff}, nil},
		{"unknown", []byte{0x7f, '{', '}'}, ErrUnknownCommand},
		{"zero type", []byte{0}, ErrUnknownCommand},
		{"empty", nil, ErrInvalid},
		{"bad json", []byte{byte(cmdCreateSandbox), '{'}, ErrInvalid},
		{"create without id", mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{CreatedAt: t0}}), ErrInvalid},
		{"create without time", mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "x"}}), ErrInvalid},
		{"create running", mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "x", CreatedAt: t0, Status: StatusRunning}}), ErrInvalid},
		{"update missing", mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "nope", Update: Update{Time: t0}}), ErrNotFound},
		{"delete missing", mustCmd(t, cmdDeleteSandbox, deleteSandboxCmd{ID: "nope"}), ErrNotFound},
		{"meta empty key", mustCmd(t, cmdSetMeta, setMetaCmd{}), ErrInvalid},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: c.data})
			if c.want == nil {
				if r != nil {
					t.Fatalf("got %v, want skipped", r)
				}
				return
			}
			if err, _ := r.(error); !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", r, c.want)
			}
		})
	}
	if after := persistState(t, f); !bytes.Equal(before, after) {
		t.Fatalf("rejected commands changed state:\n%s\n%s", before, after)
	}
}

func TestFSMCopyOnRead(t *testing.T) {
	f := newFSM(quietLogger(t))
	applyAll(f, [][]byte{
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "id1", CreatedAt: t0, Spec: SandboxSpec{Cmd: []string{"a"}}}}),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "id1", Update: Update{Runtime: map[string]string{"k": "v"}, Time: t0}}),
	})
	snap, err := f.Snapshot() // taken before the mutation attempts below; must not see them
	if err != nil {
		t.Fatal(err)
	}
	sb, _ := f.get("id1")
	sb.Spec.Cmd[0] = "mutated"
	sb.Runtime["k"] = "mutated"
	sb.Events[0].Reason = "mutated"
	list := f.list()
	list[0].Runtime["k"] = "mutated"
	again, _ := f.get("id1")
	if again.Spec.Cmd[0] != "a" || again.Runtime["k"] != "v" || again.Events[0].Reason != "created" {
		t.Fatalf("caller mutation reached FSM state: %+v", again)
	}
	// An update after Snapshot must not show up in that snapshot (copy-on-write).
	applyAll(f, [][]byte{mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "id1", Update: Update{Runtime: map[string]string{"k": "later"}, Time: t0}})})
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(sink.String(), "later") || strings.Contains(sink.String(), "mutated") {
		t.Fatalf("snapshot saw later changes: %s", sink.String())
	}
}

func TestFSMRuntimeMergeAndNames(t *testing.T) {
	f := newFSM(quietLogger(t))
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "id1", Name: "a", CreatedAt: t0}}),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "id1", Update: Update{Runtime: map[string]string{"x": "1", "y": "2"}, Time: t0}}),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "id1", Update: Update{Runtime: map[string]string{"x": "", "z": "3"}, Time: t0}}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "id2", Name: "id1", CreatedAt: t0}}), // name = other's ID
		mustCmd(t, cmdDeleteSandbox, deleteSandboxCmd{ID: "id1"}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "id3", Name: "a", CreatedAt: t0}}), // name free again
	})
	rt := res[2].(Sandbox).Runtime
	if len(rt) != 2 || rt["y"] != "2" || rt["z"] != "3" {
		t.Errorf("runtime after merge = %v", rt)
	}
	if err, _ := res[3].(error); !errors.Is(err, ErrNameTaken) {
		t.Errorf("name equal to an ID: %v", res[3])
	}
	if res[5] != nil {
		t.Errorf("reusing a deleted sandbox's name: %v", res[5])
	}
}

// The owner limit is checked by the state machine: a create past it is refused with
// ErrQuota whoever proposed it, and removing a sandbox makes room again.
func TestFSMOwnerLimit(t *testing.T) {
	f := newFSM(quietLogger(t))
	mk := func(id, owner string) []byte {
		return mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: id, Owner: owner, CreatedAt: t0, Spec: SandboxSpec{VCPUs: 1, MemoryMiB: 512}}, Quota: Quota{Sandboxes: 2}})
	}
	res := applyAll(f, [][]byte{mk("a1", "alice"), mk("a2", "alice"), mk("b1", "bob"), mk("a3", "alice")})
	for i, want := range []error{nil, nil, nil, ErrQuota} {
		err, _ := res[i].(error)
		if want == nil && err != nil || want != nil && !errors.Is(err, want) {
			t.Errorf("create %d: %v, want %v", i, res[i], want)
		}
	}
	res = applyAll(f, [][]byte{mustCmd(t, cmdDeleteSandbox, deleteSandboxCmd{ID: "a1"}), mk("a3", "alice")})
	if err, _ := res[1].(error); err != nil {
		t.Errorf("create after a removal: %v", err)
	}
	// vCPUs and memory count the sandboxes not over yet.
	big := func(id string, vcpus, mem int) []byte {
		return mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: id, Owner: "carol", CreatedAt: t0, Spec: SandboxSpec{VCPUs: vcpus, MemoryMiB: mem}},
			Quota: Quota{VCPUs: 4, MemoryMiB: 2048}})
	}
	res = applyAll(f, [][]byte{big("c1", 2, 1024), big("c2", 3, 512), big("c3", 2, 1536),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "c1", Update: Update{Status: ptr(StatusFailed), Time: t0}}), big("c4", 2, 1024)})
	for i, want := range []error{nil, ErrQuota, ErrQuota, nil, nil} {
		err, _ := res[i].(error)
		if want == nil && err != nil || want != nil && !errors.Is(err, want) {
			t.Errorf("carol's create/update %d: %v, want %v", i, res[i], want)
		}
	}
	// The scratch disk sandboxes reserve counts as well, naming the flag that bounds it.
	disk := func(id string, mib int) []byte {
		return mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: id, Owner: "dave", CreatedAt: t0, Spec: SandboxSpec{DiskMiB: mib}},
			Quota: Quota{DiskMiB: 4096}})
	}
	res = applyAll(f, [][]byte{disk("d1", 3000), disk("d2", 2000000), disk("d3", 1000)})
	if err, _ := res[1].(error); !errors.Is(err, ErrQuota) || !strings.Contains(err.Error(), "--max-disk-per-token") {
		t.Errorf("a disk reservation past the quota: %v", res[1])
	}
	if res[0] != nil || res[2] != nil {
		t.Errorf("disk reservations within the quota: %v %v", res[0], res[2])
	}
}

func TestSpecSizes(t *testing.T) {
	big := strings.Repeat("x", 300<<10)
	for field, spec := range map[string]SandboxSpec{
		"env":         {Env: []string{"A=" + big}},
		"command":     {Cmd: []string{big}},
		"image":       {Image: big[:2000]},
		"working_dir": {WorkingDir: big[:5000]},
		"policy":      {Policy: big},
		"constraints": {Constraints: make([]string, 40)},
		"ports":       {Ports: make([]Port, 65)},
	} {
		err := spec.CheckSizes()
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), field) {
			t.Errorf("%s too large: %v", field, err)
		}
	}
	if err := (SandboxSpec{Image: "busybox", Cmd: []string{"echo", "hi"}, Env: []string{"A=b"}}).CheckSizes(); err != nil {
		t.Errorf("an ordinary spec: %v", err)
	}
}

// A join spends a token's use; removing a node revokes the certificates its joins bought
// (and, for certificates issued before joins were recorded, any of its name); both
// survive a snapshot.
func TestFSMJoinAndRemoveNode(t *testing.T) {
	f := newFSM(quietLogger(t))
	later := t0.Add(365 * 24 * time.Hour)
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "j", Role: RoleJoin, SecretHash: "h", CreatedAt: t0, MaxUses: 1}}),
		mustCmd(t, cmdJoin, JoinRecord{Token: "j", Node: "n1", Serial: "aa", NotAfter: later, Time: t0}),
		mustCmd(t, cmdJoin, JoinRecord{Token: "j", Node: "n2", Serial: "bb", NotAfter: later, Time: t0}),
		mustCmd(t, cmdRemoveNode, removeNodeCmd{ID: "n1", Time: t0.Add(time.Minute)}),
	})
	if res[1] != nil || !errors.Is(res[2].(error), ErrQuota) || res[3] != nil {
		t.Fatalf("results %v", res)
	}
	g := newFSM(quietLogger(t))
	if err := g.Restore(io.NopCloser(bytes.NewReader(persist(t, f)))); err != nil {
		t.Fatal(err)
	}
	s := &Store{fsm: g}
	if !s.CertRevoked("aa", "n1") || s.CertRevoked("cc", "n2") || !s.CertRevoked("unrecorded", "n1") {
		t.Errorf("after a snapshot: revoked(aa)=%v revoked(cc, n2)=%v revoked(unrecorded n1)=%v", s.CertRevoked("aa", "n1"), s.CertRevoked("cc", "n2"), s.CertRevoked("unrecorded", "n1"))
	}
}

// An edge certificate is recorded with the token that got it (only a valid ingress or
// admin token may) and is revoked with that token; the revocation survives a snapshot and
// is listed until the certificate expires.
func TestFSMEdgeCertRevokedWithToken(t *testing.T) {
	f := newFSM(quietLogger(t))
	later := t0.Add(30 * 24 * time.Hour)
	cert := func(serial, token string) issueEdgeCertCmd {
		return issueEdgeCertCmd{Cert: IssuedCert{Serial: serial, Token: token, Name: "edge", NotAfter: later}, Time: t0}
	}
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "e1", Role: RoleIngress, SecretHash: "h", CreatedAt: t0}}),
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "e2", Role: RoleIngress, SecretHash: "h", CreatedAt: t0}}),
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "u", Role: RoleUser, SecretHash: "h", CreatedAt: t0}}),
		mustCmd(t, cmdIssueEdgeCert, cert("aa", "e1")),
		mustCmd(t, cmdIssueEdgeCert, cert("bb", "e2")),
		mustCmd(t, cmdIssueEdgeCert, cert("cc", "u")),    // a user token may not
		mustCmd(t, cmdIssueEdgeCert, cert("dd", "gone")), // nor a token revoked meanwhile
		mustCmd(t, cmdDeleteToken, deleteTokenCmd{ID: "e1", Time: t0.Add(time.Minute)}),
	})
	if res[3] != nil || res[4] != nil || !errors.Is(res[5].(error), ErrInvalid) || !errors.Is(res[6].(error), ErrNotFound) || res[7] != nil {
		t.Fatalf("results %v", res)
	}
	g := newFSM(quietLogger(t))
	if err := g.Restore(io.NopCloser(bytes.NewReader(persist(t, f)))); err != nil {
		t.Fatal(err)
	}
	s := &Store{fsm: g}
	if !s.EdgeCertRevoked("aa") || s.EdgeCertRevoked("bb") || s.EdgeCertRevoked("unknown") {
		t.Errorf("after a snapshot: revoked(aa)=%v revoked(bb)=%v revoked(unknown)=%v", s.EdgeCertRevoked("aa"), s.EdgeCertRevoked("bb"), s.EdgeCertRevoked("unknown"))
	}
	if got := s.RevokedEdgeCerts(t0.Add(time.Hour)); !slices.Equal(got, []string{"aa"}) {
		t.Errorf("revoked edge certificates %v, want [aa]", got)
	}
	if got := s.RevokedEdgeCerts(later.Add(time.Second)); len(got) != 0 {
		t.Errorf("expired certificates still listed: %v", got)
	}
	if s.HasLiveCerts("edge", t0) {
		t.Error("an edge certificate's name counts as a node holding certificates")
	}
	// One token holds a bounded number of live certificates, none outliving the token.
	var cmds [][]byte
	for i := range MaxEdgeCertsPerToken + 1 {
		cmds = append(cmds, mustCmd(t, cmdIssueEdgeCert, cert(fmt.Sprintf("e2-%d", i), "e2")))
	}
	res = applyAll(g, cmds)
	if err, _ := res[MaxEdgeCertsPerToken-1].(error); !errors.Is(err, ErrQuota) { // bb is e2's too
		t.Errorf("certificate %d of one token: %v, want ErrQuota", MaxEdgeCertsPerToken+1, res[MaxEdgeCertsPerToken-1])
	}
	short := mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "e3", Role: RoleIngress, SecretHash: "h", CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}})
	res = applyAll(g, [][]byte{short, mustCmd(t, cmdIssueEdgeCert, cert("cc3", "e3"))})
	if err, _ := res[1].(error); !errors.Is(err, ErrInvalid) {
		t.Errorf("a certificate outliving its token: %v, want ErrInvalid", res[1])
	}
}

// Lookups for an owner see only the owner's sandboxes: another's ID, name and ID prefix
// are not found, and do not make a prefix ambiguous.
func TestFSMOwnedLookups(t *testing.T) {
	f := newFSM(quietLogger(t))
	applyAll(f, [][]byte{
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "abcd0001", Name: "mine", Owner: "alice", CreatedAt: t0}}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "abcd0002", Name: "theirs", Owner: "bob", CreatedAt: t0}}),
	})
	for _, ref := range []string{"abcd0002", "theirs", "abcd00"} {
		if _, err := f.getOwned(ref, "alice"); ref != "abcd00" && !errors.Is(err, ErrNotFound) {
			t.Errorf("alice looks up %q: %v, want not found", ref, err)
		}
	}
	if sb, err := f.getOwned("abcd", "alice"); err != nil || sb.ID != "abcd0001" {
		t.Errorf("alice's prefix abcd: %v %v (bob's sandbox must not make it ambiguous)", sb.ID, err)
	}
	if _, err := f.getOwned("abcd", ""); !errors.Is(err, ErrAmbiguous) {
		t.Errorf("an admin's prefix abcd: %v, want ambiguous", err)
	}
}

// A sandbox's history in the state is bounded: restarted forever, it keeps its first
// event and the latest ones; reasons (which may quote a guest) are cut.
func TestFSMEventsBounded(t *testing.T) {
	f := newFSM(quietLogger(t))
	cmds := [][]byte{mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "r1", CreatedAt: t0}})}
	long := strings.Repeat("x", 10000)
	for i := range 200 {
		at := t0.Add(time.Duration(i) * time.Second)
		cmds = append(cmds,
			mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "r1", Update: Update{Status: ptr(StatusStarting), Node: ptr("n1"), Time: at}}),
			mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "r1", Update: Update{Status: ptr(StatusFailed), Reason: long, Time: at}}),
			mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "r1", Update: Update{Status: ptr(StatusPending), Restart: true, Reason: "again", Time: at}}))
	}
	applyAll(f, cmds)
	sb, err := f.get("r1")
	if err != nil {
		t.Fatal(err)
	}
	if len(sb.Events) > maxEvents || sb.Events[0].Reason != "created" && sb.Events[0].Status != StatusPending {
		t.Errorf("%d events, first %+v", len(sb.Events), sb.Events[0])
	}
	for _, e := range sb.Events {
		if len(e.Reason) > maxReasonBytes+3 {
			t.Fatalf("an event reason of %d bytes", len(e.Reason))
		}
	}
	if sb.Restarts != 200 {
		t.Errorf("restarts %d", sb.Restarts)
	}
}

// Removing a node whose sandboxes are live (it may keep reporting them) revokes it all the
// same and gives them up: running ones lost, placed ones placed again.
func TestFSMRemoveNodeWithSandboxes(t *testing.T) {
	f := newFSM(quietLogger(t))
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdUpsertNode, upsertNodeCmd{Node{ID: "n1", Address: "a:1", UpdatedAt: t0}}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: "run1", CreatedAt: t0}}),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "run1", Update: Update{Status: ptr(StatusStarting), Node: ptr("n1"), Time: t0}}),
		mustCmd(t, cmdUpdateSandbox, updateSandboxCmd{ID: "run1", Update: Update{Status: ptr(StatusRunning), Time: t0}}),
		mustCmd(t, cmdRemoveNode, removeNodeCmd{ID: "n1", Time: t0.Add(time.Minute)}),
	})
	if err, _ := res[4].(error); err != nil {
		t.Fatalf("remove a node with a running sandbox: %v", err)
	}
	sb, _ := f.get("run1")
	if sb.Status != StatusLost || !strings.Contains(sb.Reason, "removed") {
		t.Errorf("its sandbox: %s %q, want lost", sb.Status, sb.Reason)
	}
	s := &Store{fsm: f}
	if !s.CertRevoked("unrecorded", "n1") {
		t.Error("the removed node's certificates are not refused")
	}
}

// One owner's specs together are bounded in bytes, whatever each one's own bounds allow.
func TestFSMSpecBytesQuota(t *testing.T) {
	f := newFSM(quietLogger(t))
	env := []string{"A=" + strings.Repeat("x", 100<<10)}
	var cmds [][]byte
	for i := range 3 {
		cmds = append(cmds, mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: Sandbox{ID: fmt.Sprintf("s%d", i), Owner: "u", CreatedAt: t0, Spec: SandboxSpec{Env: env}},
			Quota: Quota{SpecBytes: 250 << 10}}))
	}
	res := applyAll(f, cmds)
	if res[0] != nil || res[1] != nil || !errors.Is(res[2].(error), ErrQuota) {
		t.Errorf("results %v: want the third refused", res)
	}
}
