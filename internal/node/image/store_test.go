package image_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"archive/tar"

	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

var ctx = context.Background()

func openStore(t *testing.T, opts ...image.Option) (*image.Store, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "images")
	s, err := image.Open(dir, opts...)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return s, dir
}

func insecure(host string) image.PullOptions {
	return image.PullOptions{InsecureRegistries: []string{host}}
}

func digestOf(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// requests records the registry requests a test server sees.
type requests struct {
	mu   sync.Mutex
	seen []string
}

func (r *requests) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.seen = append(r.seen, req.Method+" "+req.URL.Path)
		r.mu.Unlock()
		h.ServeHTTP(w, req)
	})
}

func (r *requests) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, s := range r.seen {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}

func (r *requests) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen = nil
}

func layerDigests(t *testing.T, img v1.Image) []string {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d.String())
	}
	return out
}

func TestPullFromRegistry(t *testing.T) {
	src := testimage.Busybox(t, testimage.Entrypoint("/bin/sh", "-c"), testimage.Cmd("echo hi"), testimage.User("app"))
	host := testimage.Serve(t, map[string]v1.Image{"busybox:latest": src})
	s, _ := openStore(t)

	var progress []image.Progress
	opts := insecure(host)
	opts.Progress = func(p image.Progress) { progress = append(progress, p) }
	img, err := s.Pull(ctx, host+"/busybox:latest", opts)
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if img.Ref != host+"/busybox:latest" || img.Digest != digestOf(t, src) {
		t.Errorf("pulled %q %s, want %s/busybox:latest %s", img.Ref, img.Digest, host, digestOf(t, src))
	}
	want := image.Config{Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"echo hi"},
		Env: []string{testimage.DefaultPath, testimage.FooEnv}, WorkingDir: "/home/app", User: "app"}
	if fmt.Sprint(img.Config) != fmt.Sprint(want) {
		t.Errorf("config = %+v, want %+v", img.Config, want)
	}
	if !img.Created.Equal(testimage.Epoch) || img.Size <= 0 {
		t.Errorf("created %v size %d", img.Created, img.Size)
	}
	layer := layerDigests(t, src)[0]
	if len(progress) == 0 || !progress[len(progress)-1].Done || progress[len(progress)-1].Layer != layer {
		t.Errorf("progress = %+v, want it to end with %s done", progress, layer)
	}

	// Any spelling of the ref, the digest and a digest prefix find it.
	hex := strings.TrimPrefix(img.Digest, "sha256:")
	for _, q := range []string{host + "/busybox:latest", host + "/busybox", img.Digest, hex[:12], "sha256:" + hex[:8]} {
		got, err := s.Get(ctx, q)
		if err != nil || got.Digest != img.Digest {
			t.Errorf("Get(%q) = %v, %v", q, got, err)
		}
	}
	if _, err := s.Get(ctx, "busybox"); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("Get(busybox) = %v, want ErrNotFound", err)
	}
	list, err := s.List(ctx)
	if err != nil || len(list) != 1 || list[0].Digest != img.Digest {
		t.Errorf("List = %+v, %v", list, err)
	}

	// By digest: the same image under a second name.
	byDigest := host + "/busybox@" + img.Digest
	img2, err := s.Pull(ctx, byDigest, insecure(host))
	if err != nil || img2.Digest != img.Digest || img2.Ref != byDigest {
		t.Fatalf("pull by digest = %+v, %v", img2, err)
	}
	if list, _ := s.List(ctx); len(list) != 2 {
		t.Errorf("List after pull by digest = %+v, want two names", list)
	}
}

