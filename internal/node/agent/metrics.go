package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// netCollector reports every running sandbox's packet counters at scrape time, read from
// the policy programs' maps (so a scrape always sees the kernel's current counts).
type netCollector struct {
	a                *Agent
	packets, spoofed *prometheus.Desc
}

func newNetCollector(a *Agent) *netCollector {
	return &netCollector{a: a,
		packets: prometheus.NewDesc("fireworks_sandbox_network_packets_total",
			"Packets a sandbox's network policy handled, by direction (egress: sent by the sandbox; ingress: sent to it) and verdict.",
			[]string{"sandbox", "node", "direction", "verdict"}, nil),
		spoofed: prometheus.NewDesc("fireworks_sandbox_network_spoofed_frames_total",
			"Frames a sandbox's guest sent from a MAC or address not its own (dropped at its tap).",
			[]string{"sandbox", "node"}, nil),
	}
}

func (c *netCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.spoofed
}

func (c *netCollector) Collect(ch chan<- prometheus.Metric) {
	node := c.a.cfg.Node
	for id, st := range c.a.AllNetStats() {
		for _, m := range []struct {
			dir, verdict string
			v            uint64
		}{
			{"egress", "allowed", st.EgressAllowed}, {"egress", "dropped", st.EgressDropped},
			{"ingress", "allowed", st.IngressAllowed}, {"ingress", "dropped", st.IngressDropped},
		} {
			ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(m.v), id, node, m.dir, m.verdict)
		}
		ch <- prometheus.MustNewConstMetric(c.spoofed, prometheus.CounterValue, float64(st.Spoofed), id, node)
	}
}

// MetricsHandler serves the node's metrics in the Prometheus text format.
func (a *Agent) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newNetCollector(a))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// serveMetrics serves MetricsHandler on addr until the agent closes.
func (a *Agent) serveMetrics(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", a.MetricsHandler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	a.wg.Add(2)
	go func() {
		defer a.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Warn("metrics listener", "addr", addr, "err", err)
		}
	}()
	go func() { // owned by the agent: its shutdown ends the listener
		defer a.wg.Done()
		<-a.ctx.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}()
	a.log.Info("serving metrics", "addr", ln.Addr().String(), "path", "/metrics")
	return nil
}
