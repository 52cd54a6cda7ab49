package rpc_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"testing"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
)

// A streaming call forwarded over HTTP/2 whose upstream answers and ends while the
// client still holds its request open: through EndWithResponse the client sees the
// response end. (Through a bare ReverseProxy it waits for good: the proxy's close of the
// response waits for the client's request, which waits for the response.)
func TestEndWithResponseEndsAnOpenStream(t *testing.T) {
	upstream := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			t.Errorf("upstream read: %v", err)
			return
		}
		_, _ = w.Write([]byte("answer to " + string(buf)))
		// and returns with the client's request still open
	}))
	upstream.EnableHTTP2 = true
	upstream.StartTLS()
	defer upstream.Close()
	target, _ := url.Parse(upstream.URL)

	front := httptest.NewUnstartedServer(rpc.EndWithResponse(&httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     upstream.Client().Transport,
		FlushInterval: -1,
	}))
	front.EnableHTTP2 = true
	front.StartTLS()
	defer front.Close()

	body, feed := io.Pipe()
	defer feed.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, front.URL, body)
	go func() { _, _ = feed.Write([]byte("hello")) }() // and never closes
	res, err := front.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() { b, _ := io.ReadAll(res.Body); got <- string(b) }()
	select {
	case b := <-got:
		if b != "answer to hello" {
			t.Errorf("response %q", b)
		}
	case <-time.After(10 * time.Second):
		cancel()
		feed.CloseWithError(io.ErrClosedPipe)
		t.Fatal("the response did not end while the client held its request open")
	}
}