func TestSecondPullUsesLayerCache(t *testing.T) {
	var reqs requests
	a := testimage.Busybox(t, testimage.Cmd("a"))
	b := testimage.Busybox(t, testimage.Cmd("b")) // same layer, other config
	host := testimage.ServeWrapped(t, map[string]v1.Image{"img:a": a, "img:b": b}, reqs.wrap)
	s, _ := openStore(t)
	layer := layerDigests(t, a)[0]

	if _, err := s.Pull(ctx, host+"/img:a", insecure(host)); err != nil {
		t.Fatal(err)
	}
	if n := reqs.count("GET /v2/img/blobs/" + layer); n != 1 {
		t.Fatalf("first pull fetched the layer %d times, want 1", n)
	}
	reqs.reset()
	if _, err := s.Pull(ctx, host+"/img:a", insecure(host)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pull(ctx, host+"/img:b", insecure(host)); err != nil {
		t.Fatal(err)
	}
	if n := reqs.count("/blobs/" + layer); n != 0 {
		t.Errorf("later pulls fetched the cached layer %d times", n)
	}
	if n := reqs.count("/blobs/"); n != 1 {
		t.Errorf("later pulls fetched %d blobs, want 1 (b's config): %v", n, reqs.seen)
	}

	// Ensure of a present image does not touch the registry at all.
	reqs.reset()
	if _, err := s.Ensure(ctx, host+"/img:a", insecure(host)); err != nil {
		t.Fatal(err)
	}
	if len(reqs.seen) != 0 {
		t.Errorf("Ensure of a local image made requests: %v", reqs.seen)
	}
}

func TestEnsurePullsWhenMissing(t *testing.T) {
	src := testimage.Busybox(t)
	host := testimage.Serve(t, map[string]v1.Image{"busybox:1": src})
	s, _ := openStore(t)
	img, err := s.Ensure(ctx, host+"/busybox:1", insecure(host))
	if err != nil || img.Digest != digestOf(t, src) {
		t.Fatalf("Ensure = %v, %v", img, err)
	}
}

func TestPlatformFromIndex(t *testing.T) {
	amd := testimage.Busybox(t, testimage.Cmd("amd64"))
	armCfg, _ := amd.ConfigFile()
	armCfg = armCfg.DeepCopy()
	armCfg.Architecture = "arm64"
	arm, err := mutate.ConfigFile(amd, armCfg)
	if err != nil {
		t.Fatal(err)
	}
	both := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	armOnly := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}})
	host := testimage.Serve(t, nil)
	testimage.PushIndex(t, host, "multi:latest", both)
	testimage.PushIndex(t, host, "armonly:latest", armOnly)
	s, _ := openStore(t)

	img, err := s.Pull(ctx, host+"/multi:latest", insecure(host))
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digestOf(t, amd) || img.Config.Cmd[0] != "amd64" {
		t.Errorf("picked %s, want the amd64 image %s", img.Digest, digestOf(t, amd))
	}
	// The same as a Docker schema-2 manifest list.
	testimage.PushIndex(t, host, "dockerlist:latest", mutate.IndexMediaType(both, types.DockerManifestList))
	if img, err := s.Pull(ctx, host+"/dockerlist:latest", insecure(host)); err != nil || img.Digest != digestOf(t, amd) {
		t.Errorf("Docker manifest list: picked %v, %v; want the amd64 image %s", img, err, digestOf(t, amd))
	}
	_, err = s.Pull(ctx, host+"/armonly:latest", insecure(host))
	if err == nil || !strings.Contains(err.Error(), "no linux/amd64 image") || !strings.Contains(err.Error(), "linux/arm64") {
		t.Errorf("pull of an arm64-only list = %v, want a clear platform error", err)
	}
	// A single-platform image for another architecture is refused too.
	testimage.Push(t, host, "arm:latest", arm)
	if _, err := s.Pull(ctx, host+"/arm:latest", insecure(host)); err == nil || !strings.Contains(err.Error(), "linux/arm64") {
		t.Errorf("pull of an arm64 image = %v", err)
	}
}

func TestPullLocalSources(t *testing.T) {
	src := testimage.Busybox(t, testimage.Cmd("local"))
	other := testimage.Busybox(t, testimage.Cmd("other"))
	dir := t.TempDir()
	single := filepath.Join(dir, "single")
	multi := filepath.Join(dir, "multi:with:colons")
	archive := filepath.Join(dir, "busybox.tar")
	testimage.WriteOCILayout(t, single, src, "")
	testimage.WriteOCILayout(t, multi, src, "v1")
	testimage.WriteOCILayout(t, multi, other, "v2")
	testimage.WriteDockerArchive(t, archive, src, "busybox:latest")
	s, _ := openStore(t)

	for _, tc := range []struct{ ref, cmd string }{
		{"oci:" + single, "local"},
		{"oci:" + multi + ":v1", "local"},
		{"oci:" + multi + ":v2", "other"},
		{"docker-archive:" + archive, "local"},
		{"docker-archive:" + archive + ":busybox:latest", "local"},
	} {
		img, err := s.Pull(ctx, tc.ref, image.PullOptions{})
		if err != nil {
			t.Errorf("pull %s: %v", tc.ref, err)
			continue
		}
		if img.Config.Cmd[0] != tc.cmd || img.Ref != tc.ref {
			t.Errorf("pull %s = %s %v", tc.ref, img.Ref, img.Config.Cmd)
		}
		if strings.HasPrefix(tc.ref, "oci:") && img.Digest != digestOf(t, map[string]v1.Image{"local": src, "other": other}[tc.cmd]) {
			t.Errorf("pull %s: digest %s differs from the layout's", tc.ref, img.Digest)
		}
		if got, err := s.Get(ctx, tc.ref); err != nil || got.Digest != img.Digest {
			t.Errorf("Get(%s) = %v, %v", tc.ref, got, err)
		}
	}
	// Relative paths are stored absolute.
	t.Chdir(dir)
	img, err := s.Pull(ctx, "oci:single", image.PullOptions{})
	if err != nil || img.Ref != "oci:"+single {
		t.Errorf("pull oci:single = %v, %v", img, err)
	}
}

// writeMultiArchive writes a `docker save` tarball holding several tagged images.
func writeMultiArchive(t *testing.T, file string, images map[string]v1.Image) {
	t.Helper()
	refs := map[name.Reference]v1.Image{}
	for tag, img := range images {
		r, err := name.NewTag(tag)
		if err != nil {
			t.Fatal(err)
		}
		refs[r] = img
	}
	if err := tarball.MultiRefWriteToFile(file, refs); err != nil {
		t.Fatal(err)
	}
}

