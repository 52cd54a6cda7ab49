// Command guestweb is a test server that runs inside sandboxes: it answers HTTP/1.1 and
// cleartext HTTP/2 with prior knowledge on one port, reports what each request looked
// like when it arrived (protocol, Host, headers the edge should have set or removed), and
// echoes WebSocket messages on /ws. With -grpc it also serves gRPC's health service (the
// service "guestweb" is SERVING) for proxyless gRPC clients. Tests build it static (CGO_ENABLED=0) and add it to
// an image as /bin/guestweb (see testutil.BuildGuestWeb).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Seen is the answer to every plain request.
type Seen struct {
	Proto         string `json:"proto"`
	Method        string `json:"method"`
	Host          string `json:"host"`
	Path          string `json:"path"`
	AccessToken   string `json:"access_token"` // must always be empty: the edge strips it
	XForwardedFor string `json:"x_forwarded_for"`
	Hostname      string `json:"hostname"`
}

func main() {
	listen := flag.String("listen", ":8080", "address to serve on")
	grpcListen := flag.String("grpc", "", "also serve gRPC health (service \"guestweb\") here")
	flag.Parse()
	if *grpcListen != "" {
		ln, err := net.Listen("tcp", *grpcListen)
		if err != nil {
			fmt.Fprintln(os.Stderr, "guestweb:", err)
			os.Exit(1)
		}
		g := grpc.NewServer()
		hs := health.NewServer()
		hs.SetServingStatus("guestweb", healthpb.HealthCheckResponse_SERVING)
		healthpb.RegisterHealthServer(g, hs)
		go func() { _ = g.Serve(ln) }() // lives as long as the process
	}
	host, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx := r.Context()
		for {
			typ, msg, err := c.Read(ctx)
			if err != nil {
				return
			}
			if err := c.Write(ctx, typ, append([]byte("echo:"), msg...)); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(Seen{Proto: r.Proto, Method: r.Method, Host: r.Host, Path: r.URL.Path,
			AccessToken: r.Header.Get("Fireworks-Access-Token"), XForwardedFor: r.Header.Get("X-Forwarded-For"), Hostname: host})
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	fmt.Fprintln(os.Stderr, "guestweb listening on", *listen)
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, "guestweb:", err)
		os.Exit(1)
	}
}
