package agentproc

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/agentlink"
	"github.com/fireworks-sandbox/fireworks/internal/node/nodeapi"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// migrationDialer reaches the agent of a migration's target node to drive it (see
// agent.MigrationPeer): node to node over the cluster's mutual TLS, this node's
// certificate, and the target's checked to be that node's.
func migrationDialer(id *agentlink.Identity) agent.MigrationDialer {
	return func(m state.Migration) (agent.MigrationPeer, error) {
		tc, err := nodePeerTLS(id, m.To, m.ToAddress)
		if err != nil {
			return nil, err
		}
		// HTTP/2: the disk mirror's connections and the stream share one TLS connection,
		// and a disk call is full duplex.
		tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true, IdleConnTimeout: time.Minute, TLSHandshakeTimeout: 10 * time.Second,
			// A target that stops answering (a partition, a hung node) is found out: the
			// calls' contexts bound them, and a disk call outlives its dial.
			HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
		var d net.Dialer
		d.Timeout = 10 * time.Second
		tr.DialContext = d.DialContext
		return &httpPeer{base: "https://" + m.ToAddress + nodeapi.MigratePath, c: &http.Client{Transport: tr}, node: m.To}, nil
	}
}

type httpPeer struct {
	base string
	c    *http.Client
	node string
}

func (p *httpPeer) call(ctx context.Context, id, mid, op string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.base+id+"/"+mid+"/"+op, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := p.c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("migration %s to node %s: %w", op, p.node, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return nil, fmt.Errorf("node %s refused migration %s: %s", p.node, op, strings.TrimSpace(string(b)))
	}
	return resp, nil
}

func (p *httpPeer) do(ctx context.Context, id, mid, op string, body io.Reader) error {
	resp, err := p.call(ctx, id, mid, op, body)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	return resp.Body.Close()
}

func (p *httpPeer) Begin(ctx context.Context, id, mid string, body io.Reader) error {
	return p.do(ctx, id, mid, "begin", body)
}

func (p *httpPeer) Stream(ctx context.Context, id, mid string, body io.Reader) error {
	return p.do(ctx, id, mid, "stream", body)
}

func (p *httpPeer) Switch(ctx context.Context, id, mid string, body io.Reader) error {
	return p.do(ctx, id, mid, "switch", body)
}

// Disk opens a full-duplex call to the target's disk service: what is written goes in
// the request body, what comes back is the response body.
func (p *httpPeer) Disk(ctx context.Context, id, mid string) (net.Conn, error) {
	pr, pw := io.Pipe()
	// The call lives as long as the connection, not as the dial's context; that bounds
	// it until the target has answered.
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	resp, err := p.call(cctx, id, mid, "disk", pr)
	if !stop() && err == nil {
		err = fmt.Errorf("migration disk to node %s: %w", p.node, context.Cause(ctx))
		resp.Body.Close()
	}
	if err != nil {
		cancel()
		pw.Close()
		return nil, err
	}
	return &streamConn{w: pw, r: resp.Body, cancel: cancel}, nil
}

// streamConn is a net.Conn over a request body being written and a response body being
// read (no deadlines: the mirror's owner ends it by closing).
type streamConn struct {
	w      *io.PipeWriter
	r      io.ReadCloser
	cancel context.CancelFunc
	once   sync.Once
}

func (c *streamConn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *streamConn) Write(b []byte) (int, error) { return c.w.Write(b) }
func (c *streamConn) CloseWrite() error           { return c.w.Close() }
func (c *streamConn) Close() error {
	c.once.Do(func() {
		c.w.Close()
		c.r.Close()
		c.cancel()
	})
	return nil
}
func (c *streamConn) LocalAddr() net.Addr              { return streamAddr{} }
func (c *streamConn) RemoteAddr() net.Addr             { return streamAddr{} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

type streamAddr struct{}

func (streamAddr) Network() string { return "migration" }
func (streamAddr) String() string  { return "migration" }
