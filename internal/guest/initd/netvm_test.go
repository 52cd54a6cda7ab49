package initd_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/guest/client"
	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/qemu"
	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/vmmtest"
	"github.com/fireworks-sandbox/fireworks/internal/testutil"
)

// TestGuestNetworkInVM boots the real fireworks-init in a VM with a NIC on a tap in a
// private namespace, sends the Setup a sandbox gets (an erofs image whose resolv.conf is
// a symlink, as in Debian images), and proves that init configured the interface, the
// default route and resolv.conf: programs in the sandbox reach the host end, the host
// end reaches a server in the sandbox. Identity then replaces the nameservers.
func TestGuestNetworkInVM(t *testing.T) {
	if testing.Short() {
		testutil.Skipf(t, "-short: this test boots a VM (run without -short; CI does)")
	}
	for _, tool := range []string{"qemu-system-x86_64", "mkfs.erofs", "apt-get", "dpkg-deb", "lz4", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skipf(t, "%s not found (run ./scripts/install-deps.sh)", tool)
		}
	}
	if _, err := os.Stat(vmmtest.BusyboxPath); err != nil {
		testutil.Skipf(t, "static busybox not found at %s (apt-get install busybox-static)", vmmtest.BusyboxPath)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	work, err := os.MkdirTemp("", "fwnet-") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })

	k, err := assets.EnsureKernel(ctx, vmmtest.CacheDir())
	if err != nil {
		testutil.Skipf(t, "guest kernel unavailable: %v", err)
	}
	initBin := buildInit(t, work)
	ir, err := assets.BuildInitramfs(ctx, vmmtest.CacheDir(), k, initBin)
	if err != nil {
		t.Fatal(err)
	}
	rootImg := buildRootImage(t, ctx, work)

	tap := vmmtest.HostNet(t)
	d, err := qemu.New(qemu.Config{Accel: "tcg"})
	if err != nil {
		t.Fatal(err)
	}
	spec := vmm.Spec{
		ID: "netvm", Dir: filepath.Join(work, "run"), Kernel: k.Vmlinux, Initrd: ir.Path,
		Cmdline: assets.KernelCmdline(ir.Modules), VCPUs: 1, MemoryMiB: 256,
		Disks:       []vmm.Disk{{Path: rootImg, ReadOnly: true}},
		AgentSocket: filepath.Join(work, "agent.sock"),
		NICs:        []vmm.NIC{{Tap: tap, MAC: vmmtest.GuestMAC}},
	}
	ln, err := net.Listen("unix", spec.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	vm, err := d.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	tap.Close()
	t.Cleanup(func() {
		_ = vm.Kill()
		<-vm.Wait()
	})
	_ = ln.(*net.UnixListener).SetDeadline(time.Now().Add(2 * time.Minute))
	conn, err := ln.Accept()
	if err != nil {
		t.Fatalf("no connection from the VM: %v", err)
	}
	c, err := client.HandshakeWithOptions(ctx, conn, client.Options{HandshakeTimeout: 2 * time.Minute})
	if err != nil {
		t.Fatalf("handshake: %v; console:\n%s", err, console(vm))
	}
	defer c.Close()

	err = c.Setup(ctx, proto.Setup{
		Hostname: "netvm", RootDevice: "/dev/vda", RootFSType: "erofs",
		Net:         &proto.NetConfig{Address: vmmtest.GuestCIDR, Gateway: vmmtest.HostAddr, MTU: 1400},
		Nameservers: []string{vmmtest.HostAddr, "1.1.1.1"},
	})
	if err != nil {
		t.Fatalf("Setup: %v; console:\n%s", err, console(vm))
	}
	if got := guestRun(t, c, "cat", "/etc/resolv.conf"); got != "# Written by fireworks-init.\nnameserver 169.254.0.22\nnameserver 1.1.1.1\n" {
		t.Errorf("resolv.conf after Setup: %q", got)
	}
	if got := guestRun(t, c, "sh", "-c", "test -L /etc/resolv.conf && echo symlink || echo regular"); got != "regular\n" {
		t.Errorf("/etc/resolv.conf is a %s", got)
	}
	if got := guestRun(t, c, "cat", "/sys/class/net/eth0/mtu"); got != "1400\n" {
		t.Errorf("eth0's MTU is %q", got)
	}
	// The off-link address is reached only through the default route.
	for _, addr := range []string{vmmtest.HostAddr, vmmtest.OffLinkAddr} {
		if got := guestRun(t, c, "wget", "-q", "-O", "-", "http://"+net.JoinHostPort(addr, vmmtest.HostPort)+"/"); got != vmmtest.HostBody+"\n" {
			t.Errorf("guest fetching from the host end (%s) got %q", addr, got)
		}
	}
	guestRun(t, c, "httpd", "-p", vmmtest.GuestPort, "-h", "/www") // daemonizes
	if body, err := vmmtest.HostFetch(net.JoinHostPort(vmmtest.GuestAddr, vmmtest.GuestPort)); err != nil || !strings.Contains(body, "served-by-the-sandbox") {
		t.Errorf("host fetching from the sandbox: %q, %v", body, err)
	}

	if err := c.Identity(ctx, proto.Identity{Hostname: "sb", Nameservers: []string{"10.0.0.53"}}); err != nil {
		t.Fatal(err)
	}
	if got := guestRun(t, c, "cat", "/etc/resolv.conf"); got != "# Written by fireworks-init.\nnameserver 10.0.0.53\n" {
		t.Errorf("resolv.conf after Identity: %q", got)
	}
	if err := c.Identity(ctx, proto.Identity{Hostname: "sb2"}); err != nil {
		t.Fatal(err)
	}
	if got := guestRun(t, c, "cat", "/etc/resolv.conf"); got != "# Written by fireworks-init.\nnameserver 10.0.0.53\n" {
		t.Errorf("an Identity without nameservers changed resolv.conf: %q", got)
	}
}

