package bench

import (
	"fmt"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// apiClient talks to the bench's own `fireworks dev` in-process, so a measured start
// contains the API call and nothing of a CLI process starting up.
type apiClient struct {
	sandboxes fireworksv1connect.SandboxServiceClient
	images    fireworksv1connect.ImageServiceClient
	templates fireworksv1connect.TemplateServiceClient
	volumes   fireworksv1connect.VolumeServiceClient
	system    fireworksv1connect.SystemServiceClient
	tokens    fireworksv1connect.TokenServiceClient
	cluster   fireworksv1connect.ClusterServiceClient
}

// newAPIClient connects with the server address and token of the CLI config file at
// path, which the bench's dev server wrote.
func newAPIClient(path string) (*apiClient, error) {
	cfg, err := client.ReadConfig(path)
	if err != nil {
		return nil, err
	}
	if cfg.Server == "" || cfg.Token == "" {
		return nil, fmt.Errorf("dev server config %s lacks the server address or token", path)
	}
	if strings.HasPrefix(cfg.Server, "https://") {
		return nil, fmt.Errorf("dev server config %s: the bench speaks plain HTTP to its own dev server, not %s", path, cfg.Server)
	}
	c, err := newAPIClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("dev server config %s: %w", path, err)
	}
	return c, nil
}

// newAPIClientFor connects to the servers cfg names (the bench cluster's, over TLS).
func newAPIClientFor(cfg client.Config) (*apiClient, error) {
	c, err := client.New(cfg)
	if err != nil {
		return nil, err
	}
	return &apiClient{sandboxes: c.Sandboxes, images: c.Images, volumes: c.Volumes, templates: c.Templates, system: c.System, tokens: c.Tokens, cluster: c.Cluster}, nil
}
