package state

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// Templates are their owner's: names are unique per owner (not across owners), replace
// keeps the ID, a token holds at most MaxTemplatesPerOwner, and they survive a snapshot.
func TestFSMTemplates(t *testing.T) {
	f := newFSM(quietLogger(t))
	tm := func(id, name, owner string) Template {
		return Template{ID: id, Name: name, Owner: owner, Image: "debian", CreatedAt: t0}
	}
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("a", "base", "u1")}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("b", "base", "u2")}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("c", "base", "u1")}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: Template{ID: "d", Name: "base", Owner: "u1", Image: "other", CreatedAt: t0.Add(time.Hour)}, Replace: true}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("e", "../x", "u1")}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("f", strings.Repeat("n", 129), "u1")}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("g", "a/../..", "u1")}),
		mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm("h", "a//b", "u1")}),
	})
	if _, ok := res[0].(Template); !ok {
		t.Fatalf("put: %v", res[0])
	}
	if _, ok := res[1].(Template); !ok {
		t.Fatalf("another owner's template of the same name: %v", res[1])
	}
	if err, _ := res[2].(error); !errors.Is(err, ErrExists) {
		t.Errorf("a second template of one name: %v", res[2])
	}
	if got, _ := res[3].(Template); got.ID != "a" || got.Image != "other" || !got.CreatedAt.Equal(t0) {
		t.Errorf("replace: %+v (want the ID and creation time kept)", res[3])
	}
	for i := 4; i < 8; i++ {
		if err, _ := res[i].(error); !errors.Is(err, ErrInvalid) {
			t.Errorf("bad name %d: %v", i, res[i])
		}
	}
	g := newFSM(quietLogger(t))
	if err := g.Restore(io.NopCloser(bytes.NewReader(persist(t, f)))); err != nil {
		t.Fatal(err)
	}
	s := &Store{fsm: g}
	if got := s.Templates("u1", false); len(got) != 1 || got[0].Image != "other" {
		t.Errorf("u1's templates after a snapshot: %+v", got)
	}
	if _, err := s.FindTemplate("u2", "a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("another owner's template by ID: %v", err)
	}
	if got, err := s.FindTemplate("u2", "base"); err != nil || got.ID != "b" {
		t.Errorf("u2's own by name: %+v %v", got, err)
	}

	// A revoked token's templates go with it.
	applyAll(f, [][]byte{
		mustCmd(t, cmdCreateToken, createTokenCmd{Token{ID: "u2", Role: RoleUser, SecretHash: "h", CreatedAt: t0}}),
		mustCmd(t, cmdDeleteToken, deleteTokenCmd{ID: "u2"}),
	})
	if got := (&Store{fsm: f}).Templates("u2", false); len(got) != 0 {
		t.Errorf("a revoked token's templates: %+v", got)
	}

	var cmds [][]byte
	for i := range MaxTemplatesPerOwner + 1 {
		cmds = append(cmds, mustCmd(t, cmdPutTemplate, putTemplateCmd{Template: tm(NewID(), "t"+strings.Repeat("x", i%3)+string(rune('a'+i%26))+NewID()[:4], "u3")}))
	}
	res = applyAll(f, cmds)
	if err, _ := res[MaxTemplatesPerOwner].(error); !errors.Is(err, ErrQuota) {
		t.Errorf("template %d of one token: %v", MaxTemplatesPerOwner+1, res[MaxTemplatesPerOwner])
	}
}

// Metadata is bounded; a lifetime sets the end at creation.
func TestMetadataAndLifetimeAtCreate(t *testing.T) {
	f := newFSM(quietLogger(t))
	big := map[string]string{}
	for i := range MaxMetadata + 1 {
		big[NewID()+string(rune('a'+i%26))] = "v"
	}
	sb := func(id string, spec SandboxSpec) Sandbox {
		return Sandbox{ID: id, Spec: spec, CreatedAt: t0}
	}
	res := applyAll(f, [][]byte{
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("a", SandboxSpec{Image: "x", Metadata: map[string]string{"k": "v"}, Lifetime: time.Minute})}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("b", SandboxSpec{Image: "x", Metadata: big})}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("c", SandboxSpec{Image: "x", Metadata: map[string]string{"k": strings.Repeat("v", MaxMetadataValue+1)}})}),
		mustCmd(t, cmdCreateSandbox, createSandboxCmd{Sandbox: sb("d", SandboxSpec{Image: "x", OnEnd: "explode"})}),
	})
	if res[0] != nil {
		t.Fatalf("create: %v", res[0])
	}
	for i := 1; i < 4; i++ {
		if err, _ := res[i].(error); !errors.Is(err, ErrInvalid) {
			t.Errorf("create %d: %v, want invalid", i, res[i])
		}
	}
	got, err := f.get("a")
	if err != nil || !got.EndAt.Equal(t0.Add(time.Minute)) || got.Spec.Metadata["k"] != "v" {
		t.Errorf("created: end %v, metadata %v, %v", got.EndAt, got.Spec.Metadata, err)
	}
}