// A tag in a `docker save`/`podman save` archive is found by the short name a user
// types: podman writes localhost/NAME:TAG, docker NAME:TAG.
func TestDockerArchiveTags(t *testing.T) {
	app := testimage.Busybox(t)
	tools := testimage.Busybox(t, testimage.Cmd("tools"))
	if cf, _ := app.ConfigFile(); len(cf.Config.Cmd) != 0 {
		t.Fatalf("the base image has a Cmd %v: the cases below tell images apart by it", cf.Config.Cmd)
	}
	saved := filepath.Join(t.TempDir(), "saved.tar")
	writeMultiArchive(t, saved, map[string]v1.Image{"localhost/app:latest": app, "docker.io/library/tools:v1": tools})
	s, _ := openStore(t)
	// An archive re-encodes manifests, so the images are told apart by their config.
	for ref, want := range map[string]string{
		saved + ":app":                  "",
		saved + ":app:latest":           "",
		saved + ":localhost/app:latest": "",
		saved + ":tools:v1":             "tools",
		saved + ":library/tools:v1":     "tools",
	} {
		img, err := s.Pull(ctx, "docker-archive:"+ref, image.PullOptions{})
		if err != nil {
			t.Errorf("Pull(docker-archive:%s): %v", ref, err)
			continue
		}
		if got := strings.Join(img.Config.Cmd, " "); got != want {
			t.Errorf("Pull(docker-archive:%s) picked the image with Cmd %q, want %q", ref, got, want)
		}
	}
	if _, err := s.Pull(ctx, "docker-archive:"+saved+":tools", image.PullOptions{}); err == nil {
		t.Error("tools (implicitly :latest) matched tools:v1")
	}
	if _, err := s.Pull(ctx, "docker-archive:"+saved+":other.example/app:latest", image.PullOptions{}); err == nil {
		t.Error("an explicit other registry matched localhost/app")
	}
}

func TestBadReferences(t *testing.T) {
	src := testimage.Busybox(t)
	dir := t.TempDir()
	multi := filepath.Join(dir, "multi")
	testimage.WriteOCILayout(t, multi, src, "v1")
	testimage.WriteOCILayout(t, multi, testimage.Busybox(t, testimage.Cmd("x")), "v2")
	notTar := filepath.Join(dir, "not.tar")
	os.WriteFile(notTar, []byte("hello"), 0o644)
	saved := filepath.Join(dir, "saved.tar")
	writeMultiArchive(t, saved, map[string]v1.Image{"localhost/app:latest": src, "tools:v1": testimage.Busybox(t, testimage.Cmd("x"))})
	host := testimage.Serve(t, map[string]v1.Image{"busybox:latest": src})
	s, _ := openStore(t)

	for _, tc := range []struct{ ref, want string }{
		{"", "empty image reference"},
		{"UPPER/Case:tag", "malformed image reference"},
		{"busybox:bad tag", "malformed image reference"},
		{host + "/busybox:nosuchtag", host + "/busybox:nosuchtag"},
		{host + "/nosuchrepo:latest", host + "/nosuchrepo:latest"},
		{"oci:" + filepath.Join(dir, "missing"), filepath.Join(dir, "missing")},
		{"oci:" + multi, "name one as oci:"},
		{"oci:" + multi + ":v3", `no image tagged "v3"`},
		{"docker-archive:" + filepath.Join(dir, "missing.tar"), "missing.tar"},
		{"docker-archive:" + notTar, "not.tar"},
		{"docker-archive:" + saved, "holds 2 images: name one"},
		{"docker-archive:" + saved + ":other", `no image tagged "other" (tags: `},
		{"oci-archive:" + saved, "the oci-archive: transport is not supported"},
		{"containers-storage:busybox", "transport is not supported"},
	} {
		_, err := s.Pull(ctx, tc.ref, insecure(host))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Pull(%q) = %v, want an error containing %q", tc.ref, err, tc.want)
		}
		t.Logf("%v", err)
	}
	if list, _ := s.List(ctx); len(list) != 0 {
		t.Errorf("failed pulls left images: %v", list)
	}
}

func TestCorruptBlobFromRegistry(t *testing.T) {
	src := testimage.Busybox(t)
	layer := layerDigests(t, src)[0]
	host := testimage.ServeWrapped(t, map[string]v1.Image{"busybox:latest": src}, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+layer) {
				h.ServeHTTP(w, r)
				return
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			body := rec.Body.Bytes()
			body[len(body)/2] ^= 0xff
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(body)
		})
	})
	s, dir := openStore(t)
	_, err := s.Pull(ctx, host+"/busybox:latest", insecure(host))
	if err == nil || !strings.Contains(err.Error(), layer) {
		t.Fatalf("pull of a corrupt layer = %v, want an error naming %s", err, layer)
	}
	t.Logf("corrupt blob: %v", err)
	if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(layer, "sha256:"))); err == nil {
		t.Error("corrupt layer was stored")
	}
}

func requireRootDiskTools(t *testing.T, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Skipf(t, "building root disks needs root (ownership of unpacked files)")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found", tool)
		}
	}
}

// extract shows a root disk's contents as the guest will see them: mounted
// read-only through a loop device where the host allows it, or else unpacked
// by the filesystem's own tools, which drop set-id and sticky bits (exact
// reports which one it was).
func extract(t *testing.T, disk, fsType string) (root string, exact bool) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "x")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := exec.Command("mount", "-t", fsType, "-o", "loop,ro,nodev,nosuid", disk, out).CombinedOutput()
	if err == nil {
		t.Cleanup(func() {
			if b, err := exec.Command("umount", out).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v: %s", out, err, b)
			}
		})
		return out, true
	}
	t.Logf("cannot mount %s (%v: %s); checking with the %s tools instead", disk, err, bytes.TrimSpace(b), fsType)
	var cmd *exec.Cmd
	switch fsType {
	case image.FSTypeErofs:
		os.Remove(out)
		cmd = exec.Command("fsck.erofs", "--extract="+out, "--preserve", disk)
	case image.FSTypeExt4:
		cmd = exec.Command("debugfs", "-R", "rdump / "+out, disk)
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, b)
	}
	return out, false
}

