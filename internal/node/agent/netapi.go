package agent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// SetPolicy puts a network policy (policy file text; "" = the node's defaults only) in
// force on a running sandbox, without restarting it. admin says an admin gave it (only
// an admin's policy may open what the node protects). A policy that is refused changes
// nothing.
func (a *Agent) SetPolicy(id, text string, admin bool) error {
	s, err := a.lookup(id)
	if err != nil {
		return err
	}
	s.mu.Lock()
	n := s.net
	s.mu.Unlock()
	if n == nil {
		return fmt.Errorf("sandbox %s has no network", id)
	}
	return n.Apply(NetPolicy{Text: text, Admin: admin, Strict: true})
}

// NetStats reads a running sandbox's network address and packet counters.
func (a *Agent) NetStats(id string) (NetStats, error) {
	s, err := a.lookup(id)
	if err != nil {
		return NetStats{}, err
	}
	s.mu.Lock()
	n, base := s.net, s.netBase
	s.mu.Unlock()
	if n == nil {
		return NetStats{}, fmt.Errorf("sandbox %s has no network", id)
	}
	st, err := n.Stats()
	return st.plus(base), err
}

// plus adds the counters of base (a network's before a pause) to st's.
func (st NetStats) plus(base NetStats) NetStats {
	st.EgressAllowed += base.EgressAllowed
	st.EgressDropped += base.EgressDropped
	st.IngressAllowed += base.IngressAllowed
	st.IngressDropped += base.IngressDropped
	st.Spoofed += base.Spoofed
	return st
}

// AllNetStats reads the counters of every running sandbox with a network, by sandbox ID
// (for metrics).
func (a *Agent) AllNetStats() map[string]NetStats {
	a.mu.Lock()
	nets := map[string]SandboxNet{}
	bases := map[string]NetStats{}
	for id, s := range a.live {
		s.mu.Lock()
		if s.net != nil {
			nets[id], bases[id] = s.net, s.netBase
		}
		s.mu.Unlock()
	}
	a.mu.Unlock()
	out := map[string]NetStats{}
	for id, n := range nets {
		if st, err := n.Stats(); err == nil {
			out[id] = st.plus(bases[id])
		}
	}
	return out
}

// DialSandbox opens a TCP connection to a running sandbox's guest port, through its
// network namespace (the sandbox's address translates to the guest's).
func (a *Agent) DialSandbox(ctx context.Context, id string, port uint16) (net.Conn, error) {
	s, err := a.lookup(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	n := s.net
	s.mu.Unlock()
	if n == nil {
		return nil, fmt.Errorf("sandbox %s has no network", id)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(n.Address(), port).String())
	if err != nil {
		return nil, fmt.Errorf("connect to port %d of sandbox %s: %w", port, id, err)
	}
	// Tied to this run: when it ends (stopped, paused, crashed) the connection is closed,
	// so that a peer (an edge's pooled upstream) sees the end at once instead of waiting
	// on a guest that vanished without a reset.
	tc := &runConn{Conn: c, s: s}
	s.mu.Lock()
	if s.conns == nil {
		s.conns = map[*runConn]struct{}{}
	}
	s.conns[tc] = struct{}{}
	s.mu.Unlock()
	return tc, nil
}

// runConn is a connection to a sandbox's guest, closed with the run it reached.
type runConn struct {
	net.Conn
	s *sandbox
}

func (c *runConn) Close() error {
	c.s.mu.Lock()
	delete(c.s.conns, c)
	c.s.mu.Unlock()
	return c.Conn.Close()
}

// closeConns ends the connections into the run (its end).
func (s *sandbox) closeConns() {
	s.mu.Lock()
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for c := range conns {
		_ = c.Conn.Close()
	}
}
