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

// DefaultCgroupRoot is where the cgroup filesystem is mounted on a host.
const DefaultCgroupRoot = "/sys/fs/cgroup"

// Place says where a jail's cgroups go. Root is where the cgroup filesystem is mounted
// (DefaultCgroupRoot when empty; an agent in a pod mounts the host's elsewhere). Parent
// is the directory they go in: relative, under this process's own cgroup; absolute, from
// the top of the hierarchy (so they are not in this process's cgroup, and outlive what
// ends it: a pod's container takes its cgroup's processes with it).
type Place struct {
	Root, Parent string
}

func (p Place) root() string {
	if p.Root == "" {
		return DefaultCgroupRoot
	}
	return p.Root
}

func (p Place) v2() bool {
	var st unix.Statfs_t
	return unix.Statfs(p.root(), &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// dir is Parent's directory in controller ctrl's hierarchy ("" = the v2 hierarchy).
func (p Place) dir(ctrl string) (string, error) {
	base := filepath.Join(p.root(), ctrl)
	if filepath.IsAbs(p.Parent) {
		if _, err := os.Stat(base); err != nil {
			return "", fmt.Errorf("no %q cgroup: %w", ctrl, err)
		}
		return filepath.Join(base, p.Parent), nil
	}
	self, err := ownCgroup(ctrl)
	if err != nil {
		return "", err
	}
	return filepath.Join(base, self, p.Parent), nil
}

// MakeCgroups makes cgroup id, with limits, in place (on cgroup v2; on v1 one per
// controller) and returns the directories, for Spec.Cgroups. Missing lists the v1
// controllers that are not mounted (their limits are not applied); with no cgroup support
// at all, none is made.
func MakeCgroups(place Place, id string, l Limits) (dirs, missing []string, err error) {
	if place.v2() {
		p, err := place.dir("")
		if err != nil {
			return nil, nil, err
		}
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
	for _, ctrl := range place.v1Hierarchies() {
		p, err := place.dir(ctrl)
		if err != nil {
			if limits[ctrl] != nil {
				missing = append(missing, ctrl)
			}
			continue
		}
		dir := filepath.Join(p, id)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			errs = append(errs, fmt.Errorf("cgroup %s: %w", dir, err))
			continue
		}
		if ctrl == "cpuset" {
			// A new cpuset cgroup has no CPUs or memory nodes: a process cannot join it
			// until they are copied down from above.
			if err := fillCpuset(filepath.Join(place.root(), ctrl), dir); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		for k, v := range limits[ctrl] {
			errs = append(errs, os.WriteFile(filepath.Join(dir, k), []byte(v), 0))
		}
		dirs = append(dirs, dir)
	}
	return dirs, missing, errors.Join(errs...)
}

// v1Hierarchies are the cgroup v1 hierarchies a jail's cgroups are made in: those of the
// limits (memory, pids, cpu) under this process's own cgroup; with an absolute Parent,
// every mounted one, so the jailed process leaves this process's cgroups altogether
// (a container's runtime ends whatever is left in the container's: runc lists them in
// the devices hierarchy, freezes them in the freezer one).
func (p Place) v1Hierarchies() []string {
	out := []string{"memory", "pids", "cpu"}
	if !filepath.IsAbs(p.Parent) {
		return out
	}
	seen := map[string]bool{}
	for _, c := range out {
		if r, err := filepath.EvalSymlinks(filepath.Join(p.root(), c)); err == nil {
			seen[r] = true
		}
	}
	ents, _ := os.ReadDir(p.root())
	for _, e := range ents {
		full := filepath.Join(p.root(), e.Name())
		r, err := filepath.EvalSymlinks(full)
		if err != nil || seen[r] {
			continue
		}
		if _, err := os.Stat(filepath.Join(full, "cgroup.procs")); err != nil {
			continue
		}
		seen[r] = true
		out = append(out, e.Name())
	}
	return out
}

// fillCpuset gives every cpuset cgroup from top down to dir the CPUs and memory nodes of
// its parent where it has none.
func fillCpuset(top, dir string) error {
	rel, err := filepath.Rel(top, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("cpuset cgroup %s is not under %s", dir, top)
	}
	parent := top
	for _, part := range strings.Split(rel, string(filepath.Separator)) {
		cur := filepath.Join(parent, part)
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			b, err := os.ReadFile(filepath.Join(cur, f))
			if err != nil {
				return fmt.Errorf("cpuset cgroup %s: %w", cur, err)
			}
			if strings.TrimSpace(string(b)) != "" {
				continue
			}
			up, err := os.ReadFile(filepath.Join(parent, f))
			if err != nil {
				return fmt.Errorf("cpuset cgroup %s: %w", parent, err)
			}
			if err := os.WriteFile(filepath.Join(cur, f), up, 0); err != nil {
				return fmt.Errorf("cpuset cgroup %s: %w", cur, err)
			}
		}
		parent = cur
	}
	return nil
}

// CgroupParents are the directories MakeCgroups makes place's cgroups in (one on v2,
// one per controller on v1).
func CgroupParents(place Place) []string {
	if place.v2() {
		if d, err := place.dir(""); err == nil {
			return []string{d}
		}
		return nil
	}
	var out []string
	for _, ctrl := range place.v1Hierarchies() {
		if d, err := place.dir(ctrl); err == nil {
			out = append(out, d)
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
