package testutil

import (
	"testing"
	"time"
)

// Eventually polls check every 200 ms until it reports true, and fails the test with
// what it last saw once timeout has passed.
func Eventually(t testing.TB, timeout time.Duration, what string, check func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, got := check()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s after %s", what, got, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
