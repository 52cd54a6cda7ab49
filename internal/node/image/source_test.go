package image

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"testing"
	"time"
)

// A user's pull connects only to public addresses and the allowed ranges.
func TestGuardedReach(t *testing.T) {
	allow := []netip.Prefix{netip.MustParsePrefix("10.5.0.0/16")}
	for addr, ok := range map[string]bool{
		"8.8.8.8": true, "2606:4700::1": true, "10.5.1.2": true,
		"127.0.0.1": false, "10.0.0.1": false, "169.254.169.254": false, "192.168.1.1": false,
		"100.64.0.1": false, "0.0.0.0": false, "::1": false, "fe80::1": false, "fd00::1": false, "224.0.0.1": false,
		"64:ff9b::a9fe:a9fe": false, "64:ff9b::808:808": true, "2002:a00:1::1": false, "::10.0.0.1": false,
		"168.63.129.16": false,
	} {
		err := reachable(netip.MustParseAddr(addr), allow)
		if (err == nil) != ok {
			t.Errorf("%s: %v, want reachable=%v", addr, err, ok)
		}
	}
}

// A user's pull speaks plain HTTP only to an address the operator allowed.
func TestUserPullsUseTLS(t *testing.T) {
	tr := GuardedTransport([]netip.Prefix{netip.MustParsePrefix("10.5.0.0/16")}, nil)
	for url, ok := range map[string]bool{"http://8.8.8.8/v2/": false, "http://registry.local/v2/": false, "http://10.5.0.7:5000/v2/": true} {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		_, err := tr.RoundTrip(req.WithContext(ctx))
		cancel()
		refused := err != nil && errors.Is(err, ErrPrivateRegistry)
		if refused == ok {
			t.Errorf("%s: %v, want allowed=%v", url, err, ok)
		}
	}
}
