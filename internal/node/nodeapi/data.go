package nodeapi

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/shared/ingress"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
)

// publishedDialer connects to a sandbox on this node, and only to a port the sandbox
// publishes: the data address is for the ingress, not a way to any guest port.
type publishedDialer struct{ ag *agent.Agent }

func (d publishedDialer) DialSandbox(ctx context.Context, r routes.Route) (net.Conn, error) {
	spec, ok := d.ag.Spec(r.Sandbox)
	if !ok {
		return nil, fmt.Errorf("sandbox %s is not running on this node", r.Sandbox)
	}
	if _, ok := spec.Publishes(r.Port); !ok {
		return nil, fmt.Errorf("sandbox %s does not publish port %d", r.Sandbox, r.Port)
	}
	return d.ag.DialSandbox(ctx, r.Sandbox, r.Port)
}

// Dialer reaches the published ports of ag's sandboxes, and only those: the dialer of
// an edge in the node's own process (`fireworks dev --ingress-listen`), with no node hop
// and no TLS.
func Dialer(ag *agent.Agent) ingress.Dialer {
	return publishedDialer{ag: ag}
}

// DataHandler is the node side of the data path without peer authentication:
// `fireworks dev` serves it on a loopback address, its node's data address (for an Envoy
// fed over xDS), that only the user running dev may connect to.
func DataHandler(ag *agent.Agent, domain string, log *slog.Logger) http.Handler {
	return ingress.NewNodeHandler(domain, publishedDialer{ag: ag}, log)
}

// edgeHandler is the data path of Handler: edges (servers and ingress certificates) may
// open tunnels and send Host-routed requests.
func edgeHandler(ag *agent.Agent, domain string, revoked *pki.Revoked, log *slog.Logger) http.Handler {
	h := ingress.NewNodeHandler(domain, publishedDialer{ag: ag}, log)
	h.Authorize = func(r *http.Request) error {
		role, name, err := pki.PeerIdentity(r.TLS)
		if err != nil {
			return err
		}
		if role != pki.RoleIngress && role != pki.RoleServer {
			return fmt.Errorf("a node's data path serves edges (ingress or server certificates), not %s", role)
		}
		if role == pki.RoleIngress && revoked != nil {
			if !revoked.Known() {
				// Started, not yet told which edge certificates are revoked: admitting
				// every edge meanwhile would readmit revoked ones after each restart.
				return fmt.Errorf("this node has not heard from the servers yet which edge certificates are revoked; try again shortly")
			}
			if revoked.Has(pki.PeerSerial(r.TLS)) {
				return fmt.Errorf("edge certificate %q was revoked with its token", name)
			}
		}
		return nil
	}
	return h
}

// isDataRequest tells the data path's requests (CONNECT tunnels, Host-routed requests
// for a sandbox port) from internal API calls on a node's listener.
func isDataRequest(r *http.Request, domain string) bool {
	if r.Method == http.MethodConnect {
		return true
	}
	_, _, ok := routes.ParseHost(r.Host, domain)
	return ok
}
