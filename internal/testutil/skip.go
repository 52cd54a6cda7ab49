// Package testutil holds helpers shared by tests across the project.
package testutil

import (
	"fmt"
	"os"
	"testing"
)

// RequireAllEnv, when set (CI sets it), turns every environment-dependent skip into a
// failure: a CI run where no VM could boot must not pass by skipping.
const RequireAllEnv = "FIREWORKS_REQUIRE_ALL"

// Skipf skips the test for a missing prerequisite, or fails it when RequireAllEnv is set.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv(RequireAllEnv) != "" {
		t.Fatalf("%s (required: %s is set)", msg, RequireAllEnv)
	}
	t.Skip(msg)
}
