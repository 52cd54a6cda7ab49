package bench

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// Series keys of the E2B SDK rows.
const (
	KeyE2B     = "e2b"      // Sandbox.create + commands.run through the real SDK, no pool
	KeyE2BPool = "e2b-pool" // the same with a warm pool of the template's image
)

// E2BSDKVersion is the `e2b` npm package the bench drives (the one the tests pin).
const E2BSDKVersion = "2.51.0"

// Where InPrivateNetNS leaves the installed SDK (or why it could not install it).
const (
	e2bSDKEnv    = "FIREWORKS_BENCH_E2B_SDK"
	e2bSDKErrEnv = "FIREWORKS_BENCH_E2B_SDK_ERROR"
)

// installE2BSDK installs the pinned SDK from the npm registry into dir/node_modules.
func installE2BSDK(ctx context.Context, dir string) error {
	for _, tool := range []string{"node", "npm"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found: the E2B rows run the real e2b SDK on Node.js (scripts/install-deps.sh)", tool)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	npm := exec.CommandContext(ctx, "npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error", "e2b@"+E2BSDKVersion)
	npm.Dir = dir
	if out, err := npm.CombinedOutput(); err != nil {
		return fmt.Errorf("npm install e2b@%s: %w: %s", E2BSDKVersion, err, out)
	}
	return nil
}

// e2bRuns is how many creates each E2B row measures (the p50 over 20).
const e2bRuns = 20

//go:embed e2bsdk/bench.cjs
var e2bBenchScript []byte

// measureE2B measures what an E2B user waits for: from Sandbox.create to the first
// output of commands.run, through the real SDK, the edge's REST API and envd, on a dev
// server of its own (its edge speaks HTTPS, as the SDK needs), without and with a warm
// pool. Each sample's start path is read from the node (the row names the path that
// ran: a template restore, or a warm VM).
func measureE2B(ctx context.Context, cfg Config, img v1.Image, work string, rep *Report) error {
	if msg := os.Getenv(e2bSDKErrEnv); msg != "" {
		return errors.New(msg)
	}
	dir := filepath.Join(work, "e2b")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	sdk := os.Getenv(e2bSDKEnv)
	if sdk == "" { // --host-network: the registry is reachable from here
		sdk = filepath.Join(dir, "sdk")
		if err := installE2BSDK(ctx, sdk); err != nil {
			return err
		}
	}
	script := filepath.Join(dir, "bench.cjs")
	if err := os.WriteFile(script, e2bBenchScript, 0o644); err != nil {
		return err
	}
	// The SDK runs commands with /bin/bash -l -c: the busybox image gets a bash that is
	// its sh (the command is plain sh).
	ref, err := withBash(img, filepath.Join(dir, "oci"))
	if err != nil {
		return err
	}
	const domain = "e2b.bench.test"
	caFile, certFile, keyFile, err := testutil.ServingCert(dir, "127.0.0.1", "*."+domain)
	if err != nil {
		return err
	}
	addr, err := freeLoopbackAddr()
	if err != nil {
		return err
	}
	dev, err := startDev(ctx, cfg, dir, "--ingress-listen", addr, "--ingress-domain", domain,
		"--ingress-tls-cert", certFile, "--ingress-tls-key", keyFile)
	if err != nil {
		return err
	}
	defer dev.stop()
	devCfg, err := client.ReadConfig(dev.config) // its token is the SDK's key
	if err != nil {
		return err
	}
	api, err := newAPIClient(dev.config)
	if err != nil {
		return err
	}
	if rep.Accelerator == "" {
		rep.Accelerator, rep.Kernel = api.info(ctx)
	}
	const tmpl = "bench-e2b"
	if _, err := api.templates.CreateTemplate(ctx, connect.NewRequest(&pb.CreateTemplateRequest{
		Template: &pb.NamedTemplate{Name: tmpl, Image: ref}, Replace: true})); err != nil {
		return fmt.Errorf("create template: %w", err)
	}
	if _, _, err := api.warmImage(ctx, ref); err != nil {
		return fmt.Errorf("template snapshot of the E2B image: %w", err)
	}
	command := strings.Join(cfg.Command, " ")
	node := exec.CommandContext(ctx, "node", script)
	node.Dir = dir
	node.Env = append(os.Environ(), "NODE_PATH="+filepath.Join(sdk, "node_modules"), "NODE_EXTRA_CA_CERTS="+caFile,
		"E2B_API_KEY="+devCfg.Token, "E2B_API_URL=https://"+addr, "E2B_SANDBOX_URL=https://"+addr, "E2B_DOMAIN="+domain,
		"FW_TEMPLATE="+tmpl, "FW_COMMAND="+command)
	stdin, err := node.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := node.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr strings.Builder
	node.Stderr = &stderr
	if err := node.Start(); err != nil {
		return err
	}
	defer func() { stdin.Close(); _ = node.Wait() }()
	lines := bufio.NewScanner(stdout)
	one := func(wantHow string) (sample, error) {
		if _, err := io.WriteString(stdin, "go\n"); err != nil {
			return sample{}, fmt.Errorf("e2b bench script: %w: %s", err, stderr.String())
		}
		if !lines.Scan() {
			return sample{}, fmt.Errorf("e2b bench script ended: %s", stderr.String())
		}
		f := strings.Fields(lines.Text())
		if len(f) != 5 || f[0] != "sample" {
			return sample{}, fmt.Errorf("e2b bench script said %q", lines.Text())
		}
		var s sample
		for i, d := range []*time.Duration{&s.create, &s.first, &s.exit} {
			v, err := strconv.ParseFloat(f[2+i], 64)
			if err != nil {
				return sample{}, fmt.Errorf("e2b bench script said %q", lines.Text())
			}
			*d = time.Duration(v * float64(time.Millisecond))
		}
		got, err := api.sandboxes.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: f[1]}))
		if err != nil {
			return sample{}, err
		}
		d := got.Msg.GetSandbox().GetDetails()
		s.how, s.phases, s.handoff = startedBy(d), parsePhases(d["start_phases"]), handoff(got.Msg.GetSandbox())
		if _, err := io.WriteString(stdin, "done\n"); err != nil {
			return sample{}, err
		}
		if !lines.Scan() || lines.Text() != "killed" {
			return sample{}, fmt.Errorf("e2b bench script did not kill %s: %s", f[1], stderr.String())
		}
		if wantHow != "" && s.how != wantHow {
			return sample{}, fmt.Errorf("sandbox %s started %q, not %q: not the path this row names", f[1], s.how, wantHow)
		}
		return s, nil
	}
	if _, err := one(""); err != nil { // warm-up: the template's first restore pages it in
		return err
	}
	rcfg := cfg
	rcfg.Runs = min(cfg.Runs, e2bRuns)
	accel := " (" + rep.Accelerator + ")"
	s, err := measure(ctx, rcfg, KeyE2B, "E2B SDK create → first output, no pool"+accel, func() (sample, error) { return one("restore") })
	if err != nil {
		return err
	}
	s.Boot = "auto"
	rep.Series = append(rep.Series, s)

	if err := api.setPool(ctx, ref, cfg.PoolSize); err != nil {
		return err
	}
	defer func() { _ = api.deletePool(context.WithoutCancel(ctx), ref) }()
	poolWait := 5 * time.Minute
	s, err = measure(ctx, rcfg, KeyE2BPool, "E2B SDK create → first output, warm pool"+accel, func() (sample, error) {
		if err := api.waitPoolReady(ctx, ref, poolWait); err != nil {
			return sample{}, err
		}
		poolWait = time.Minute
		return one("warm")
	})
	if err != nil {
		return err
	}
	s.Boot = "auto"
	rep.Series = append(rep.Series, s)
	return nil
}

// withBash writes img plus /bin/bash (a script running its sh) to an OCI layout and
// returns its reference.
func withBash(img v1.Image, dir string) (string, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := "#!/bin/sh\nexec /bin/sh \"$@\"\n"
	if err := tw.WriteHeader(&tar.Header{Name: "bin/bash", Mode: 0o755, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
		return "", err
	}
	if _, err := io.WriteString(tw, body); err != nil {
		return "", err
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		return "", err
	}
	out, err := mutate.AppendLayers(img, layer)
	if err != nil {
		return "", err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return "", err
	}
	if err := p.AppendImage(out); err != nil {
		return "", err
	}
	return "oci:" + dir, nil
}
