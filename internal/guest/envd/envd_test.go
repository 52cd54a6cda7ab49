package envd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/fireworks-sandbox/fireworks/internal/guest/envd/filesystempb"
	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/filesystempb/filesystempbconnect"
	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/processpb"
	"github.com/fireworks-sandbox/fireworks/internal/guest/envd/processpb/processpbconnect"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// These tests run the envd server in the test process, on real processes and files of
// the host (hostSpawner, a home directory of the test's), through real Connect clients
// over HTTP/1.1 as the SDK speaks it. The guest's spawner and the SDK itself are tested
// end to end elsewhere.

const token = "test-token"

type fixture struct {
	url  string
	home string
	proc processpbconnect.ProcessClient
	fs   filesystempbconnect.FilesystemClient
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	home := t.TempDir()
	s := New(Config{Spawner: hostSpawner{home: home}, AccessToken: token, Env: []string{"PATH=/usr/bin:/bin"}})
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(func() { srv.Close(); s.Close() })
	opt := connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, r connect.AnyRequest) (connect.AnyResponse, error) {
			r.Header().Set("X-Access-Token", token)
			return next(ctx, r)
		}
	}), tokenStreams{})
	return &fixture{url: srv.URL, home: home,
		proc: processpbconnect.NewProcessClient(srv.Client(), srv.URL, opt),
		fs:   filesystempbconnect.NewFilesystemClient(srv.Client(), srv.URL, opt)}
}

// tokenStreams adds the access token to streaming calls.
type tokenStreams struct{}

func (tokenStreams) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc { return next }
func (tokenStreams) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		c := next(ctx, spec)
		c.RequestHeader().Set("X-Access-Token", token)
		return c
	}
}
func (tokenStreams) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// run starts a process and collects its events until its end.
func (f *fixture) run(t *testing.T, req *processpb.StartRequest, during func(pid uint32)) (stdout, stderr, tty string, end *processpb.ProcessEvent_EndEvent) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	st, err := f.proc.Start(ctx, connect.NewRequest(req))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var wg sync.WaitGroup
	defer wg.Wait() // what runs during the process ends before the test goes on
	var out, errb, pty bytes.Buffer
	for st.Receive() {
		e := st.Msg().GetEvent()
		switch {
		case e.GetStart() != nil:
			if during != nil {
				pid := e.GetStart().GetPid()
				wg.Go(func() { during(pid) })
			}
		case e.GetData() != nil:
			out.Write(e.GetData().GetStdout())
			errb.Write(e.GetData().GetStderr())
			pty.Write(e.GetData().GetPty())
		case e.GetEnd() != nil:
			end = e.GetEnd()
		}
	}
	if err := st.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if end == nil {
		t.Fatal("no end event")
	}
	return out.String(), errb.String(), pty.String(), end
}

func cmd(name string, args ...string) *processpb.ProcessConfig {
	return &processpb.ProcessConfig{Cmd: name, Args: args}
}

func TestProcessOutputAndExit(t *testing.T) {
	f := newFixture(t)
	cwd := "sub"
	if err := os.Mkdir(filepath.Join(f.home, cwd), 0o755); err != nil {
		t.Fatal(err)
	}
	req := &processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", `echo out $K; pwd; echo err >&2; exit 3`},
		Envs: map[string]string{"K": "v"}, Cwd: &cwd}}
	out, errOut, _, end := f.run(t, req, nil)
	if out != "out v\n"+filepath.Join(f.home, cwd)+"\n" || errOut != "err\n" || end.GetExitCode() != 3 || !end.GetExited() {
		t.Fatalf("stdout %q stderr %q end %+v", out, errOut, end)
	}
	if _, err := f.proc.Start(t.Context(), connect.NewRequest(&processpb.StartRequest{Process: cmd("no-such-command")})); err == nil {
		// The error comes with the stream's first receive.
		t.Log("start of a missing command answered at once")
	}
}

