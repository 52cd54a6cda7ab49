package peeruid

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// A connection from this process's user is admitted; one from another local user (here
// nobody, through setpriv) is closed before anything is read or written.
func TestSameUser(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "switching to another user for the test needs root")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := SameUser(ln, nil)
	defer l.Close()
	got := make(chan string, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("admitted\n"))
			c.Close()
			got <- "admitted"
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	// The clients keep their side open for a moment, as a real one (Envoy, a gRPC
	// client) does.
	out, err := exec.Command("sh", "-c", "sleep 1 | busybox nc -w 3 127.0.0.1 "+port).CombinedOutput()
	if err != nil || string(out) != "admitted\n" {
		t.Fatalf("this user's connection: %v %q", err, out)
	}
	<-got
	out, _ = exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", "sleep 1 | busybox nc -w 3 127.0.0.1 "+port).CombinedOutput()
	if string(out) == "admitted\n" {
		t.Fatalf("another user's connection was admitted")
	}
	select {
	case <-got:
		t.Fatal("another user's connection reached Accept's caller")
	case <-time.After(500 * time.Millisecond):
	}
}

func TestParse(t *testing.T) {
	a, err := parse("0100007F:1F90")
	if err != nil || a.String() != "127.0.0.1:8080" {
		t.Errorf("parse: %v %v", a, err)
	}
	b, err := parse("00000000000000000000000001000000:0050")
	if err != nil || b.String() != "[::1]:80" {
		t.Errorf("parse v6: %v %v", b, err)
	}
}
