package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// BuildGuestWeb builds the guest test server (./internal/testutil/guestweb: HTTP/1.1, h2c
// and a WebSocket echo) as a static binary into dir and returns its path, for images that
// run it inside sandboxes.
func BuildGuestWeb(dir string) (string, error) { return BuildGuestTool(dir, "guestweb") }

// BuildGuestTool builds the test program ./internal/testutil/NAME as a static binary into
// dir and returns its path, for images that run it inside sandboxes.
func BuildGuestTool(dir, name string) (string, error) {
	_, self, _, _ := runtime.Caller(0)
	modRoot := filepath.Join(filepath.Dir(self), "..", "..")
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./internal/testutil/"+name)
	cmd.Dir = modRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v: %s", name, err, b)
	}
	return out, nil
}
