package e2bapi

import (
	"bufio"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
)

// upload PUTs body to an upload link's URL with its headers (as the SDK does).
func upload(t *testing.T, link map[string]any, token, body string, length int64) int {
	t.Helper()
	u, err := url.Parse(link["url"].(string))
	if err != nil {
		t.Fatal(err)
	}
	// Written by hand: Go's client sends no Content-Length it cannot keep, and a
	// hostile one must be answered too.
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	head := "PUT " + u.RequestURI() + " HTTP/1.1\r\nHost: " + u.Host + "\r\nConnection: close\r\n"
	if token != "" {
		head += uploadTokenHeader + ": " + token + "\r\n"
	}
	if length >= 0 {
		head += "Content-Length: " + strconv.FormatInt(length, 10) + "\r\n"
	} else {
		head += "Transfer-Encoding: chunked\r\n"
		body = strconv.FormatInt(int64(len(body)), 16) + "\r\n" + body + "\r\n0\r\n\r\n"
	}
	if _, err := conn.Write([]byte(head + "\r\n" + body)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// startBuild starts a build of template name as key; it returns the build's ID.
func (w *world) startBuild(t *testing.T, key, name string) string {
	t.Helper()
	var started struct{ TemplateID, BuildID string }
	if err := json.Unmarshal([]byte(w.want(t, "POST", "/v3/templates", key, `{"name":"`+name+`","cpuCount":1,"memoryMB":512}`, http.StatusAccepted)), &started); err != nil || started.BuildID == "" {
		t.Fatalf("request build: %+v %v", started, err)
	}
	if n, _, _ := strings.Cut(name, ":"); started.TemplateID != n {
		t.Errorf("templateID %q for a build of %q", started.TemplateID, name)
	}
	return started.BuildID
}

// buildState is a build's status as key sees it.
func (w *world) buildState(t *testing.T, key, name, id string) (string, string) {
	t.Helper()
	var st struct {
		Status string
		Reason struct{ Message string }
	}
	if err := json.Unmarshal([]byte(w.want(t, "GET", "/templates/"+name+"/builds/"+id+"/status", key, "", http.StatusOK)), &st); err != nil {
		t.Fatal(err)
	}
	return st.Status, st.Reason.Message
}

// The build calls up to the point where a sandbox would run the steps (this world has no
// node: e2e TestE2BSDK runs whole builds): the key's own builds, uploads by the build's
// token only and bounded, steps checked before anything runs (a refused build ends),
// builds bounded per key.
func TestBuildRequests(t *testing.T) {
	w := newWorld(t)
	w.want(t, "POST", "/v3/templates", "", `{"name":"app"}`, http.StatusUnauthorized)
	w.want(t, "POST", "/v3/templates", "fwk_0000000000000000_"+strings.Repeat("00", 32), `{"name":"app"}`, http.StatusUnauthorized)
	w.want(t, "POST", "/v3/templates", w.user, `{"name":"../x"}`, http.StatusBadRequest)
	w.want(t, "POST", "/v3/templates", w.user, `{"name":"app","cpuCount":1000}`, http.StatusBadRequest)
	build := w.startBuild(t, w.user, "app:v1")
	base := "/templates/app"
	hash := strings.Repeat("ab", 32)
	// A key with the user's token ID and another secret is not the user's: the edge
	// gives a build back only to the key that started it.
	id, _, err := auth.Parse(w.user)
	if err != nil {
		t.Fatal(err)
	}
	forged := "fwk_" + id + "_" + strings.Repeat("00", 32)
	w.want(t, "GET", base+"/files/"+hash, forged, "", http.StatusNotFound)
	w.want(t, "GET", base+"/files/NOT-HEX", w.user, "", http.StatusBadRequest)
	w.want(t, "GET", base+"/files/"+hash, w.other, "", http.StatusNotFound)
	var link map[string]any
	_ = json.Unmarshal([]byte(w.want(t, "GET", base+"/files/"+hash, w.user, "", http.StatusOK)), &link)
	if link["present"] != false || link["url"] == nil {
		t.Fatalf("upload link: %v", link)
	}
	token := link["headers"].(map[string]any)[uploadTokenHeader].(string)
	if code := upload(t, link, "", "data", 4); code != http.StatusNotFound {
		t.Errorf("upload without the build's token: %d", code)
	}
	if code := upload(t, link, strings.Repeat("0", len(token)), "data", 4); code != http.StatusNotFound {
		t.Errorf("upload with a wrong token: %d", code)
	}
	if code := upload(t, link, token, "data", maxBuildBytes+1); code != http.StatusRequestEntityTooLarge {
		t.Errorf("upload past the build's bound: %d", code)
	}
	if code := upload(t, link, token, "data", -1); code != http.StatusLengthRequired {
		t.Errorf("upload without a length: %d", code)
	}
	if code := upload(t, link, token, "data", 4); code != http.StatusOK {
		t.Fatalf("upload: %d", code)
	}
	if body := w.want(t, "GET", base+"/files/"+hash, w.user, "", http.StatusOK); !strings.Contains(body, `"present":true`) {
		t.Errorf("an uploaded hash: %s", body)
	}
	if code := upload(t, link, token, "bigger", 6); code != http.StatusConflict {
		t.Errorf("a second upload of the same files: %d", code)
	}

	trigger := func(id string) string { return "/v2/templates/app/builds/" + id }
	w.want(t, "POST", trigger(build), w.other, `{"fromImage":"busybox"}`, http.StatusNotFound)
	w.want(t, "POST", trigger(build), forged, `{"fromImage":"busybox"}`, http.StatusNotFound)
	w.want(t, "POST", "/v2/templates/app/builds/0123", w.user, `{"fromImage":"busybox"}`, http.StatusNotFound)
	// Each refusal ends its build, with the reason as its status.
	for _, bad := range []string{
		`{}`,
		`{"fromImage":"busybox","fromImageRegistry":{"type":"registry","username":"u","password":"p"}}`,
		`{"fromImage":"busybox","steps":[{"type":"HEALTHCHECK","args":["x"]}]}`,
		`{"fromImage":"busybox","steps":[{"type":"COPY","args":["a","/a"],"filesHash":"` + strings.Repeat("cd", 32) + `"}]}`,
		`{"fromImage":"busybox","steps":[{"type":"ENV","args":["A"]}]}`,
		`{"fromImage":"busybox","steps":[{"type":"ENV","args":["A=B","c"]}]}`,
	} {
		refused := w.startBuild(t, w.user, "app")
		w.want(t, "POST", trigger(refused), w.user, bad, http.StatusBadRequest)
		if st, why := w.buildState(t, w.user, "app", refused); st != "error" || why == "" {
			t.Errorf("a build refused for %s: %s %q", bad, st, why)
		}
	}
	if st, _ := w.buildState(t, w.user, "app", build); st != "waiting" {
		t.Errorf("a build waiting for its steps: %s", st)
	}
	// Files uploaded to one build of a template serve another of it (the SDK names the
	// template, not the build).
	sibling := w.startBuild(t, w.user, "app:v2")
	if body := w.want(t, "GET", base+"/files/"+hash, w.user, "", http.StatusOK); !strings.Contains(body, `"present":true`) {
		t.Errorf("files another build of the template has: %s", body)
	}
	steps := `{"fromImage":"busybox","steps":[{"type":"COPY","args":["a","/a"],"filesHash":"` + hash + `"},{"type":"RUN","args":["true"]}]}`
	w.want(t, "POST", trigger(sibling), w.user, steps, http.StatusAccepted)
	w.want(t, "POST", trigger(build), w.user, steps, http.StatusAccepted)
	w.want(t, "POST", trigger(build), w.user, steps, http.StatusConflict)
	if code := upload(t, link, token, "late", 4); code != http.StatusConflict {
		t.Errorf("an upload to a build under way: %d", code)
	}
	status := base + "/builds/" + build + "/status"
	w.want(t, "GET", status, w.other, "", http.StatusNotFound)
	w.want(t, "GET", status, forged, "", http.StatusNotFound)
	w.want(t, "GET", status+"?logsOffset=-1", w.user, "", http.StatusBadRequest)
	var st struct {
		Status     string
		LogEntries []map[string]any
	}
	if err := json.Unmarshal([]byte(w.want(t, "GET", status, w.user, "", http.StatusOK)), &st); err != nil || st.Status != "building" || len(st.LogEntries) == 0 {
		t.Errorf("status of a build under way: %+v %v", st, err)
	}

	// Two builds run per key at most (these two wait for a node that never comes); a
	// third is refused, and over.
	third := w.startBuild(t, w.user, "third")
	w.want(t, "POST", "/v2/templates/third/builds/"+third, w.user, `{"fromImage":"busybox"}`, http.StatusTooManyRequests)
	other := w.startBuild(t, w.other, "third")
	w.want(t, "POST", "/v2/templates/third/builds/"+other, w.other, `{"fromImage":"busybox"}`, http.StatusAccepted)
	// Builds waiting for their steps: a key's oldest give way to its new ones.
	var waiting []string
	for range maxWaitingPerKey + 1 {
		waiting = append(waiting, w.startBuild(t, w.user, "idle"))
	}
	w.want(t, "GET", "/templates/idle/builds/"+waiting[0]+"/status", w.user, "", http.StatusNotFound)
	w.want(t, "POST", "/v2/templates/idle/builds/"+waiting[0], w.user, `{"fromImage":"busybox"}`, http.StatusNotFound)
	if st, _ := w.buildState(t, w.user, "idle", waiting[maxWaitingPerKey]); st != "waiting" {
		t.Errorf("the newest waiting build: %s", st)
	}

	w.want(t, "GET", "/templates/aliases/app", w.user, "", http.StatusNotFound)
}

// Ended builds keep their status for a while, but only so many: a key that starts and
// fails builds in a loop cannot grow the edge's memory.
func TestEndedBuildsAreBounded(t *testing.T) {
	w := newWorld(t)
	first := ""
	for i := range maxEndedPerOwner + 2 {
		var started struct{ BuildID string }
		if err := json.Unmarshal([]byte(w.want(t, "POST", "/v3/templates", w.other, `{"name":"loop"}`, http.StatusAccepted)), &started); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = started.BuildID
		}
		// A base template that does not exist: the build fails at once.
		w.want(t, "POST", "/v2/templates/loop/builds/"+started.BuildID, w.other, `{"fromTemplate":"nope"}`, http.StatusAccepted)
		status := "/templates/loop/builds/" + started.BuildID + "/status"
		for deadline := time.Now().Add(10 * time.Second); ; {
			body := w.want(t, "GET", status, w.other, "", http.StatusOK)
			if strings.Contains(body, `"status":"error"`) {
				if !strings.Contains(body, `"step":"base"`) || !strings.Contains(body, "nope") {
					t.Errorf("a build from a template that does not exist: %s", body)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the build did not fail: %s", body)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	w.want(t, "GET", "/templates/loop/builds/"+first+"/status", w.other, "", http.StatusNotFound)
}
