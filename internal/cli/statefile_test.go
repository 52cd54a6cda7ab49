package cli

import (
	"os"
	"path/filepath"
	"testing"
)

// A state file replaces only a regular file: a device or a directory at FILE is refused,
// a symbolic link is written through to the file it names, and one that names nothing is
// refused.
func TestStateFileTarget(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real.state")
	if err := os.WriteFile(real, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.state")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "dangling.state")
	if err := os.Symlink(filepath.Join(dir, "new.state"), dangling); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path, want string
		refused    bool
	}{
		{path: real, want: real},
		{path: link, want: real},
		{path: dangling, refused: true},
		{path: filepath.Join(dir, "fresh.state"), want: filepath.Join(dir, "fresh.state")},
		{path: "/dev/null", refused: true},
		{path: dir, refused: true},
	} {
		got, err := stateFileTarget(tc.path)
		switch {
		case tc.refused && err == nil:
			t.Errorf("%s: taken as %s, want refused", tc.path, got)
		case !tc.refused && (err != nil || got != tc.want):
			t.Errorf("%s: %q, %v; want %q", tc.path, got, err, tc.want)
		}
	}
}
