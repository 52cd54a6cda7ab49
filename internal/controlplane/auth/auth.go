// Package auth is API authentication and authorisation: token strings, their stored
// hashes, and the identity a verified token gives a request.
//
// A token is "fwk_<id>_<secret>": the ID (16 hex) names the stored record, the secret
// (64 hex, 256 random bits) proves possession. Only sha256(secret) is stored, in the
// replicated state: with 256-bit secrets a fast hash is enough (there is nothing to brute
// force), and a leaked snapshot gives no usable token.
package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

const prefix = "fwk_"

// ErrMalformed: the string is not a Fireworks API token.
var ErrMalformed = errors.New("malformed API token")

// New returns a fresh token string and the record to store for it.
func New(role state.Role, name, createdBy string, now time.Time, ttl time.Duration) (string, state.Token) {
	var id [8]byte
	var secret [32]byte
	_, _ = rand.Read(id[:]) // crypto/rand.Read never fails
	_, _ = rand.Read(secret[:])
	idHex, secretHex := hex.EncodeToString(id[:]), hex.EncodeToString(secret[:])
	rec := state.Token{ID: idHex, Name: name, Role: role, SecretHash: HashSecret(secretHex), CreatedAt: now, CreatedBy: createdBy}
	if ttl > 0 {
		rec.ExpiresAt = now.Add(ttl)
	}
	return prefix + idHex + "_" + secretHex, rec
}

// Parse splits a token string into its ID and secret.
func Parse(s string) (id, secret string, err error) {
	rest, ok := strings.CutPrefix(s, prefix)
	if !ok {
		return "", "", fmt.Errorf("%w: no %q prefix", ErrMalformed, prefix)
	}
	id, secret, ok = strings.Cut(rest, "_")
	if !ok || len(id) != 16 || len(secret) != 64 || !isHex(id) || !isHex(secret) {
		return "", "", fmt.Errorf("%w: want %s<16 hex>_<64 hex>", ErrMalformed, prefix)
	}
	return id, secret, nil
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

// HashSecret is what the state stores for a secret.
func HashSecret(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return "sha256:" + hex.EncodeToString(h[:])
}

// Verify checks secret against a stored record in constant time, and the record's expiry.
func Verify(rec state.Token, secret string, now time.Time) bool {
	want := []byte(rec.SecretHash)
	got := []byte(HashSecret(secret))
	ok := subtle.ConstantTimeCompare(want, got) == 1
	return ok && rec.ValidAt(now)
}

// Identity is who a verified request acts as.
type Identity struct {
	TokenID string
	Name    string
	Role    state.Role
}

// Admin reports whether the identity may do everything.
func (id Identity) Admin() bool { return id.Role == state.RoleAdmin }

// CanAccess reports whether the identity may see and act on a sandbox owned by owner.
func (id Identity) CanAccess(owner string) bool { return id.Admin() || owner == id.TokenID }

type ctxKey struct{}

// With returns ctx carrying id.
func With(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// From returns the identity ctx carries; ok is false for an unauthenticated context.
func From(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(ctxKey{}).(Identity)
	return id, ok
}
