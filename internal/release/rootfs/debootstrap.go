package rootfs

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Debootstrap builds a Debian minbase root filesystem in dir (which must not exist) with
// debootstrap, the way hand-built and `docker import` base images are made: the host's
// own release, from the package mirror this machine's apt is configured with, plus the
// packages in include. The downloaded .debs are removed from the tree afterwards.
func Debootstrap(ctx context.Context, dir string, include ...string) error {
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return fmt.Errorf("debootstrap not found (scripts/install-deps.sh installs it): %w", err)
	}
	suite, err := HostSuite()
	if err != nil {
		return err
	}
	mirror, err := AptMirror(suite)
	if err != nil {
		return err
	}
	args := []string{"--variant=minbase"}
	if len(include) > 0 {
		args = append(args, "--include="+strings.Join(include, ","))
	}
	args = append(args, suite, dir, mirror)
	// In a mount namespace of its own, so the proc and sys mounts debootstrap makes in the
	// tree vanish with it whatever happens; in a process group of its own, so a cancelled
	// run takes the chroot's dpkg and apt children along.
	cmd := exec.CommandContext(ctx, "unshare", append([]string{"--mount", "--propagation", "private", "--fork", "debootstrap"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		tail := string(out)
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		if log, lerr := os.ReadFile(filepath.Join(dir, "debootstrap/debootstrap.log")); lerr == nil && len(log) > 0 {
			if len(log) > 4000 {
				log = log[len(log)-4000:]
			}
			tail += "\ndebootstrap.log:\n" + string(log)
		}
		return fmt.Errorf("debootstrap %s: %w\n%s", strings.Join(args, " "), err, tail)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "var/cache/apt/archives/*.deb"))
	for _, d := range debs {
		_ = os.Remove(d)
	}
	return nil
}

// HostSuite is the Debian suite (codename) this machine runs, e.g. bookworm.
func HostSuite() (string, error) { return osRelease("VERSION_CODENAME") }

func osRelease(key string) (string, error) {
	f, err := os.Open("/etc/os-release")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+"="); ok {
			return strings.Trim(v, `"`), nil
		}
	}
	return "", fmt.Errorf("/etc/os-release has no %s", key)
}

// AptMirror returns the first archive URI this machine's apt sources list for suite,
// in either the one-line or the deb822 format.
func AptMirror(suite string) (string, error) {
	files := []string{"/etc/apt/sources.list"}
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	files = append(files, more...)
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		switch {
		case strings.HasSuffix(name, ".sources"):
			for _, stanza := range strings.Split(string(data), "\n\n") {
				var uris, suites, types []string
				enabled := true
				for _, line := range strings.Split(stanza, "\n") {
					k, v, ok := strings.Cut(line, ":")
					if !ok || strings.HasPrefix(line, "#") {
						continue
					}
					switch strings.TrimSpace(k) {
					case "URIs":
						uris = strings.Fields(v)
					case "Suites":
						suites = strings.Fields(v)
					case "Types":
						types = strings.Fields(v)
					case "Enabled":
						enabled = strings.TrimSpace(v) != "no"
					}
				}
				if enabled && len(uris) > 0 && slices.Contains(suites, suite) && slices.Contains(types, "deb") {
					return uris[0], nil
				}
			}
		case strings.HasSuffix(name, ".list"):
			for _, line := range strings.Split(string(data), "\n") {
				f := strings.Fields(line)
				// deb [options] URI suite components...
				if len(f) >= 3 && f[0] == "deb" {
					f = f[1:]
					if strings.HasPrefix(f[0], "[") {
						for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
							f = f[1:]
						}
						if len(f) > 0 {
							f = f[1:]
						}
					}
					if len(f) >= 2 && f[1] == suite {
						return f[0], nil
					}
				}
			}
		}
	}
	return "", fmt.Errorf("no apt source for %s in /etc/apt/sources.list or /etc/apt/sources.list.d", suite)
}
