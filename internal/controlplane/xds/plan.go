package xds

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// The plan is what both kinds of client get, before it is shaped into Envoy or gRPC
// resources: one target per route and one upstream per node that serves a running route.

type target struct {
	route routes.Route
	host  string // routes.Host of the route
	// cluster is the node cluster requests go to; "" when the route cannot be forwarded
	// (the sandbox is not running, or its node has no usable data address).
	cluster string
}

type upstream struct {
	cluster string // "node-<name>"
	host    string
	port    uint32
	// ip says host is an IP literal, sent as an EDS endpoint; a DNS name makes the
	// cluster LOGICAL_DNS instead, since EDS endpoints must be IP addresses.
	ip bool
}

type plan struct {
	targets   []target
	upstreams []upstream // sorted by cluster name
}

// clusterName is the cluster (and EDS resource) of a node.
func clusterName(node string) string { return "node-" + node }

// makePlan builds the plan of t. A route that cannot be forwarded degrades to "not
// running" rather than failing the whole table (one broken node record must not freeze
// every other route); the problems are returned for logging.
func makePlan(domain string, t routes.Table) (plan, []error) {
	var (
		p        plan
		problems []error
		seen     = map[string]bool{}
		byNode   = map[string]upstream{}
	)
	for _, r := range t.Sorted() {
		if r.Sandbox == "" {
			problems = append(problems, fmt.Errorf("route %v: no sandbox, skipped", r))
			continue
		}
		if r.Port == 0 {
			// Every port of a sandbox: Envoy's routes name a port each (the node's
			// data address routes by host), so Envoy serves only the ports published
			// one by one; the built-in edge serves all.
			continue
		}
		host := routes.Host(r.Port, r.Sandbox, domain)
		if seen[host] {
			// Envoy rejects a route configuration whose domains repeat.
			problems = append(problems, fmt.Errorf("route %v: duplicate host %s, skipped", r, host))
			continue
		}
		seen[host] = true
		tg := target{route: r, host: host}
		if r.Running {
			up, err := upstreamOf(r)
			switch prev, known := byNode[r.Node]; {
			case err != nil:
				problems = append(problems, fmt.Errorf("route %v: %w", r, err))
			case known && prev != up:
				problems = append(problems, fmt.Errorf("route %v: node %q has address %s here but %s:%d on another route, answering 502",
					r, r.Node, r.NodeAddr, prev.host, prev.port))
			default:
				byNode[r.Node] = up
				tg.cluster = up.cluster
			}
		}
		p.targets = append(p.targets, tg)
	}
	for _, up := range byNode {
		p.upstreams = append(p.upstreams, up)
	}
	slices.SortFunc(p.upstreams, func(a, b upstream) int {
		switch {
		case a.cluster < b.cluster:
			return -1
		case a.cluster > b.cluster:
			return 1
		}
		return 0
	})
	return p, problems
}

func upstreamOf(r routes.Route) (upstream, error) {
	if r.Node == "" {
		return upstream{}, fmt.Errorf("no node name")
	}
	host, portStr, err := net.SplitHostPort(r.NodeAddr)
	if err != nil {
		return upstream{}, fmt.Errorf("node %q data address %q: %w", r.Node, r.NodeAddr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 || host == "" {
		return upstream{}, fmt.Errorf("node %q data address %q: need host:port", r.Node, r.NodeAddr)
	}
	_, ipErr := netip.ParseAddr(host)
	return upstream{cluster: clusterName(r.Node), host: host, port: uint32(port), ip: ipErr == nil}, nil
}

// --- building blocks shared by the Envoy and gRPC resources ---

func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion:    corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	}
}

// routerFilter is the terminal HTTP filter: Envoy needs it to forward at all, and gRPC
// NACKs a listener whose filter chain does not end in it.
func routerFilter() (*hcmv3.HttpFilter, error) {
	cfg, err := anypb.New(&routerv3.Router{})
	if err != nil {
		return nil, fmt.Errorf("router filter config: %w", err)
	}
	return &hcmv3.HttpFilter{Name: wellknown.Router, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: cfg}}, nil
}

func matchAll() *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}
}

// tokenMatch matches requests that carry the sandbox's access token.
func tokenMatch(token string) *routev3.RouteMatch {
	m := matchAll()
	m.Headers = []*routev3.HeaderMatcher{{
		Name: routes.TokenHeader,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Exact{Exact: token},
		}},
	}}
	return m
}

// directRoute answers every request itself. gRPC clients do not support direct
// responses: their RPCs that land on such a route fail with UNAVAILABLE.
func directRoute(name string, status uint32, body string) *routev3.Route {
	return &routev3.Route{
		Name:  name,
		Match: matchAll(),
		Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{
			Status: status,
			Body:   &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: body}},
		}},
	}
}

// routeRules is the shared shape of a target's routes; forward builds the action that
// reaches the cluster (Envoy and gRPC differ there).
func routeRules(tg target, forward func(cluster string) *routev3.Route_Route) []*routev3.Route {
	r := tg.route
	switch {
	case tg.cluster == "":
		return []*routev3.Route{directRoute("not-running", 502, "sandbox port "+tg.host+" is not running\n")}
	case r.Public:
		return []*routev3.Route{{Name: "forward", Match: matchAll(), Action: forward(tg.cluster)}}
	case r.Token == "":
		// A private port without a token cannot be opened by anyone; an empty exact
		// match would let requests without the header through.
		return []*routev3.Route{directRoute("unauthorized", 401, "access token required\n")}
	default:
		return []*routev3.Route{
			{
				Name:   "forward-with-token",
				Match:  tokenMatch(r.Token),
				Action: forward(tg.cluster),
				// The token is the edge's business: the sandbox never sees it.
				RequestHeadersToRemove: []string{routes.TokenHeader},
			},
			directRoute("unauthorized", 401, "access token required\n"),
		}
	}
}

func domainsOf(host string) []string {
	// Clients may send Host with a port (e.g. "h:8080"); Envoy's prefix wildcard covers it.
	return []string{host, host + ":*"}
}

// loadAssignment is the single endpoint of a node: its data address.
func loadAssignment(up upstream) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{
		ClusterName: up.cluster,
		Endpoints: []*endpointv3.LocalityLbEndpoints{{
			// gRPC ignores localities without a weight, and wants a locality at all.
			Locality:            &corev3.Locality{},
			LoadBalancingWeight: wrapperspb.UInt32(1),
			LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
						Protocol:      corev3.SocketAddress_TCP,
						Address:       up.host,
						PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: up.port},
					}}},
				}},
			}},
		}},
	}
}

// nodeCluster is a node's cluster: EDS for an IP address (the endpoint is returned for the
// EDS resources), LOGICAL_DNS with the endpoint inline for a DNS name. Both Envoy and
// gRPC accept both types.
func nodeCluster(up upstream) (*clusterv3.Cluster, *endpointv3.ClusterLoadAssignment) {
	c := &clusterv3.Cluster{Name: up.cluster, LbPolicy: clusterv3.Cluster_ROUND_ROBIN}
	if up.ip {
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		c.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource()}
		return c, loadAssignment(up)
	}
	c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_LOGICAL_DNS}
	c.LoadAssignment = loadAssignment(up)
	return c, nil
}
