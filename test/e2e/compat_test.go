package e2e

import (
	"archive/tar"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/fireworks-sandbox/fireworks/internal/testutil"
	"github.com/fireworks-sandbox/fireworks/internal/testutil/testimage"
)

// The image compatibility suite: images built the way real images are built, each booted
// in a real VM and checked from inside the guest. Every image kind here is one Docker
// runs; a refusal of any of them would be a compatibility bug.

// keyed parses "key=value" lines of a guest script's output.
func keyed(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			m[k] = v
		}
	}
	return m
}

func expect(t *testing.T, what string, got map[string]string, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s = %q, want %q", what, k, got[k], v)
		}
	}
}

// A Debian root filesystem from debootstrap (minbase), imported as one layer the way
// `docker import` makes base images: its /dev nodes, setuid programs and the file
// capability iputils-ping's postinst sets are all in it. apt and dpkg work inside, and
// ping runs as an unprivileged user only because its capability survived.
func TestImageDebianMinbase(t *testing.T) {
	need(t)
	ref := debianImage(t)

	script := `echo debian_version=$(cut -d. -f1 /etc/debian_version)
echo apt=$(apt-get --version | head -n1 | cut -d' ' -f1)
echo dpkg_many=$([ "$(dpkg -l | grep -c '^ii')" -gt 50 ] && echo yes)
echo dpkg_ping=$(dpkg-query -W -f='${Status}' iputils-ping)
echo getcap=$(getcap /usr/bin/ping | cut -d' ' -f2)
echo passwd_mode=$(stat -c %A /usr/bin/passwd)
cp /usr/bin/ping /tmp/ping-nocap
echo ping_as_nobody=$(setpriv --reuid=65534 --regid=65534 --clear-groups ping -c1 -W5 127.0.0.1 >/dev/null 2>&1 && echo ok || echo failed)
echo ping_nocap_as_nobody=$(setpriv --reuid=65534 --regid=65534 --clear-groups /tmp/ping-nocap -c1 -W5 127.0.0.1 >/dev/null 2>&1 && echo ok || echo failed)
echo dev_full=$(stat -c %F /dev/full)
echo shell=$(readlink -f /bin/sh)
echo self_resolves=$(getent hosts "$(hostname)" >/dev/null && echo yes)
echo hostname_file=$([ "$(cat /etc/hostname)" = "$(hostname)" ] && echo same)`
	r := fw(t, 0, "run", ref, "--", "bash", "-c", script)
	expect(t, "debian minbase", keyed(r.stdout), map[string]string{
		"debian_version":       "12",
		"apt":                  "apt",
		"dpkg_many":            "yes",
		"dpkg_ping":            "install ok installed",
		"getcap":               "cap_net_raw=ep",
		"passwd_mode":          "-rwsr-xr-x",
		"ping_as_nobody":       "ok",
		"ping_nocap_as_nobody": "failed", // the control: without the capability it cannot
		"dev_full":             "character special file",
		"shell":                "/usr/bin/dash",
		"self_resolves":        "yes",  // /etc/hosts names the sandbox, as Docker's does
		"hostname_file":        "same", // and /etc/hostname is the sandbox's, not the image's
	})
	if t.Failed() {
		t.Logf("guest output:\n%s\n%s", r.stdout, r.stderr)
	}
	// The image's default command is honoured too (bash reading an empty stdin exits 0).
	fw(t, 0, "run", ref)
}

