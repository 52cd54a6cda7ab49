package xds

// These tests check the Envoy resources as data: no Envoy binary exists on this machine,
// so nothing here proves a real Envoy accepts them. What is checked is what Envoy checks
// first (each message's protoc-gen-validate rules, which Envoy enforces on every xDS
// resource, and the snapshot's internal references) and the routing decisions encoded in
// the virtual hosts.

import (
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

const (
	testDomain = "sandbox.test"
	sbA        = "aaaaaaaaaaaaaaaa"
	sbB        = "bbbbbbbbbbbbbbbb"
)

type validator interface{ ValidateAll() error }

func validate(t *testing.T, what string, m any) {
	t.Helper()
	v, ok := m.(validator)
	if !ok {
		t.Fatalf("%s: %T has no validation rules", what, m)
	}
	if err := v.ValidateAll(); err != nil {
		t.Errorf("%s fails Envoy's validation: %v", what, err)
	}
}

func buildEnvoy(t *testing.T, cfg Config, tbl routes.Table) *cachev3.Snapshot {
	t.Helper()
	p, problems := makePlan(testDomain, tbl)
	for _, err := range problems {
		t.Logf("plan: %v", err)
	}
	snap, err := envoySnapshot(cfg, "9", p)
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Consistent(); err != nil {
		t.Fatalf("snapshot not consistent: %v", err)
	}
	return snap
}

func TestEnvoyResources(t *testing.T) {
	cfg := Config{
		Domain: testDomain, ListenerName: "edge", ListenPort: 8080,
		NodeTLS: &UpstreamTLS{CertFile: "/c.pem", KeyFile: "/k.pem", CAFile: "/ca.pem", ServerName: "node"},
	}
	tbl := routes.Table{Version: 9, Routes: []routes.Route{
		{Sandbox: sbA, Port: 80, Public: true, Node: "n1", NodeAddr: "10.0.0.1:7443", Running: true},
		{Sandbox: sbA, Port: 8888, Token: "tok-a", Node: "n1", NodeAddr: "10.0.0.1:7443", Running: true},
		{Sandbox: sbB, Port: 3000, Public: true, Node: "n2", NodeAddr: "node2.internal:7443", Running: true},
		{Sandbox: sbB, Port: 4000, Public: true, Node: "n3", NodeAddr: "10.0.0.3:7443", Running: false},
	}}
	snap := buildEnvoy(t, cfg, tbl)

	// Listener: socket listener with the connection manager fetching routes over ADS.
	lds := snap.GetResources(resourcev3.ListenerType)
	lis, ok := lds["edge"].(*listenerv3.Listener)
	if len(lds) != 1 || !ok {
		t.Fatalf("listeners = %v", lds)
	}
	validate(t, "listener", lis)
	if sa := lis.GetAddress().GetSocketAddress(); sa.GetAddress() != "0.0.0.0" || sa.GetPortValue() != 8080 {
		t.Errorf("listener address = %v", sa)
	}
	var hcm hcmv3.HttpConnectionManager
	if err := lis.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
		t.Fatal(err)
	}
	validate(t, "http connection manager", &hcm)
	if hcm.GetRds().GetRouteConfigName() != RouteConfigName || hcm.GetRds().GetConfigSource().GetAds() == nil {
		t.Errorf("RDS = %v", hcm.GetRds())
	}
	if hf := hcm.GetHttpFilters(); len(hf) != 1 || hf[0].GetName() != wellknown.Router {
		t.Errorf("http filters = %v", hf)
	}
	if uc := hcm.GetUpgradeConfigs(); len(uc) != 1 || uc[0].GetUpgradeType() != "websocket" {
		t.Errorf("upgrades = %v", uc)
	}
	if hcm.GetCodecType() != hcmv3.HttpConnectionManager_AUTO {
		t.Errorf("codec = %v, want AUTO (HTTP/1.1 and HTTP/2)", hcm.GetCodecType())
	}

	// Routes.
	rc, ok := snap.GetResources(resourcev3.RouteType)[RouteConfigName].(*routev3.RouteConfiguration)
	if !ok {
		t.Fatal("no route configuration")
	}
	validate(t, "route configuration", rc)
	vhs := map[string]*routev3.VirtualHost{}
	for _, vh := range rc.GetVirtualHosts() {
		for _, d := range vh.GetDomains() {
			if vhs[d] != nil {
				t.Errorf("domain %s in two virtual hosts", d)
			}
			vhs[d] = vh
		}
	}
	cluster := func(r *routev3.Route) string { return r.GetRoute().GetCluster() }
	direct := func(r *routev3.Route) uint32 { return r.GetDirectResponse().GetStatus() }

	pub := vhs[routes.Host(80, sbA, testDomain)]
	if pub == nil || vhs[routes.Host(80, sbA, testDomain)+":*"] != pub {
		t.Fatalf("no virtual host for the public port (with and without a port suffix): %v", rc)
	}
	if r := pub.GetRoutes(); len(r) != 1 || cluster(r[0]) != "node-n1" || len(r[0].GetMatch().GetHeaders()) != 0 {
		t.Errorf("public routes = %v", r)
	}
	if pub.GetRoutes()[0].GetRoute().GetHostRewriteSpecifier() != nil {
		t.Error("public route rewrites Host; the node routes by it")
	}

	priv := vhs[routes.Host(8888, sbA, testDomain)]
	if priv == nil {
		t.Fatal("no virtual host for the private port")
	}
	r := priv.GetRoutes()
	if len(r) != 2 {
		t.Fatalf("private routes = %v", r)
	}
	h := r[0].GetMatch().GetHeaders()
	if len(h) != 1 || !strings.EqualFold(h[0].GetName(), routes.TokenHeader) || h[0].GetStringMatch().GetExact() != "tok-a" || h[0].GetInvertMatch() {
		t.Errorf("token match = %v", h)
	}
	if cluster(r[0]) != "node-n1" || len(r[0].GetRequestHeadersToRemove()) != 1 || r[0].GetRequestHeadersToRemove()[0] != routes.TokenHeader {
		t.Errorf("token route = %v (must forward to node-n1 and drop the token)", r[0])
	}
	if direct(r[1]) != 401 || len(r[1].GetMatch().GetHeaders()) != 0 {
		t.Errorf("fallback route = %v, want 401 for every other request", r[1])
	}

	if r := vhs[routes.Host(4000, sbB, testDomain)].GetRoutes(); len(r) != 1 || direct(r[0]) != 502 {
		t.Errorf("stopped sandbox routes = %v, want 502", r)
	}
	if r := vhs["*"].GetRoutes(); len(r) != 1 || direct(r[0]) != 404 {
		t.Errorf("default routes = %v, want 404", r)
	}

	// Clusters: only nodes with running routes; IP addresses over EDS, names over DNS; all
	// with mutual TLS from files.
	cds := snap.GetResources(resourcev3.ClusterType)
	if len(cds) != 2 {
		t.Errorf("clusters = %v, want node-n1 and node-n2", cds)
	}
	n1, _ := cds["node-n1"].(*clusterv3.Cluster)
	n2, _ := cds["node-n2"].(*clusterv3.Cluster)
	if n1.GetType() != clusterv3.Cluster_EDS || n2.GetType() != clusterv3.Cluster_LOGICAL_DNS {
		t.Errorf("cluster types: n1 %v, n2 %v", n1.GetType(), n2.GetType())
	}
	for _, c := range []*clusterv3.Cluster{n1, n2} {
		validate(t, c.GetName(), c)
		var tc tlsv3.UpstreamTlsContext
		if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(&tc); err != nil {
			t.Fatalf("%s transport socket: %v", c.GetName(), err)
		}
		validate(t, c.GetName()+" TLS", &tc)
		cert := tc.GetCommonTlsContext().GetTlsCertificates()
		if len(cert) != 1 || cert[0].GetCertificateChain().GetFilename() != "/c.pem" || cert[0].GetPrivateKey().GetFilename() != "/k.pem" ||
			tc.GetCommonTlsContext().GetValidationContext().GetTrustedCa().GetFilename() != "/ca.pem" || tc.GetSni() != "node" {
			t.Errorf("%s TLS = %v", c.GetName(), &tc)
		}
		// Only that node's agent certificate: its identity URI, which the CA alone sets.
		sans := tc.GetCommonTlsContext().GetValidationContext().GetMatchTypedSubjectAltNames()
		if want := "fireworks://agent/" + strings.TrimPrefix(c.GetName(), "node-"); len(sans) != 1 || sans[0].GetMatcher().GetExact() != want {
			t.Errorf("%s accepts %v, want only %s", c.GetName(), sans, want)
		}
	}
	if sa := n2.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress(); sa.GetAddress() != "node2.internal" || sa.GetPortValue() != 7443 {
		t.Errorf("n2 address = %v", sa)
	}
	eds := snap.GetResources(resourcev3.EndpointType)
	cla, ok := eds["node-n1"].(*endpointv3.ClusterLoadAssignment)
	if len(eds) != 1 || !ok {
		t.Fatalf("endpoints = %v", eds)
	}
	validate(t, "node-n1 endpoints", cla)
	if sa := cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress(); sa.GetAddress() != "10.0.0.1" || sa.GetPortValue() != 7443 {
		t.Errorf("n1 address = %v", sa)
	}
}

