package agentproc

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
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
		return &httpPeer{base: "https://" + m.ToAddress + nodeapi.MigratePath, c: &http.Client{Transport: duplexTransport(tc)}, node: m.To}, nil
	}
}

// duplexTransport is HTTP/2 to one peer node with tc, for full-duplex streams that may
// outlive their dial.
func duplexTransport(tc *tls.Config) *http.Transport {
	tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true, IdleConnTimeout: time.Minute, TLSHandshakeTimeout: 10 * time.Second,
		// A peer that stops answering (a partition, a hung node) is found out: the calls'
		// contexts bound them until answered, and the pings after.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 10 * time.Second}}
	var d net.Dialer
	d.Timeout = 10 * time.Second
	tr.DialContext = d.DialContext
	return tr
}

// volumeDialer relays the volume connections of this node's sandboxes to the nodes
// holding their volumes (see agent.VolumeDialer): node to node over the cluster's mutual
// TLS, the holder's certificate checked to be that node's.
//
// Each guest connection gets a TLS connection of its own: streams sharing one would share
// its flow control, and a guest that stops reading its answers would stall every other
// sandbox's volume traffic between the two nodes. A guest connection is long-lived and a
// guest has few (one per mount, the lock manager's, the portmapper's).
func volumeDialer(id *agentlink.Identity) agent.VolumeDialer {
	return func(ctx context.Context, node, address, sandbox string, index int) (net.Conn, error) {
		tc, err := nodePeerTLS(id, node, address)
		if err != nil {
			return nil, err
		}
		tr := duplexTransport(tc)
		// What a stalled guest leaves buffered here is bounded per connection.
		tr.HTTP2.MaxReceiveBufferPerStream = 256 << 10
		tr.HTTP2.MaxReceiveBufferPerConnection = 256 << 10
		c, err := dialDuplex(ctx, &http.Client{Transport: tr}, "https://"+address+nodeapi.VolumePath+sandbox+"/"+strconv.Itoa(index), "volume stream to node "+node)
		if err != nil {
			tr.CloseIdleConnections()
			return nil, err
		}
		c.(*streamConn).done = tr.CloseIdleConnections
		return c, nil
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
	return dialDuplex(ctx, p.c, p.base+id+"/"+mid+"/disk", "migration disk to node "+p.node)
}

// dialDuplex opens a full-duplex POST to url as a net.Conn: what is written goes in the
// request body, what comes back is the response body. The call lives as long as the
// connection, not as ctx, which bounds it until the peer has answered.
func dialDuplex(ctx context.Context, c *http.Client, url, what string) (net.Conn, error) {
	pr, pw := io.Pipe()
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	req, err := http.NewRequestWithContext(cctx, http.MethodPost, url, pr)
	if err != nil {
		stop()
		cancel()
		return nil, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := c.Do(req)
	if err != nil {
		err = fmt.Errorf("%s: %w", what, err)
	} else if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		err = fmt.Errorf("%s refused: %s", what, strings.TrimSpace(string(b)))
	}
	if !stop() && err == nil {
		err = fmt.Errorf("%s: %w", what, context.Cause(ctx))
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
// read (no deadlines: its owner ends it by closing).
type streamConn struct {
	w      *io.PipeWriter
	r      io.ReadCloser
	cancel context.CancelFunc
	done   func() // if set, after the close (the connection's own transport goes)
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
		if c.done != nil {
			c.done()
		}
	})
	return nil
}
func (c *streamConn) LocalAddr() net.Addr              { return streamAddr{} }
func (c *streamConn) RemoteAddr() net.Addr             { return streamAddr{} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

type streamAddr struct{}

func (streamAddr) Network() string { return "node-stream" }
func (streamAddr) String() string  { return "node-stream" }
