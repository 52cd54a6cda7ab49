package testimage

import (
	"archive/tar"
	"fmt"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/busybox"
)

// Hostile layer kinds. Escapes aim at a directory named "sentinel" beside
// the unpack root (HostileSentinel), or at host paths that must not appear;
// a test makes the sentinel and checks that it stays empty.
const (
	// HostileDotDot writes ../sentinel/pwned.
	HostileDotDot = "dotdot"
	// HostileAbsolute writes /tmp/fireworks-hostile-absolute (an absolute name).
	HostileAbsolute = "absolute"
	// HostileSymlink makes escape -> /../../.. and then writes
	// escape/sentinel/pwned through it. Resolved inside the root this is
	// legitimate and lands at <root>/sentinel/pwned.
	HostileSymlink = "symlink"
	// HostileSymlinkRelative makes escape -> ../sentinel and then writes
	// escape/pwned, which resolved inside the root lands at <root>/sentinel/pwned.
	HostileSymlinkRelative = "symlink-relative"
	// HostileHardlink hardlinks passwd to ../../../../../../../../etc/passwd.
	HostileHardlink = "hardlink"
	// HostileHardlinkViaSymlink makes etc-link -> /../../../../etc and then
	// hardlinks passwd to etc-link/passwd: resolved inside the root, that is
	// the tree's own etc/passwd, which does not exist in an empty tree.
	HostileHardlinkViaSymlink = "hardlink-via-symlink"
	// HostileGiant is a file header claiming 1 TiB, with no body.
	HostileGiant = "giant"
	// HostileWhiteout is a whiteout naming "..".
	HostileWhiteout = "whiteout"
)

// HostileSentinel is the name of the directory beside the root that the
// escaping kinds aim at.
const HostileSentinel = "sentinel"

// HostileAbsolutePath is where HostileAbsolute would write on a naive host.
const HostileAbsolutePath = "/tmp/fireworks-hostile-absolute"

// HostileKinds lists every kind HostileLayer builds.
func HostileKinds() []string {
	return []string{HostileDotDot, HostileAbsolute, HostileSymlink, HostileSymlinkRelative,
		HostileHardlink, HostileHardlinkViaSymlink, HostileGiant, HostileWhiteout}
}

// HostileEntries returns the tar entries of a hostile layer of kind.
func HostileEntries(t testing.TB, kind string) []Entry {
	t.Helper()
	e, err := hostileEntries(kind)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func hostileEntries(kind string) ([]Entry, error) {
	switch kind {
	case HostileDotDot:
		return []Entry{{Name: "../" + HostileSentinel + "/pwned", Body: "pwned\n"}}, nil
	case HostileAbsolute:
		return []Entry{{Name: HostileAbsolutePath, Body: "pwned\n"}}, nil
	case HostileSymlink:
		return []Entry{
			{Name: "escape", Type: tar.TypeSymlink, Link: "/../../.."},
			{Name: "escape/" + HostileSentinel + "/pwned", Body: "pwned\n"},
		}, nil
	case HostileSymlinkRelative:
		return []Entry{
			{Name: "escape", Type: tar.TypeSymlink, Link: "../" + HostileSentinel},
			{Name: "escape/pwned", Body: "pwned\n"},
		}, nil
	case HostileHardlink:
		return []Entry{{Name: "passwd", Type: tar.TypeLink, Link: "../../../../../../../../etc/passwd"}}, nil
	case HostileHardlinkViaSymlink:
		return []Entry{
			{Name: "etc-link", Type: tar.TypeSymlink, Link: "/../../../../etc"},
			{Name: "passwd", Type: tar.TypeLink, Link: "etc-link/passwd"},
		}, nil
	case HostileGiant:
		return []Entry{{Name: "giant", Size: 1 << 40}}, nil
	case HostileWhiteout:
		return []Entry{{Name: "dir/", Type: tar.TypeDir}, {Name: "dir/.wh...", Body: ""}}, nil
	}
	return nil, fmt.Errorf("unknown hostile layer kind %q", kind)
}

// HostileLayer returns a gzip OCI layer of kind (one of HostileKinds).
func HostileLayer(t testing.TB, kind string) v1.Layer {
	t.Helper()
	return Layer(t, HostileEntries(t, kind)...)
}

// BuildHostile returns the busybox image with a hostile layer of kind on
// top, for callers without a testing.TB.
func BuildHostile(kind string) (v1.Image, error) {
	base, err := BuildBusybox()
	if err != nil {
		return nil, err
	}
	entries, err := hostileEntries(kind)
	if err != nil {
		return nil, err
	}
	b, err := busybox.Tar(entries...)
	if err != nil {
		return nil, err
	}
	l, err := busybox.LayerFromTar(b)
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(base, l)
	if err != nil {
		return nil, fmt.Errorf("append hostile layer: %w", err)
	}
	return img, nil
}
