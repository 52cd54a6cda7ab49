package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// BuildBinaries builds bin/fireworks and the static guest init into dir, from the module
// that contains this file, for end-to-end tests that drive the real programs; the static
// volume server goes beside them (where the agent looks for it).
func BuildBinaries(dir string) (fireworks, initBin string, err error) {
	_, self, _, _ := runtime.Caller(0)
	return BuildBinariesIn(filepath.Join(filepath.Dir(self), "..", ".."), dir)
}

// BuildBinariesIn is BuildBinaries of the source tree at modRoot (e.g. an earlier
// release checked out, for an upgrade test).
func BuildBinariesIn(modRoot, dir string) (fireworks, initBin string, err error) {
	fireworks = filepath.Join(dir, "fireworks")
	initBin = filepath.Join(dir, "fireworks-init")
	cmd := exec.Command("go", "build", "-o", fireworks, "./cmd/fireworks")
	cmd.Dir = modRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("go build fireworks: %v: %s", err, out)
	}
	for _, static := range []struct{ out, pkg string }{{initBin, "./cmd/fireworks-init"}, {filepath.Join(dir, "fireworks-volume-server"), "./cmd/fireworks-volume-server"}} {
		cmd = exec.Command("go", "build", "-trimpath", "-o", static.out, static.pkg)
		cmd.Dir = modRoot
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s: %v: %s", static.pkg, err, out)
		}
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