func checkBusyboxTree(t *testing.T, root string, exact bool) {
	t.Helper()
	check := func(p string, mode os.FileMode, uid uint32) {
		t.Helper()
		if !exact {
			mode &^= os.ModeSetuid | os.ModeSetgid | os.ModeSticky
		}
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return
		}
		got := fi.Mode()
		if !exact {
			got &^= os.ModeSetuid | os.ModeSetgid | os.ModeSticky
		}
		if got != mode || fi.Sys().(*syscall.Stat_t).Uid != uid {
			t.Errorf("%s: %v uid %d, want %v uid %d", p, fi.Mode(), fi.Sys().(*syscall.Stat_t).Uid, mode, uid)
		}
	}
	check("bin/busybox", 0o755, 0)
	if fi, err := os.Lstat(filepath.Join(root, "bin/busybox")); err == nil && !fi.ModTime().Equal(testimage.Epoch) {
		t.Errorf("bin/busybox mtime %v, want %v", fi.ModTime(), testimage.Epoch)
	}
	check("bin/notexec", 0o644, 0)
	check("home/app", os.ModeDir|0o755, testimage.AppUID)
	check("tmp", os.ModeDir|os.ModeSticky|0o777, 0)
	if l, err := os.Readlink(filepath.Join(root, "bin/sh")); err != nil || l != "busybox" {
		t.Errorf("bin/sh -> %q, %v", l, err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/passwd")); !bytes.Contains(b, []byte("app:x:1000:1000:")) {
		t.Errorf("etc/passwd = %q", b)
	}
	out, err := exec.Command(filepath.Join(root, "bin/busybox"), "echo", "runs").Output()
	if err != nil || string(out) != "runs\n" {
		t.Errorf("extracted busybox: %q, %v", out, err)
	}
}

// fsTools are what building and reading back a root disk of each filesystem needs.
var fsTools = map[string][]string{
	image.FSTypeErofs: {"mkfs.erofs", "fsck.erofs"},
	image.FSTypeExt4:  {"mkfs.ext4", "debugfs"},
}

func TestRootDiskBuiltOnceForConcurrentCallers(t *testing.T) {
	for _, fsType := range []string{image.FSTypeErofs, image.FSTypeExt4} {
		t.Run(fsType, func(t *testing.T) {
			requireRootDiskTools(t, fsTools[fsType]...)
			dir := t.TempDir()
			testimage.WriteOCILayout(t, dir, testimage.Busybox(t), "")
			s, storeDir := openStore(t, image.WithFSType(fsType))
			img, err := s.Pull(ctx, "oci:"+dir, image.PullOptions{})
			if err != nil {
				t.Fatal(err)
			}
			const callers = 4
			paths := make([]string, callers)
			errs := make([]error, callers)
			var wg sync.WaitGroup
			for i := range callers {
				wg.Go(func() {
					var got string
					var fs string
					cp := *img
					got, fs, errs[i] = s.RootDisk(ctx, &cp)
					if errs[i] == nil && fs != fsType {
						errs[i] = fmt.Errorf("fsType %q", fs)
					}
					paths[i] = got
				})
			}
			wg.Wait()
			for i := range callers {
				if errs[i] != nil || paths[i] != paths[0] {
					t.Fatalf("caller %d: %q, %v (first: %q)", i, paths[i], errs[i], paths[0])
				}
			}
			if n := image.BuildCount(s); n != 1 {
				t.Errorf("built %d times, want 1", n)
			}
			if got, _ := s.Get(ctx, img.Digest); got.RootDisk != paths[0] {
				t.Errorf("Get().RootDisk = %q, want %q", got.RootDisk, paths[0])
			}
			if ents, _ := os.ReadDir(filepath.Join(storeDir, "tmp")); len(ents) != 0 {
				t.Errorf("tmp not cleaned: %v", ents)
			}
			root, exact := extract(t, paths[0], fsType)
			checkBusyboxTree(t, root, exact)
		})
	}
}

