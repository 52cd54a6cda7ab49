package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Reference prefixes for local image sources (the API's, see state.OCIPrefix).
const (
	OCIPrefix           = state.OCIPrefix
	DockerArchivePrefix = state.DockerArchivePrefix
)

// refNameAnnotation names a manifest's tag in an OCI layout index.
const refNameAnnotation = "org.opencontainers.image.ref.name"

// otherTransports are image transports of containers/image (podman, skopeo) that are not
// image sources here; named, they get an error that says so rather than a failed look-up
// of a registry host called "oci-archive". (A registry host with a port, "dir:5000/x",
// is still a registry.)
var otherTransports = []string{"oci-archive", "dir", "containers-storage", "docker-daemon", "ostree", "sif", "tarball"}

// sourceRef is a parsed image reference.
type sourceRef struct {
	registry name.Reference // set for registry references
	prefix   string         // OCIPrefix or DockerArchivePrefix for local sources
	path     string         // absolute path of the layout directory or tarball
	tag      string         // optional tag inside a local source
}

// String is the canonical form stored in the index.
func (p sourceRef) String() string {
	if p.registry != nil {
		return p.registry.Name()
	}
	if p.tag == "" {
		return p.prefix + p.path
	}
	return p.prefix + p.path + ":" + p.tag
}

// parseRef parses any accepted reference without touching the network:
//
//	REGISTRY-REF                 docker.io/library/busybox:latest, busybox, host:5000/x@sha256:...
//	oci:DIR[:TAG]                an OCI layout directory; TAG matches the
//	                             org.opencontainers.image.ref.name annotation
//	docker-archive:FILE[:TAG]    a `docker save` tarball; TAG like busybox:latest
//
// A local path may itself contain colons: the longest-existing-prefix rule
// (see splitLocal) decides where the path ends.
func parseRef(ref string) (sourceRef, error) {
	if strings.TrimSpace(ref) == "" {
		return sourceRef{}, errors.New("empty image reference")
	}
	for _, prefix := range []string{OCIPrefix, DockerArchivePrefix} {
		rest, ok := strings.CutPrefix(ref, prefix)
		if !ok {
			continue
		}
		if rest == "" {
			return sourceRef{}, fmt.Errorf("image reference %q: no path after %q", ref, prefix)
		}
		p, tag := splitLocal(rest, prefix == OCIPrefix)
		abs, err := filepath.Abs(p)
		if err != nil {
			return sourceRef{}, fmt.Errorf("image reference %q: %w", ref, err)
		}
		return sourceRef{prefix: prefix, path: abs, tag: tag}, nil
	}
	if t, rest, ok := strings.Cut(ref, ":"); ok && slices.Contains(otherTransports, t) && (rest == "" || rest[0] < '0' || rest[0] > '9') {
		return sourceRef{}, fmt.Errorf("image reference %q: the %s: transport is not supported; use a registry reference, %sDIR[:TAG] (an OCI layout, e.g. from podman save --format oci-dir) or %sFILE[:TAG] (from docker or podman save)",
			ref, t, OCIPrefix, DockerArchivePrefix)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return sourceRef{}, fmt.Errorf("malformed image reference %q: %w", ref, err)
	}
	return sourceRef{registry: r}, nil
}

// splitLocal splits PATH[:TAG]. The path is the shortest prefix ending
// before a colon that exists as the right kind of file (a directory for OCI
// layouts, a regular file for tarballs), or the whole string if it exists;
// when nothing exists (e.g. looking up an image whose source is gone), the
// text after the last colon is the tag if it contains no slash.
func splitLocal(s string, wantDir bool) (path, tag string) {
	ok := func(p string) bool {
		fi, err := os.Stat(p)
		return err == nil && fi.IsDir() == wantDir
	}
	if ok(s) {
		return s, ""
	}
	for i := 0; i < len(s); i++ {
		if s[i] == ':' && ok(s[:i]) {
			return s[:i], s[i+1:]
		}
	}
	if i := strings.LastIndex(s, ":"); i > 0 && !strings.Contains(s[i+1:], "/") {
		return s[:i], s[i+1:]
	}
	return s, ""
}

// resolve turns a reference into the image to pull for platform.
func resolve(ctx context.Context, p sourceRef, platform v1.Platform, insecure []string, tr http.RoundTripper, anonymous bool) (v1.Image, error) {
	switch {
	case p.registry != nil:
		return resolveRegistry(ctx, p.registry, platform, insecure, tr, anonymous)
	case p.prefix == OCIPrefix:
		return resolveLayout(p, platform)
	default:
		return resolveArchive(p)
	}
}

// registryTransport bounds each step of talking to a registry, so one that accepts
// connections and never answers fails the pull instead of hanging it. Bodies (layers) are
// bounded by the caller's context.
var registryTransport = func() http.RoundTripper {
	t := remote.DefaultTransport.(*http.Transport).Clone()
	t.DialContext = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	t.TLSHandshakeTimeout = 30 * time.Second
	t.ResponseHeaderTimeout = 60 * time.Second
	return t
}()

// GuardedTransport is a registry transport that connects only to public addresses and
// to those allow holds: the transport of a pull a user asked for. Without it a user
// could make the node fetch from its own loopback services, the cloud's metadata address
// or the internal network (an image reference names any host). The check is on the
// address each connection is made to, after name resolution and on every redirect (blob
// downloads are redirected), so a name that resolves differently later gains nothing.
//
// protected, if set, lists what the node protects from sandboxes (its own addresses among
// them); a user's pull may not reach those either, unless the operator allows them.
func GuardedTransport(allow []netip.Prefix, protected func() []netip.Prefix) http.RoundTripper {
	t := registryTransport.(*http.Transport).Clone()
	t.Proxy = nil // a proxy would connect for us, past the check
	d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second,
		Control: func(_, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("registry address %q: %w", address, err)
			}
			a := ap.Addr().Unmap()
			for _, p := range allow { // the operator's word comes first
				if p.Contains(a) {
					return nil
				}
			}
			if protected != nil {
				for _, p := range protected() {
					if p.Contains(a) {
						return fmt.Errorf("%w: %s is one the node protects", ErrPrivateRegistry, a)
					}
				}
			}
			return reachable(a, allow)
		}}
	t.DialContext = d.DialContext
	return tlsOnly{t, allow}
}

