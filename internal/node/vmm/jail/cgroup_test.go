package jail

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// An absolute parent puts the cgroups at the top of the hierarchy mounted at Root, not
// under this process's own cgroup (an agent in a pod: its VMs outlive its container). The
// hierarchy here is plain directories laid out as cgroup v1's (what MakeCgroups writes
// is checked, not what the kernel does with it).
func TestCgroupPlace(t *testing.T) {
	root := t.TempDir()
	for _, ctrl := range []string{"memory", "pids"} { // no cpu controller mounted
		if err := os.MkdirAll(filepath.Join(root, ctrl), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	place := Place{Root: root, Parent: "/fwkube/fireworks-vmm-abc"}
	dirs, missing, err := MakeCgroups(place, "vm1", Limits{MemoryBytes: 1 << 30, Pids: 512, CPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(dirs)
	want := []string{filepath.Join(root, "memory/fwkube/fireworks-vmm-abc/vm1"), filepath.Join(root, "pids/fwkube/fireworks-vmm-abc/vm1")}
	if !slices.Equal(dirs, want) || !slices.Equal(missing, []string{"cpu"}) {
		t.Fatalf("dirs %v missing %v, want %v and [cpu]", dirs, missing, want)
	}
	if b, _ := os.ReadFile(filepath.Join(want[0], "memory.limit_in_bytes")); string(b) != "1073741824" {
		t.Fatalf("memory limit %q", b)
	}
	parents := CgroupParents(place)
	if !slices.Equal(parents, []string{filepath.Dir(want[0]), filepath.Dir(want[1])}) {
		t.Fatalf("parents %v", parents)
	}
	// A relative parent goes under this process's own cgroup, as on a host (where this
	// process has no v1 memory cgroup, there is nothing to go under: an error).
	self, serr := ownCgroup("memory")
	d, err := Place{Root: root, Parent: "fireworks-vol-1"}.dir("memory")
	switch {
	case serr != nil && err == nil:
		t.Fatalf("relative parent with no own cgroup: %s", d)
	case serr == nil && (err != nil || d != filepath.Join(root, "memory", self, "fireworks-vol-1") || !strings.HasPrefix(d, root)):
		t.Fatalf("relative parent: %s, %v", d, err)
	}
}
