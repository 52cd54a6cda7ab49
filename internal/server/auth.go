package server

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net/http"
	"strings"
)

// NewToken returns a fresh random API token.
func NewToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return "fwk_" + hex.EncodeToString(b)
}

// requireToken rejects every request that does not carry the token. Comparing hashes in
// constant time keeps the check independent of where a guess first differs.
func requireToken(token string, next http.Handler) http.Handler {
	want := sha256.Sum256([]byte(token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		h := sha256.Sum256([]byte(got))
		if !ok || subtle.ConstantTimeCompare(h[:], want[:]) != 1 {
			unauthenticated(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// unauthenticated answers in the caller's protocol so gRPC and Connect clients both see a
// proper "unauthenticated" code rather than a transport error.
func unauthenticated(w http.ResponseWriter, r *http.Request) {
	const msg = "missing or invalid API token (send Authorization: Bearer <token>; `fireworks dev` writes it to the CLI config)"
	ct := r.Header.Get("Content-Type")
	if strings.HasPrefix(ct, "application/grpc") {
		w.Header().Set("Content-Type", ct)
		w.Header().Set("Grpc-Status", "16")
		w.Header().Set("Grpc-Message", msg)
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusUnauthorized)
	_, _ = w.Write([]byte(`{"code":"unauthenticated","message":"` + msg + `"}`))
}
