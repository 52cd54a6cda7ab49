package serverproc_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/cluster/serverproc"
	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// freePorts returns n TCP ports free on 127.0.0.1 right now.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var out []int
	var lns []net.Listener
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		out = append(out, ln.Addr().(*net.TCPAddr).Port)
	}
	for _, ln := range lns {
		ln.Close()
	}
	return out
}

// Three servers on one host, told only each other's Raft addresses (the layout a review
// tried: the API ports differ from server to server). Every server answers reads and
// writes at once, the followers by forwarding to the leader at the address the leader
// recorded; a request one server forwarded is never forwarded again.
func TestThreeServersOnOneHost(t *testing.T) {
	root := t.TempDir()
	caDir := filepath.Join(root, "ca")
	clusterCA, err := pki.CreateCA(caDir, "fireworks")
	if err != nil {
		t.Fatal(err)
	}
	token, _ := auth.New(state.RoleAdmin, "", "", time.Now(), 0)
	joinTok, joinID, _ := pki.NewJoinToken(clusterCA)
	userTok, userRec := auth.New(state.RoleUser, "", "", time.Now(), 0)
	boot := []serverproc.BootstrapToken{{Name: "pool", Role: state.RoleJoin, Token: joinTok}, {Name: "kubernetes", Role: state.RoleUser, Token: userTok}}
	ports := freePorts(t, 6)
	var peers []string
	for i := range 3 {
		peers = append(peers, fmt.Sprintf("s%d=127.0.0.1:%d", i+1, ports[3+i]))
	}
	parsed, err := serverproc.ParsePeers(strings.Join(peers, ","))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	apis := make([]string, 3)
	for i := range 3 {
		log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})).With("server", i+1)
		cfg := serverproc.ServerConfig{
			NodeID: fmt.Sprintf("s%d", i+1), DataDir: filepath.Join(root, fmt.Sprint(i)), CADir: caDir,
			Listen: fmt.Sprintf("127.0.0.1:%d", ports[i]), RaftListen: fmt.Sprintf("127.0.0.1:%d", ports[3+i]),
			Peers: append([]serverproc.Peer(nil), parsed...), BootstrapToken: token, BootstrapTokens: boot, Log: log,
		}
		apis[i] = cfg.Listen
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := serverproc.RunServer(ctx, cfg); err != nil {
				t.Errorf("server %s: %v", cfg.NodeID, err)
			}
		}()
	}
	clientOf := func(i int) *client.Client {
		c, err := client.New(client.Config{Server: "https://" + apis[i], Token: token, CA: filepath.Join(caDir, "ca.pem"), RequestTimeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Wait for the cluster to answer through the first server.
	deadline := time.Now().Add(60 * time.Second)
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := clientOf(0).Cluster.ListNodes(cctx, connect.NewRequest(&pb.ListNodesRequest{}))
		ccancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cluster did not answer within a minute: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	// The installer's tokens exist with their roles; the join token never expires and has
	// no bound on its uses (it stands for a node pool).
	toks, err := clientOf(0).Tokens.ListTokens(ctx, connect.NewRequest(&pb.ListTokensRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]*pb.Token{}
	for _, tk := range toks.Msg.Tokens {
		found[tk.Id] = tk
	}
	for _, want := range []struct {
		id, name, role string
	}{{joinID, "pool", "join"}, {userRec.ID, "kubernetes", "user"}} {
		tk := found[want.id]
		if tk == nil {
			t.Errorf("bootstrap %s token %s was not created (tokens: %v)", want.role, want.id, toks.Msg.Tokens)
			continue
		}
		if tk.Name != want.name || tk.Role != want.role || tk.MaxUses != 0 || tk.ExpiresAt != nil {
			t.Errorf("bootstrap token %s = %v, want name %s role %s, no expiry, no bound on uses", want.id, tk, want.name, want.role)
		}
	}
	for i := range 3 {
		c := clientOf(i)
		start := time.Now()
		cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
		if _, err := c.Cluster.ListNodes(cctx, connect.NewRequest(&pb.ListNodesRequest{})); err != nil {
			t.Errorf("node ls through server %d: %v", i+1, err)
		}
		if _, err := c.Tokens.CreateToken(cctx, connect.NewRequest(&pb.CreateTokenRequest{Role: "user", Name: fmt.Sprintf("via-s%d", i+1)})); err != nil {
			t.Errorf("a write through server %d: %v", i+1, err)
		}
		ccancel()
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("server %d took %s to answer", i+1, d)
		}
	}
	// A stream whose call the leader ends with an error reaches its client through every
	// server, the followers' forwarding included, while the client still holds its side
	// open (as `fireworks exec` does, to pass on a signal): a follower's proxy once waited
	// for the client's side to end, and the client for the proxy's.
	for i := range 3 {
		cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
		sess, err := client.Exec(clientOf(i).Sandboxes.Exec(cctx), &pb.ExecStart{Sandbox: "no-such-sandbox", Argv: []string{"true"}})
		if err == nil {
			_, err = sess.Wait(io.Discard, io.Discard)
		}
		ccancel()
		if connect.CodeOf(err) != connect.CodeNotFound {
			t.Errorf("exec in an unknown sandbox through server %d: %v, want not found at once", i+1, err)
		}
	}
	// Every server answers the orchestrator's probes without a token once a leader is
	// known, and nothing but "ok".
	for i := range 3 {
		c, _ := pki.LoadCA(caDir)
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.ClientTLS(c, nil, "127.0.0.1", pki.RoleServer)}}
		for _, path := range []string{"/healthz", "/readyz"} {
			resp, err := hc.Get("https://" + apis[i] + path)
			if err != nil {
				t.Fatalf("server %d %s: %v", i+1, path, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
				t.Errorf("server %d %s: HTTP %d %q", i+1, path, resp.StatusCode, body)
			}
		}
	}
	// A request marked as forwarded is refused by a follower instead of forwarded again.
	refused := 0
	for i := range 3 {
		c, err := pki.LoadCA(caDir)
		if err != nil {
			t.Fatal(err)
		}
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.ClientTLS(c, nil, "127.0.0.1", pki.RoleServer)}}
		req, _ := http.NewRequest(http.MethodPost, "https://"+apis[i]+"/fireworks.v1.ClusterService/ListNodes", strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Fireworks-Forwarded-By", "elsewhere")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("a forwarded request to server %d: %v", i+1, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusOK: // the leader answers it
		case http.StatusServiceUnavailable:
			refused++
			if !strings.Contains(string(body), "not the leader") {
				t.Errorf("server %d refused a forwarded request with %q", i+1, body)
			}
		default:
			t.Errorf("a forwarded request to server %d: HTTP %d %s", i+1, resp.StatusCode, body)
		}
	}
	if refused != 2 {
		t.Errorf("%d servers refused to forward a forwarded request, want the 2 followers", refused)
	}
	// A call without a known token is refused by whichever server it reaches, before a
	// follower reads its body or forwards it.
	for i := range 3 {
		c, _ := pki.LoadCA(caDir)
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.ClientTLS(c, nil, "127.0.0.1", pki.RoleServer)}}
		req, _ := http.NewRequest(http.MethodPost, "https://"+apis[i]+"/fireworks.v1.ClusterService/ListNodes", strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer fwk_0000000000000000_"+strings.Repeat("0", 64))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("server %d answered an unknown token with HTTP %d", i+1, resp.StatusCode)
		}
	}
}

