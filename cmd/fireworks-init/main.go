// Command fireworks-init is PID 1 inside every Fireworks guest. It is built
// static (CGO_ENABLED=0) and placed at /init in the initramfs.
package main

import (
	"fmt"
	"os"
	"runtime/debug"

	"github.com/fireworks-sandbox/fireworks/internal/guest/initd"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if len(os.Args) == 1 && os.Args[0] == proto.IdleCommand {
		initd.Idle() // the main process of a sandbox with no command of its own
		return
	}
	if len(os.Args) > 1 && os.Args[0] == proto.BuildCommand {
		os.Exit(initd.Build(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "fireworks-init: must run as PID 1 inside a Fireworks guest")
		os.Exit(2)
	}
	// Collect garbage only near a memory limit, not on every doubling of a small heap:
	// under software emulation a GC cycle in the middle of a start costs milliseconds, and
	// init's heap stays small (frames are bounded, output is streamed).
	debug.SetGCPercent(-1)
	debug.SetMemoryLimit(32 << 20)
	initd.Main(version)
}
