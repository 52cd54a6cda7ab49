package pki

import (
	"crypto/tls"
	"sync"
)

// Revoked is a set of certificate serials (hex, as SerialNumber.Text(16)) to refuse. A
// node holds the cluster's list of revoked edge certificates in one, replaced whole by
// every heartbeat answer; the zero value is an empty set, safe for concurrent use.
type Revoked struct {
	mu    sync.RWMutex
	set   map[string]bool
	known bool
}

// Set replaces the set with serials.
func (r *Revoked) Set(serials []string) {
	m := make(map[string]bool, len(serials))
	for _, s := range serials {
		m[s] = true
	}
	r.mu.Lock()
	r.set, r.known = m, true
	r.mu.Unlock()
}

// Known reports whether Set was called: until then the set is not the cluster's list
// (a node just started), and whoever relies on it should refuse rather than admit.
func (r *Revoked) Known() bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.known
}

// Has reports whether serial is revoked.
func (r *Revoked) Has(serial string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.set[serial]
}

// PeerSerial is the serial (hex) of the verified peer certificate of cs, "" without one.
func PeerSerial(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	return cs.VerifiedChains[0][0].SerialNumber.Text(16)
}
