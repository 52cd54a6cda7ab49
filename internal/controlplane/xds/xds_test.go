package xds_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds" // registers the xds:/// resolver and its balancers

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/xds"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

const (
	domain  = "sandbox.test"
	sandbox = "0123456789abcdef"
)

// startXDS serves a fresh xds.Server on loopback and returns it with its address.
func startXDS(t *testing.T, cfg xds.Config) (*xds.Server, string) {
	t.Helper()
	srv := xds.New(cfg, slog.New(slog.DiscardHandler))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.Register(g)
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Serve(lis) }()
	t.Cleanup(func() {
		srv.Close() // ends the clients' streams, so GracefulStop does not wait for them
		g.GracefulStop()
		<-done
	})
	return srv, lis.Addr().String()
}

// backend stands in for a node's data address: a gRPC server whose health service knows
// only the service called name, and which records the :authority of every RPC.
type backend struct {
	addr string
	mu   sync.Mutex
	seen []string // :authority values
}

func startBackend(t *testing.T, name string) *backend {
	t.Helper()
	b := &backend{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = lis.Addr().String()
	g := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		b.mu.Lock()
		b.seen = append(b.seen, md.Get(":authority")...)
		b.mu.Unlock()
		return h(ctx, req)
	}))
	hs := health.NewServer()
	hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(g, hs)
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Serve(lis) }()
	t.Cleanup(func() { g.Stop(); <-done })
	return b
}

func (b *backend) authorities() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.seen...)
}

