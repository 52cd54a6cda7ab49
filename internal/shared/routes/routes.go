// Package routes is the ingress route table: which published sandbox port lives on which
// node, and who may reach it. Servers derive it from the replicated state and stream it to
// the built-in ingress and (over xDS) to Envoy; both route a request by its Host header,
// `<port>-<sandbox>.<domain>` (the convention E2B's SDKs use).
package routes

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// DefaultDomain is the ingress domain servers, agents and edges use unless told
// otherwise. Names under .localhost resolve to the loopback address in browsers and curl,
// so `fireworks dev --ingress-listen :8080` is reachable as
// http://8080-<sandbox>.fireworks.localhost:8080 without any DNS set-up.
const DefaultDomain = "fireworks.localhost"

// TokenHeader carries a sandbox's access token on requests to its private ports.
const TokenHeader = "Fireworks-Access-Token"

// TrafficToken is the token that opens a sandbox's private ports and nothing else (E2B's
// trafficAccessToken, sent in E2B's traffic header): derived one way from the sandbox's
// access token, which also opens its in-sandbox API. Whoever is handed a preview link
// with it cannot run commands in the sandbox.
func TrafficToken(accessToken string) string {
	if accessToken == "" {
		return ""
	}
	m := hmac.New(sha256.New, []byte(accessToken))
	m.Write([]byte("fireworks e2b traffic access token v1"))
	return hex.EncodeToString(m.Sum(nil))
}

// Route is one published port of one sandbox.
type Route struct {
	Sandbox string // sandbox ID (lowercase hex)
	// Port is the guest TCP port; 0 routes every port the sandbox has no route of its
	// own for (a sandbox that publishes all: E2B's).
	Port uint16
	// Public ports are open to anyone who knows the host name; private ones need the
	// sandbox's access token in TokenHeader.
	Public bool
	Token  string // the sandbox's access token (set for private ports)
	// Node runs the sandbox; NodeAddr is that node's data address (host:port, mutual TLS)
	// where the edge opens connections to the sandbox.
	Node, NodeAddr string
	// Running is false once the sandbox stopped (or its node is down): the edge answers
	// 502 at once instead of trying to connect.
	Running bool
}

// Table is every route at one version (versions only grow).
type Table struct {
	Version uint64
	Routes  []Route
}

// Host is the host name a route answers to.
func Host(port uint16, sandbox, domain string) string {
	return strconv.Itoa(int(port)) + "-" + sandbox + "." + domain
}

// ParseHost splits a request's Host (an optional :port suffix and a trailing dot are
// ignored, case does not matter) into the guest port and sandbox ID, if it names one
// under domain.
func ParseHost(host, domain string) (port uint16, sandbox string, ok bool) {
	host = strings.ToLower(host)
	if h, p, found := strings.Cut(host, ":"); found && !strings.Contains(p, ":") {
		host = h
	}
	host = strings.TrimSuffix(host, ".")
	label, found := strings.CutSuffix(host, "."+strings.ToLower(strings.TrimSuffix(domain, ".")))
	if !found || strings.Contains(label, ".") {
		return 0, "", false
	}
	ps, sb, found := strings.Cut(label, "-")
	if !found || sb == "" {
		return 0, "", false
	}
	n, err := strconv.ParseUint(ps, 10, 16)
	if err != nil || n == 0 || ps[0] == '0' {
		return 0, "", false
	}
	return uint16(n), sb, true
}

// ValidSandbox checks the form of a sandbox ID (16 lowercase hex). Checking it before
// any lookup or dial keeps odd strings out of logs, pool keys and dialers.
func ValidSandbox(id string) bool {
	if len(id) != 16 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// Lookup finds the route of a sandbox's port.
func (t Table) Lookup(sandbox string, port uint16) (Route, bool) {
	for _, r := range t.Routes {
		if r.Sandbox == sandbox && r.Port == port {
			return r, true
		}
	}
	return Route{}, false
}

// Sorted returns the routes in a stable order (sandbox, then port), for deterministic
// output such as xDS resources.
func (t Table) Sorted() []Route {
	rs := slices.Clone(t.Routes)
	slices.SortFunc(rs, func(a, b Route) int {
		if c := strings.Compare(a.Sandbox, b.Sandbox); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
	return rs
}

func (r Route) String() string {
	return fmt.Sprintf("%d-%s (node %s, public=%v, running=%v)", r.Port, r.Sandbox, r.Node, r.Public, r.Running)
}
