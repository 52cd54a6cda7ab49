package rpc

import (
	"context"
	"io"
	"net/http"
	"net/http/httputil"
)

// EndWithResponse returns p as a handler that ends each forwarded call once the
// upstream's response has ended. A streaming call's client may keep its request open
// after the response ends (`fireworks exec` keeps its side open to pass on a signal; a
// Connect client reads to the end of the response before it lets go), and ReverseProxy
// hands the HTTP/2 transport a request body the transport cannot close: closing the
// response would wait for the client's request to end while the client waits for the
// response to end. Ending the forward's context once the response body has ended lets
// the response close and the call end.
func EndWithResponse(p *httputil.ReverseProxy) http.Handler {
	next := p.ModifyResponse
	p.ModifyResponse = func(res *http.Response) error {
		// (An upgrade's body is the connection itself, which the proxy takes over.)
		if end, ok := res.Request.Context().Value(endKey{}).(context.CancelFunc); ok && res.StatusCode != http.StatusSwitchingProtocols {
			res.Body = &endsWith{ReadCloser: res.Body, end: end}
		}
		if next != nil {
			return next(res)
		}
		return nil
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		p.ServeHTTP(w, r.WithContext(context.WithValue(ctx, endKey{}, cancel)))
	})
}

type endKey struct{}

// endsWith is a response body that calls end once it has ended (or failed).
type endsWith struct {
	io.ReadCloser
	end context.CancelFunc
}

func (e *endsWith) Read(p []byte) (int, error) {
	n, err := e.ReadCloser.Read(p)
	if err != nil {
		e.end()
	}
	return n, err
}
