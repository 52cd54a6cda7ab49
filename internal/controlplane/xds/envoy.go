package xds

import (
	"errors"
	"fmt"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

const (
	// Sandboxes run terminals, dev servers and websockets that sit idle for a while;
	// Envoy's default stream idle timeout (5 min) would cut them.
	envoyStreamIdleTimeout = time.Hour
	envoyConnectTimeout    = 5 * time.Second
)

// envoySnapshot is the configuration of an Envoy edge: one listener, one route
// configuration over RDS, one cluster per node (plus EDS endpoints for IP addresses).
func envoySnapshot(cfg Config, version string, p plan) (*cachev3.Snapshot, error) {
	lis, err := envoyListener(cfg)
	if err != nil {
		return nil, err
	}
	var clusters, endpoints []types.Resource
	for _, up := range p.upstreams {
		c, cla := nodeCluster(up)
		c.ConnectTimeout = durationpb.New(envoyConnectTimeout)
		if cfg.NodeTLS != nil {
			// Each node's cluster accepts only that node's agent certificate (its identity
			// URI), not any certificate of the cluster CA at the node's address.
			if c.TransportSocket, err = upstreamTLS(*cfg.NodeTLS, strings.TrimPrefix(up.cluster, "node-")); err != nil {
				return nil, err
			}
		}
		// No upstream protocol options: Envoy speaks HTTP/1.1 to the node, which is what the
		// node's data listener serves (websocket upgrades included).
		clusters = append(clusters, c)
		if cla != nil {
			endpoints = append(endpoints, cla)
		}
	}
	snap, err := cachev3.NewSnapshot(version, map[resourcev3.Type][]types.Resource{
		resourcev3.ListenerType: {lis},
		resourcev3.RouteType:    {envoyRouteConfig(p)},
		resourcev3.ClusterType:  clusters,
		resourcev3.EndpointType: endpoints,
	})
	if err != nil {
		return nil, fmt.Errorf("envoy snapshot %s: %w", version, err)
	}
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("envoy snapshot %s: %w", version, err)
	}
	return snap, nil
}

func envoyListener(cfg Config) (*listenerv3.Listener, error) {
	router, err := routerFilter()
	if err != nil {
		return nil, err
	}
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: "fireworks_ingress",
		// AUTO serves HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.
		CodecType: hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource:    adsSource(),
			RouteConfigName: RouteConfigName,
		}},
		HttpFilters:    []*hcmv3.HttpFilter{router},
		UpgradeConfigs: []*hcmv3.HttpConnectionManager_UpgradeConfig{{UpgradeType: "websocket"}},
		// Websockets over HTTP/2 (RFC 8441) arrive as extended CONNECT.
		Http2ProtocolOptions: &corev3.Http2ProtocolOptions{AllowConnect: true},
		// Envoy is the edge: the client's address is the peer's, not an X-Forwarded-For
		// the client made up.
		UseRemoteAddress:  wrapperspb.Bool(true),
		StreamIdleTimeout: durationpb.New(envoyStreamIdleTimeout),
	}
	hcmAny, err := anypb.New(hcm)
	if err != nil {
		return nil, fmt.Errorf("http connection manager: %w", err)
	}
	return &listenerv3.Listener{
		Name: cfg.ListenerName,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Protocol:      corev3.SocketAddress_TCP,
			Address:       "0.0.0.0",
			PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: cfg.ListenPort},
		}}},
		FilterChains: []*listenerv3.FilterChain{{
			Filters: []*listenerv3.Filter{{
				Name:       wellknown.HTTPConnectionManager,
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcmAny},
			}},
		}},
	}, nil
}

// envoyRouteConfig has one virtual host per route and a catch-all answering 404. Requests
// keep their Host header (no host rewrite): the node picks the sandbox by it.
func envoyRouteConfig(p plan) *routev3.RouteConfiguration {
	forward := func(cluster string) *routev3.Route_Route {
		return &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
			// 0 turns off Envoy's 15 s response timeout: long polls, event streams and
			// slow builds are normal for sandboxes.
			Timeout: durationpb.New(0),
		}}
	}
	vhs := make([]*routev3.VirtualHost, 0, len(p.targets)+1)
	for _, tg := range p.targets {
		vhs = append(vhs, &routev3.VirtualHost{
			Name:    tg.host,
			Domains: domainsOf(tg.host),
			Routes:  routeRules(tg, forward),
		})
	}
	vhs = append(vhs, &routev3.VirtualHost{
		Name:    "unknown-host",
		Domains: []string{"*"},
		Routes:  []*routev3.Route{directRoute("not-found", 404, "no such sandbox port\n")},
	})
	return &routev3.RouteConfiguration{Name: RouteConfigName, VirtualHosts: vhs}
}

// upstreamTLS is Envoy's client side of the node's mutual TLS, from files on Envoy's host.
func upstreamTLS(t UpstreamTLS, node string) (*corev3.TransportSocket, error) {
	if t.CertFile == "" || t.KeyFile == "" || t.CAFile == "" {
		return nil, errors.New("node TLS needs a certificate, key and CA file")
	}
	file := func(name string) *corev3.DataSource {
		return &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: name}}
	}
	ctx, err := anypb.New(&tlsv3.UpstreamTlsContext{
		Sni: t.ServerName,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificates: []*tlsv3.TlsCertificate{{
				CertificateChain: file(t.CertFile),
				PrivateKey:       file(t.KeyFile),
			}},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{
				ValidationContext: &tlsv3.CertificateValidationContext{TrustedCa: file(t.CAFile),
					MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
						SanType: tlsv3.SubjectAltNameMatcher_URI,
						Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{
							Exact: pki.IdentityURI(pki.RoleAgent, node).String()}},
					}}},
			},
			// The node's data listener serves HTTP/1.1 (CONNECT tunnels and the reverse
			// proxy); say so rather than leave it to the server's default.
			AlpnProtocols: []string{"http/1.1"},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("upstream TLS context: %w", err)
	}
	return &corev3.TransportSocket{
		Name:       wellknown.TransportSocketTLS,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: ctx},
	}, nil
}
