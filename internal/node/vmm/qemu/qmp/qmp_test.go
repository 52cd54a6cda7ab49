package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeQEMU serves one QMP connection on a unix socket with the given command handler. The
// handler gets the decoded request and writes raw lines to w.
func fakeQEMU(t *testing.T, handle func(req map[string]json.RawMessage, w *bufio.Writer)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		w := bufio.NewWriter(conn)
		fmt.Fprint(w, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`+"\r\n")
		w.Flush()
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			var req map[string]json.RawMessage
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				return
			}
			if string(req["execute"]) == `"qmp_capabilities"` {
				fmt.Fprintf(w, `{"return": {}, "id": %s}`+"\r\n", req["id"])
			} else {
				handle(req, w)
			}
			w.Flush()
		}
	}()
	return path
}

func TestCommandsEventsAndErrors(t *testing.T) {
	path := fakeQEMU(t, func(req map[string]json.RawMessage, w *bufio.Writer) {
		switch string(req["execute"]) {
		case `"query-status"`:
			// An event may arrive between a command and its reply.
			fmt.Fprint(w, `{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "STOP"}`+"\r\n")
			fmt.Fprintf(w, `{"return": {"status": "paused", "running": false}, "id": %s}`+"\r\n", req["id"])
		case `"bogus"`:
			fmt.Fprintf(w, `{"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}, "id": %s}`+"\r\n", req["id"])
		}
	})
	events := make(chan Event, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, path, func(e Event) { events <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	var st struct {
		Status string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "paused" {
		t.Fatalf("query-status = %+v, %v", st, err)
	}
	select {
	case e := <-events:
		if e.Name != "STOP" || e.Time.Unix() != 1700000000 {
			t.Errorf("event = %+v", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event delivered")
	}
	err = c.Execute(ctx, "bogus", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("bogus command error = %v", err)
	}
}

func TestNoReplyHonoursContext(t *testing.T) {
	path := fakeQEMU(t, func(map[string]json.RawMessage, *bufio.Writer) {}) // never answers
	c, err := Dial(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "quit", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Execute without a reply = %v, want deadline exceeded", err)
	}
}

func TestOversizedMessageClosesConnection(t *testing.T) {
	path := fakeQEMU(t, func(req map[string]json.RawMessage, w *bufio.Writer) {
		fmt.Fprintf(w, `{"return": "%s", "id": %s}`+"\r\n", strings.Repeat("x", MaxMessage+10), req["id"])
	})
	c, err := Dial(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("oversized reply gave %v, want ErrClosed", err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("connection not closed after an oversized message")
	}
}

func TestDialRejectsNonQMP(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err == nil {
			fmt.Fprint(conn, "hello, not qmp\n")
			time.Sleep(100 * time.Millisecond)
			conn.Close()
		}
	}()
	if _, err := Dial(context.Background(), path, nil); err == nil {
		t.Fatal("Dial accepted a server without a QMP greeting")
	}
}
