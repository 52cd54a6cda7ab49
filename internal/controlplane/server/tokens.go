package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Join tokens are short-lived by default: they are handed to machines being set up, and a
// forgotten one should not stay a way into the cluster.
const defaultJoinTTL = 24 * time.Hour

type tokenService struct{ s *Server }

func (h *tokenService) CreateToken(ctx context.Context, req *connect.Request[pb.CreateTokenRequest]) (*connect.Response[pb.CreateTokenResponse], error) {
	who, err := requireAdmin(ctx, "creating a token")
	if err != nil {
		return nil, err
	}
	role := state.Role(req.Msg.GetRole())
	switch role {
	case "":
		role = state.RoleUser
	case state.RoleAdmin, state.RoleUser, state.RoleJoin, state.RoleIngress:
	default:
		return nil, toConnectError(invalid("role %q: want admin, user, join or ingress", req.Msg.GetRole()))
	}
	name := req.Msg.GetName()
	if len(name) > 64 || strings.IndexFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) }) >= 0 {
		return nil, toConnectError(invalid("token name %q: at most 64 characters, no control characters", name))
	}
	var ttl time.Duration
	if d := req.Msg.GetTtl(); d != nil {
		ttl = d.AsDuration()
	}
	if ttl < 0 || ttl > 10*365*24*time.Hour {
		return nil, toConnectError(invalid("token TTL %s must be between 0 (no expiry) and 10 years", ttl))
	}
	if role == state.RoleJoin && ttl == 0 {
		ttl = defaultJoinTTL
	}
	uses := int(req.Msg.GetMaxUses())
	switch {
	case uses < 0 || uses > 10000:
		return nil, toConnectError(invalid("uses %d: want 1..10000", uses))
	case uses > 0 && role != state.RoleJoin:
		return nil, toConnectError(invalid("uses: only join tokens are spent by use"))
	case uses == 0 && role == state.RoleJoin:
		uses = 1 // one host per token unless told otherwise: a leaked token joins nothing more
	}
	secret, rec := auth.New(role, name, who.TokenID, h.s.now(), ttl)
	rec.MaxUses = uses
	if role == state.RoleJoin {
		// A join token carries the cluster CA's fingerprint, so it needs the cluster CA.
		if h.s.cluster.CA == nil {
			return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("join tokens exist only on a cluster server (`fireworks server`); `fireworks dev` runs its own node"))
		}
		tok, id, hash := pki.NewJoinToken(h.s.cluster.CA)
		secret = tok
		rec.ID, rec.SecretHash = id, hash
	}
	if err := h.s.store.CreateToken(ctx, rec); err != nil {
		return nil, toConnectError(err)
	}
	h.s.log.Info("token created", "id", rec.ID, "role", rec.Role, "name", rec.Name, "by", who.TokenID)
	return connect.NewResponse(&pb.CreateTokenResponse{Token: tokenToPB(rec), Secret: secret}), nil
}

func (h *tokenService) ListTokens(ctx context.Context, _ *connect.Request[pb.ListTokensRequest]) (*connect.Response[pb.ListTokensResponse], error) {
	if _, err := requireAdmin(ctx, "listing tokens"); err != nil {
		return nil, err
	}
	toks, err := h.s.store.ListTokens(ctx)
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &pb.ListTokensResponse{}
	for _, t := range toks {
		resp.Tokens = append(resp.Tokens, tokenToPB(t))
	}
	return connect.NewResponse(resp), nil
}

func (h *tokenService) RevokeToken(ctx context.Context, req *connect.Request[pb.RevokeTokenRequest]) (*connect.Response[pb.RevokeTokenResponse], error) {
	who, err := requireAdmin(ctx, "revoking a token")
	if err != nil {
		return nil, err
	}
	id := req.Msg.GetId()
	if id == who.TokenID {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("token %s is the one making this call; revoke it with another admin token", id))
	}
	if err := h.s.store.DeleteToken(ctx, id); err != nil {
		return nil, toConnectError(err)
	}
	h.s.log.Info("token revoked", "id", id, "by", who.TokenID)
	return connect.NewResponse(&pb.RevokeTokenResponse{}), nil
}

func tokenToPB(t state.Token) *pb.Token {
	out := &pb.Token{Id: t.ID, Name: t.Name, Role: string(t.Role), CreatedAt: timestamppb.New(t.CreatedAt), CreatedBy: t.CreatedBy,
		MaxUses: int32(t.MaxUses), Uses: int32(t.Uses)}
	if !t.ExpiresAt.IsZero() {
		out.ExpiresAt = timestamppb.New(t.ExpiresAt)
	}
	return out
}

// EnsureAdminToken returns the admin token kept in file, creating it (and its record in
// the state) when the file is missing or names a token the state no longer has. This is
// how `fireworks dev` and a bootstrapping server get their first credential.
func EnsureAdminToken(ctx context.Context, store *state.Store, file, name string) (string, error) {
	if b, err := os.ReadFile(file); err == nil {
		tok := strings.TrimSpace(string(b))
		if id, secret, err := auth.Parse(tok); err == nil {
			if rec, err := store.GetToken(ctx, id); err == nil && auth.Verify(rec, secret, time.Now()) && rec.Role == state.RoleAdmin {
				return tok, nil
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read admin token %s: %w", file, err)
	}
	secret, rec := auth.New(state.RoleAdmin, name, "bootstrap", time.Now(), 0)
	if err := store.CreateToken(ctx, rec); err != nil {
		return "", fmt.Errorf("create admin token: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return "", err
	}
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, []byte(secret+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write admin token %s: %w", file, err)
	}
	if err := os.Rename(tmp, file); err != nil {
		return "", fmt.Errorf("write admin token %s: %w", file, err)
	}
	return secret, nil
}
