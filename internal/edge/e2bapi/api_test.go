package e2bapi

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/server"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// world is the API in front of a real in-process Fireworks server (its state in Raft,
// its auth) without nodes: sandboxes made here stay pending, which E2B calls running.
type world struct {
	api         *httptest.Server
	fw          *client.Client
	admin, user string
	other       string // a second user
}

func newWorld(t *testing.T) *world {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	store, err := state.Open(ctx, state.Options{Dir: t.TempDir(), NodeID: "test", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	srv := server.New(store, log)
	// The server as it serves (h2c: the client speaks HTTP/2 without TLS to it).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(sctx, ln) }()
	t.Cleanup(func() { stop(); <-done })
	w := &world{}
	for i, r := range []state.Role{state.RoleAdmin, state.RoleUser, state.RoleUser} {
		secret, rec := auth.New(r, string(r), "", time.Now(), 0)
		if err := store.CreateToken(ctx, rec); err != nil {
			t.Fatal(err)
		}
		switch i {
		case 0:
			w.admin = secret
		case 1:
			w.user = secret
		case 2:
			w.other = secret
		}
	}
	if w.fw, err = client.New(client.Config{Server: "http://" + ln.Addr().String()}); err != nil {
		t.Fatal(err)
	}
	api := New(Config{Servers: w.fw, Domain: "e2b.test", Log: log, BuildDir: t.TempDir()})
	w.api = httptest.NewServer(api)
	t.Cleanup(api.Close) // after the server's close (cleanups run last first)
	t.Cleanup(w.api.Close)
	return w
}

func (w *world) call(t *testing.T, method, path, key, body string) (int, string, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, w.api.URL+path, strings.NewReader(body))
	if key != "" {
		req.Header.Set("X-API-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func (w *world) want(t *testing.T, method, path, key, body string, code int) string {
	t.Helper()
	got, out, _ := w.call(t, method, path, key, body)
	if got != code {
		t.Errorf("%s %s: %d %s, want %d", method, path, got, out, code)
	}
	if got >= 400 {
		var e struct {
			Code    int
			Message string
		}
		if err := json.Unmarshal([]byte(out), &e); err != nil || e.Code != got || e.Message == "" {
			t.Errorf("%s %s: error body %q is not E2B's {code, message}", method, path, out)
		}
	}
	return out
}

// pending makes a sandbox the way the API would, through the Fireworks API as key.
func (w *world) pending(t *testing.T, key string, meta map[string]string) string {
	t.Helper()
	req := connect.NewRequest(&pb.CreateSandboxRequest{Spec: &pb.SandboxSpec{Image: "busybox", KeepAlive: true, Metadata: meta,
		Ports: []*pb.Port{{All: true, Public: true}}}})
	resp, err := w.fw.WithToken(key).Sandboxes.CreateSandbox(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Msg.GetSandbox().GetId()
}

func TestAuthAndErrors(t *testing.T) {
	w := newWorld(t)
	w.want(t, "GET", "/v2/sandboxes", "", "", http.StatusUnauthorized)
	w.want(t, "GET", "/v2/sandboxes", "fwk_0000000000000000_"+strings.Repeat("00", 32), "", http.StatusUnauthorized)
	w.want(t, "GET", "/v2/sandboxes", strings.Repeat("k", 600), "", http.StatusUnauthorized)
	w.want(t, "POST", "/sandboxes", w.user, "{", http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes", w.user, `{}`, http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes", w.user, `{"templateID":"nope"}`, http.StatusNotFound)
	w.want(t, "POST", "/sandboxes", w.user, `{"templateID":"x","mcp":{"a":1}}`, http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes", w.user, `{"templateID":"x","timeout":-1}`, http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes", w.user, `{"templateID":"x","timeout":99999999}`, http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes", w.user, `{"templateID":"x","network":{"allowOut":["example.com"]}}`, http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes", w.user, `{"templateID":"x","`+strings.Repeat("a", 2<<20)+`":1}`, http.StatusBadRequest)
	w.want(t, "GET", "/sandboxes/0123456789abcdef", w.user, "", http.StatusNotFound)
	w.want(t, "GET", "/sandboxes/..%2f..%2fetc", w.user, "", http.StatusNotFound)
	w.want(t, "DELETE", "/sandboxes/0123456789abcdef", w.user, "", http.StatusNotFound)
	w.want(t, "POST", "/sandboxes/0123456789abcdef/timeout", w.user, `{"timeout":10}`, http.StatusNotFound)
	w.want(t, "GET", "/templates/nope", w.user, "", http.StatusNotFound)
}

// Sandboxes, templates and snapshots are the key's own: another user's are not found,
// listed or changed.
func TestTenantsAndListing(t *testing.T) {
	w := newWorld(t)
	mine := w.pending(t, w.user, map[string]string{"team": "a", "run": "1"})
	mine2 := w.pending(t, w.user, map[string]string{"team": "a", "run": "2"})
	theirs := w.pending(t, w.other, map[string]string{"team": "a"})

	var items []map[string]any
	if err := json.Unmarshal([]byte(w.want(t, "GET", "/v2/sandboxes?metadata=team%3Da", w.user, "", http.StatusOK)), &items); err != nil {
		t.Fatal(err)
	}
	if len(items) != 2 || items[0]["sandboxID"] != mine2 || items[1]["sandboxID"] != mine || items[0]["state"] != "running" {
		t.Errorf("the user's listing (newest first): %v", items)
	}
	if err := json.Unmarshal([]byte(w.want(t, "GET", "/v2/sandboxes?metadata=run%3D1&state=running", w.user, "", http.StatusOK)), &items); err != nil || len(items) != 1 || items[0]["sandboxID"] != mine {
		t.Errorf("filtered by metadata: %v %v", items, err)
	}
	if err := json.Unmarshal([]byte(w.want(t, "GET", "/v2/sandboxes?state=paused", w.user, "", http.StatusOK)), &items); err != nil || len(items) != 0 {
		t.Errorf("paused ones: %v %v", items, err)
	}
	w.want(t, "GET", "/v2/sandboxes?state=exploded", w.user, "", http.StatusBadRequest)
	// Pages of one.
	_, body, hdr := w.call(t, "GET", "/v2/sandboxes?limit=1", w.user, "")
	if next := hdr.Get("X-Next-Token"); next != mine2 || !strings.Contains(body, mine2) {
		t.Errorf("page 1: next %q, %s", next, body)
	}
	_, body, hdr = w.call(t, "GET", "/v2/sandboxes?limit=1&nextToken="+mine2, w.user, "")
	if hdr.Get("X-Next-Token") != "" || !strings.Contains(body, mine) {
		t.Errorf("page 2: next %q, %s", hdr.Get("X-Next-Token"), body)
	}

	w.want(t, "GET", "/sandboxes/"+theirs, w.user, "", http.StatusNotFound)
	w.want(t, "DELETE", "/sandboxes/"+theirs, w.user, "", http.StatusNotFound)
	w.want(t, "POST", "/sandboxes/"+theirs+"/timeout", w.user, `{"timeout":1}`, http.StatusNotFound)
	w.want(t, "POST", "/sandboxes/"+theirs+"/pause", w.user, ``, http.StatusNotFound)
	w.want(t, "PUT", "/sandboxes/"+theirs+"/network", w.user, `{"allow_internet_access":false}`, http.StatusNotFound)
	// An admin's key acts on its own sandboxes only, here as everywhere in E2B's API.
	w.want(t, "GET", "/sandboxes/"+theirs, w.admin, "", http.StatusNotFound)
	w.want(t, "DELETE", "/sandboxes/"+theirs, w.admin, "", http.StatusNotFound)
	w.want(t, "POST", "/sandboxes/"+theirs+"/timeout", w.admin, `{"timeout":60}`, http.StatusNotFound)
	if body := w.want(t, "GET", "/v2/sandboxes", w.admin, "", http.StatusOK); strings.TrimSpace(body) != "[]" {
		t.Errorf("an admin's key lists other tokens' sandboxes: %s", body)
	}
	w.want(t, "POST", "/sandboxes/"+theirs+"/refreshes", w.other, `{"duration":0}`, http.StatusBadRequest)
	w.want(t, "POST", "/sandboxes/"+theirs+"/timeout", w.other, `{"timeout":0}`, http.StatusBadRequest)
	detail := w.want(t, "GET", "/sandboxes/"+theirs, w.other, "", http.StatusOK)
	if !strings.Contains(detail, `"envdAccessToken"`) || !strings.Contains(detail, `"team":"a"`) {
		t.Errorf("the owner's detail: %s", detail)
	}

	// A timeout moves the end; a kill removes the sandbox.
	w.want(t, "POST", "/sandboxes/"+mine+"/timeout", w.user, `{"timeout":3600}`, http.StatusNoContent)
	var d map[string]any
	_ = json.Unmarshal([]byte(w.want(t, "GET", "/sandboxes/"+mine, w.user, "", http.StatusOK)), &d)
	if end, _ := time.Parse(time.RFC3339Nano, d["endAt"].(string)); time.Until(end) < 59*time.Minute || time.Until(end) > time.Hour {
		t.Errorf("endAt after a timeout of an hour: %v", d["endAt"])
	}
	w.want(t, "DELETE", "/sandboxes/"+mine, w.user, "", http.StatusNoContent)
	w.want(t, "GET", "/sandboxes/"+mine, w.user, "", http.StatusNotFound)
	w.want(t, "DELETE", "/sandboxes/"+mine, w.user, "", http.StatusNotFound)

	// Templates: the user's own, by name.
	req := connect.NewRequest(&pb.CreateTemplateRequest{Template: &pb.NamedTemplate{Name: "base", Image: "busybox"}})
	if _, err := w.fw.WithToken(w.other).Templates.CreateTemplate(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	if body := w.want(t, "GET", "/templates", w.user, "", http.StatusOK); strings.TrimSpace(body) != "[]" {
		t.Errorf("another user's templates listed: %s", body)
	}
	w.want(t, "GET", "/templates/base", w.user, "", http.StatusNotFound)
	w.want(t, "DELETE", "/templates/base", w.user, "", http.StatusNotFound)
	if body := w.want(t, "GET", "/templates/base", w.other, "", http.StatusOK); !strings.Contains(body, `"names":["base"]`) {
		t.Errorf("the owner's template: %s", body)
	}
	w.want(t, "DELETE", "/templates/base", w.other, "", http.StatusNoContent)
}
