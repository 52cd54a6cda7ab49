package ingress

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// TunnelDialer opens a sandbox connection through its node: TLS to Route.NodeAddr, then
// `CONNECT <sandbox>:<port>`. It is the edge's Dialer and what port-forward uses.
type TunnelDialer struct {
	// TLS is the client configuration for the node's data address (the cluster CA, this
	// edge's certificate). When ServerName is empty the host of NodeAddr is used.
	TLS *tls.Config
	// VerifyNode, when set, checks the node's certificate is node's (VerifyConnection).
	VerifyNode func(node string) func(tls.ConnectionState) error
	// Timeout bounds connecting, the handshake and the CONNECT exchange (0: only ctx).
	Timeout time.Duration
}

// maxErrorBody is how much of a refusal's body goes into the error.
const maxErrorBody = 512

// DialSandbox implements Dialer. The connection it returns supports CloseWrite.
func (d *TunnelDialer) DialSandbox(ctx context.Context, r routes.Route) (net.Conn, error) {
	target := net.JoinHostPort(r.Sandbox, strconv.Itoa(int(r.Port)))
	if r.NodeAddr == "" {
		return nil, fmt.Errorf("tunnel to %s: route has no node address", target)
	}
	if d.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d.Timeout)
		defer cancel()
	}
	var cfg *tls.Config
	if d.TLS != nil {
		cfg = d.TLS.Clone()
		if r.Node != "" && d.VerifyNode != nil {
			cfg.VerifyConnection = d.VerifyNode(r.Node) // the route's node, not whoever holds its address
		}
	} else {
		cfg = &tls.Config{MinVersion: tls.VersionTLS13}
	}
	// The tunnel is an HTTP/1.1 exchange; a node that also serves HTTP/2 must not pick it.
	cfg.NextProtos = []string{"http/1.1"}
	td := &tls.Dialer{Config: cfg}
	nc, err := td.DialContext(ctx, "tcp", r.NodeAddr)
	if err != nil {
		return nil, fmt.Errorf("tunnel to %s via %s: %w", target, r.NodeAddr, err)
	}
	conn := nc.(*tls.Conn)
	c, err := connect(ctx, conn, target)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("tunnel to %s via %s: %w", target, r.NodeAddr, err)
	}
	return c, nil
}

// connect runs the CONNECT exchange on conn, bounded by ctx.
func connect(ctx context.Context, conn *tls.Conn, target string) (net.Conn, error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	// A cancelled ctx interrupts blocked I/O by moving the deadline to the past.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return nil, ctxErr(ctx, fmt.Errorf("send CONNECT: %w", err))
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, ctxErr(ctx, fmt.Errorf("read CONNECT response: %w", err))
	}
	if resp.StatusCode != http.StatusOK {
		// The body (a short reason) is bounded by our deadline and maxErrorBody.
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		resp.Body.Close()
		return nil, fmt.Errorf("node answered %s: %q", resp.Status, strings.TrimSpace(string(body)))
	}
	// A 200 to CONNECT has no body: everything after the header is the guest's bytes.
	if !stop() {
		// ctx ended just now and the deadline may already be in the past.
		return nil, ctxErr(ctx, errors.New("CONNECT interrupted"))
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("clear deadline: %w", err)
	}
	if n := br.Buffered(); n > 0 {
		pre, _ := br.Peek(n)
		return &prefixConn{Conn: conn, pre: append([]byte(nil), pre...)}, nil
	}
	return conn, nil
}

func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%w (%w)", cerr, err)
	}
	return err
}

// prefixConn is a tunnel whose first bytes were read along with the CONNECT response.
type prefixConn struct {
	*tls.Conn
	pre []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}
