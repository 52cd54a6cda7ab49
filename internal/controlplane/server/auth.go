package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// authenticate resolves the bearer token of every request to an identity, or answers
// "unauthenticated" without calling anything behind it. Tokens are checked against the
// replicated state; only join tokens are refused here (they only buy a node certificate).
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, nodeServicePrefix) {
			s.authenticateAgent(w, r, next)
			return
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			rpc.Unauthenticated(w, r, "missing API token (send Authorization: Bearer <token>; `fireworks dev` writes it to the CLI config)")
			return
		}
		id, err := s.verifyToken(r.Context(), strings.TrimSpace(got))
		if err != nil {
			rpc.Unauthenticated(w, r, err.Error())
			return
		}
		if id.Role == state.RoleIngress && !strings.HasPrefix(r.URL.Path, ingressServicePrefix) {
			// An edge's token opens the route feed only: it must not act as a user.
			edgeOnly(w, r)
			return
		}
		ctx := auth.With(r.Context(), id)
		ctx = state.WithActor(ctx, state.Actor{Kind: "token", ID: id.TokenID, Name: id.Name, Role: id.Role})
		if StaleRead(r) {
			ctx = state.WithStaleReads(ctx)
		}
		// A token revoked (or expiring) while a call streams ends the call: logs -f,
		// attach and exec must not outlive the credential that opened them.
		ctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		go s.watchToken(ctx, cancel, id.TokenID)
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// PreAuth is what a follower knows of a call's credential before forwarding it.
type PreAuth int

const (
	PreAuthRefused PreAuth = iota // refused here (answered already)
	PreAuthKnown                  // a token this server's copy of the state holds and accepts
	PreAuthUnknown                // well-formed, but not in this server's copy (it may lag)
)

// PreAuthenticate checks a user call's bearer token against this server's copy of the
// state before a follower reads a body to forward: a missing or malformed token, or one
// the copy holds and refuses, is answered here in the caller's protocol. A token the copy
// does not hold yet (just created on the leader) is the leader's to judge; the follower
// streams such a call through without buffering its body, so a stranger's random token
// cannot make it hold one.
func (s *Server) PreAuthenticate(w http.ResponseWriter, r *http.Request) PreAuth {
	if strings.HasPrefix(r.URL.Path, nodeServicePrefix) {
		return PreAuthKnown // the node protocol authenticates by certificate (and Join by its token)
	}
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		rpc.Unauthenticated(w, r, "missing API token (send Authorization: Bearer <token>)")
		return PreAuthRefused
	}
	id, _, err := auth.Parse(strings.TrimSpace(got))
	if err != nil {
		rpc.Unauthenticated(w, r, "invalid API token: "+err.Error())
		return PreAuthRefused
	}
	if _, err := s.store.LocalToken(id); err != nil {
		return PreAuthUnknown
	}
	if _, err := s.verifyToken(r.Context(), strings.TrimSpace(got)); err != nil {
		rpc.Unauthenticated(w, r, err.Error())
		return PreAuthRefused
	}
	return PreAuthKnown
}

// verifyToken checks a token string against the state. The FSM is read locally: requests
// are served by the leader, whose FSM holds every committed token change.
func (s *Server) verifyToken(ctx context.Context, tok string) (auth.Identity, error) {
	id, secret, err := auth.Parse(tok)
	if err != nil {
		return auth.Identity{}, fmt.Errorf("invalid API token: %w", err)
	}
	rec, err := s.store.LocalToken(id)
	if err != nil || !auth.Verify(rec, secret, s.now()) {
		// One message for unknown, revoked, expired and wrong: no oracle for guessing.
		return auth.Identity{}, errors.New("invalid API token: unknown, revoked or expired")
	}
	if rec.Role == state.RoleJoin {
		return auth.Identity{}, errors.New("a join token cannot call the API; it only lets an agent join the cluster")
	}
	return auth.Identity{TokenID: rec.ID, Name: rec.Name, Role: rec.Role}, nil
}

// caller returns the request's identity; every handler runs behind authenticate, so a
// missing one is a wiring bug and refused rather than trusted.
func caller(ctx context.Context) (auth.Identity, error) {
	id, ok := auth.From(ctx)
	if !ok {
		return auth.Identity{}, connect.NewError(connect.CodeUnauthenticated, errors.New("request has no verified identity"))
	}
	return id, nil
}

// requireAdmin refuses callers without the admin role, naming what they tried.
func requireAdmin(ctx context.Context, what string) (auth.Identity, error) {
	id, err := caller(ctx)
	if err != nil {
		return id, err
	}
	if !id.Admin() {
		return id, connect.NewError(connect.CodePermissionDenied,
			fmt.Errorf("%s needs an admin token; token %s has role %s", what, id.TokenID, id.Role))
	}
	return id, nil
}

// StaleHeader asks a server to answer a read from its own copy of the state (which may
// lag the leader) instead of forwarding it: for looking at a follower or a partitioned
// server.
const StaleHeader = "Fireworks-Stale"

// staleProcedures are the read-only calls a stale read may serve locally.
var staleProcedures = map[string]bool{
	fireworksv1connect.SandboxServiceGetSandboxProcedure:    true,
	fireworksv1connect.SandboxServiceListSandboxesProcedure: true,
	fireworksv1connect.ClusterServiceListNodesProcedure:     true,
	fireworksv1connect.SystemServiceInfoProcedure:           true,
}

// StaleRead reports whether r is a read-only call that asked for a stale read.
func StaleRead(r *http.Request) bool {
	return r.Header.Get(StaleHeader) == "1" && staleProcedures[r.URL.Path]
}

// watchToken cancels a call's context once its token is revoked or expires. It ends with
// the call (its context).
func (s *Server) watchToken(ctx context.Context, cancel context.CancelCauseFunc, tokenID string) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rec, err := s.store.LocalToken(tokenID)
		if err != nil || !rec.ValidAt(s.now()) {
			cancel(errors.New("API token revoked or expired"))
			return
		}
	}
}