// A layered image with what real images carry, over three layers compressed with gzip,
// zstd and nothing: hardlinks across directories, set-id bits, long (PAX) and non-ASCII
// names, a symlink chain through an absolute link, a FIFO and a device node outside
// /dev, a sparse file (GNU tar --sparse), whiteouts and an opaque directory.
func TestImageFilesystemFeatures(t *testing.T) {
	need(t)
	long := strings.Repeat("a-long-name-", 18) + "end" // 219 bytes: a PAX path record
	type E = testimage.Entry
	l1 := testimage.Tar(t,
		E{Name: "usr/lib/fw/", Type: tar.TypeDir},
		E{Name: "usr/lib/fw/shared", Body: "shared-body"},
		E{Name: "opt/fw/other/", Type: tar.TypeDir},
		E{Name: "opt/fw/other/shared-link", Type: tar.TypeLink, Link: "usr/lib/fw/shared"},
		E{Name: "usr/local/bin/suid", Mode: 0o4755, Body: "#!/bin/sh\necho suid\n"},
		E{Name: "srv/shared/", Type: tar.TypeDir, Mode: 0o2775, GID: 1000},
		E{Name: "opt/fw/" + long, Body: "long-ok"},
		E{Name: "opt/fw/naïve-日本語.txt", Body: "utf8-ok"},
		E{Name: "opt/fw/target-file", Body: "chain-ok"},
		E{Name: "opt/fw/chain3", Type: tar.TypeSymlink, Link: "/opt/fw/target-file"},
		E{Name: "opt/fw/chain2", Type: tar.TypeSymlink, Link: "chain3"},
		E{Name: "opt/fw/chain1", Type: tar.TypeSymlink, Link: "../fw/chain2"},
		E{Name: "opt/fw/fifo", Type: tar.TypeFifo, Mode: 0o644},
		E{Name: "opt/fw/devnull", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devmin: 3},
		E{Name: "opt/wh/gone", Body: "gone"},
		E{Name: "opt/wh/keep", Body: "keep"},
		E{Name: "opt/opq/old1", Body: "old"},
		E{Name: "opt/opq/sub/old2", Body: "old"},
		E{Name: "layers/gzip", Body: "gzip-ok"},
	)
	l2 := testimage.Tar(t,
		E{Name: "opt/wh/.wh.gone"},
		E{Name: "opt/opq/", Type: tar.TypeDir},
		E{Name: "opt/opq/.wh..wh..opq"},
		E{Name: "opt/opq/new", Body: "new"},
		E{Name: "layers/zstd", Body: "zstd-ok"},
	)
	// The third layer is written by GNU tar: a sparse file (32 MiB, data only at both ends).
	dir := t.TempDir()
	for _, d := range []string{"opt/sparse", "layers"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.Create(filepath.Join(dir, "opt/sparse/big"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("head"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("tail"), 32<<20-4); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.WriteFile(filepath.Join(dir, "layers/none"), []byte("none-ok"), 0o644); err != nil {
		t.Fatal(err)
	}
	l3 := testimage.GNUTar(t, dir, "--sparse")
	img := testimage.WithLayers(t, testimage.Busybox(t),
		testimage.LayerCompressed(t, l1, testimage.Gzip),
		testimage.LayerCompressed(t, l2, testimage.Zstd),
		testimage.LayerCompressed(t, l3, testimage.Uncompressed))
	testimage.Push(t, world.registry, "features:latest", img)

	script := `cd /opt/fw
echo suid=$(stat -c '%a %u' /usr/local/bin/suid)
echo setgid_dir=$(stat -c '%a %g' /srv/shared)
echo hardlink=$([ "$(stat -c %i /usr/lib/fw/shared)" = "$(stat -c %i other/shared-link)" ] && stat -c %h other/shared-link)
echo long=$(cat ` + long + `)
echo utf8=$(cat naïve-日本語.txt)
echo chain=$(cat chain1)
echo fifo=$(stat -c %F fifo)
echo devnull=$(stat -c '%F %t:%T' devnull)
echo devnull_write=$(echo x > devnull && echo ok)
echo whiteout=$(ls /opt/wh | tr '\n' ' ')
echo opaque=$(ls /opt/opq | tr '\n' ' ')
echo sparse_size=$(stat -c %s /opt/sparse/big)
echo sparse_ends=$(head -c 4 /opt/sparse/big)$(tail -c 4 /opt/sparse/big)
echo sparse_zeros=$(head -c 1048580 /opt/sparse/big | tail -c 1048576 | tr -d '\000' | wc -c)
echo layers=$(cat /layers/gzip /layers/zstd /layers/none | tr '\n' ' ')`
	r := fw(t, 0, "run", "-u", "0", image("features:latest"), "--", "sh", "-c", script)
	expect(t, "filesystem features", keyed(r.stdout), map[string]string{
		"suid":          "4755 0",
		"setgid_dir":    "2775 1000",
		"hardlink":      "2",
		"long":          "long-ok",
		"utf8":          "utf8-ok",
		"chain":         "chain-ok",
		"fifo":          "fifo",
		"devnull":       "character special file 1:3",
		"devnull_write": "ok",
		"whiteout":      "keep",
		"opaque":        "new",
		"sparse_size":   "33554432",
		"sparse_ends":   "headtail",
		"sparse_zeros":  "0",
		"layers":        "gzip-okzstd-oknone-ok",
	})
	if t.Failed() {
		t.Logf("guest output:\n%s\n%s", r.stdout, r.stderr)
	}
}

// platformImage is busybox with /platform naming arch, and a config saying so.
func platformImage(t *testing.T, arch string) v1.Image {
	img := testimage.WithLayers(t, testimage.Busybox(t), testimage.Layer(t, testimage.Entry{Name: "platform", Body: arch}))
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = arch
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

// Manifest kinds: an OCI index of several platforms (linux/amd64 is picked), a Docker
// schema-2 manifest with Docker media types throughout, and a `docker save` tarball
// booted through docker-archive:.
func TestImageManifestKinds(t *testing.T) {
	need(t)
	t.Run("oci-index", func(t *testing.T) {
		idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
		for _, p := range []v1.Platform{{OS: "linux", Architecture: "arm64", Variant: "v8"}, {OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "s390x"}} {
			idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: platformImage(t, p.Architecture), Descriptor: v1.Descriptor{Platform: &p}})
		}
		testimage.PushIndex(t, world.registry, "multiarch:latest", idx)
		if r := fw(t, 0, "run", image("multiarch:latest"), "--", "cat", "/platform"); r.stdout != "amd64" {
			t.Errorf("multi-platform index: ran %q, want the linux/amd64 image", r.stdout)
		}
	})
	t.Run("docker-schema2", func(t *testing.T) {
		base := testimage.Busybox(t)
		img := mutate.MediaType(empty.Image, types.DockerManifestSchema2)
		img = mutate.ConfigMediaType(img, types.DockerConfigJSON)
		layers, err := base.Layers()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range append(layers, testimage.Layer(t, testimage.Entry{Name: "kind", Body: "docker-schema2"})) {
			dl, err := tarball.LayerFromOpener(l.Uncompressed, tarball.WithMediaType(types.DockerLayer))
			if err != nil {
				t.Fatal(err)
			}
			if img, err = mutate.AppendLayers(img, dl); err != nil {
				t.Fatal(err)
			}
		}
		bcf, _ := base.ConfigFile()
		cf, _ := img.ConfigFile()
		cf = cf.DeepCopy()
		cf.OS, cf.Architecture, cf.Config = "linux", "amd64", bcf.Config
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			t.Fatal(err)
		}
		if mt, _ := img.MediaType(); mt != types.DockerManifestSchema2 {
			t.Fatalf("built a %s manifest", mt)
		}
		testimage.Push(t, world.registry, "docker-schema2:latest", img)
		if r := fw(t, 0, "run", image("docker-schema2:latest"), "--", "cat", "/kind"); r.stdout != "docker-schema2" {
			t.Errorf("Docker schema-2 image: ran %q", r.stdout)
		}
	})
	t.Run("docker-archive", func(t *testing.T) {
		img := testimage.WithLayers(t, testimage.Busybox(t), testimage.Layer(t, testimage.Entry{Name: "kind", Body: "docker-save"}))
		file := filepath.Join(t.TempDir(), "saved.tar")
		testimage.WriteDockerArchive(t, file, img, "saved/app:v1")
		if r := fw(t, 0, "run", "docker-archive:"+file, "--", "cat", "/kind"); r.stdout != "docker-save" {
			t.Errorf("docker-archive: ran %q", r.stdout)
		}
		if r := fw(t, 0, "run", "docker-archive:"+file+":saved/app:v1", "--", "cat", "/kind"); r.stdout != "docker-save" {
			t.Errorf("docker-archive with a tag: ran %q", r.stdout)
		}
	})
}

// Image config the way Docker reads it: User as a name, a uid and uid:gid; Entrypoint and
// Cmd with and without --entrypoint; Env merged with -e; a WorkingDir that does not exist
// in the image (created, as Docker does).
func TestImageConfig(t *testing.T) {
	need(t)
	cfg := testimage.Configure(t, testimage.Busybox(t),
		testimage.User("app"), testimage.Entrypoint("/bin/echo", "ep"), testimage.Cmd("cmd-default"),
		testimage.Env("BAR=image", "BAZ=image"), testimage.Workdir("/work/missing"))
	testimage.Push(t, world.registry, "config:latest", cfg)
	ref := image("config:latest")
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"entrypoint and cmd", []string{ref}, "ep cmd-default\n"},
		{"args replace cmd", []string{ref, "--", "x", "y"}, "ep x y\n"},
		{"entrypoint override drops cmd", []string{"--entrypoint", "/bin/pwd", ref}, "/work/missing\n"},
		{"entrypoint override with args", []string{"--entrypoint", "/bin/sh", ref, "--", "-c", "id -u; id -g; pwd"}, "1000\n1000\n/work/missing\n"},
		{"env merged with -e", []string{"-e", "BAR=cli", "-e", "NEW=cli", "--entrypoint", "/bin/sh", ref, "--", "-c", "echo $FOO $BAR $BAZ $NEW"}, "from-image cli image cli\n"},
		{"cleared entrypoint", []string{"--entrypoint", "", ref, "--", "echo", "no-ep"}, "no-ep\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if r := fw(t, 0, append([]string{"run"}, c.args...)...); r.stdout != c.want {
				t.Errorf("run %v: %q, want %q", c.args, r.stdout, c.want)
			}
		})
	}
	for _, c := range []struct{ user, want string }{
		{"1000", "1000:1000 /home/app"},      // a uid with a passwd entry takes its group and home
		{"4321", "4321:0 /"},                 // a uid without one: group 0, HOME=/
		{"1000:4242", "1000:4242 /home/app"}, // uid:gid
	} {
		t.Run("user "+c.user, func(t *testing.T) {
			img := testimage.Configure(t, testimage.Busybox(t), testimage.User(c.user))
			tag := "user-" + strings.ReplaceAll(c.user, ":", "-") + ":latest"
			testimage.Push(t, world.registry, tag, img)
			r := fw(t, 0, "run", "--boot", "cold", image(tag), "--", "sh", "-c", `echo "$(id -u):$(id -g) $HOME"`)
			if strings.TrimSpace(r.stdout) != c.want {
				t.Errorf("image User %q: %q, want %q", c.user, r.stdout, c.want)
			}
		})
	}
}

