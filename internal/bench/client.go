package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
)

// apiClient talks to the bench's own `fireworks dev` in-process, so a measured start
// contains the API call and nothing of a CLI process starting up.
type apiClient struct {
	sandboxes fireworksv1connect.SandboxServiceClient
	images    fireworksv1connect.ImageServiceClient
	system    fireworksv1connect.SystemServiceClient
	http      *http.Client
}

// devClientConfig is the part of the CLI config file (written by `fireworks dev`) the
// bench needs.
type devClientConfig struct {
	Server string `json:"server"`
	Token  string `json:"token"`
}

// newAPIClient reads the server address and token from the CLI config file at path. The
// dev server speaks plain HTTP; HTTP/2 without TLS carries the bidirectional attach and
// exec streams.
func newAPIClient(path string) (*apiClient, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read dev server config %s: %w", path, err)
	}
	var cfg devClientConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("parse dev server config %s: %w", path, err)
	}
	if cfg.Server == "" || cfg.Token == "" {
		return nil, fmt.Errorf("dev server config %s lacks the server address or token", path)
	}
	base := cfg.Server
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	if strings.HasPrefix(base, "https://") {
		return nil, fmt.Errorf("dev server config %s: the bench speaks plain HTTP to its own dev server, not %s", path, base)
	}
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: &protocols}}
	opts := []connect.ClientOption{connect.WithInterceptors(bearerToken(cfg.Token))}
	return &apiClient{
		sandboxes: fireworksv1connect.NewSandboxServiceClient(hc, base, opts...),
		images:    fireworksv1connect.NewImageServiceClient(hc, base, opts...),
		system:    fireworksv1connect.NewSystemServiceClient(hc, base, opts...),
		http:      hc,
	}, nil
}

func (c *apiClient) close() { c.http.CloseIdleConnections() }

// bearerToken adds the token to every call, unary and streaming.
type bearerToken string

func (t bearerToken) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Authorization", "Bearer "+string(t))
		return next(ctx, req)
	}
}

func (t bearerToken) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		conn.RequestHeader().Set("Authorization", "Bearer "+string(t))
		return conn
	}
}

func (t bearerToken) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
