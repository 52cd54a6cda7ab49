package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/unpack"
)

// crunBundle unpacks img into an OCI runtime bundle under dir whose process is command,
// so crun runs exactly what the sandboxes run.
func crunBundle(ctx context.Context, img v1.Image, dir string, command []string) (string, error) {
	if _, err := exec.LookPath("crun"); err != nil {
		return "", fmt.Errorf("crun not found (install the crun package, or pass -skip-crun): %w", err)
	}
	rootfs := filepath.Join(dir, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		return "", err
	}
	u, err := unpack.New(rootfs, unpack.Limits{}, nil)
	if err != nil {
		return "", fmt.Errorf("open crun rootfs %s: %w", rootfs, err)
	}
	defer u.Close()
	layers, err := img.Layers()
	if err != nil {
		return "", fmt.Errorf("bench image layers: %w", err)
	}
	for i, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			return "", fmt.Errorf("layer %d: %w", i+1, err)
		}
		err = u.Apply(ctx, rc)
		rc.Close()
		if err != nil {
			return "", fmt.Errorf("unpack layer %d for crun: %w", i+1, err)
		}
	}
	// Start from crun's own default spec and change only the process.
	spec := exec.CommandContext(ctx, "crun", "spec")
	spec.Dir = dir
	if out, err := spec.CombinedOutput(); err != nil {
		return "", fmt.Errorf("crun spec: %w: %s", err, out)
	}
	path := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var cfg map[string]any
	if err := json.Unmarshal(data, &cfg); err != nil {
		return "", fmt.Errorf("parse crun spec %s: %w", path, err)
	}
	proc, _ := cfg["process"].(map[string]any)
	if proc == nil {
		return "", fmt.Errorf("crun spec %s has no process", path)
	}
	proc["args"] = command
	proc["terminal"] = false
	data, _ = json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return "", err
	}
	return dir, nil
}