// tlsOnly refuses a plain-HTTP request unless it goes to an address the operator allowed
// (go-containerregistry falls back to HTTP on its own for loopback, RFC 1918 and .local
// registries): a user's pull is as private as TLS makes it.
type tlsOnly struct {
	next  http.RoundTripper
	allow []netip.Prefix
}

func (t tlsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" {
		host := req.URL.Hostname()
		a, err := netip.ParseAddr(host)
		ok := err == nil && slices.ContainsFunc(t.allow, func(p netip.Prefix) bool { return p.Contains(a.Unmap()) })
		if !ok {
			return nil, fmt.Errorf("%w: plain HTTP to %s (a user's pull uses TLS, except to addresses the node's operator allows with --registry-allow)", ErrPrivateRegistry, host)
		}
	}
	return t.next.RoundTrip(req)
}

// ErrPrivateRegistry: a user's pull would connect to a non-public address.
var ErrPrivateRegistry = errors.New("registry address is not public")

// nonPublic are ranges IsGlobalUnicast and IsPrivate let through that still lead inside:
// shared address space (CGNAT), cloud platform endpoints (Azure's WireServer), and
// IPv6 forms that carry an IPv4 address (checked on their own below).
var nonPublic = []netip.Prefix{
	netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("168.63.129.16/32"),
	netip.MustParsePrefix("192.0.0.0/24"), netip.MustParsePrefix("198.18.0.0/15"),
}

// embeddedV4 returns the IPv4 address an IPv6 one carries (NAT64, 6to4, IPv4-compatible),
// which is where a gateway on the way would send the packet.
func embeddedV4(a netip.Addr) (netip.Addr, bool) {
	if !a.Is6() || a.Is4In6() {
		return netip.Addr{}, false
	}
	b := a.As16()
	switch {
	case netip.MustParsePrefix("64:ff9b::/96").Contains(a), netip.MustParsePrefix("::/96").Contains(a):
		return netip.AddrFrom4([4]byte(b[12:16])), true
	case netip.MustParsePrefix("64:ff9b:1::/48").Contains(a):
		return netip.AddrFrom4([4]byte(b[12:16])), true
	case netip.MustParsePrefix("2002::/16").Contains(a):
		return netip.AddrFrom4([4]byte(b[2:6])), true
	}
	return netip.Addr{}, false
}

