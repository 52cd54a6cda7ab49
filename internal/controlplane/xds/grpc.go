package xds

import (
	"fmt"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// grpcSnapshot is the configuration of proxyless gRPC clients (gRFC A27). A client
// dialling `xds:///<port>-<sandbox>.<domain>` asks for the listener named after that host;
// each route gets such an api_listener. Its route configuration is inline rather than
// over RDS: the listener and its routes then change in one update, and go-control-plane's
// consistency check (which does not follow api_listeners to RDS names) holds. Clusters are
// the per-node clusters without a transport socket: gRPC NACKs TLS settings given as
// file paths, and a gRPC client dials with its own channel credentials.
//
// What gRPC makes of the routes: a matching route with a cluster sends the RPC to the
// node with :authority = the host (the node routes by it); the direct responses Envoy
// uses (not running, missing token) are unsupported actions to gRPC, so those RPCs fail
// with UNAVAILABLE. A route that is removed takes its listener with it, and RPCs on the
// channel fail with UNAVAILABLE (resource does not exist).
func grpcSnapshot(version string, p plan) (*cachev3.Snapshot, error) {
	router, err := routerFilter()
	if err != nil {
		return nil, err
	}
	forward := func(cluster string) *routev3.Route_Route {
		return &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
		}}
	}
	listeners := make([]types.Resource, 0, len(p.targets))
	for _, tg := range p.targets {
		hcm := &hcmv3.HttpConnectionManager{
			StatPrefix: "fireworks_grpc",
			RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
				Name: tg.host,
				VirtualHosts: []*routev3.VirtualHost{{
					Name:    tg.host,
					Domains: domainsOf(tg.host),
					Routes:  routeRules(tg, forward),
				}},
			}},
			HttpFilters: []*hcmv3.HttpFilter{router},
		}
		hcmAny, err := anypb.New(hcm)
		if err != nil {
			return nil, fmt.Errorf("api listener %s: %w", tg.host, err)
		}
		listeners = append(listeners, &listenerv3.Listener{
			Name:        tg.host,
			ApiListener: &listenerv3.ApiListener{ApiListener: hcmAny},
		})
	}
	var clusters, endpoints []types.Resource
	for _, up := range p.upstreams {
		c, cla := nodeCluster(up)
		clusters = append(clusters, c)
		if cla != nil {
			endpoints = append(endpoints, cla)
		}
	}
	snap, err := cachev3.NewSnapshot(version, map[resourcev3.Type][]types.Resource{
		resourcev3.ListenerType: listeners,
		resourcev3.ClusterType:  clusters,
		resourcev3.EndpointType: endpoints,
	})
	if err != nil {
		return nil, fmt.Errorf("gRPC snapshot %s: %w", version, err)
	}
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("gRPC snapshot %s: %w", version, err)
	}
	return snap, nil
}