func TestRootDiskLayersAndWhiteouts(t *testing.T) {
	requireRootDiskTools(t, "mkfs.erofs", "fsck.erofs")
	type E = testimage.Entry
	src := testimage.WithLayers(t, testimage.Busybox(t),
		testimage.Layer(t,
			E{Name: "bin/.wh.notexec"},
			E{Name: "run/", Type: tar.TypeDir},
			E{Name: "var/run", Type: tar.TypeSymlink, Link: "/run"},
			E{Name: "opt/old/file", Body: "old"},
		),
		testimage.Layer(t,
			E{Name: "var/run/x", Body: "lands in /run"},
			E{Name: "opt/", Type: tar.TypeDir},
			E{Name: "opt/.wh..wh..opq"},
			E{Name: "opt/new", Body: "new", Mode: 0o4755},
		),
	)
	host := testimage.Serve(t, map[string]v1.Image{"layered:latest": src})
	s, _ := openStore(t)
	img, err := s.Pull(ctx, host+"/layered:latest", insecure(host))
	if err != nil {
		t.Fatal(err)
	}
	disk, _, err := s.RootDisk(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	root, exact := extract(t, disk, image.FSTypeErofs)
	if b, err := os.ReadFile(filepath.Join(root, "run/x")); err != nil || string(b) != "lands in /run" {
		t.Errorf("run/x = %q, %v", b, err)
	}
	for p, want := range map[string]bool{"bin/notexec": false, "bin/busybox": true, "opt/old": false, "opt/new": true} {
		if _, err := os.Lstat(filepath.Join(root, p)); (err == nil) != want {
			t.Errorf("%s exists = %v, want %v", p, err == nil, want)
		}
	}
	if fi, err := os.Stat(filepath.Join(root, "opt/new")); err != nil || exact && fi.Mode() != os.ModeSetuid|0o755 {
		t.Errorf("opt/new mode = %v, %v", fi, err)
	}
}

// capNetRaw is a security.capability xattr value (VFS_CAP_REVISION_2) granting
// cap_net_raw in the permitted and effective sets: what `setcap cap_net_raw+ep` writes.
const capNetRaw = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// What real images carry reaches the guest's root disk intact, on both filesystems:
// device nodes and FIFOs (debootstrap roots), set-id bits, file capabilities, hardlinks
// across directories, long and non-ASCII names. The host keeps no device node or FIFO
// after the build.
func TestRootDiskRecordsWhatImagesCarry(t *testing.T) {
	longName := strings.Repeat("long-name-", 20) + "end" // 203 bytes: PAX path record
	for _, fsType := range []string{image.FSTypeErofs, image.FSTypeExt4} {
		t.Run(fsType, func(t *testing.T) {
			requireRootDiskTools(t, fsTools[fsType]...)
			type E = testimage.Entry
			src := testimage.WithLayers(t, testimage.Busybox(t), testimage.Layer(t,
				E{Name: "dev/", Type: tar.TypeDir},
				E{Name: "dev/full", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devmin: 7},
				E{Name: "dev/loop0", Type: tar.TypeBlock, Mode: 0o660, Devmajor: 7, Devmin: 0, GID: 6},
				E{Name: "run/initctl", Type: tar.TypeFifo, Mode: 0o600},
				E{Name: "usr/bin/ping", Body: "ping", Mode: 0o755, Xattrs: map[string]string{"security.capability": capNetRaw}},
				E{Name: "usr/bin/passwd", Body: "passwd", Mode: 0o4755},
				E{Name: "usr/bin/wall", Body: "wall", Mode: 0o2755, GID: 5},
				E{Name: "usr/lib/one", Body: "shared body"},
				E{Name: "opt/other/two", Type: tar.TypeLink, Link: "usr/lib/one"},
				E{Name: "opt/" + longName, Body: "long"},
				E{Name: "opt/naïve-日本語", Body: "utf-8"},
			))
			host := testimage.Serve(t, map[string]v1.Image{"real:latest": src})
			s, storeDir := openStore(t, image.WithFSType(fsType))
			img, err := s.Pull(ctx, host+"/real:latest", insecure(host))
			if err != nil {
				t.Fatal(err)
			}
			disk, _, err := s.RootDisk(ctx, img)
			if err != nil {
				t.Fatalf("RootDisk: %v", err)
			}
			filepath.Walk(storeDir, func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Mode()&(os.ModeDevice|os.ModeNamedPipe) != 0 {
					t.Errorf("the image build left %v on the host at %s", fi.Mode(), p)
				}
				return nil
			})
			root, exact := extract(t, disk, fsType)
			if !exact {
				testutil.Skipf(t, "cannot mount the %s disk read-only through a loop device here (the filesystem tools drop device nodes and set-id bits)", fsType)
			}
			for _, c := range []struct {
				path       string
				mode       os.FileMode
				major, min uint32
			}{
				{"dev/full", os.ModeDevice | os.ModeCharDevice | 0o666, 1, 7},
				{"dev/loop0", os.ModeDevice | 0o660, 7, 0},
				{"run/initctl", os.ModeNamedPipe | 0o600, 0, 0},
				{"usr/bin/passwd", os.ModeSetuid | 0o755, 0, 0},
				{"usr/bin/wall", os.ModeSetgid | 0o755, 0, 0},
			} {
				fi, err := os.Lstat(filepath.Join(root, c.path))
				if err != nil {
					t.Errorf("%s: %v", c.path, err)
					continue
				}
				st := fi.Sys().(*syscall.Stat_t)
				if fi.Mode() != c.mode || unix.Major(st.Rdev) != c.major || unix.Minor(st.Rdev) != c.min {
					t.Errorf("%s: %v %d:%d, want %v %d:%d", c.path, fi.Mode(), unix.Major(st.Rdev), unix.Minor(st.Rdev), c.mode, c.major, c.min)
				}
			}
			buf := make([]byte, 64)
			if n, err := unix.Lgetxattr(filepath.Join(root, "usr/bin/ping"), "security.capability", buf); err != nil || string(buf[:n]) != capNetRaw {
				t.Errorf("usr/bin/ping security.capability = %x, %v; want %x", buf[:max(n, 0)], err, capNetRaw)
			}
			a, _ := os.Lstat(filepath.Join(root, "usr/lib/one"))
			b, _ := os.Lstat(filepath.Join(root, "opt/other/two"))
			if a == nil || b == nil || !os.SameFile(a, b) {
				t.Error("opt/other/two is not a hardlink of usr/lib/one")
			}
			for p, want := range map[string]string{"opt/" + longName: "long", "opt/naïve-日本語": "utf-8"} {
				if got, err := os.ReadFile(filepath.Join(root, p)); err != nil || string(got) != want {
					t.Errorf("%s = %q, %v", p, got, err)
				}
			}
		})
	}
}