// guestRun execs a busybox applet in the guest and returns its stdout, failing on a non-zero
// exit.
func guestRun(t *testing.T, c *client.Client, argv ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := c.Exec(ctx, proto.ExecRequest{Argv: append([]string{"/bin/busybox"}, argv...)})
	if err != nil {
		t.Fatalf("exec %q: %v", argv, err)
	}
	var stdout, stderr bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _, _ = io.Copy(&stdout, s.Stdout()) }()
	go func() { defer wg.Done(); _, _ = io.Copy(&stderr, s.Stderr()) }()
	wg.Wait()
	st, err := s.Wait(ctx)
	if err != nil || st.Code != 0 {
		t.Fatalf("exec %q: %+v %v; stderr: %s", argv, st, err, stderr.String())
	}
	return stdout.String()
}

func console(vm vmm.VM) string {
	b, _ := os.ReadFile(vm.Info().ConsoleLog)
	return string(b)
}

// buildInit builds cmd/fireworks-init as the guest gets it (static).
func buildInit(t *testing.T, dir string) string {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	out := filepath.Join(dir, "fireworks-init")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/fireworks-init")
	cmd.Dir = filepath.Join(filepath.Dir(self), "..", "..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build fireworks-init: %v: %s", err, b)
	}
	return out
}

// buildRootImage makes an erofs image with busybox, a web root, and /etc/resolv.conf as
// a dangling symlink (as systemd-resolved images have it).
func buildRootImage(t *testing.T, ctx context.Context, dir string) string {
	t.Helper()
	tree := filepath.Join(dir, "tree")
	for _, d := range []string{"bin", "etc", "www", "tmp"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bb, err := os.ReadFile(vmmtest.BusyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "bin", "busybox"), bb, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(tree, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "www", "index.html"), []byte("served-by-the-sandbox\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(tree, "etc", "resolv.conf")); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "root.erofs")
	if b, err := exec.CommandContext(ctx, "mkfs.erofs", img, tree).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v: %s", err, b)
	}
	return img
}