func TestProcessStdinSignalsAndList(t *testing.T) {
	f := newFixture(t)
	stdin := true
	tag := "cat-1"
	out, _, _, end := f.run(t, &processpb.StartRequest{Process: cmd("cat"), Stdin: &stdin, Tag: &tag}, func(pid uint32) {
		list, err := f.proc.List(t.Context(), connect.NewRequest(&processpb.ListRequest{}))
		if err != nil || len(list.Msg.GetProcesses()) != 1 || list.Msg.GetProcesses()[0].GetTag() != tag {
			t.Errorf("list while cat runs: %v %v", list, err)
		}
		sel := &processpb.ProcessSelector{Selector: &processpb.ProcessSelector_Tag{Tag: tag}}
		if _, err := f.proc.SendInput(t.Context(), connect.NewRequest(&processpb.SendInputRequest{Process: sel,
			Input: &processpb.ProcessInput{Input: &processpb.ProcessInput_Stdin{Stdin: []byte("hello\n")}}})); err != nil {
			t.Error(err)
		}
		s := f.proc.StreamInput(t.Context())
		_ = s.Send(&processpb.StreamInputRequest{Event: &processpb.StreamInputRequest_Start{Start: &processpb.StreamInputRequest_StartEvent{Process: sel}}})
		_ = s.Send(&processpb.StreamInputRequest{Event: &processpb.StreamInputRequest_Data{Data: &processpb.StreamInputRequest_DataEvent{
			Input: &processpb.ProcessInput{Input: &processpb.ProcessInput_Stdin{Stdin: []byte("streamed\n")}}}}})
		if _, err := s.CloseAndReceive(); err != nil {
			t.Error(err)
		}
		if _, err := f.proc.CloseStdin(t.Context(), connect.NewRequest(&processpb.CloseStdinRequest{Process: sel})); err != nil {
			t.Error(err)
		}
	})
	if out != "hello\nstreamed\n" || end.GetExitCode() != 0 {
		t.Fatalf("cat: %q %+v", out, end)
	}
	_, _, _, end = f.run(t, &processpb.StartRequest{Process: cmd("sleep", "100")}, func(pid uint32) {
		if _, err := f.proc.SendSignal(t.Context(), connect.NewRequest(&processpb.SendSignalRequest{
			Process: &processpb.ProcessSelector{Selector: &processpb.ProcessSelector_Pid{Pid: pid}}, Signal: processpb.Signal_SIGNAL_SIGKILL})); err != nil {
			t.Error(err)
		}
	})
	if end.GetExited() || !strings.Contains(end.GetStatus(), "SIGKILL") {
		t.Fatalf("killed sleep: %+v", end)
	}
	_, err := f.proc.SendInput(t.Context(), connect.NewRequest(&processpb.SendInputRequest{
		Process: &processpb.ProcessSelector{Selector: &processpb.ProcessSelector_Tag{Tag: "nobody"}}}))
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("input to an unknown process: %v", err)
	}
}

