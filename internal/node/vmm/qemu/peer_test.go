package qemu

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

// A socket in a VMM's directory is talked to only if the VMM listens on it: a link there
// to another process's socket (what a VMM taken over by its guest could make) is refused.
func TestDialVMMChecksWhoListens(t *testing.T) {
	dir := t.TempDir()
	other := filepath.Join(dir, "other.sock")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	link := filepath.Join(dir, "qmp.sock")
	if err := os.Symlink(other, link); err != nil {
		t.Fatal(err)
	}
	// This process listens: as the "VMM" it is accepted, as anyone else refused.
	c, err := dialVMM(t.Context(), link, os.Getpid())
	if err != nil {
		t.Fatalf("the listener's own pid was refused: %v", err)
	}
	c.Close()
	if c, err := dialVMM(t.Context(), link, os.Getpid()+1); err == nil {
		c.Close()
		t.Fatal("a socket another process listens on was accepted as the VMM's")
	}
}