// A malformed --bootstrap-token is refused at start, not accepted and then failing every
// call.
func TestMalformedBootstrapTokenRefused(t *testing.T) {
	root := t.TempDir()
	err := serverproc.RunServer(context.Background(), serverproc.ServerConfig{NodeID: "s1", DataDir: root,
		Listen: "127.0.0.1:0", RaftListen: "127.0.0.1:0", BootstrapToken: "fwk_not-a-token"})
	if err == nil || !errors.Is(err, auth.ErrMalformed) || !strings.Contains(err.Error(), "--bootstrap-token") {
		t.Errorf("RunServer with a malformed bootstrap token: %v", err)
	}
}

// Installer tokens are checked at start too: a malformed one, an unknown role, or two
// that share an ID (one would shadow the other's role) are refused before anything runs.
func TestBadBootstrapTokensRefused(t *testing.T) {
	admin, _ := auth.New(state.RoleAdmin, "", "", time.Now(), 0)
	user, _ := auth.New(state.RoleUser, "", "", time.Now(), 0)
	otherCA, err := pki.CreateCA(filepath.Join(t.TempDir(), "ca"), "other")
	if err != nil {
		t.Fatal(err)
	}
	join, _, _ := pki.NewJoinToken(otherCA)
	for _, tc := range []struct {
		name string
		toks []serverproc.BootstrapToken
		want string
	}{
		{"malformed", []serverproc.BootstrapToken{{Name: "edge", Role: state.RoleIngress, Token: "fwk_nope"}}, "malformed"},
		{"an API token as join token", []serverproc.BootstrapToken{{Name: "pool", Role: state.RoleJoin, Token: user}}, "not a join token"},
		{"unknown role", []serverproc.BootstrapToken{{Name: "x", Role: "root", Token: user}}, "unknown role"},
		{"same ID as admin", []serverproc.BootstrapToken{{Name: "k", Role: state.RoleUser, Token: admin}}, "same ID"},
		{"same ID twice", []serverproc.BootstrapToken{{Name: "a", Role: state.RoleIngress, Token: user}, {Name: "b", Role: state.RoleUser, Token: user}}, "same ID"},
		{"join token of another CA", []serverproc.BootstrapToken{{Name: "pool", Role: state.RoleJoin, Token: join}}, "names CA"},
	} {
		err := serverproc.RunServer(context.Background(), serverproc.ServerConfig{NodeID: "s1", DataDir: t.TempDir(),
			Listen: "127.0.0.1:0", RaftListen: "127.0.0.1:0", BootstrapToken: admin, BootstrapTokens: tc.toks})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: RunServer = %v, want an error with %q", tc.name, err, tc.want)
		}
	}
}