func TestProcessTerminal(t *testing.T) {
	f := newFixture(t)
	req := &processpb.StartRequest{Process: cmd("/bin/sh"), Pty: &processpb.PTY{Size: &processpb.PTY_Size{Cols: 80, Rows: 24}}}
	_, _, tty, end := f.run(t, req, func(pid uint32) {
		sel := &processpb.ProcessSelector{Selector: &processpb.ProcessSelector_Pid{Pid: pid}}
		if _, err := f.proc.Update(t.Context(), connect.NewRequest(&processpb.UpdateRequest{Process: sel,
			Pty: &processpb.PTY{Size: &processpb.PTY_Size{Cols: 100, Rows: 30}}})); err != nil {
			t.Error(err)
		}
		for _, line := range []string{"stty size; echo $((6*7))\n", "exit 5\n"} {
			if _, err := f.proc.SendInput(t.Context(), connect.NewRequest(&processpb.SendInputRequest{Process: sel,
				Input: &processpb.ProcessInput{Input: &processpb.ProcessInput_Pty{Pty: []byte(line)}}})); err != nil {
				t.Error(err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
	if !strings.Contains(tty, "30 100") || !strings.Contains(tty, "42") || end.GetExitCode() != 5 {
		t.Fatalf("terminal: %q %+v", tty, end)
	}
}

func TestFilesystemAndFiles(t *testing.T) {
	f := newFixture(t)
	ctx := t.Context()
	if _, err := f.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: "a/b"})); err != nil {
		t.Fatal(err)
	}
	// A watcher on a, recursive.
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	defer wcancel()
	watch, err := f.fs.WatchDir(wctx, connect.NewRequest(&fspb.WatchDirRequest{Path: "a", Recursive: true}))
	if err != nil {
		t.Fatal(err)
	}
	if !watch.Receive() || watch.Msg().GetStart() == nil {
		t.Fatalf("watch start: %v", watch.Err())
	}
	// Multipart, then octet-stream (20 MB).
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	fw, _ := mw.CreateFormFile("file", "a/b/one.txt")
	fw.Write([]byte("one"))
	mw.Close()
	post := func(query string, ct string, b io.Reader) (int, string) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.url+"/files"+query, b)
		req.Header.Set("Content-Type", ct)
		req.Header.Set("X-Access-Token", token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(out)
	}
	if code, out := post("", mw.FormDataContentType(), &body); code != 200 || !strings.Contains(out, `"name":"one.txt"`) {
		t.Fatalf("multipart upload: %d %s", code, out)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 20<<20/16)
	if code, out := post("?path=a/big.bin", "application/octet-stream", bytes.NewReader(big)); code != 200 {
		t.Fatalf("octet-stream upload: %d %s", code, out)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, f.url+"/files?path=a/big.bin", nil)
	req.Header.Set("X-Access-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(got, big) {
		t.Fatalf("download: %d bytes, want %d", len(got), len(big))
	}
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, f.url+"/files?path=a/none", nil)
	req.Header.Set("X-Access-Token", token)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("download of a missing file: %v %v", resp, err)
	}
	// The watcher saw the upload under a/b.
	seen := false
	for !seen && watch.Receive() {
		if e := watch.Msg().GetFilesystem(); e != nil && e.GetName() == "b/one.txt" && e.GetType() == fspb.EventType_EVENT_TYPE_CREATE {
			seen = true
		}
	}
	if !seen {
		t.Fatalf("the watcher did not see b/one.txt created: %v", watch.Err())
	}
	list, err := f.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: "a", Depth: 2}))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range list.Msg.GetEntries() {
		names = append(names, strings.TrimPrefix(e.GetPath(), f.home+"/"))
	}
	if strings.Join(names, " ") != "a/b a/b/one.txt a/big.bin" {
		t.Fatalf("list depth 2: %v", names)
	}
	if _, err := f.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: "a/b/one.txt", Destination: "c/two.txt"})); err != nil {
		t.Fatal(err)
	}
	st, err := f.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: "c/two.txt"}))
	if err != nil || st.Msg.GetEntry().GetSize() != 3 || st.Msg.GetEntry().GetType() != fspb.FileType_FILE_TYPE_FILE {
		t.Fatalf("stat of the moved file: %v %v", st, err)
	}
	if _, err := f.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "a"})); err != nil {
		t.Fatal(err)
	}
	if _, err := f.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: "a"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("stat of a removed directory: %v", err)
	}
}