// reachable admits a public unicast address, or one inside allow.
func reachable(a netip.Addr, allow []netip.Prefix) error {
	for _, p := range allow {
		if p.Contains(a) {
			return nil
		}
	}
	refuse := !a.IsGlobalUnicast() || a.IsPrivate() || a.Is4In6()
	for _, p := range nonPublic {
		refuse = refuse || p.Contains(a)
	}
	if v4, ok := embeddedV4(a); ok {
		if err := reachable(v4, allow); err != nil {
			refuse = true
		}
	}
	if refuse {
		return fmt.Errorf("%w: %s (only an admin's pulls reach private, loopback and link-local addresses; the node's operator may allow ranges with --registry-allow)", ErrPrivateRegistry, a)
	}
	return nil
}

func resolveRegistry(ctx context.Context, ref name.Reference, platform v1.Platform, insecure []string, tr http.RoundTripper, anonymous bool) (v1.Image, error) {
	if tr == nil {
		tr = registryTransport
	}
	if slices.Contains(insecure, ref.Context().RegistryStr()) {
		// Re-parse so go-containerregistry speaks plain HTTP to this host.
		r, err := name.ParseReference(ref.String(), name.Insecure)
		if err != nil {
			return nil, fmt.Errorf("malformed image reference %q: %w", ref, err)
		}
		ref = r
	}
	// A user's pull never borrows the node's registry credentials.
	auth := remote.WithAuthFromKeychain(authn.DefaultKeychain)
	if anonymous {
		auth = remote.WithAuth(authn.Anonymous)
	}
	desc, err := remote.Get(ref,
		remote.WithContext(ctx),
		remote.WithTransport(tr),
		auth,
		remote.WithUserAgent("fireworks"))
	if err != nil {
		return nil, fmt.Errorf("fetch manifest of %s: %w", ref, err)
	}
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, fmt.Errorf("read manifest list of %s: %w", ref, err)
		}
		return pickFromIndex(idx, ref.String(), platform)
	case desc.MediaType.IsImage():
		img, err := desc.Image()
		if err != nil {
			return nil, fmt.Errorf("read manifest of %s: %w", ref, err)
		}
		return img, nil
	default:
		return nil, fmt.Errorf("manifest of %s has unsupported media type %q", ref, desc.MediaType)
	}
}

// pickFromIndex chooses the manifest for platform from an image index,
// descending into nested indexes.
func pickFromIndex(idx v1.ImageIndex, what string, platform v1.Platform) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read manifest list of %s: %w", what, err)
	}
	var have []string
	for _, d := range im.Manifests {
		if d.Platform == nil {
			continue
		}
		have = append(have, d.Platform.String())
		if !platformMatches(*d.Platform, platform) {
			continue
		}
		switch {
		case d.MediaType.IsImage():
			img, err := idx.Image(d.Digest)
			if err != nil {
				return nil, fmt.Errorf("read %s manifest %s of %s: %w", platform, d.Digest, what, err)
			}
			return img, nil
		case d.MediaType.IsIndex():
			child, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, fmt.Errorf("read nested manifest list %s of %s: %w", d.Digest, what, err)
			}
			return pickFromIndex(child, what, platform)
		}
	}
	return nil, fmt.Errorf("manifest list of %s has no %s image (it has: %s)", what, platform, strings.Join(have, ", "))
}

func platformMatches(have, want v1.Platform) bool {
	if have.OS != want.OS || have.Architecture != want.Architecture {
		return false
	}
	return want.Variant == "" || have.Variant == want.Variant
}