func TestEmptyTableStillHasTheListener(t *testing.T) {
	// Envoy must get a listener and a 404 catch-all before any sandbox publishes a port.
	snap := buildEnvoy(t, Config{Domain: testDomain, ListenerName: "edge", ListenPort: 8080}, routes.Table{Version: 1})
	if len(snap.GetResources(resourcev3.ListenerType)) != 1 {
		t.Error("no listener")
	}
	rc := snap.GetResources(resourcev3.RouteType)[RouteConfigName].(*routev3.RouteConfiguration)
	if vh := rc.GetVirtualHosts(); len(vh) != 1 || vh[0].GetDomains()[0] != "*" {
		t.Errorf("virtual hosts = %v", vh)
	}
}

func TestBadRoutesDegradeInsteadOfFailingTheTable(t *testing.T) {
	tbl := routes.Table{Version: 3, Routes: []routes.Route{
		{Sandbox: sbA, Port: 1, Public: true, Node: "n1", NodeAddr: "no-port", Running: true},
		{Sandbox: sbA, Port: 2, Public: true, Node: "n2", NodeAddr: "10.0.0.2:7443", Running: true},
		{Sandbox: sbB, Port: 2, Public: true, Node: "n2", NodeAddr: "10.0.0.9:7443", Running: true}, // same node, other address
		{Sandbox: sbB, Port: 2, Public: true, Node: "n2", NodeAddr: "10.0.0.2:7443", Running: true}, // duplicate host
		{Sandbox: sbB, Port: 3, Token: "", Node: "n2", NodeAddr: "10.0.0.2:7443", Running: true},    // private, no token
	}}
	p, problems := makePlan(testDomain, tbl)
	if len(problems) != 3 {
		t.Errorf("problems = %v, want bad address, address conflict, duplicate host", problems)
	}
	want := map[string]string{
		routes.Host(1, sbA, testDomain): "",        // bad address: 502
		routes.Host(2, sbA, testDomain): "node-n2", // first address of n2 wins
		routes.Host(2, sbB, testDomain): "",        // conflicting address: 502
		routes.Host(3, sbB, testDomain): "node-n2",
	}
	if len(p.targets) != len(want) {
		t.Fatalf("targets = %v", p.targets)
	}
	for _, tg := range p.targets {
		if c, ok := want[tg.host]; !ok || c != tg.cluster {
			t.Errorf("%s → cluster %q, want %q", tg.host, tg.cluster, c)
		}
	}
	snap, err := envoySnapshot(Config{Domain: testDomain, ListenerName: "edge", ListenPort: 1}, "3", p)
	if err != nil {
		t.Fatal(err)
	}
	rc := snap.GetResources(resourcev3.RouteType)[RouteConfigName].(*routev3.RouteConfiguration)
	for _, vh := range rc.GetVirtualHosts() {
		if vh.GetName() == routes.Host(3, sbB, testDomain) {
			if r := vh.GetRoutes(); len(r) != 1 || r[0].GetDirectResponse().GetStatus() != 401 {
				t.Errorf("private port without a token: routes %v, want only 401", r)
			}
		}
	}
}

