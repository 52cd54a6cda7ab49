package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// e2bSDKEnv names the directory the e2e run installed the pinned `e2b` npm package in
// (before entering its network namespace: the npm registry is outside).
const e2bSDKEnv = "FIREWORKS_E2B_SDK"

// e2bSDKVersion is the SDK the tests run: the one whose wire contract envd serves.
const e2bSDKVersion = "2.51.0"

const e2bDomain = "fireworks.test"

// installE2BSDK installs the pinned SDK from the npm registry into dir/node_modules.
func installE2BSDK(ctx context.Context, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error", "e2b@"+e2bSDKVersion)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	return nil
}

// TestE2BSDK runs the real `e2b` SDK (npm, pinned) against `fireworks dev`: E2B's REST API
// and the SDK's calls into sandboxes (envd) through one HTTPS address of the in-process
// edge, as E2B_API_URL and E2B_SANDBOX_URL point it. The script (testdata/e2b_sdk.cjs)
// asserts every step; this test checks the outcome from Fireworks's side.
func TestE2BSDK(t *testing.T) {
	need(t)
	sdk := os.Getenv(e2bSDKEnv)
	if sdk == "" {
		testutil.Skipf(t, "the e2b npm package is not installed (%s unset: the e2e run installs it with npm before entering its network namespace; is npm installed? see scripts/install-deps.sh)", e2bSDKEnv)
	}
	if _, err := exec.LookPath("node"); err != nil {
		testutil.Skipf(t, "node not found (scripts/install-deps.sh installs Node.js)")
	}
	caFile, certFile, keyFile, err := testutil.ServingCert(t.TempDir(), "api."+e2bDomain, "*."+e2bDomain, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	addr := freeLoopbackAddr(t)
	restartDev(t, "--ingress-listen", addr, "--ingress-tls-cert", certFile, "--ingress-tls-key", keyFile, "--ingress-domain", e2bDomain)
	t.Cleanup(func() { restartDev(t) })

	_, user := userToken(t, "e2b-sdk")
	key := strings.TrimPrefix(user[0], "FIREWORKS_TOKEN=")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	tmplName := "fw-e2b-debian"
	if r := world.cliEnv(ctx, user, nil, "template", "create", tmplName, debianImage(t), "--memory", "512M"); r.code != 0 {
		t.Fatalf("template create: %d %s", r.code, r.stderr)
	}
	if r := world.cliEnv(ctx, user, nil, "template", "ls"); r.code != 0 || !strings.Contains(r.stdout, tmplName) {
		t.Fatalf("template ls: %d %q %s", r.code, r.stdout, r.stderr)
	}
	if r := world.cli(ctx, nil, "template", "ls"); strings.Contains(r.stdout, tmplName) {
		t.Errorf("another token (the admin's) lists the user's template:\n%s", r.stdout)
	}
	// A template built from a Dockerfile (buildah, no Docker daemon): the Debian root as a
	// tar, a RUN that makes a user, and USER.
	built := "fw-e2b-built"
	bctx := t.TempDir()
	if out, err := exec.CommandContext(ctx, "tar", "-C", os.Getenv(debianRootEnv), "-cf", filepath.Join(bctx, "rootfs.tar"), ".").CombinedOutput(); err != nil {
		t.Fatalf("tar the Debian root: %v: %s", err, out)
	}
	dockerfile := "FROM scratch\nADD rootfs.tar /\nRUN useradd -m -u 1000 app && echo built-by-buildah > /etc/built\nUSER app\nENV BUILT=yes\n"
	if err := os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := world.cliEnv(ctx, user, nil, "template", "build", built, "-f", filepath.Join(bctx, "Dockerfile"),
		"--push", image("built:latest"), "--tls-verify=false", bctx); r.code != 0 {
		t.Fatalf("template build: %d\n%s", r.code, r.stderr)
	}
	// What the SDK's builds leave if the script fails half-way goes with the test (other
	// tests count the node's snapshots).
	t.Cleanup(func() {
		ctx := context.Background()
		_ = world.cliEnv(ctx, user, nil, "template", "rm", "fw-sdk-built")
		for _, line := range strings.Split(world.cliEnv(ctx, user, nil, "snapshot", "ls").stdout, "\n") {
			if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "e2b-build-") {
				_ = world.cliEnv(ctx, user, nil, "snapshot", "rm", f[0])
			}
		}
	})
	web, err := testutil.BuildGuestTool(t.TempDir(), "guestweb")
	if err != nil {
		t.Fatal(err)
	}

	// The API answers at api.DOMAIN and at the edge's own address; the key is required.
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: caPool(t, caFile), ServerName: "api." + e2bDomain}}}
	for _, c := range []struct {
		key  string
		want int
	}{{"", http.StatusUnauthorized}, {"fw_wrong", http.StatusUnauthorized}, {key, http.StatusOK}} {
		req, _ := http.NewRequest("GET", "https://"+addr+"/v2/sandboxes", nil)
		req.Host = "api." + e2bDomain
		if c.key != "" {
			req.Header.Set("X-API-Key", c.key)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("GET /v2/sandboxes with key %q: %d %s; want %d", c.key, resp.StatusCode, body, c.want)
		}
	}

	run := "run-" + time.Now().Format("150405.000")
	cmd := exec.CommandContext(ctx, "node", filepath.Join("testdata", "e2b_sdk.cjs"))
	cmd.Env = append(os.Environ(),
		"NODE_PATH="+filepath.Join(sdk, "node_modules"), "NODE_EXTRA_CA_CERTS="+caFile,
		"E2B_API_KEY="+key, "E2B_API_URL=https://"+addr, "E2B_SANDBOX_URL=https://"+addr, "E2B_DOMAIN="+e2bDomain,
		"FW_TEMPLATE="+tmplName, "FW_BUILT_TEMPLATE="+built, "FW_RUN="+run, "FW_GUESTWEB="+web, "FW_BASE_IMAGE="+debianImage(t))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	facts := map[string]string{}
	sc := bufio.NewScanner(out)
	allOK := false
	for sc.Scan() {
		line := sc.Text()
		t.Log("sdk: " + line)
		if f := strings.Fields(line); len(f) == 3 && f[0] == "fact" {
			facts[f[1]] = f[2]
		}
		allOK = allOK || line == "ALL OK"
	}
	if err := cmd.Wait(); err != nil || !allOK {
		t.Fatalf("the SDK script failed (%v):\n%s", err, stderr.String())
	}

	// From Fireworks's side: killed sandboxes are gone, the timed-out one ended by its
	// lifetime (or is gone: listing removes ended ones).
	for _, k := range []string{"killed", "fork"} {
		if r := world.cliEnv(ctx, user, nil, "inspect", facts[k]); r.code == 0 {
			t.Errorf("the %s sandbox %s is still known after the SDK killed it:\n%s", k, facts[k], r.stdout)
		}
	}
	if r := world.cliEnv(ctx, user, nil, "inspect", "--format", "text", facts["timed_out"]); r.code == 0 && !strings.Contains(r.stdout, "lifetime ended") {
		t.Errorf("the sandbox whose timeout passed: %s", r.stdout)
	}
	// The SDK's builds left their template's snapshot and nothing else: no builder
	// sandbox, no snapshot of a step's files, none of the failed build's or of the
	// build the rebuild replaced.
	ids := world.cliEnv(ctx, user, nil, "ps", "-a", "-q")
	for _, id := range strings.Fields(ids.stdout) {
		if r := world.cliEnv(ctx, user, nil, "inspect", id); strings.Contains(r.stdout, "e2b.build") {
			t.Errorf("a build's sandbox is left:\n%s", r.stdout)
		}
	}
	snaps := world.cliEnv(ctx, user, nil, "snapshot", "ls")
	if n := strings.Count(snaps.stdout, "e2b-build-"); snaps.code != 0 || n != 1 || strings.Contains(snaps.stdout, "-files") {
		t.Errorf("snapshots after two builds of one template and a failed one: want the template's only:\n%s", snaps.stdout)
	}
	// E2B's delete of the built template takes its snapshot with it.
	req, _ := http.NewRequest("DELETE", "https://"+addr+"/templates/"+facts["sdk_built"], nil)
	req.Host = "api." + e2bDomain
	req.Header.Set("X-API-Key", key)
	if resp, err := hc.Do(req); err != nil || resp.StatusCode != http.StatusNoContent {
		t.Errorf("DELETE /templates/%s: %v %v", facts["sdk_built"], resp, err)
	} else {
		resp.Body.Close()
	}
	if r := world.cliEnv(ctx, user, nil, "snapshot", "ls"); strings.Contains(r.stdout, "e2b-build-") {
		t.Errorf("the deleted template's snapshot is still there:\n%s", r.stdout)
	}
	if r := world.cliEnv(ctx, user, nil, "template", "rm", tmplName, built); r.code != 0 {
		t.Errorf("template rm: %d %s", r.code, r.stderr)
	}
}

func caPool(t *testing.T, file string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	p.AppendCertsFromPEM(b)
	return p
}
