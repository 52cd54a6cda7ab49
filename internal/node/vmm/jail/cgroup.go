package jail

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Limits bound what the processes of one jail's cgroup may take.
type Limits struct {
	MemoryBytes int64
	Pids        int
	// CPUs is how many CPUs' worth of time they may use (0: no bound).
	CPUs int
}

// MakeCgroups makes cgroup id, with limits, in the directory parent under this process's
// own cgroup (on cgroup v2; on v1 one per controller) and returns the directories, for
// Spec.Cgroups. Missing lists the v1 controllers that are not mounted (their limits are
// not applied); with no cgroup support at all, none is made.
func MakeCgroups(parent, id string, l Limits) (dirs, missing []string, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		self, err := ownCgroup("")
		if err != nil {
			return nil, nil, err
		}
		p := filepath.Join("/sys/fs/cgroup", self, parent)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return nil, nil, fmt.Errorf("cgroup %s: %w", p, err)
		}
		_ = os.WriteFile(filepath.Join(p, "cgroup.subtree_control"), []byte("+cpu +memory +pids"), 0)
		dir := filepath.Join(p, id)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, nil, fmt.Errorf("cgroup %s: %w", dir, err)
		}
		errs := []error{
			os.WriteFile(filepath.Join(dir, "memory.max"), []byte(strconv.FormatInt(l.MemoryBytes, 10)), 0),
			os.WriteFile(filepath.Join(dir, "pids.max"), []byte(strconv.Itoa(l.Pids)), 0),
		}
		if l.CPUs > 0 {
			errs = append(errs, os.WriteFile(filepath.Join(dir, "cpu.max"), []byte(fmt.Sprintf("%d 100000", l.CPUs*100000)), 0))
		}
		return []string{dir}, nil, errors.Join(errs...)
	}
	limits := map[string]map[string]string{
		"memory": {"memory.limit_in_bytes": strconv.FormatInt(l.MemoryBytes, 10)},
		"pids":   {"pids.max": strconv.Itoa(l.Pids)},
	}
	if l.CPUs > 0 {
		limits["cpu"] = map[string]string{"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": strconv.Itoa(l.CPUs * 100000)}
	}
	var errs []error
	for ctrl, kv := range limits {
		self, err := ownCgroup(ctrl)
		if err != nil {
			missing = append(missing, ctrl)
			continue
		}
		dir := filepath.Join("/sys/fs/cgroup", ctrl, self, parent, id)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			errs = append(errs, fmt.Errorf("cgroup %s: %w", dir, err))
			continue
		}
		for k, v := range kv {
			errs = append(errs, os.WriteFile(filepath.Join(dir, k), []byte(v), 0))
		}
		dirs = append(dirs, dir)
	}
	return dirs, missing, errors.Join(errs...)
}

// CgroupParents are the directories MakeCgroups makes parent's cgroups in (one on v2,
// one per controller on v1).
func CgroupParents(parent string) []string {
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		if self, err := ownCgroup(""); err == nil {
			return []string{filepath.Join("/sys/fs/cgroup", self, parent)}
		}
		return nil
	}
	var out []string
	for _, ctrl := range []string{"memory", "pids", "cpu"} {
		if self, err := ownCgroup(ctrl); err == nil {
			out = append(out, filepath.Join("/sys/fs/cgroup", ctrl, self, parent))
		}
	}
	return out
}

// RemoveCgroups ends whatever still runs in the cgroups (the jailed process is gone, but
// one its input took over must not leave anything behind), then removes them.
func RemoveCgroups(dirs []string) {
	for _, d := range dirs {
		_ = os.WriteFile(filepath.Join(d, "cgroup.kill"), []byte("1"), 0) // v2
		if b, err := os.ReadFile(filepath.Join(d, "cgroup.procs")); err == nil {
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			}
		}
		for range 50 { // rmdir fails while the killed are still exiting
			if err := os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// ownCgroup is this process's cgroup path for controller ctrl ("" = the v2 hierarchy).
func ownCgroup(ctrl string) (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == ctrl {
				return parts[2], nil
			}
		}
	}
	return "", fmt.Errorf("no %q cgroup", ctrl)
}
