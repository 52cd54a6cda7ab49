package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/api/fireworksv1/fireworksv1connect"
)

// ClientConfig is where the CLI finds the server and its token. `fireworks dev` writes it.
type ClientConfig struct {
	Server string `json:"server"`
	Token  string `json:"token"`
}

// DefaultServer is the address `fireworks dev` listens on by default.
const DefaultServer = "http://127.0.0.1:7766"

// ConfigPath is the CLI config file: $FIREWORKS_CONFIG, else $XDG_CONFIG_HOME/fireworks/config.json.
func ConfigPath() string {
	if p := os.Getenv("FIREWORKS_CONFIG"); p != "" {
		return p
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		dir = "/etc"
	}
	return filepath.Join(dir, "fireworks", "config.json")
}

// LoadClientConfig reads the config file, then lets the environment and flags override it.
func LoadClientConfig(flagServer, flagToken string) (ClientConfig, error) {
	cfg := ClientConfig{Server: DefaultServer}
	data, err := os.ReadFile(ConfigPath())
	switch {
	case err == nil:
		if err := json.Unmarshal(data, &cfg); err != nil {
			return cfg, fmt.Errorf("parse CLI config %s: %w", ConfigPath(), err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return cfg, fmt.Errorf("read CLI config %s: %w", ConfigPath(), err)
	}
	if v := os.Getenv("FIREWORKS_SERVER"); v != "" {
		cfg.Server = v
	}
	if v := os.Getenv("FIREWORKS_TOKEN"); v != "" {
		cfg.Token = v
	}
	if flagServer != "" {
		cfg.Server = flagServer
	}
	if flagToken != "" {
		cfg.Token = flagToken
	}
	if !strings.Contains(cfg.Server, "://") {
		cfg.Server = "http://" + cfg.Server
	}
	return cfg, nil
}

// SaveClientConfig writes the config file readable by its owner only (it holds a token).
func SaveClientConfig(cfg ClientConfig) error {
	p := ConfigPath()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("create CLI config directory: %w", err)
	}
	data, _ := json.MarshalIndent(cfg, "", "  ")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("write CLI config %s: %w", p, err)
	}
	return os.Rename(tmp, p)
}

// Client bundles the API clients.
type Client struct {
	Sandboxes fireworksv1connect.SandboxServiceClient
	Images    fireworksv1connect.ImageServiceClient
	System    fireworksv1connect.SystemServiceClient
	Tokens    fireworksv1connect.TokenServiceClient
	Server    string
}

// NewClient connects (lazily) to the server. HTTP/2 without TLS carries the bidirectional
// attach and exec streams.
func NewClient(cfg ClientConfig) *Client {
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protocols, DialContext: (&net.Dialer{}).DialContext}
	hc := &http.Client{Transport: tr}
	opts := []connect.ClientOption{connect.WithInterceptors(bearer(cfg.Token)), connect.WithReadMaxBytes(64 << 20)}
	return &Client{
		Sandboxes: fireworksv1connect.NewSandboxServiceClient(hc, cfg.Server, opts...),
		Images:    fireworksv1connect.NewImageServiceClient(hc, cfg.Server, opts...),
		System:    fireworksv1connect.NewSystemServiceClient(hc, cfg.Server, opts...),
		Tokens:    fireworksv1connect.NewTokenServiceClient(hc, cfg.Server, opts...),
		Server:    cfg.Server,
	}
}

type bearerInterceptor struct{ token string }

func bearer(token string) connect.Interceptor { return bearerInterceptor{token} }

func (b bearerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Authorization", "Bearer "+b.token)
		return next(ctx, req)
	}
}

func (b bearerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		conn.RequestHeader().Set("Authorization", "Bearer "+b.token)
		return conn
	}
}

func (b bearerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
