package initd

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

const wantResolv = "# Written by fireworks-init.\nnameserver 169.254.0.22\nnameserver 1.1.1.1\n"

var servers = []string{"169.254.0.22", "1.1.1.1"}

func readRegular(t *testing.T, path string) string {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Errorf("%s is %v, want a regular file with mode 0644", path, fi.Mode())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestWriteResolvConfReplacesSymlinks: symlinks at /etc/resolv.conf (e.g. to
// systemd-resolved's stub, or planted by a hostile image to point outside the root) are
// replaced by a regular file, never written through.
func TestWriteResolvConfReplacesSymlinks(t *testing.T) {
	outside := t.TempDir()
	victim := filepath.Join(outside, "victim")
	if err := os.WriteFile(victim, []byte("keep me\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{
		"absolute":      victim,
		"relative":      "../../../../../../../../.." + victim,
		"dangling":      "/run/systemd/resolve/stub-resolv.conf",
		"regular file":  "",
		"no etc at all": "-",
	} {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			conf := filepath.Join(root, "etc", "resolv.conf")
			switch target {
			case "-":
			case "":
				_ = os.MkdirAll(filepath.Dir(conf), 0o755)
				if err := os.WriteFile(conf, []byte("nameserver 9.9.9.9\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			default:
				_ = os.MkdirAll(filepath.Dir(conf), 0o755)
				if err := os.Symlink(target, conf); err != nil {
					t.Fatal(err)
				}
			}
			if err := writeResolvConf(root, servers); err != nil {
				t.Fatal(err)
			}
			if got := readRegular(t, conf); got != wantResolv {
				t.Errorf("resolv.conf = %q, want %q", got, wantResolv)
			}
			if b, _ := os.ReadFile(victim); string(b) != "keep me\n" {
				t.Errorf("the file outside the root was changed: %q", b)
			}
			if ents, _ := os.ReadDir(filepath.Dir(conf)); len(ents) != 1 {
				t.Errorf("/etc holds %v, want only resolv.conf", ents)
			}
		})
	}
}

// TestWriteResolvConfRefuses: /etc leading outside the root, or a directory in the way,
// is an error, and nothing is written anywhere.
func TestWriteResolvConfRefuses(t *testing.T) {
	outside := t.TempDir()
	root := t.TempDir()
	if err := os.Symlink(outside, filepath.Join(root, "etc")); err != nil {
		t.Fatal(err)
	}
	if err := writeResolvConf(root, servers); err == nil {
		t.Error("wrote through an /etc symlink that leads outside the root")
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Errorf("files appeared outside the root: %v", ents)
	}

	root = t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc", "resolv.conf"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := writeResolvConf(root, servers); err == nil || !strings.Contains(err.Error(), "resolv.conf") {
		t.Errorf("a directory at resolv.conf: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "etc", ".resolv.conf.fireworks")); err == nil {
		t.Error("the temporary file was left behind")
	}

	for _, bad := range [][]string{nil, {"1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"}, {"::1"}, {"1.1.1.1\noptions ndots:15"}} {
		root := t.TempDir()
		if err := writeResolvConf(root, bad); err == nil {
			t.Errorf("nameservers %q accepted", bad)
		}
		if _, err := os.Stat(filepath.Join(root, "etc")); err == nil {
			t.Errorf("nameservers %q: /etc was made anyway", bad)
		}
	}
}

// TestWriteResolvConfInsideRootSymlink: an /etc that is a symlink within the image (as
// if chrooted) is followed there.
func TestWriteResolvConfInsideRootSymlink(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "real-etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/real-etc", filepath.Join(root, "etc")); err != nil {
		t.Fatal(err)
	}
	if err := writeResolvConf(root, servers); err != nil {
		t.Fatal(err)
	}
	if got := readRegular(t, filepath.Join(root, "real-etc", "resolv.conf")); got != wantResolv {
		t.Errorf("resolv.conf = %q", got)
	}
}

func ipOut(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestConfigureNet runs init's rtnetlink configuration in a private network namespace
// against an ethernet interface and reads the result back with iproute2.
func TestConfigureNet(t *testing.T) {
	testutil.PrivateNetNS(t)
	ipOut(t, "link", "set", "lo", "down")
	ctx := context.Background()
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := configureNet(short, &proto.NetConfig{Address: "169.254.0.21/30", Gateway: "169.254.0.22"}); err == nil || !strings.Contains(err.Error(), "no ethernet interface") {
		t.Errorf("without an ethernet interface: %v", err)
	}
	ipOut(t, "tuntap", "add", "dev", "eth7", "mode", "tap") // an ethernet interface
	ifc, err := configureNet(ctx, &proto.NetConfig{Address: "169.254.0.21/30", Gateway: "169.254.0.22", MTU: 1400})
	if err != nil {
		t.Fatal(err)
	}
	if ifc != "eth7" {
		t.Errorf("configured %q, want eth7", ifc)
	}
	if out := ipOut(t, "-o", "link", "show", "lo"); !strings.Contains(out, ",UP") {
		t.Errorf("lo is not up: %s", out)
	}
	if out := ipOut(t, "-o", "link", "show", "eth7"); !strings.Contains(out, ",UP") || !strings.Contains(out, "mtu 1400") {
		t.Errorf("eth7 is not up with mtu 1400: %s", out)
	}
	if out := ipOut(t, "-4", "-o", "addr", "show", "dev", "eth7"); !strings.Contains(out, "inet 169.254.0.21/30 brd 169.254.0.23") {
		t.Errorf("eth7's address: %s", out)
	}
	if out := ipOut(t, "-4", "route", "show", "default"); !strings.Contains(out, "default via 169.254.0.22 dev eth7") {
		t.Errorf("default route: %q", out)
	}
	// The same request again (e.g. a retried setup) is not an error.
	if _, err := configureNet(ctx, &proto.NetConfig{Address: "169.254.0.21/30", Gateway: "169.254.0.22"}); err != nil {
		t.Errorf("configuring again: %v", err)
	}
	// Bad input is refused before anything changes.
	if _, err := configureNet(ctx, &proto.NetConfig{Address: "10.1.0.2/24", Gateway: "10.2.0.1"}); err == nil {
		t.Error("a gateway outside the network was accepted")
	}
	if out := ipOut(t, "-4", "-o", "addr", "show", "dev", "eth7"); strings.Contains(out, "10.1.0.2") {
		t.Errorf("a refused config changed the address: %s", out)
	}
}

// /etc/hostname and /etc/hosts are the sandbox's, as Docker writes them: replacing the
// image's (never writing through a symlink), with localhost and the hostname at the
// guest's address, or 127.0.1.1 without a network.
func TestWriteHostFiles(t *testing.T) {
	outside := t.TempDir()
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "hosts"), []byte("outside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "hosts"), filepath.Join(root, "etc/hosts")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("image-host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeHostFiles(root, "sb-1", netip.MustParseAddr("169.254.0.21"), []proto.HostEntry{{Name: "db", Addr: "169.254.20.11"}}); err != nil {
		t.Fatal(err)
	}
	hosts, _ := os.ReadFile(filepath.Join(root, "etc/hosts"))
	name, _ := os.ReadFile(filepath.Join(root, "etc/hostname"))
	if !strings.Contains(string(hosts), "127.0.0.1\tlocalhost\n") || !strings.Contains(string(hosts), "169.254.0.21\tsb-1\n") || !strings.Contains(string(hosts), "169.254.20.11\tdb\n") || string(name) != "sb-1\n" {
		t.Errorf("hosts %q hostname %q", hosts, name)
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "hosts")); string(b) != "outside\n" {
		t.Errorf("written through the image's symlink: %q", b)
	}
	if fi, err := os.Lstat(filepath.Join(root, "etc/hosts")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("/etc/hosts is %v, %v; want a regular file", fi, err)
	}
	if err := writeHostFiles(root, "offline", netip.Addr{}, nil); err != nil {
		t.Fatal(err)
	}
	if hosts, _ := os.ReadFile(filepath.Join(root, "etc/hosts")); !strings.Contains(string(hosts), "127.0.1.1\toffline\n") {
		t.Errorf("without a network: %q", hosts)
	}
}
