package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// BuildBinaries builds bin/fireworks and the static guest init into dir, from the module
// that contains this file, for end-to-end tests that drive the real programs.
func BuildBinaries(dir string) (fireworks, initBin string, err error) {
	_, self, _, _ := runtime.Caller(0)
	modRoot := filepath.Join(filepath.Dir(self), "..", "..")
	fireworks = filepath.Join(dir, "fireworks")
	initBin = filepath.Join(dir, "fireworks-init")
	cmd := exec.Command("go", "build", "-o", fireworks, "./cmd/fireworks")
	cmd.Dir = modRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("go build fireworks: %v: %s", err, out)
	}
	cmd = exec.Command("go", "build", "-trimpath", "-o", initBin, "./cmd/fireworks-init")
	cmd.Dir = modRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("go build fireworks-init: %v: %s", err, out)
	}
	return fireworks, initBin, nil
}

// AssetCache is where end-to-end tests keep the guest kernel between runs (the first run
// fetches it with apt-get): $FIREWORKS_TEST_ASSETS or /var/tmp/fireworks-test-assets.
func AssetCache() string {
	if d := os.Getenv("FIREWORKS_TEST_ASSETS"); d != "" {
		return d
	}
	return "/var/tmp/fireworks-test-assets"
}