// dialXDS opens a proxyless gRPC channel to target through the xDS server at xdsAddr, with
// the bootstrap given programmatically (the GRPC_XDS_BOOTSTRAP* variables are read once at
// process start).
func dialXDS(t *testing.T, xdsAddr, target string) *grpc.ClientConn {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
		"xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": "test-grpc-client"}
	}`, xdsAddr)
	rb, err := grpcxds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatalf("xDS resolver: %v", err)
	}
	conn, err := grpc.NewClient("xds:///"+target,
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb))
	if err != nil {
		t.Fatalf("dial %s: %v", target, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// check asks the backend behind conn whether it serves service.
func check(ctx context.Context, conn *grpc.ClientConn, service string, opts ...grpc.CallOption) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service}, opts...)
	return err
}

// eventually retries f until it returns nil; xDS updates reach the client asynchronously.
func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: still %v", what, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func wantCode(err error, code codes.Code) error {
	if status.Code(err) != code {
		return fmt.Errorf("got %v, want code %v", err, code)
	}
	return nil
}

func table(version uint64, rs ...routes.Route) routes.Table {
	return routes.Table{Version: version, Routes: rs}
}

func TestProxylessGRPCFollowsTheTable(t *testing.T) {
	ctx := context.Background()
	srv, xdsAddr := startXDS(t, xds.Config{Domain: domain})
	a := startBackend(t, "backend-a")
	b := startBackend(t, "backend-b")

	public := routes.Route{Sandbox: sandbox, Port: 50051, Public: true, Node: "n1", NodeAddr: a.addr, Running: true}
	private := routes.Route{Sandbox: sandbox, Port: 8443, Token: "s3cret", Node: "n1", NodeAddr: a.addr, Running: true}
	if err := srv.SetTable(ctx, table(1, public, private)); err != nil {
		t.Fatal(err)
	}
	host := routes.Host(50051, sandbox, domain)
	conn := dialXDS(t, xdsAddr, host)

	// The first RPC waits for the channel to resolve through LDS, CDS and EDS.
	if err := check(ctx, conn, "backend-a", grpc.WaitForReady(true)); err != nil {
		t.Fatalf("RPC through xDS to node n1: %v", err)
	}
	// The node routes by Host: the RPC must carry the route's host as its authority.
	if got := a.authorities(); len(got) == 0 || got[len(got)-1] != host {
		t.Errorf("backend saw authorities %q, want %q", got, host)
	}

	t.Run("private port needs the token", func(t *testing.T) {
		pconn := dialXDS(t, xdsAddr, routes.Host(8443, sandbox, domain))
		withToken := metadata.AppendToOutgoingContext(ctx, routes.TokenHeader, "s3cret")
		if err := check(withToken, pconn, "backend-a", grpc.WaitForReady(true)); err != nil {
			t.Fatalf("RPC with the token: %v", err)
		}
		// Without it the request lands on the route Envoy answers 401; gRPC does not
		// support direct responses and fails the RPC as UNAVAILABLE.
		if err := wantCode(check(ctx, pconn, "backend-a"), codes.Unavailable); err != nil {
			t.Fatalf("RPC without the token: %v", err)
		}
		wrong := metadata.AppendToOutgoingContext(ctx, routes.TokenHeader, "guess")
		if err := wantCode(check(wrong, pconn, "backend-a"), codes.Unavailable); err != nil {
			t.Fatalf("RPC with a wrong token: %v", err)
		}
	})

	// The node's data address changes: the client must follow the EDS update.
	public.NodeAddr, private.NodeAddr = b.addr, b.addr
	if err := srv.SetTable(ctx, table(2, public, private)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "RPC reaching the node's new address", func() error { return check(ctx, conn, "backend-b") })
	// And it really is the new server answering (the old one knows only backend-a).
	if err := wantCode(check(ctx, conn, "backend-a"), codes.NotFound); err != nil {
		t.Fatalf("after the move: %v", err)
	}

	// An older table must not roll the client back.
	if err := srv.SetTable(ctx, table(1, routes.Route{Sandbox: sandbox, Port: 50051, Public: true, Node: "n1", NodeAddr: a.addr, Running: true})); err != nil {
		t.Fatal(err)
	}
	if err := check(ctx, conn, "backend-b"); err != nil {
		t.Fatalf("after a stale table: %v", err)
	}

	// The sandbox stops: Envoy would answer 502 itself; gRPC fails the RPC as UNAVAILABLE.
	stopped := public
	stopped.Running = false
	if err := srv.SetTable(ctx, table(3, stopped, private)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "RPC to a stopped sandbox failing", func() error {
		return wantCode(check(ctx, conn, "backend-b"), codes.Unavailable)
	})

	// It runs again, then its route is removed: the listener disappears and the channel
	// fails its RPCs as UNAVAILABLE (the resource does not exist).
	if err := srv.SetTable(ctx, table(4, public, private)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "RPC after the sandbox runs again", func() error { return check(ctx, conn, "backend-b") })
	if err := srv.SetTable(ctx, table(5, private)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "RPC to a removed route failing", func() error {
		return wantCode(check(ctx, conn, "backend-b"), codes.Unavailable)
	})
}

// TestEnvoyClientGetsEnvoyResources speaks ADS the way Envoy does (wildcard LDS and CDS,
// RDS by name, user agent "envoy") and checks it gets the socket listener and TLS
// clusters, not the gRPC api_listeners. It cannot prove a real Envoy accepts them: no
// Envoy binary exists here (see envoy_test.go for the resource checks).
func TestEnvoyClientGetsEnvoyResources(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, xdsAddr := startXDS(t, xds.Config{
		Domain:     domain,
		ListenPort: 10000,
		NodeTLS:    &xds.UpstreamTLS{CertFile: "/etc/envoy/node.crt", KeyFile: "/etc/envoy/node.key", CAFile: "/etc/envoy/ca.crt"},
	})
	r := routes.Route{Sandbox: sandbox, Port: 3000, Public: true, Node: "n1", NodeAddr: "10.1.2.3:7443", Running: true}
	if err := srv.SetTable(ctx, table(7, r)); err != nil {
		t.Fatal(err)
	}

	conn, err := grpc.NewClient(xdsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "envoy-edge-1", UserAgentName: "envoy"}
	fetch := func(typeURL string, names ...string) *discoverygrpc.DiscoveryResponse {
		t.Helper()
		if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: node, TypeUrl: typeURL, ResourceNames: names}); err != nil {
			t.Fatalf("request %s: %v", typeURL, err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("response to %s: %v", typeURL, err)
		}
		if resp.GetTypeUrl() != typeURL || resp.GetVersionInfo() != "7" {
			t.Fatalf("response to %s: type %s version %q", typeURL, resp.GetTypeUrl(), resp.GetVersionInfo())
		}
		return resp
	}

	lds := fetch(resourcev3.ListenerType)
	if len(lds.Resources) != 1 {
		t.Fatalf("Envoy got %d listeners, want 1 (the socket listener only)", len(lds.Resources))
	}
	var lis listenerv3.Listener
	if err := lds.Resources[0].UnmarshalTo(&lis); err != nil {
		t.Fatal(err)
	}
	if lis.GetName() != xds.DefaultListenerName || lis.GetAddress().GetSocketAddress().GetPortValue() != 10000 || lis.GetApiListener() != nil {
		t.Errorf("listener = %v", &lis)
	}

	rds := fetch(resourcev3.RouteType, xds.RouteConfigName)
	var rc routev3.RouteConfiguration
	if len(rds.Resources) != 1 || rds.Resources[0].UnmarshalTo(&rc) != nil {
		t.Fatalf("RDS response %v", rds)
	}
	host := routes.Host(3000, sandbox, domain)
	if vh := rc.GetVirtualHosts(); len(vh) != 2 || vh[0].GetDomains()[0] != host || vh[1].GetDomains()[0] != "*" {
		t.Errorf("virtual hosts = %v", vh)
	}

	cds := fetch(resourcev3.ClusterType)
	var c clusterv3.Cluster
	if len(cds.Resources) != 1 || cds.Resources[0].UnmarshalTo(&c) != nil {
		t.Fatalf("CDS response %v", cds)
	}
	if c.GetName() != "node-n1" || c.GetType() != clusterv3.Cluster_EDS || c.GetTransportSocket() == nil {
		t.Errorf("cluster = %v", &c)
	}
}

func TestSetTableNeedsADomain(t *testing.T) {
	srv := xds.New(xds.Config{}, nil)
	defer srv.Close()
	err := srv.SetTable(context.Background(), table(1))
	if err == nil {
		t.Fatal("SetTable without a domain succeeded")
	}
}
