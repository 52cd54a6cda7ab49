package vmm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// AccelChoice is the accelerator VMs on this host run with, and why.
type AccelChoice struct {
	Accel  string `json:"accel"` // "kvm" or "tcg"
	Reason string `json:"reason"`
}

// ProbeTimeout bounds the KVM probe boot: a standard kernel under working KVM prints its
// first serial byte well under a second; under the nested PVM hypervisor it never does.
var ProbeTimeout = 8 * time.Second

// DetectAccel decides between KVM and TCG. force ("kvm" or "tcg") skips detection. Without
// /dev/kvm it is TCG. On a host whose KVM is the nested PVM hypervisor (/sys/module/kvm_pvm),
// a standard guest kernel hangs under -accel kvm, so it is TCG. Otherwise a short KVM boot of
// kernel decides (does the first serial byte arrive before ProbeTimeout?), and the verdict is
// cached in cacheDir per host kernel and guest kernel, so the probe runs once per host.
func DetectAccel(ctx context.Context, cacheDir, force, kernel string) AccelChoice {
	switch force {
	case "tcg":
		return AccelChoice{"tcg", "forced by configuration"}
	case "kvm":
		if err := kvmUsable(); err != nil {
			return AccelChoice{"kvm", fmt.Sprintf("forced by configuration, although %v", err)}
		}
		return AccelChoice{"kvm", "forced by configuration"}
	}
	if err := kvmUsable(); err != nil {
		return AccelChoice{"tcg", err.Error()}
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return AccelChoice{"tcg", "host KVM is the nested PVM hypervisor (/sys/module/kvm_pvm), which boots only PVM guest kernels"}
	}
	if kernel == "" {
		return AccelChoice{"tcg", "no guest kernel to probe KVM with"}
	}

	key := probeKey(kernel)
	cache := filepath.Join(cacheDir, "accel-probe-"+key+".json")
	if b, err := os.ReadFile(cache); err == nil {
		var c AccelChoice
		if json.Unmarshal(b, &c) == nil && (c.Accel == "kvm" || c.Accel == "tcg") {
			return c
		}
	}
	c := probeKVM(ctx, kernel)
	if ctx.Err() == nil { // an interrupted probe proves nothing; do not remember it
		if b, err := json.Marshal(c); err == nil && os.MkdirAll(cacheDir, 0o755) == nil {
			tmp := cache + ".tmp"
			if os.WriteFile(tmp, b, 0o644) == nil {
				_ = os.Rename(tmp, cache)
			}
		}
	}
	return c
}

// kvmDevice is the KVM device node; a variable so tests can check the verdict for a host
// without KVM on any machine.
var kvmDevice = "/dev/kvm"

func kvmUsable() error {
	f, err := os.OpenFile(kvmDevice, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("%s is not usable: %v", kvmDevice, err)
	}
	f.Close()
	return nil
}

// probeKey identifies the host kernel and the guest kernel file.
func probeKey(kernel string) string {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	h := sha256.New()
	h.Write(uts.Release[:])
	h.Write(uts.Version[:])
	if fi, err := os.Stat(kernel); err == nil {
		fmt.Fprintf(h, "%s\x00%d\x00%d", kernel, fi.Size(), fi.ModTime().UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func probeKVM(ctx context.Context, kernel string) AccelChoice {
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	cmd := exec.Command("qemu-system-x86_64",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
		"-kernel", kernel, "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1",
		"-serial", "stdio")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return AccelChoice{"tcg", fmt.Sprintf("KVM probe: %v", err)}
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return AccelChoice{"tcg", fmt.Sprintf("KVM probe: start qemu-system-x86_64: %v", err)}
	}
	got := make(chan error, 1)
	go func() {
		_, err := io.ReadFull(stdout, make([]byte, 1))
		got <- err
	}()
	// stderr is read only after Wait: exec's copier goroutine writes it until then.
	outcome, drained := "timeout", false
	select {
	case err := <-got:
		drained = true
		outcome = "failed"
		if err == nil {
			outcome = "printed"
		}
	case <-ctx.Done():
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait() // closes stdout, which ends the reader goroutine
	if !drained {
		<-got
	}
	var res AccelChoice
	switch outcome {
	case "printed":
		res = AccelChoice{"kvm", "KVM probe boot printed to the serial console"}
	case "failed":
		res = AccelChoice{"tcg", fmt.Sprintf("KVM probe boot failed: %s", firstLine(stderr.String(), "qemu exited without output"))}
	default:
		res = AccelChoice{"tcg", fmt.Sprintf("KVM probe boot printed nothing within %s (a standard guest kernel hangs under this host's KVM)", ProbeTimeout)}
	}
	return res
}

func firstLine(s, def string) string {
	s = strings.TrimSpace(s)
	if s == "" {
		return def
	}
	line, _, _ := strings.Cut(s, "\n")
	return line
}
