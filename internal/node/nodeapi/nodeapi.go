// Package nodeapi is a node's internal API, on top of its agent: what the servers ask of
// the node (the data plane of its sandboxes: attach, logs, exec, policy, port-forward,
// removal; its images, templates and warm pools; its Info), and its data address for the
// edges (CONNECT tunnels and Host-routed requests to published ports, see
// internal/shared/ingress). Remote servers reach it over mutual TLS (Handler); the server of the
// node's own process (`fireworks dev`) in memory (APIHandler), through the same handlers.
//
// Users are authenticated and authorised by the server; the node trusts its caller to
// be a server (it checks the certificate) and takes the user the server acts for from
// the caller headers (see rpc.CallerTokenHeader).
package nodeapi

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"

	"connectrpc.com/connect"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1/fireworksv1connect"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// Options configure a node's listener (Handler).
type Options struct {
	// IngressDomain is the ingress domain (default routes.DefaultDomain): requests whose
	// Host names a sandbox port under it go to the data path.
	IngressDomain string
	// RevokedEdges are the edge certificates the data path refuses (revoked with their
	// token), as the servers' heartbeat answers list them; nil refuses none.
	RevokedEdges *pki.Revoked
}

// Handler is a node's listener: the internal API for cluster servers (their certificate
// is checked here) and the data path for edges (ingress and server certificates).
func Handler(ag *agent.Agent, opts Options, log *slog.Logger) http.Handler {
	if opts.IngressDomain == "" {
		opts.IngressDomain = routes.DefaultDomain
	}
	data := edgeHandler(ag, opts.IngressDomain, opts.RevokedEdges, log)
	api := APIHandler(ag, log)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isDataRequest(r, opts.IngressDomain) {
			data.ServeHTTP(w, r)
			return
		}
		if id, ok := strings.CutPrefix(r.URL.Path, SavedPath); ok {
			serveSaved(ag, w, r, id, log)
			return
		}
		if rest, ok := strings.CutPrefix(r.URL.Path, MigratePath); ok {
			serveMigration(ag, w, r, rest, log)
			return
		}
		if id, ok := strings.CutPrefix(r.URL.Path, VolumeDataPath); ok {
			serveVolumeData(ag, w, r, id, log)
			return
		}
		if rest, ok := strings.CutPrefix(r.URL.Path, VolumePath); ok {
			serveVolumeStream(ag, w, r, rest, log)
			return
		}
		if role, _, err := pki.PeerIdentity(r.TLS); err != nil || role != pki.RoleServer {
			rpc.Unauthenticated(w, r, "a node's internal API serves only cluster servers")
			return
		}
		api.ServeHTTP(w, r)
	})
}

// SavedPath + a sandbox ID is where a node fetches the saved state a sandbox starts
// from, from the node that holds it: its own, to resume it, or its source's, to fork it
// (GET, node certificates only).
const SavedPath = "/fireworks.node/saved/"

// serveSaved streams a saved state to the node the control plane placed its sandbox on.
func serveSaved(ag *agent.Agent, w http.ResponseWriter, r *http.Request, id string, log *slog.Logger) {
	role, peer, err := pki.PeerIdentity(r.TLS)
	if err != nil || role != pki.RoleAgent || r.Method != http.MethodGet {
		http.Error(w, "a saved state is served to nodes only, with GET", http.StatusForbidden)
		return
	}
	if checkID(id) != nil {
		http.Error(w, "not a sandbox ID", http.StatusBadRequest)
		return
	}
	dir, err := ag.MaySendSaved(r.Context(), id, peer)
	if err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	if err := ag.SendSaved(dir, w); err != nil {
		// Cut the connection: the receiver must see a broken stream, not an end.
		log.Warn("send a saved state", "sandbox", id, "to", peer, "err", err)
		panic(http.ErrAbortHandler)
	}
	log.Info("sent a saved state", "sandbox", id, "to", peer)
}

// APIHandler is a node's internal API without the peer check: behind Handler's for
// remote servers, or reached in memory by the server of the node's own process.
func APIHandler(ag *agent.Agent, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	opts := rpc.HandlerOptions(log)
	mux.Handle(fireworksv1connect.NewSandboxServiceHandler(&sandboxService{ag: ag}, opts...))
	mux.Handle(fireworksv1connect.NewImageServiceHandler(&imageService{ag: ag}, opts...))
	mux.Handle(fireworksv1connect.NewVolumeServiceHandler(&volumeService{ag: ag}, opts...))
	mux.Handle(fireworksv1connect.NewSystemServiceHandler(&systemService{ag: ag}, opts...))
	return rpc.BoundBody(mux)
}

// TLS is the listener configuration for Handler: HTTP/2 for the servers' calls, HTTP/1.1
// for the edges (CONNECT tunnels, WebSocket upgrades).
func TLS(ca *pki.CA, cert tls.Certificate) *tls.Config {
	cfg := pki.ServerTLS(ca, cert, true)
	cfg.NextProtos = []string{"h2", "http/1.1"}
	return cfg
}

// caller is who the server acts for on a call: a token ID and whether that token is an
// admin's. It fails closed: a call that does not say it acts for an admin is a user's.
type caller struct {
	token string
	admin bool
}

func callerOf(h http.Header) caller {
	return caller{token: h.Get(rpc.CallerTokenHeader), admin: h.Get(rpc.CallerAdminHeader) == "true"}
}

// checkSource refuses a local image source (read from the node's filesystem) to a
// caller that is not an admin; the server refuses it first, this is the node's own check.
func (c caller) checkSource(ref string) error {
	if !c.admin && (strings.HasPrefix(ref, state.OCIPrefix) || strings.HasPrefix(ref, state.DockerArchivePrefix)) {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("%s: a local image source needs an admin", ref))
	}
	return nil
}

// requireAdmin refuses a call only an admin may make (the server refuses it first; this
// is the node's own check, failing closed).
func requireAdmin(h http.Header, what string) error {
	if !callerOf(h).admin {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("%s needs an admin", what))
	}
	return nil
}

// checkID refuses what is not a sandbox ID (it names files on the node).
func checkID(id string) error {
	if !routes.ValidSandbox(id) {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%q is not a sandbox ID", id))
	}
	return nil
}

// sentinels are the node's errors callers can act on.
var sentinels = []rpc.Sentinel{
	{Err: agent.ErrMovedAway, Code: connect.CodeAborted}, // the server runs the call again where it moved
	{Err: agent.ErrNotRunning, Code: connect.CodeFailedPrecondition},
	{Err: image.ErrNotFound, Code: connect.CodeNotFound},
	{Err: image.ErrOwnerBudget, Code: connect.CodeResourceExhausted},
	{Err: agent.ErrImageInUse, Code: connect.CodeFailedPrecondition},
	{Err: agent.ErrSavedDiskFull, Code: connect.CodeResourceExhausted},
	{Err: state.ErrNoRoom, Code: connect.CodeResourceExhausted},
	{Err: state.ErrInUse, Code: connect.CodeFailedPrecondition},
	{Err: state.ErrInvalid, Code: connect.CodeInvalidArgument},
}

func toConnectError(err error) error { return rpc.Error(err, sentinels) }

var errNoRef = connect.NewError(connect.CodeInvalidArgument, errors.New("no image reference given"))
