package ingress

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// ShutdownGrace is how long Serve lets in-flight requests finish after its context is
// done before it cuts them (and every tunnel and WebSocket) off.
const ShutdownGrace = 10 * time.Second

// Serve serves h on ln until ctx is done, then shuts down: it stops accepting, lets
// in-flight requests finish for up to ShutdownGrace, then cancels every request context
// (which ends hijacked tunnels and WebSockets, since http.Server.Shutdown does not track
// them) and returns only once every handler has returned. It closes ln.
//
// With tlsCfg (which must carry a certificate) it serves HTTPS with HTTP/2 negotiated by
// ALPN, else HTTP/1.1 and cleartext HTTP/2 with prior knowledge (h2c). It returns nil
// after a shutdown caused by ctx, or the error that stopped the listener.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, tlsCfg *tls.Config, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	// Request contexts derive from base, not ctx: cancelling ctx starts a graceful
	// shutdown, cancelling base is the hard stop after it.
	base, cancelBase := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelBase()

	tr := newTracker()
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !tr.enter() {
				plainError(w, http.StatusServiceUnavailable, "shutting down")
				return
			}
			defer tr.leave()
			h.ServeHTTP(w, r)
		}),
		BaseContext:       func(net.Listener) context.Context { return base },
		ReadHeaderTimeout: 10 * time.Second,
		// No ReadTimeout/WriteTimeout: streams, tunnels and WebSockets are long-lived.
		IdleTimeout: 2 * time.Minute,
		ErrorLog:    slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		Protocols:   new(http.Protocols),
	}
	srv.Protocols.SetHTTP1(true)
	if tlsCfg != nil {
		srv.Protocols.SetHTTP2(true)
		srv.TLSConfig = tlsCfg.Clone()
	} else {
		srv.Protocols.SetUnencryptedHTTP2(true)
	}

	errc := make(chan error, 1)
	go func() {
		if tlsCfg != nil {
			errc <- srv.ServeTLS(ln, "", "")
		} else {
			errc <- srv.Serve(ln)
		}
	}()

	var serveErr error
	select {
	case serveErr = <-errc:
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), ShutdownGrace)
		if err := srv.Shutdown(sctx); err != nil {
			log.Info("ingress: cutting off requests still running after the grace period", "addr", ln.Addr().String())
		}
		cancel()
		serveErr = <-errc
	}
	cancelBase()
	_ = srv.Close()
	tr.closeAndWait()
	if errors.Is(serveErr, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve on %s: %w", ln.Addr(), serveErr)
}

// tracker counts running handlers so Serve can wait for them, including hijacked ones
// that http.Server forgets. Unlike a WaitGroup it refuses entries once closing, so a
// request that slips in during shutdown cannot race the wait.
type tracker struct {
	mu      sync.Mutex
	n       int
	closing bool
	idle    chan struct{}
}

func newTracker() *tracker { return &tracker{idle: make(chan struct{})} }

func (t *tracker) enter() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closing {
		return false
	}
	t.n++
	return true
}

func (t *tracker) leave() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n--
	if t.closing && t.n == 0 {
		close(t.idle)
	}
}

func (t *tracker) closeAndWait() {
	t.mu.Lock()
	t.closing = true
	if t.n == 0 {
		close(t.idle)
	}
	t.mu.Unlock()
	<-t.idle
}