func TestAccessToken(t *testing.T) {
	f := newFixture(t)
	for _, c := range []struct {
		path, token string
		want        int
	}{{"/health", "", http.StatusNoContent}, {"/files?path=x", "", http.StatusUnauthorized}, {"/files?path=x", "wrong", http.StatusUnauthorized}} {
		req, _ := http.NewRequest(http.MethodGet, f.url+c.path, nil)
		if c.token != "" {
			req.Header.Set("X-Access-Token", c.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s with token %q: %d, want %d", c.path, c.token, resp.StatusCode, c.want)
		}
	}
	bare := processpbconnect.NewProcessClient(http.DefaultClient, f.url)
	if _, err := bare.List(t.Context(), connect.NewRequest(&processpb.ListRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated && !errors.Is(err, err) {
		t.Fatalf("a call without the token: %v", err)
	}
}

// A call acting as an unprivileged user acts with that user's rights: a symbolic link
// the user planted to a file only root may write does not make envd (root) write it.
func TestFilesActAsTheCallsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "acting as another user (setfsuid) needs root: run the test as root, as CI does")
	}
	f := newFixture(t)
	// nobody may walk down to its home (t.TempDir's directories are root's, 0700).
	for _, d := range []string{filepath.Dir(f.home), f.home} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	home := filepath.Join(f.home, "nobody")
	if err := os.Mkdir(home, 0o755); err != nil || os.Chown(home, 65534, 65534) != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(f.home, "shadow")
	if err := os.WriteFile(secret, []byte("root's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(home, "out.txt")); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, f.url+"/files?path=out.txt&username=nobody", strings.NewReader("overwritten"))
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("X-Access-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("a write as nobody through a link to root's file: %d, want 403", resp.StatusCode)
	}
	if b, _ := os.ReadFile(secret); string(b) != "root's" {
		t.Fatalf("root's file was written through the link: %q", b)
	}
	// What nobody writes for itself is nobody's.
	req, _ = http.NewRequest(http.MethodPost, f.url+"/files?path=mine/new.txt&username=nobody", strings.NewReader("x"))
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("X-Access-Token", token)
	if resp, err = http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("a write as nobody in its home: %v %v", resp, err)
	}
	resp.Body.Close()
	fi, err := os.Stat(filepath.Join(home, "mine", "new.txt"))
	if st, ok := fi.Sys().(*syscall.Stat_t); err != nil || !ok || st.Uid != 65534 {
		t.Fatalf("the file nobody wrote: %v %+v", err, fi.Sys())
	}
}

// File URLs the SDK signs (uploadUrl, downloadUrl) open one operation on one path, as
// one user, until they expire: E2B's "v1_" signature over the access token.
func TestSignedFileURLs(t *testing.T) {
	f := newFixture(t)
	sign := func(path, op, user string, exp int64) url.Values {
		raw := path + ":" + op + ":" + user + ":" + token
		q := url.Values{"path": {path}}
		if user != "" {
			q.Set("username", user)
		}
		if exp != 0 {
			raw += ":" + strconv.FormatInt(exp, 10)
			q.Set("signature_expiration", strconv.FormatInt(exp, 10))
		}
		sum := sha256.Sum256([]byte(raw))
		q.Set("signature", "v1_"+strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "="))
		return q
	}
	do := func(method string, q url.Values, body string) int {
		req, _ := http.NewRequest(method, f.url+"/files?"+q.Encode(), strings.NewReader(body))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	p := filepath.Join(f.home, "signed.txt")
	if code := do(http.MethodPost, sign(p, "write", "", 0), "via a signed URL"); code != http.StatusOK {
		t.Fatalf("a signed upload: %d", code)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "via a signed URL" {
		t.Fatalf("uploaded: %q %v", b, err)
	}
	if code := do(http.MethodGet, sign(p, "read", "", time.Now().Add(time.Minute).Unix()), ""); code != http.StatusOK {
		t.Errorf("a signed download: %d", code)
	}
	for name, q := range map[string]url.Values{
		"a read's signature for a write": sign(p, "read", "", 0),
		"another path":                   func() url.Values { q := sign(p, "write", "", 0); q.Set("path", p+"2"); return q }(),
		"another user":                   func() url.Values { q := sign(p, "write", "", 0); q.Set("username", "root"); return q }(),
		"expired":                        sign(p, "write", "", time.Now().Add(-time.Minute).Unix()),
		"an expiration changed after signing": func() url.Values {
			q := sign(p, "write", "", time.Now().Unix()+60)
			q.Set("signature_expiration", "99999999999")
			return q
		}(),
	} {
		if code := do(http.MethodPost, q, "x"); code != http.StatusUnauthorized {
			t.Errorf("%s: %d, want 401", name, code)
		}
	}
}

// A process that leaves a child holding its output ends when it exits, with everything
// it wrote (as E2B's envd does): the child's later output is not waited for.
func TestEndDoesNotWaitForAChildHoldingTheOutput(t *testing.T) {
	f := newFixture(t)
	start := time.Now()
	stdout, _, _, end := f.run(t, &processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh",
		Args: []string{"-c", "seq 1 20000; sleep 5 & echo started"}}}, nil)
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("the end came after %s: it waited for the child", took)
	}
	if end == nil || end.GetExitCode() != 0 || !strings.HasSuffix(stdout, "20000\nstarted\n") || !strings.HasPrefix(stdout, "1\n2\n") {
		t.Errorf("end %v, stdout %d bytes ending %q", end, len(stdout), stdout[max(0, len(stdout)-20):])
	}
}

// A child that keeps writing does not keep its parent's command from ending either.
func TestEndDoesNotWaitForAChildThatKeepsWriting(t *testing.T) {
	f := newFixture(t)
	start := time.Now()
	stdout, _, _, end := f.run(t, &processpb.StartRequest{Process: &processpb.ProcessConfig{Cmd: "/bin/sh",
		Args: []string{"-c", "(for i in $(seq 300); do echo child; sleep 0.02; done) & echo started"}}}, nil)
	if took := time.Since(start); took > 5*time.Second || end == nil || !strings.Contains(stdout, "started\n") {
		t.Errorf("ended after %s (%v), stdout starts %q", took, end, stdout[:min(len(stdout), 40)])
	}
}
