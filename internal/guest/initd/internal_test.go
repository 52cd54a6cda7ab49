package initd

import (
	"reflect"
	"testing"
)

func TestParseCmdline(t *testing.T) {
	got := parseCmdline("console=ttyS0 quiet fw.mods=virtio_ring,virtio fw.poweroff=\"reboot\"\n")
	want := map[string]string{"console": "ttyS0", "quiet": "", "fw.mods": "virtio_ring,virtio", "fw.poweroff": "reboot"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"A=1", "B=2", "PATH=/bin"}, []string{"B=3", "C=4", "A=5"})
	want := []string{"A=5", "B=3", "PATH=/bin", "C=4"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestLoadModulesRejectsPaths(t *testing.T) {
	for _, bad := range []string{"../etc/x", "a/b", ".."} {
		if err := loadModules(nil, bad); err == nil {
			t.Errorf("loadModules(%q) accepted", bad)
		}
	}
}