func TestGRPCResources(t *testing.T) {
	tbl := routes.Table{Version: 2, Routes: []routes.Route{
		{Sandbox: sbA, Port: 50051, Public: true, Node: "n1", NodeAddr: "10.0.0.1:7443", Running: true},
		{Sandbox: sbB, Port: 50051, Public: true, Node: "n2", NodeAddr: "10.0.0.2:7443", Running: false},
	}}
	p, _ := makePlan(testDomain, tbl)
	snap, err := grpcSnapshot("2", p)
	if err != nil {
		t.Fatal(err)
	}
	lds := snap.GetResources(resourcev3.ListenerType)
	if len(lds) != 2 {
		t.Fatalf("listeners = %v, want one api_listener per route", lds)
	}
	for name, res := range lds {
		lis := res.(*listenerv3.Listener)
		if lis.GetApiListener() == nil || lis.GetAddress() != nil {
			t.Errorf("%s is not an api_listener: %v", name, lis)
		}
	}
	cds := snap.GetResources(resourcev3.ClusterType)
	c, ok := cds["node-n1"].(*clusterv3.Cluster)
	if len(cds) != 1 || !ok || c.GetType() != clusterv3.Cluster_EDS || c.GetTransportSocket() != nil {
		t.Errorf("clusters = %v, want node-n1 over EDS without TLS settings", cds)
	}
	if n := len(snap.GetResources(resourcev3.RouteType)); n != 0 {
		t.Errorf("%d RDS resources; gRPC routes are inline", n)
	}
}

func TestClientKindGroupsNodes(t *testing.T) {
	for ua, want := range map[string]string{"envoy": groupEnvoy, "": groupEnvoy, "gRPC Go": groupGRPC, "gRPC Java": groupGRPC} {
		if got := (clientKind{}).ID(&corev3.Node{Id: "any", UserAgentName: ua}); got != want {
			t.Errorf("user agent %q → %q, want %q", ua, got, want)
		}
	}
}