// Past --image-disk-mib, the node removes the least recently used images nothing runs
// from; the image a sandbox runs from stays.
func TestImagesPrunedUnderBudget(t *testing.T) {
	need(t)
	for _, tag := range []string{"prune-a", "prune-b"} {
		testimage.Push(t, world.registry, tag+":latest", testimage.Busybox(t, testimage.Cmd(tag)))
	}
	restartDev(t, "--image-disk-mib", "1")
	t.Cleanup(func() { restartDev(t) })
	fw(t, 0, "run", "--boot", "cold", image("prune-a:latest"), "--", "true")
	id := strings.TrimSpace(fw(t, 0, "run", "-d", "--boot", "cold", image("prune-b:latest"), "--", "sleep", "600").stdout)
	t.Cleanup(func() { world.cli(context.Background(), nil, "rm", "-f", id) })
	waitStatus(t, id, "running")
	deadline := time.Now().Add(60 * time.Second)
	for {
		ls := fw(t, 0, "image", "ls").stdout
		if !strings.Contains(ls, "prune-a") {
			if !strings.Contains(ls, "prune-b") {
				t.Fatalf("the image a running sandbox uses was removed:\n%s", ls)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("an unused image stayed past the disk budget:\n%s", ls)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// debianImage pushes the debootstrapped Debian root (see TestImageDebianMinbase) to the
// test registry as one layer and returns its reference.
func debianImage(t *testing.T) string {
	t.Helper()
	root := os.Getenv(debianRootEnv)
	if root == "" {
		testutil.Skipf(t, "no Debian root filesystem (%s unset: the e2e run bootstraps one before entering its network namespace)", debianRootEnv)
	}
	if fi, err := os.Lstat(filepath.Join(root, "dev/full")); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Fatalf("the debootstrap tree has no /dev/full device node to import (%v, %v)", fi, err)
	}
	img := testimage.DirImage(t, root, v1.Config{
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Cmd: []string{"bash"},
	})
	testimage.Push(t, world.registry, "debian-minbase:latest", img)
	return image("debian-minbase:latest")
}