func TestRootDiskRefusesHostileLayer(t *testing.T) {
	requireRootDiskTools(t, "mkfs.erofs")
	passwd, _ := os.ReadFile("/etc/passwd")
	for _, kind := range []string{testimage.HostileDotDot, testimage.HostileHardlink, testimage.HostileGiant} {
		t.Run(kind, func(t *testing.T) {
			src := testimage.WithLayers(t, testimage.Busybox(t), testimage.HostileLayer(t, kind))
			host := testimage.Serve(t, map[string]v1.Image{"evil:latest": src})
			s, storeDir := openStore(t)
			img, err := s.Pull(ctx, host+"/evil:latest", insecure(host))
			if err != nil {
				t.Fatal(err) // pulling is harmless; unpacking is where it is refused
			}
			_, _, err = s.RootDisk(ctx, img)
			if !errors.Is(err, image.ErrHostileLayer) {
				t.Fatalf("RootDisk = %v, want ErrHostileLayer", err)
			}
			t.Logf("refused: %v", err)
			if ents, _ := os.ReadDir(filepath.Join(storeDir, "tmp")); len(ents) != 0 {
				t.Errorf("staging left behind: %v", ents)
			}
			if ents, _ := os.ReadDir(filepath.Join(storeDir, "disks")); len(ents) != 0 {
				t.Errorf("disk left behind: %v", ents)
			}
			filepath.Walk(filepath.Dir(storeDir), func(p string, fi os.FileInfo, err error) error {
				if err == nil && (fi.Name() == "pwned" || fi.Name() == testimage.HostileSentinel) {
					t.Errorf("hostile write landed at %s", p)
				}
				return nil
			})
			if now, _ := os.ReadFile("/etc/passwd"); !bytes.Equal(now, passwd) {
				t.Fatal("host /etc/passwd changed")
			}
		})
	}
}

func TestDamagedCachedBlobIsRefetched(t *testing.T) {
	requireRootDiskTools(t, "mkfs.erofs")
	src := testimage.Busybox(t)
	host := testimage.Serve(t, map[string]v1.Image{"busybox:latest": src})
	s, storeDir := openStore(t)
	img, err := s.Pull(ctx, host+"/busybox:latest", insecure(host))
	if err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(storeDir, "blobs", "sha256", strings.TrimPrefix(layerDigests(t, src)[0], "sha256:"))
	f, err := os.OpenFile(blob, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("garbage"), 100)
	f.Close()
	if _, _, err := s.RootDisk(ctx, img); err == nil || !strings.Contains(err.Error(), "pull the image again") {
		t.Fatalf("RootDisk with a damaged blob = %v", err)
	}
	if img, err = s.Pull(ctx, host+"/busybox:latest", insecure(host)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.RootDisk(ctx, img); err != nil {
		t.Fatalf("RootDisk after re-pull: %v", err)
	}
}

func TestRemove(t *testing.T) {
	requireRootDiskTools(t, "mkfs.erofs")
	a := testimage.Busybox(t, testimage.Cmd("a"))
	b := testimage.Busybox(t, testimage.Cmd("b"))
	host := testimage.Serve(t, map[string]v1.Image{"x:a": a, "x:a2": a, "x:b": b})
	s, storeDir := openStore(t)
	for _, tag := range []string{"a", "a2", "b"} {
		if _, err := s.Pull(ctx, host+"/x:"+tag, insecure(host)); err != nil {
			t.Fatal(err)
		}
	}
	imgA, _ := s.Get(ctx, host+"/x:a")
	if _, _, err := s.RootDisk(ctx, imgA); err != nil {
		t.Fatal(err)
	}

	// Removing one of two names keeps the image.
	if err := s.Remove(ctx, host+"/x:a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, host+"/x:a"); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("Get after Remove = %v, want ErrNotFound", err)
	}
	if got, err := s.Get(ctx, host+"/x:a2"); err != nil || got.RootDisk == "" {
		t.Errorf("other name of the image: %v, %v", got, err)
	}
	// Removing by digest removes the image, its disk and its config; the
	// shared layer stays for b.
	if err := s.Remove(ctx, strings.TrimPrefix(imgA.Digest, "sha256:")[:12]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, host+"/x:a2"); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("Get after Remove by digest = %v, want ErrNotFound", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(storeDir, "disks")); len(ents) != 0 {
		t.Errorf("disks left: %v", ents)
	}
	if err := s.Remove(ctx, host+"/x:b"); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(storeDir, "blobs", "sha256")); len(ents) != 0 {
		t.Errorf("blobs left after removing every image: %v", ents)
	}
	if err := s.Remove(ctx, host+"/x:b"); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("second Remove = %v, want ErrNotFound", err)
	}
	if list, _ := s.List(ctx); len(list) != 0 {
		t.Errorf("List = %v", list)
	}
}

