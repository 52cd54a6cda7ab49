package ingress

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// startSandboxGRPC starts a gRPC server (plain TCP, i.e. h2c) on 127.0.0.1 standing in for
// a gRPC app in a sandbox; it serves the standard health service.
func startSandboxGRPC(t *testing.T) (string, *health.Server) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return ln.Addr().String(), hs
}

func checkHealth(t *testing.T, target, authority string, creds credentials.TransportCredentials, md metadata.MD) {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+target, grpc.WithTransportCredentials(creds), grpc.WithAuthority(authority))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, md)
	hc := healthpb.NewHealthClient(cc)

	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Check via %s: %v", target, err)
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Check: %v", resp.Status)
	}
	// A server stream proves responses are flushed as they come, not at the end.
	stream, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	first, err := stream.Recv()
	if err != nil || first.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch first: %v %v", first, err)
	}
	// An unknown service is a gRPC status error carried in trailers.
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("Check unknown service: %v, want NotFound", err)
	}
}

func TestGRPCEndToEnd(t *testing.T) {
	w := newWorld(t)
	addr, _ := startSandboxGRPC(t)
	w.guests.set(sbA, 50051, addr)
	w.guests.set(sbB, 50051, addr)
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{
		w.route(sbA, 50051, true, ""),
		w.route(sbB, 50051, false, "grpc-token"),
	}})

	t.Run("edge h2c", func(t *testing.T) {
		checkHealth(t, w.edgeAddr, host(50051, sbA), insecure.NewCredentials(), nil)
	})
	t.Run("edge TLS", func(t *testing.T) {
		creds := credentials.NewTLS(&tls.Config{RootCAs: w.pki.ca.CertPool(), ServerName: host(50051, sbA)})
		checkHealth(t, w.edgeTLS, host(50051, sbA), creds, nil)
	})
	t.Run("edge private port with token metadata", func(t *testing.T) {
		checkHealth(t, w.edgeAddr, host(50051, sbB), insecure.NewCredentials(),
			metadata.Pairs("fireworks-access-token", "grpc-token"))
	})
	t.Run("node reverse proxy (the Envoy path)", func(t *testing.T) {
		// Verify the node by its role, not by a name: the authority is the sandbox host.
		cfg := pki.ClientTLS(w.pki.ca, &w.pki.edge, "", pki.RoleAgent)
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = pki.VerifyPeerRole(w.pki.ca, x509.ExtKeyUsageServerAuth, pki.RoleAgent)
		creds := credentials.NewTLS(cfg)
		checkHealth(t, w.nodeAddr, host(50051, sbA), creds, nil)
	})
}

// startSandboxWS starts a WebSocket echo server on 127.0.0.1 standing in for a sandbox app.
func startSandboxWS(t *testing.T) string {
	t.Helper()
	return startSandboxHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, append([]byte("echo: "), msg...)); err != nil {
				return
			}
		}
	}))
}

func wsEcho(t *testing.T, url string, hc *http.Client, hdr http.Header) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: hc, HTTPHeader: hdr})
	if err != nil {
		code := 0
		if resp != nil {
			code = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (status %d)", url, err, code)
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	for _, m := range []string{"one", "two", string(make([]byte, 100_000))} {
		if err := c.Write(ctx, websocket.MessageText, []byte(m)); err != nil {
			t.Fatalf("write: %v", err)
		}
		_, got, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if string(got) != "echo: "+m {
			t.Fatalf("echo of %d bytes: got %d bytes", len(m), len(got))
		}
	}
	if err := c.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Fatalf("close: %v", err)
	}
}

func TestWebSocketEndToEnd(t *testing.T) {
	w := newWorld(t)
	w.guests.set(sbA, 8080, startSandboxWS(t))
	w.guests.set(sbB, 8080, startSandboxWS(t))
	w.proxy.SetTable(routes.Table{Version: 1, Routes: []routes.Route{
		w.route(sbA, 8080, true, ""),
		w.route(sbB, 8080, false, "ws-token"),
	}})

	t.Run("edge", func(t *testing.T) {
		wsEcho(t, "ws://"+host(8080, sbA)+"/ws", client(w.edgeAddr), nil)
	})
	t.Run("edge private port", func(t *testing.T) {
		wsEcho(t, "ws://"+host(8080, sbB)+"/ws", client(w.edgeAddr), http.Header{routes.TokenHeader: {"ws-token"}})
	})
	t.Run("node reverse proxy (the Envoy path)", func(t *testing.T) {
		var p http.Protocols
		p.SetHTTP1(true)
		hc := &http.Client{Transport: &http.Transport{
			Protocols:       &p,
			TLSClientConfig: pki.ClientTLS(w.pki.ca, &w.pki.edge, "127.0.0.1", pki.RoleAgent),
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", w.nodeAddr)
			},
		}}
		wsEcho(t, "wss://"+host(8080, sbA)+"/ws", hc, nil)
	})
}