func resolveLayout(p sourceRef, platform v1.Platform) (v1.Image, error) {
	idx, err := layout.ImageIndexFromPath(p.path)
	if err != nil {
		return nil, fmt.Errorf("open OCI layout %s: %w", p.path, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read index of OCI layout %s: %w", p.path, err)
	}
	var chosen *v1.Descriptor
	var tags []string
	for i, d := range im.Manifests {
		t := d.Annotations[refNameAnnotation]
		if t != "" {
			tags = append(tags, t)
		}
		if p.tag != "" && t == p.tag {
			chosen = &im.Manifests[i]
			break
		}
	}
	switch {
	case chosen != nil:
	case p.tag != "":
		return nil, fmt.Errorf("OCI layout %s has no image tagged %q (tags: %s)", p.path, p.tag, strings.Join(tags, ", "))
	case len(im.Manifests) == 1:
		chosen = &im.Manifests[0]
	default:
		return nil, fmt.Errorf("OCI layout %s holds %d manifests: name one as oci:%s:TAG (tags: %s)", p.path, len(im.Manifests), p.path, strings.Join(tags, ", "))
	}
	what := p.String()
	switch {
	case chosen.MediaType.IsImage():
		img, err := idx.Image(chosen.Digest)
		if err != nil {
			return nil, fmt.Errorf("read image %s from %s: %w", chosen.Digest, what, err)
		}
		return img, nil
	case chosen.MediaType.IsIndex():
		child, err := idx.ImageIndex(chosen.Digest)
		if err != nil {
			return nil, fmt.Errorf("read manifest list %s from %s: %w", chosen.Digest, what, err)
		}
		return pickFromIndex(child, what, platform)
	default:
		return nil, fmt.Errorf("%s: manifest %s has unsupported media type %q", what, chosen.Digest, chosen.MediaType)
	}
}

func resolveArchive(p sourceRef) (v1.Image, error) {
	var tag *name.Tag
	if p.tag != "" {
		t, err := name.NewTag(p.tag)
		if err != nil {
			return nil, fmt.Errorf("%s: malformed tag %q: %w", p, p.tag, err)
		}
		tag = &t
	}
	img, err := tarball.ImageFromPath(p.path, tag)
	if err == nil {
		return img, nil
	}
	// It did not open as asked: read the archive's manifest (another pass over the file,
	// paid only here) to find the tag under the name docker or podman saved it as, or
	// to say which tags there are.
	m, merr := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(p.path) })
	if merr != nil {
		return nil, fmt.Errorf("open docker archive %s: %w", p, err)
	}
	var tags []string
	for _, d := range m {
		tags = append(tags, d.RepoTags...)
	}
	switch {
	case tag == nil && len(m) > 1:
		return nil, fmt.Errorf("docker archive %s holds %d images: name one as docker-archive:FILE:TAG (tags: %s)", p, len(m), strings.Join(tags, ", "))
	case tag == nil:
		return nil, fmt.Errorf("open docker archive %s: %w", p, err)
	}
	for _, t := range tags {
		if have, terr := name.NewTag(t); terr == nil && sameTag(*tag, have, p.tag) {
			return openArchive(p, &have)
		}
	}
	return nil, fmt.Errorf("docker archive %s has no image tagged %q (tags: %s)", p, p.tag, strings.Join(tags, ", "))
}

// sameTag matches a tag the user wrote against one in an archive. Besides the same
// name, a short name with no registry matches the same repository and tag under any
// registry, as `podman save` writes localhost/NAME:TAG and `docker save` NAME:TAG.
func sameTag(want, have name.Tag, written string) bool {
	if want.Name() == have.Name() {
		return true
	}
	firstPart, _, hasSlash := strings.Cut(written, "/")
	explicitRegistry := hasSlash && (strings.ContainsAny(firstPart, ".:") || firstPart == "localhost")
	if explicitRegistry || want.TagStr() != have.TagStr() {
		return false
	}
	short := func(t name.Tag) string { return strings.TrimPrefix(t.RepositoryStr(), "library/") }
	return short(want) == short(have)
}

func openArchive(p sourceRef, tag *name.Tag) (v1.Image, error) {
	img, err := tarball.ImageFromPath(p.path, tag)
	if err != nil {
		return nil, fmt.Errorf("open docker archive %s: %w", p, err)
	}
	return img, nil
}