func TestRetagLeavesOldImageListed(t *testing.T) {
	host := testimage.Serve(t, nil)
	s, _ := openStore(t)
	old := testimage.Busybox(t, testimage.Cmd("old"))
	testimage.Push(t, host, "x:latest", old)
	if _, err := s.Pull(ctx, host+"/x:latest", insecure(host)); err != nil {
		t.Fatal(err)
	}
	testimage.Push(t, host, "x:latest", testimage.Busybox(t, testimage.Cmd("new")))
	img, err := s.Pull(ctx, host+"/x:latest", insecure(host))
	if err != nil || img.Config.Cmd[0] != "new" {
		t.Fatalf("re-pull = %v, %v", img, err)
	}
	list, _ := s.List(ctx)
	refs := []string{}
	for _, i := range list {
		refs = append(refs, i.Ref)
	}
	if len(list) != 2 || !slices.Contains(refs, "") || !slices.Contains(refs, host+"/x:latest") {
		t.Errorf("List refs = %q, want the new image named and the old one unnamed", refs)
	}
	if _, err := s.Get(ctx, digestOf(t, old)); err != nil {
		t.Errorf("old image by digest: %v", err)
	}
}

func TestOpenSweepsLeftovers(t *testing.T) {
	src := testimage.Busybox(t)
	host := testimage.Serve(t, map[string]v1.Image{"busybox:latest": src})
	s, dir := openStore(t)
	if _, err := s.Pull(ctx, host+"/busybox:latest", insecure(host)); err != nil {
		t.Fatal(err)
	}
	stray := filepath.Join(dir, "blobs", "sha256", strings.Repeat("ab", 32))
	os.WriteFile(stray, []byte("x"), 0o600)
	os.WriteFile(filepath.Join(dir, "tmp", "blob-123"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(dir, "disks", strings.Repeat("cd", 32)+".erofs"), []byte("x"), 0o600)

	s2, err := image.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"tmp", "disks"} {
		if ents, _ := os.ReadDir(filepath.Join(dir, sub)); len(ents) != 0 {
			t.Errorf("%s not swept: %v", sub, ents)
		}
	}
	if _, err := os.Stat(stray); err == nil {
		t.Error("unreferenced blob not swept")
	}
	if _, err := s2.Get(ctx, host+"/busybox:latest"); err != nil {
		t.Errorf("image lost by reopening: %v", err)
	}
}

func TestCorruptIndexIsSetAside(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	if _, err := image.Open(dir); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "index.json"), []byte("{not json"), 0o600)
	s, err := image.Open(dir, image.WithLogger(nil))
	if err == nil {
		_, err = s.List(ctx)
	}
	if err != nil {
		t.Fatalf("open with a corrupt index: %v", err)
	}
	matches, _ := filepath.Glob(filepath.Join(dir, "index.json.corrupt-*"))
	if len(matches) != 1 {
		t.Errorf("corrupt index not kept aside: %v", matches)
	}
}

// Prune removes the least recently used images not in use until the store fits the
// budget, and keeps those in use whatever the budget.
func TestPruneUnderBudget(t *testing.T) {
	imgs := map[string]v1.Image{}
	for _, tag := range []string{"a", "b", "c"} {
		imgs["x:"+tag] = testimage.Busybox(t, testimage.Cmd(tag))
	}
	host := testimage.Serve(t, imgs)
	s, _ := openStore(t)
	digests := map[string]string{}
	for _, tag := range []string{"a", "b", "c", "a"} { // a is used again: b is now the oldest
		img, err := s.Ensure(ctx, host+"/x:"+tag, insecure(host))
		if err != nil {
			t.Fatal(err)
		}
		digests[tag] = img.Digest
		time.Sleep(10 * time.Millisecond) // distinct last-use times
	}
	full := s.Usage()
	inUse := func(d string) bool { return d == digests["c"] } // c runs
	removed, err := s.Prune(ctx, full-1, 0, inUse)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != digests["b"] {
		t.Errorf("pruned %v, want only b (%s), the least recently used", removed, digests["b"])
	}
	if removed, _ := s.Prune(ctx, 1, 0, inUse); slices.Contains(removed, digests["c"]) || !slices.Contains(removed, digests["a"]) {
		t.Errorf("pruned %v under a tiny budget: want a, never c (in use)", removed)
	}
	if _, err := s.Get(ctx, digests["c"]); err != nil {
		t.Errorf("the image in use is gone: %v", err)
	}
}

