package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/guest/envd"
	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/processpb"
	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/processpb/processpbconnect"
)

// Every sandbox serves E2B's in-sandbox API (envd) from its fireworks-init on port
// 49983, for the holder of its access token: through a port-forward to a real guest, a
// Connect client runs a command (its output and exit code come back) and writes and
// reads a file over /files; without the token it is refused.
func TestEnvdInTheGuest(t *testing.T) {
	need(t)
	id, sb := startServer(t, "envd")
	token, _ := sb["access_token"].(string)
	if token == "" {
		t.Fatalf("inspect shows no access token: %v", sb)
	}
	port, _ := forwardPort(t, id, envd.Port)
	ctx := t.Context()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	do := func(method, path, tok string, body io.Reader) (int, string) {
		for i := 0; ; i++ {
			req, _ := http.NewRequest(method, base+path, body)
			if tok != "" {
				req.Header.Set("X-Access-Token", tok)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				if i < 100 {
					time.Sleep(100 * time.Millisecond) // the port-forward starting
					continue
				}
				t.Fatalf("%s %s: %v", method, path, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return resp.StatusCode, string(b)
		}
	}
	if code, _ := do(http.MethodGet, "/health", "", nil); code != http.StatusNoContent {
		t.Fatalf("/health: %d", code)
	}
	if code, _ := do(http.MethodGet, "/files?path=/etc/hostname", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("/files without the token: %d, want 401", code)
	}
	if code, out := do(http.MethodPost, "/files?path=/tmp/e2b/note.txt", token, strings.NewReader("from-envd")); code != http.StatusOK {
		t.Fatalf("write a file: %d %s", code, out)
	}
	if code, out := do(http.MethodGet, "/files?path=/tmp/e2b/note.txt", token, nil); code != http.StatusOK || out != "from-envd" {
		t.Fatalf("read it back: %d %q", code, out)
	}
	client := processpbconnect.NewProcessClient(http.DefaultClient, base)
	req := connect.NewRequest(&processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "cat /tmp/e2b/note.txt; echo; hostname; exit 7"}}})
	req.Header().Set("X-Access-Token", token)
	sctx, scancel := context.WithTimeout(ctx, time.Minute)
	defer scancel()
	st, err := client.Start(sctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	code := int32(-100)
	for st.Receive() {
		e := st.Msg().GetEvent()
		out.Write(e.GetData().GetStdout())
		if end := e.GetEnd(); end != nil {
			code = end.GetExitCode()
		}
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "from-envd\n") || code != 7 {
		t.Fatalf("a command through envd: %q, exit %d", out.String(), code)
	}
	// And the file is the guest's: the sandbox's own exec sees it.
	if r := fw(t, 0, "exec", id, "--", "cat", "/tmp/e2b/note.txt"); r.stdout != "from-envd" {
		t.Fatalf("the guest's file: %q", r.stdout)
	}
}
