package auth

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

func TestTokenRoundTrip(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s, rec := New(state.RoleUser, "ci", "admin-id", now, time.Hour)
	if strings.Contains(rec.SecretHash, s[len(prefix)+17:]) {
		t.Fatal("stored record contains the secret")
	}
	id, secret, err := Parse(s)
	if err != nil || id != rec.ID {
		t.Fatalf("parse %q: %v %v", s, id, err)
	}
	if !Verify(rec, secret, now) {
		t.Fatal("own secret rejected")
	}
	if Verify(rec, strings.Repeat("0", 64), now) {
		t.Fatal("wrong secret accepted")
	}
	if Verify(rec, secret, now.Add(2*time.Hour)) {
		t.Fatal("expired token accepted")
	}
	s2, rec2 := New(state.RoleAdmin, "", "", now, 0)
	if s2 == s || rec2.ID == rec.ID || !rec2.ExpiresAt.IsZero() {
		t.Fatal("tokens repeat or a token without TTL expires")
	}
}

func TestParseRejectsMalformed(t *testing.T) {
	for _, bad := range []string{"", "Bearer x", "fwk_", "fwk_abc_def", "fwk_" + strings.Repeat("z", 16) + "_" + strings.Repeat("0", 64),
		"fwk_" + strings.Repeat("0", 16) + "_" + strings.Repeat("0", 63), "fwt_" + strings.Repeat("0", 16) + "_" + strings.Repeat("0", 64)} {
		if _, _, err := Parse(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}

func TestIdentity(t *testing.T) {
	ctx := With(context.Background(), Identity{TokenID: "u1", Role: state.RoleUser})
	id, ok := From(ctx)
	if !ok || !id.CanAccess("u1") || id.CanAccess("u2") || id.CanAccess("") || id.Admin() {
		t.Fatalf("user identity: %+v", id)
	}
	if _, ok := From(context.Background()); ok {
		t.Fatal("identity from nothing")
	}
	admin := Identity{TokenID: "a", Role: state.RoleAdmin}
	if !admin.CanAccess("u2") || !admin.CanAccess("") {
		t.Fatal("admin limited")
	}
}