// A user's pull is not served what an admin pulled (a private registry, a local path):
// not by a digest prefix, and by name only after resolving it itself, anonymously,
// through the guarded transport.
func TestUserPullsDoNotGetAdminImages(t *testing.T) {
	src := testimage.Busybox(t, testimage.Cmd("private"))
	host := testimage.Serve(t, map[string]v1.Image{"x:a": src})
	s, _ := openStore(t)
	admin, err := s.Pull(ctx, host+"/x:a", insecure(host))
	if err != nil {
		t.Fatal(err)
	}
	user := image.PullOptions{InsecureRegistries: []string{host}, User: true,
		Transport: image.GuardedTransport([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, nil)}
	if img, err := s.Ensure(ctx, strings.TrimPrefix(admin.Digest, "sha256:")[:8], user); err == nil {
		t.Errorf("a user got the admin's image by a digest prefix: %+v", img)
	}
	img, err := s.Ensure(ctx, host+"/x:a", user)
	if err != nil || !img.Public || img.Digest != admin.Digest {
		t.Fatalf("a user's pull by name: %+v %v", img, err)
	}
	// Resolved by a user's pull, it is served to users from the cache from now on.
	if img, err := s.Ensure(ctx, strings.TrimPrefix(admin.Digest, "sha256:")[:8], user); err != nil || img.Digest != admin.Digest {
		t.Errorf("a public image by prefix: %+v %v", img, err)
	}
}

// One user token's images are bounded by its share: past it the token's own least
// recently used images go (removed from the node when no one else holds them and the
// operator never asked for them), never another token's or the operator's, never one
// in use; when what is left is in use, the pull that went over is refused and let go of.
func TestOwnerShare(t *testing.T) {
	imgs := map[string]v1.Image{}
	for _, tag := range []string{"a", "b", "c", "d", "e"} {
		imgs["x:"+tag] = testimage.Busybox(t, testimage.Cmd(tag))
	}
	host := testimage.Serve(t, imgs)
	s, dir := openStore(t)
	allow := image.GuardedTransport([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, nil)
	as := func(owner string) image.PullOptions {
		return image.PullOptions{InsecureRegistries: []string{host}, User: true, Transport: allow, Owner: owner}
	}
	get := func(tag string, opts image.PullOptions) string {
		t.Helper()
		img, err := s.Ensure(ctx, host+"/x:"+tag, opts)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // distinct last-use times
		return img.Digest
	}
	has := func(d string) bool { _, err := s.Get(ctx, d); return err == nil }
	none := func(string) bool { return false }

	admin := get("d", insecure(host)) // the operator's
	shared := get("b", as("u2"))      // another token's too
	a, b, d := get("a", as("u1")), get("b", as("u1")), get("d", as("u1"))
	one, err := s.OwnerUsage("u1")
	if err != nil || one <= 0 {
		t.Fatalf("usage of u1: %d %v", one, err)
	}
	per := one / 3 // busybox images of the same size
	if owners, _ := s.Owners(); !slices.Equal(owners, []string{"u1", "u2"}) {
		t.Errorf("owners %v, want [u1 u2]", owners)
	}
	c := get("c", as("u1"))
	// Room for two: a (oldest) and b go, d's is next but two fit now.
	var removed []string
	gone := func(d string) { removed = append(removed, d) }
	if err := s.FitOwner(ctx, "u1", 2*per+per/2, c, 0, none, gone); err != nil {
		t.Fatalf("fit: %v", err)
	}
	if !slices.Equal(removed, []string{a}) {
		t.Errorf("removed callback for %v, want only %s (the one removed from the node)", removed, a)
	}
	if has(a) {
		t.Errorf("u1's least recently used image %s, held by no one else, is still in the store", a)
	}
	if !has(shared) || b != shared {
		t.Errorf("the image u2 holds too was removed")
	}
	if !has(admin) || d != admin || !has(c) {
		t.Errorf("the operator's image or the one just pulled is gone")
	}
	if got, _ := s.OwnerUsage("u1"); got > 2*per+per/2 {
		t.Errorf("u1 holds %d bytes after fitting into %d", got, 2*per+per/2)
	}
	if got, _ := s.OwnerUsage("u2"); got != per {
		t.Errorf("u2's usage changed to %d (want %d): one token's share must not touch another's", got, per)
	}
	// Everything else of u1's runs: the new pull over the share is refused and goes.
	e := get("e", as("u1"))
	running := func(x string) bool { return x != e }
	err = s.FitOwner(ctx, "u1", 2*per+per/2, e, 0, running, gone)
	if !errors.Is(err, image.ErrOwnerBudget) || !strings.Contains(err.Error(), "MiB allowed") {
		t.Fatalf("over the share with all else in use: %v, want ErrOwnerBudget naming the figures", err)
	}
	if has(e) {
		t.Errorf("the refused pull %s is still in the store", e)
	}
	for _, x := range []string{c, d} {
		if !has(x) {
			t.Errorf("image %s in use was removed", x)
		}
	}
	// The owners survive a reopen of the store (an agent restart).
	s2, err := image.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := s2.OwnerUsage("u1"); got == 0 {
		t.Errorf("u1's images are not counted after a reopen")
	}
}

// An image recorded before owners were (an index from an older release) is the
// operator's: a token that uses it and then goes over its share never removes it.
func TestOwnerShareKeepsImagesFromBefore(t *testing.T) {
	host := testimage.Serve(t, map[string]v1.Image{"x:old": testimage.Busybox(t, testimage.Cmd("old")), "x:new": testimage.Busybox(t, testimage.Cmd("new"))})
	s, dir := openStore(t)
	old, err := s.Pull(ctx, host+"/x:old", insecure(host))
	if err != nil {
		t.Fatal(err)
	}
	// What an older release wrote: no owners, no operator mark.
	index := filepath.Join(dir, "index.json")
	b, err := os.ReadFile(index)
	if err != nil {
		t.Fatal(err)
	}
	b = bytes.ReplaceAll(b, []byte(`"operator": true`), []byte(`"operator": false`))
	if err := os.WriteFile(index, b, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err = image.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	user := image.PullOptions{InsecureRegistries: []string{host}, User: true, Owner: "u1",
		Transport: image.GuardedTransport([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, nil)}
	for _, tag := range []string{"old", "new"} {
		if _, err := s.Ensure(ctx, host+"/x:"+tag, user); err != nil {
			t.Fatal(err)
		}
	}
	_ = s.FitOwner(ctx, "u1", 1, "", 0, func(string) bool { return false }, nil)
	if _, err := s.Get(ctx, old.Digest); err != nil {
		t.Errorf("an image from before owners were recorded was removed by a token's share: %v", err)
	}
}
