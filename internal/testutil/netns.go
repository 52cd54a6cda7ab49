package testutil

import (
	"os"
	"os/exec"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// PrivateNetNS moves the calling test goroutine into a network namespace of its own, so
// that a test can play "the host" without touching the machine's interfaces: the
// goroutine keeps its OS thread, which leaves the machine's namespace, and commands it
// runs are forked from that thread. The thread is discarded when the test ends. It skips
// (naming what is missing) without root, iproute2 or busybox, which the network tests use.
func PrivateNetNS(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skipf(t, "network namespaces and eBPF need root")
	}
	for _, tool := range []string{"ip", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			Skipf(t, "%s not found (apt-get install iproute2 busybox-static)", tool)
		}
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatalf("unshare the network namespace: %v", err)
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("bring up lo in the private namespace: %v %s", err, out)
	}
}
