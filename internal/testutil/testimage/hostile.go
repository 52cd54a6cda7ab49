package testimage

import (
	"archive/tar"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
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
	// HostileDevice makes a block device node for 8:0 (the host's first disk).
	HostileDevice = "device"
	// HostileCharDevice makes a character device node for 1:1 (/dev/mem).
	HostileCharDevice = "char-device"
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
		HostileHardlink, HostileHardlinkViaSymlink, HostileDevice, HostileCharDevice, HostileGiant, HostileWhiteout}
}

// HostileEntries returns the tar entries of a hostile layer of kind.
func HostileEntries(t testing.TB, kind string) []Entry {
	t.Helper()
	switch kind {
	case HostileDotDot:
		return []Entry{{Name: "../" + HostileSentinel + "/pwned", Body: "pwned\n"}}
	case HostileAbsolute:
		return []Entry{{Name: HostileAbsolutePath, Body: "pwned\n"}}
	case HostileSymlink:
		return []Entry{
			{Name: "escape", Type: tar.TypeSymlink, Link: "/../../.."},
			{Name: "escape/" + HostileSentinel + "/pwned", Body: "pwned\n"},
		}
	case HostileSymlinkRelative:
		return []Entry{
			{Name: "escape", Type: tar.TypeSymlink, Link: "../" + HostileSentinel},
			{Name: "escape/pwned", Body: "pwned\n"},
		}
	case HostileHardlink:
		return []Entry{{Name: "passwd", Type: tar.TypeLink, Link: "../../../../../../../../etc/passwd"}}
	case HostileHardlinkViaSymlink:
		return []Entry{
			{Name: "etc-link", Type: tar.TypeSymlink, Link: "/../../../../etc"},
			{Name: "passwd", Type: tar.TypeLink, Link: "etc-link/passwd"},
		}
	case HostileDevice:
		return []Entry{{Name: "disk", Type: tar.TypeBlock, Mode: 0o666, Devmajor: 8, Devmin: 0}}
	case HostileCharDevice:
		return []Entry{{Name: "mem", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devmin: 1}}
	case HostileGiant:
		return []Entry{{Name: "giant", Size: 1 << 40}}
	case HostileWhiteout:
		return []Entry{{Name: "dir/", Type: tar.TypeDir}, {Name: "dir/.wh...", Body: ""}}
	}
	t.Fatalf("unknown hostile layer kind %q", kind)
	return nil
}

// HostileLayer returns a gzip OCI layer of kind (one of HostileKinds).
func HostileLayer(t testing.TB, kind string) v1.Layer {
	t.Helper()
	return Layer(t, HostileEntries(t, kind)...)
}
