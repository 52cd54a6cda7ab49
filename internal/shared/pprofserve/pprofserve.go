// Package pprofserve serves Go's runtime profiles (net/http/pprof) of a process on a
// loopback address, for an operator finding what limits a server or an agent.
package pprofserve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"time"
)

// MaxSeconds bounds a profile's or a trace's ?seconds=: a local user's request for an
// hour-long trace would otherwise hold the process's tracer (and its memory) that long.
const MaxSeconds = 60

// Handler serves the profiles, refusing a ?seconds= above MaxSeconds.
func Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Every value, from the query and a POST body both: the handlers read
		// FormValue, which takes the body's first.
		if err := r.ParseForm(); err != nil {
			http.Error(w, "bad form: "+err.Error(), http.StatusBadRequest)
			return
		}
		for _, v := range r.Form["seconds"] {
			if n, err := strconv.ParseFloat(v, 64); err != nil || !(n >= 0 && n <= MaxSeconds) { // NaN too
				http.Error(w, fmt.Sprintf("seconds=%q: a number from 0 to %d", v, MaxSeconds), http.StatusBadRequest)
				return
			}
		}
		mux.ServeHTTP(w, r)
	})
}

// Start serves the profiles on addr until ctx ends. Only a loopback address is taken:
// profiles show what the process holds and cost it CPU, so they are for whoever is on
// the host already, never the network.
func Start(ctx context.Context, addr string, log *slog.Logger) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--pprof-listen %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("--pprof-listen %q: profiles are served on a loopback address only (127.0.0.1:PORT)", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--pprof-listen: %w", err)
	}
	if a, ok := ln.Addr().(*net.TCPAddr); !ok || !a.IP.IsLoopback() {
		ln.Close()
		return fmt.Errorf("--pprof-listen %q listens on %s, not a loopback address", addr, ln.Addr())
	}
	srv := &http.Server{Handler: Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { // ends when ctx does (Shutdown below closes the listener)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("pprof server", "err", err)
		}
	}()
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	log.Info("serving runtime profiles", "addr", ln.Addr().String())
	return nil
}