// A bootstrap token revoked with `fireworks token rm` stays revoked when the servers
// start again with it in their configuration (the chart keeps handing it to them).
func TestRevokedBootstrapTokenStaysRevoked(t *testing.T) {
	root := t.TempDir()
	caDir := filepath.Join(root, "ca")
	clusterCA, err := pki.CreateCA(caDir, "fireworks")
	if err != nil {
		t.Fatal(err)
	}
	admin, _ := auth.New(state.RoleAdmin, "", "", time.Now(), 0)
	joinTok, joinID, _ := pki.NewJoinToken(clusterCA)
	ingressTok, ingressRec := auth.New(state.RoleIngress, "", "", time.Now(), 0)
	boot := []serverproc.BootstrapToken{{Name: "node-pool", Role: state.RoleJoin, Token: joinTok}, {Name: "edge", Role: state.RoleIngress, Token: ingressTok}}
	run := func() (ids map[string]bool, revoke func(id string), stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		ports := freePorts(t, 2)
		cfg := serverproc.ServerConfig{NodeID: "s1", DataDir: filepath.Join(root, "data"), CADir: caDir,
			Listen: fmt.Sprintf("127.0.0.1:%d", ports[0]), RaftListen: fmt.Sprintf("127.0.0.1:%d", ports[1]), BootstrapToken: admin, BootstrapTokens: boot,
			Log: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))}
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := serverproc.RunServer(ctx, cfg); err != nil {
				t.Errorf("server: %v", err)
			}
		}()
		c, err := client.New(client.Config{Server: "https://" + cfg.Listen, Token: admin, CA: filepath.Join(caDir, "ca.pem"), RequestTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		// The bootstrap tokens are made a moment after the server answers: wait for the
		// ingress one, which is never revoked here.
		deadline := time.Now().Add(time.Minute)
		for {
			ids = map[string]bool{}
			if resp, err := c.Tokens.ListTokens(ctx, connect.NewRequest(&pb.ListTokensRequest{})); err == nil {
				for _, tk := range resp.Msg.Tokens {
					ids[tk.Id] = true
				}
			}
			if ids[ingressRec.ID] {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the bootstrap tokens were not made within a minute: %v", ids)
			}
			time.Sleep(200 * time.Millisecond)
		}
		return ids, func(id string) {
				if _, err := c.Tokens.RevokeToken(ctx, connect.NewRequest(&pb.RevokeTokenRequest{Id: id})); err != nil {
					t.Fatal(err)
				}
			}, func() {
				cancel()
				<-done
			}
	}
	ids, revoke, stop := run()
	if !ids[joinID] {
		t.Fatalf("the bootstrap join token was not made: %v", ids)
	}
	revoke(joinID)
	stop()
	ids, _, stop = run()
	defer stop()
	if ids[joinID] {
		t.Fatal("the revoked bootstrap join token was made again at the next start")
	}
}
