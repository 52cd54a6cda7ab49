package initd

import (
	"os"
	"os/signal"
	"syscall"
)

// Idle is init's idle program (proto.IdleCommand): it waits for SIGTERM, SIGINT or SIGHUP
// and exits 0. A stop of the sandbox signals it; nothing else does.
func Idle() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	<-c
	os.Exit(0)
}
