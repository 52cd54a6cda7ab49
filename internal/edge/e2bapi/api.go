// Package e2bapi serves E2B's REST control plane (the API the `e2b` SDKs call at
// api.<domain>) in front of the Fireworks API. It holds no state and no privilege of its
// own: each request is carried out with the caller's own key (X-API-Key, a Fireworks
// token) through the ordinary API, so what a key may do through it is exactly what that
// token may do with the CLI. It runs in the edge (`fireworks ingress`, and `fireworks
// dev`'s in-process edge), where the SDK's other half, the calls into sandboxes, arrives.
package e2bapi

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fireworks-sandbox/fireworks/internal/controlplane/auth"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/routes"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// EnvdVersion is the version of the in-sandbox API the guests serve (see
// internal/guest/envd): the SDK switches features on it.
const EnvdVersion = "0.5.7"

// Defaults and bounds E2B's API documents.
const (
	defaultTimeout = 15 * time.Second // a create without timeout (E2B's default)
	maxTimeout     = 24 * time.Hour
	maxBody        = 1 << 20
	maxListLimit   = 100
	maxLogLines    = 1000
	maxForks       = 16
)

// Servable says whether an edge listening on listen may serve the API: with TLS, or on a
// loopback address. Callers' keys are tokens of the cluster; an edge without TLS on the
// network would carry them in clear.
func Servable(listen string, tls bool) bool {
	if tls {
		return true
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || ip != nil && ip.IsLoopback()
}

// Config is the API's wiring.
type Config struct {
	// Servers reaches the Fireworks servers; each request is made with its caller's key
	// (Client.WithToken), never with the edge's own token.
	Servers *client.Client
	// Domain is the ingress domain the SDK builds sandbox hosts under (`<port>-<id>.<domain>`).
	Domain string
	Log    *slog.Logger
	// BuildDir is where template builds' uploaded files wait for their build ("": a
	// private directory under the system's temporary one).
	BuildDir string
}

// API is an http.Handler for E2B's REST API.
type API struct {
	cfg    Config
	mux    *http.ServeMux
	builds *builds
}

// New returns the API.
func New(cfg Config) *API {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	a := &API{cfg: cfg, mux: http.NewServeMux(), builds: newBuilds(cfg.BuildDir)}
	h := func(pattern string, fn func(*call) error) {
		a.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) { a.serve(w, r, fn) })
	}
	h("POST /sandboxes", a.create)
	h("POST /v2/sandboxes", a.create)
	h("GET /sandboxes", a.list)
	h("GET /v2/sandboxes", a.list)
	h("GET /sandboxes/{id}", a.get)
	h("DELETE /sandboxes/{id}", a.kill)
	h("POST /sandboxes/{id}/timeout", a.setTimeout)
	h("POST /sandboxes/{id}/refreshes", a.refresh)
	h("POST /sandboxes/{id}/pause", a.pause)
	h("POST /sandboxes/{id}/resume", a.resume)
	h("POST /sandboxes/{id}/connect", a.connect)
	h("POST /v2/sandboxes/{id}/connect", a.connect)
	h("POST /sandboxes/{id}/fork", a.fork)
	h("POST /sandboxes/{id}/snapshots", a.snapshot)
	h("GET /snapshots", a.listSnapshots)
	h("PUT /sandboxes/{id}/network", a.network)
	h("GET /sandboxes/{id}/metrics", a.metrics)
	h("GET /sandboxes/{id}/logs", a.logs)
	h("GET /v2/sandboxes/{id}/logs", a.logs)
	h("GET /templates", a.listTemplates)
	h("GET /templates/{id}", a.getTemplate)
	h("DELETE /templates/{id}", a.deleteTemplate)
	h("GET /templates/aliases/{alias}", a.aliasExists)
	h("POST /v3/templates", a.requestBuild)
	h("GET /templates/{id}/files/{hash}", a.uploadLink)
	h("POST /v2/templates/{id}/builds/{buildID}", a.triggerBuild)
	h("GET /templates/{id}/builds/{buildID}/status", a.buildStatus)
	// The SDK sends only the headers the upload link gave: no API key (see upload).
	a.mux.HandleFunc("PUT /fireworks/e2b-builds/{build}/files/{hash}", a.upload)
	h("GET /health", func(c *call) error { c.w.WriteHeader(http.StatusOK); return nil })
	return a
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// Close stops the template builds under way (each removes the sandboxes and snapshots it
// made) and removes their files.
func (a *API) Close() { a.builds.close() }

// call is one request, with the servers' client acting as its caller.
type call struct {
	w   http.ResponseWriter
	r   *http.Request
	ctx context.Context
	c   *client.Client
	// owner is the ID of the caller's token: E2B's API acts on the key's own sandboxes
	// only, an admin's key too (the Fireworks API would let an admin act on any).
	owner string
	// keyHash is the SHA-256 of the caller's key. The owner is only the key's ID, which
	// is not secret and is checked by nothing on the edge: what the edge keeps for a key
	// (a template build) it gives back only to a call with the same whole key.
	keyHash [sha256.Size]byte
}

// apiError is an answer other than success, in E2B's error shape.
type apiError struct {
	code int
	msg  string
}

func (e *apiError) Error() string { return e.msg }

func fail(code int, format string, args ...any) error {
	return &apiError{code: code, msg: fmt.Sprintf(format, args...)}
}

// key is the caller's Fireworks token: E2B's X-API-Key, or a bearer token.
func key(r *http.Request) string {
	if k := r.Header.Get("X-API-Key"); k != "" {
		return k
	}
	if b, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return strings.TrimSpace(b)
	}
	return ""
}

func (a *API) serve(w http.ResponseWriter, r *http.Request, fn func(*call) error) {
	k := key(r)
	if k == "" && r.URL.Path != "/health" {
		writeError(w, &apiError{http.StatusUnauthorized, "missing API key (X-API-Key: a Fireworks token)"})
		return
	}
	id, _, err := auth.Parse(k)
	if err != nil && r.URL.Path != "/health" {
		writeError(w, &apiError{http.StatusUnauthorized, "invalid API key (a Fireworks token)"})
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxBody)
	c := &call{w: w, r: r, ctx: r.Context(), c: a.cfg.Servers.WithToken(k), owner: id, keyHash: sha256.Sum256([]byte(k))}
	if err := fn(c); err != nil {
		writeError(w, a.publicError(r, err))
	}
}

// publicError is what a caller is told of err: E2B's code, and for a server-side
// failure not of this API's making a generic message (the log has the rest).
func (a *API) publicError(r *http.Request, err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	ae = fromConnect(err)
	if ae.code >= 500 {
		a.cfg.Log.Warn("e2b api", "method", r.Method, "path", r.URL.Path, "code", ae.code, "err", err)
		if ae.code == http.StatusInternalServerError {
			ae = &apiError{ae.code, "internal error"}
		}
	}
	return ae
}

// fromConnect maps a Fireworks API error to E2B's status codes (the SDK turns 401 into
// AuthenticationError, 404 into NotFoundError, 429 into RateLimitError, ...).
func fromConnect(err error) *apiError {
	msg := err.Error()
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return &apiError{http.StatusInternalServerError, msg}
	}
	msg = ce.Message()
	switch ce.Code() {
	case connect.CodeNotFound:
		return &apiError{http.StatusNotFound, msg}
	case connect.CodeUnauthenticated:
		return &apiError{http.StatusUnauthorized, msg}
	case connect.CodePermissionDenied:
		return &apiError{http.StatusForbidden, msg}
	case connect.CodeInvalidArgument, connect.CodeOutOfRange:
		return &apiError{http.StatusBadRequest, msg}
	case connect.CodeAlreadyExists, connect.CodeFailedPrecondition, connect.CodeAborted:
		return &apiError{http.StatusConflict, msg}
	case connect.CodeResourceExhausted:
		return &apiError{http.StatusTooManyRequests, msg}
	case connect.CodeUnavailable:
		// Its message names the servers' addresses: the log has it, the caller not.
		return &apiError{http.StatusServiceUnavailable, "the Fireworks servers are unavailable; retry"}
	case connect.CodeDeadlineExceeded:
		return &apiError{http.StatusGatewayTimeout, msg}
	}
	return &apiError{http.StatusInternalServerError, msg}
}

func writeError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.code, map[string]any{"code": e.code, "message": e.msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// decode reads a JSON body into v; an empty body leaves v as it is.
func (c *call) decode(v any) error {
	b, err := io.ReadAll(c.r.Body)
	if err != nil {
		return fail(http.StatusBadRequest, "read body: %v", err)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return nil
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fail(http.StatusBadRequest, "body: %v", err)
	}
	return nil
}

// seconds reads E2B's timeout (seconds) into a lifetime, bounded.
func seconds(s *int64, def time.Duration) (time.Duration, error) {
	if s == nil {
		return def, nil
	}
	if *s < 0 || time.Duration(*s)*time.Second > maxTimeout {
		return 0, fail(http.StatusBadRequest, "timeout %d s: want 1 to %d", *s, int64(maxTimeout/time.Second))
	}
	return time.Duration(*s) * time.Second, nil
}

// sandbox resolves the path's sandbox ID to the caller's sandbox that is not over:
// E2B's sandboxes are gone once they end.
func (c *call) sandbox() (*pb.Sandbox, error) {
	id := c.r.PathValue("id")
	if !routes.ValidSandbox(id) {
		return nil, fail(http.StatusNotFound, "sandbox %.40q not found", id)
	}
	resp, err := c.c.Sandboxes.GetSandbox(c.ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: id}))
	if err != nil {
		return nil, err
	}
	sb := resp.Msg.GetSandbox()
	if sb.GetId() != id || over(sb) || sb.GetOwner() != c.owner {
		return nil, fail(http.StatusNotFound, "sandbox %s not found", id)
	}
	return sb, nil
}

func over(sb *pb.Sandbox) bool {
	return state.Status(sb.GetStatus()).Terminal()
}

// e2bState is a sandbox's state as E2B names it.
func e2bState(sb *pb.Sandbox) string {
	if state.Status(sb.GetStatus()) == state.StatusPaused {
		return "paused"
	}
	return "running"
}

// createBody is E2B's NewSandbox.
type createBody struct {
	TemplateID          string            `json:"templateID"`
	Timeout             *int64            `json:"timeout"`
	AutoPause           *bool             `json:"autoPause"`
	AllowInternetAccess *bool             `json:"allow_internet_access"`
	Network             *networkBody      `json:"network"`
	Metadata            map[string]string `json:"metadata"`
	EnvVars             map[string]string `json:"envVars"`
	VolumeMounts        []struct {
		Name string `json:"name"`
		Path string `json:"path"`
	} `json:"volumeMounts"`
	MCP json.RawMessage `json:"mcp"`
}

// networkBody is E2B's sandbox network configuration.
type networkBody struct {
	AllowOut           []string `json:"allowOut"`
	DenyOut            []string `json:"denyOut"`
	AllowPublicTraffic *bool    `json:"allowPublicTraffic"`
	// allow_internet_access comes here in PUT .../network.
	AllowInternetAccess *bool `json:"allow_internet_access"`
}

func (a *API) create(c *call) error {
	var body createBody
	if err := c.decode(&body); err != nil {
		return err
	}
	if body.TemplateID == "" {
		return fail(http.StatusBadRequest, "templateID is required")
	}
	if len(body.MCP) > 0 && string(body.MCP) != "null" {
		return fail(http.StatusBadRequest, "mcp is not supported by Fireworks")
	}
	lifetime, err := seconds(body.Timeout, defaultTimeout)
	if err != nil {
		return err
	}
	if lifetime < time.Second {
		return fail(http.StatusBadRequest, "timeout: want 1 to %d s", int64(maxTimeout/time.Second))
	}
	spec := &pb.SandboxSpec{KeepAlive: true, Metadata: body.Metadata, Lifetime: durationpb.New(lifetime)}
	if body.AutoPause != nil && *body.AutoPause {
		spec.OnEnd = state.LifetimePause
	}
	net := body.Network
	if body.AllowInternetAccess != nil {
		if net == nil {
			net = &networkBody{}
		}
		net.AllowInternetAccess = body.AllowInternetAccess
	}
	policy, public, err := policyOf(net)
	if err != nil {
		return err
	}
	var env []string
	for _, k := range slices.Sorted(maps.Keys(body.EnvVars)) {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return fail(http.StatusBadRequest, "envVars: invalid name %.40q", k)
		}
		env = append(env, k+"="+body.EnvVars[k])
	}
	if err := a.fromTemplate(c, body.TemplateID, spec); err != nil {
		return err
	}
	spec.Env, spec.Policy = append(spec.Env, env...), policy
	for _, v := range body.VolumeMounts {
		spec.Volumes = append(spec.Volumes, &pb.VolumeMount{Volume: v.Name, Path: v.Path})
	}
	// Every guest port answers at <port>-<id>.<domain>: public, as E2B's are unless
	// allowPublicTraffic is false (then the traffic token opens them). The in-sandbox
	// API's port is public at the edge either way: envd checks its own token.
	spec.Ports = []*pb.Port{{All: true, Public: public}, {Port: 49983, Public: true}}
	resp, err := c.c.Sandboxes.CreateSandbox(c.ctx, connect.NewRequest(&pb.CreateSandboxRequest{Spec: spec}))
	if err != nil {
		return err
	}
	sb, err := a.waitRunning(c, resp.Msg.GetSandbox())
	if err != nil {
		return err
	}
	writeJSON(c.w, http.StatusCreated, a.created(sb))
	return nil
}

// fromTemplate fills spec from a templateID: the caller's named template, else a
// snapshot of the caller's (one taken through /snapshots starts as it was saved).
func (a *API) fromTemplate(c *call, id string, spec *pb.SandboxSpec) error {
	id, _, _ = strings.Cut(id, ":") // E2B's "name:tag": tags are not kept apart here
	t, err := c.c.Templates.GetTemplate(c.ctx, connect.NewRequest(&pb.GetTemplateRequest{Template: id}))
	if err == nil {
		tm := t.Msg.GetTemplate()
		if tm.GetSnapshot() != "" {
			// A built template: its sandboxes resume its snapshot (its shape, its start
			// command running); their commands get its environment, user and directory.
			spec.Snapshot, spec.Template = tm.GetSnapshot(), tm.GetName()
			spec.Env, spec.User, spec.WorkingDir = slices.Clone(tm.GetEnv()), tm.GetUser(), tm.GetWorkingDir()
			return nil
		}
		spec.Image, spec.Vcpus, spec.MemoryMib, spec.DiskMib = tm.GetImage(), tm.GetVcpus(), tm.GetMemoryMib(), tm.GetDiskMib()
		spec.Env, spec.Template = slices.Clone(tm.GetEnv()), tm.GetName()
		return nil
	}
	if connect.CodeOf(err) != connect.CodeNotFound {
		return err
	}
	s, err := c.snapshot(id)
	if err != nil {
		return err
	}
	if s == nil {
		return fail(http.StatusNotFound, "template %.64q not found (create one with `fireworks template create`)", id)
	}
	spec.Snapshot, spec.Template = s.GetId(), s.GetName()
	return nil
}

// snapshot finds the caller's own snapshot of exactly this ID or name (the Fireworks
// API also takes ID prefixes, which E2B's IDs are not); nil if there is none.
func (c *call) snapshot(idOrName string) (*pb.Snapshot, error) {
	resp, err := c.c.Sandboxes.ListSnapshots(c.ctx, connect.NewRequest(&pb.ListSnapshotsRequest{Mine: true}))
	if err != nil {
		return nil, err
	}
	for _, s := range resp.Msg.GetSnapshots() {
		if s.GetId() == idOrName || s.GetName() == idOrName {
			return s, nil
		}
	}
	return nil, nil
}

// waitRunning waits until a new or resumed sandbox runs (the SDK calls into it at once).
func (a *API) waitRunning(c *call, sb *pb.Sandbox) (*pb.Sandbox, error) {
	deadline := time.Now().Add(5 * time.Minute)
	// Polled finely: a start from a warm VM or a template takes a few hundred
	// milliseconds, which a coarse poll would add to every create.
	start := time.Now()
	for delay := 10 * time.Millisecond; ; delay = min(delay*3/2, 100*time.Millisecond) {
		if time.Since(start) > 2*time.Second {
			delay = 500 * time.Millisecond // a cold boot or a pull: no need to ask often
		}
		switch state.Status(sb.GetStatus()) {
		case state.StatusRunning:
			return sb, nil
		case state.StatusPending, state.StatusStarting:
		default:
			return nil, fail(http.StatusInternalServerError, "sandbox %s did not start: %s: %s", sb.GetId(), sb.GetStatus(), sb.GetReason())
		}
		if time.Now().After(deadline) {
			return nil, fail(http.StatusGatewayTimeout, "sandbox %s did not start within 5 minutes (%s)", sb.GetId(), sb.GetReason())
		}
		select {
		case <-c.ctx.Done():
			return nil, c.ctx.Err()
		case <-time.After(delay):
		}
		resp, err := c.c.Sandboxes.GetSandbox(c.ctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: sb.GetId()}))
		if err != nil {
			return nil, err
		}
		sb = resp.Msg.GetSandbox()
	}
}

// created is E2B's Sandbox: what the SDK needs to reach a sandbox.
func (a *API) created(sb *pb.Sandbox) map[string]any {
	out := map[string]any{
		"sandboxID": sb.GetId(), "templateID": templateOf(sb), "clientID": "fireworks",
		"envdVersion": EnvdVersion, "envdAccessToken": sb.GetAccessToken(), "domain": a.cfg.Domain,
	}
	if !publicTraffic(sb) {
		// Opens the private ports only: handing it out (a preview link) gives no way into
		// envd, which needs the access token.
		out["trafficAccessToken"] = routes.TrafficToken(sb.GetAccessToken())
	}
	if sb.GetName() != "" {
		out["alias"] = sb.GetName()
	}
	return out
}

func templateOf(sb *pb.Sandbox) string {
	return cmp.Or(sb.GetSpec().GetTemplate(), sb.GetSpec().GetImage())
}

func publicTraffic(sb *pb.Sandbox) bool {
	for _, p := range sb.GetSpec().GetPorts() {
		if p.GetAll() {
			return p.GetPublic()
		}
	}
	return true
}

// listed is E2B's ListedSandbox; detail adds what GET /sandboxes/{id} gives.
func (a *API) listed(sb *pb.Sandbox, detail bool) map[string]any {
	started := sb.GetStartedAt()
	if started == nil {
		started = sb.GetCreatedAt()
	}
	var end time.Time // none: the zero time, as E2B's API writes it
	if e := sb.GetEndAt(); e != nil {
		end = e.AsTime()
	}
	spec := sb.GetSpec()
	out := map[string]any{
		"sandboxID": sb.GetId(), "templateID": templateOf(sb), "clientID": "fireworks",
		"startedAt": started.AsTime().Format(time.RFC3339Nano), "endAt": end.Format(time.RFC3339Nano),
		"cpuCount": cmp.Or(spec.GetVcpus(), 1), "memoryMB": cmp.Or(spec.GetMemoryMib(), 512), "diskSizeMB": spec.GetDiskMib(),
		"metadata": metadataOf(spec), "state": e2bState(sb),
		"envdVersion": EnvdVersion, "volumeMounts": volumesOf(spec),
	}
	if sb.GetName() != "" {
		out["alias"] = sb.GetName()
	}
	if detail {
		out["envdAccessToken"] = sb.GetAccessToken()
		out["domain"] = a.cfg.Domain
		onTimeout := "kill"
		if spec.GetOnEnd() == state.LifetimePause {
			onTimeout = "pause"
		}
		out["lifecycle"] = map[string]any{"onTimeout": onTimeout, "autoResume": false}
		allow, deny, internet := rulesOf(spec.GetPolicy())
		out["network"] = map[string]any{"allowPublicTraffic": publicTraffic(sb), "allowOut": allow, "denyOut": deny}
		out["allowInternetAccess"] = internet
	}
	return out
}

func metadataOf(spec *pb.SandboxSpec) map[string]string {
	if m := spec.GetMetadata(); m != nil {
		return m
	}
	return map[string]string{}
}

func volumesOf(spec *pb.SandboxSpec) []map[string]string {
	out := []map[string]string{}
	for _, v := range spec.GetVolumes() {
		out = append(out, map[string]string{"name": v.GetVolume(), "path": v.GetPath()})
	}
	return out
}

func (a *API) get(c *call) error {
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	writeJSON(c.w, http.StatusOK, a.listed(sb, true))
	return nil
}

// list is GET /v2/sandboxes (and the older /sandboxes): the caller's sandboxes that are
// not over, filtered by state and metadata, in pages of at most 100 (x-next-token).
func (a *API) list(c *call) error {
	q := c.r.URL.Query()
	states := map[string]bool{}
	for _, s := range strings.Split(strings.Join(q["state"], ","), ",") {
		switch s = strings.TrimSpace(s); s {
		case "":
		case "running", "paused":
			states[s] = true
		default:
			return fail(http.StatusBadRequest, "state %.20q: want running or paused", s)
		}
	}
	meta, err := metadataFilter(q.Get("metadata"))
	if err != nil {
		return err
	}
	template := q.Get("template")
	var startedAfter time.Time
	if v := q.Get("startedAfter"); v != "" {
		if startedAfter, err = time.Parse(time.RFC3339Nano, v); err != nil {
			return fail(http.StatusBadRequest, "startedAfter %.40q: want an RFC 3339 time", v)
		}
	}
	order := strings.ToLower(q.Get("order"))
	if order != "" && order != "asc" && order != "desc" {
		return fail(http.StatusBadRequest, "order %.10q: want asc or desc", order)
	}
	resp, err := c.c.Sandboxes.ListSandboxes(c.ctx, connect.NewRequest(&pb.ListSandboxesRequest{All: true, Mine: true}))
	if err != nil {
		return err
	}
	var ended []string
	var out []*pb.Sandbox
	for _, sb := range resp.Msg.GetSandboxes() {
		if over(sb) {
			if sb.GetSpec().GetKeepAlive() {
				ended = append(ended, sb.GetId())
			}
			continue
		}
		if len(states) > 0 && !states[e2bState(sb)] || !matches(sb.GetSpec().GetMetadata(), meta) ||
			template != "" && templateOf(sb) != template && sb.GetSpec().GetSnapshot() != template ||
			!startedAfter.IsZero() && sb.GetCreatedAt().AsTime().Before(startedAfter) {
			continue
		}
		out = append(out, sb)
	}
	a.forget(c, ended)
	// Newest first, as E2B lists (order=asc: oldest first); the token is the last ID of
	// the page before.
	slices.SortFunc(out, func(x, y *pb.Sandbox) int {
		return cmp.Or(y.GetCreatedAt().AsTime().Compare(x.GetCreatedAt().AsTime()), cmp.Compare(x.GetId(), y.GetId()))
	})
	if order == "asc" {
		slices.Reverse(out)
	}
	if out, err = page(c, out, (*pb.Sandbox).GetId); err != nil {
		return err
	}
	items := make([]map[string]any, 0, len(out))
	for _, sb := range out {
		items = append(items, a.listed(sb, false))
	}
	writeJSON(c.w, http.StatusOK, items)
	return nil
}

// forget removes sandboxes made through this API that ended (their lifetime ran out):
// E2B's are gone then, and their records would count against the caller's quota.
func (a *API) forget(c *call, ids []string) {
	for _, id := range ids {
		if _, err := c.c.Sandboxes.RemoveSandbox(c.ctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: id, Force: true})); err != nil {
			a.cfg.Log.Debug("e2b api: removing an ended sandbox", "sandbox", id, "err", err)
		}
	}
}

// metadataFilter reads E2B's metadata query as E2B's API does: a query string
// ("k1=v1&k2=v2") whose keys and values are URL-encoded once more (the SDK encodes
// each with encodeURIComponent before it builds the string).
func metadataFilter(s string) (map[string]string, error) {
	out := map[string]string{}
	if s == "" {
		return out, nil
	}
	q, err := url.ParseQuery(s)
	if err != nil {
		return nil, fail(http.StatusBadRequest, "metadata filter: %v", err)
	}
	for k, vs := range q {
		key, err := url.QueryUnescape(k)
		if err != nil {
			return nil, fail(http.StatusBadRequest, "metadata filter: %v", err)
		}
		if len(vs) != 1 {
			return nil, fail(http.StatusBadRequest, "metadata filter: key %.40q given %d times", key, len(vs))
		}
		v, err := url.QueryUnescape(vs[0])
		if err != nil {
			return nil, fail(http.StatusBadRequest, "metadata filter: %v", err)
		}
		out[key] = v
	}
	return out, nil
}

func matches(have, want map[string]string) bool {
	for k, v := range want {
		if got, ok := have[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func (a *API) kill(c *call) error {
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	// E2B's kill ends the sandbox at once, and it is gone.
	if _, err := c.c.Sandboxes.RemoveSandbox(c.ctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: sb.GetId(), Force: true})); err != nil {
		return err
	}
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}

// setLifetime ends the sandbox d from now. Every sandbox made here has an end: less than
// a second (0 would be none to the Fireworks API) is refused.
func (a *API) setLifetime(c *call, id string, d time.Duration) (*pb.Sandbox, error) {
	if d < time.Second {
		return nil, fail(http.StatusBadRequest, "timeout: want 1 to %d s", int64(maxTimeout/time.Second))
	}
	resp, err := c.c.Sandboxes.SetLifetime(c.ctx, connect.NewRequest(&pb.SetLifetimeRequest{Sandbox: id, Lifetime: durationpb.New(d)}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.GetSandbox(), nil
}

func (a *API) setTimeout(c *call) error {
	var body struct {
		Timeout *int64 `json:"timeout"`
	}
	if err := c.decode(&body); err != nil {
		return err
	}
	if body.Timeout == nil {
		return fail(http.StatusBadRequest, "timeout is required")
	}
	d, err := seconds(body.Timeout, 0)
	if err != nil {
		return err
	}
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	if _, err := a.setLifetime(c, sb.GetId(), d); err != nil {
		return err
	}
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}

// refresh extends the lifetime to at least duration seconds from now (never shortens).
func (a *API) refresh(c *call) error {
	var body struct {
		Duration *int64 `json:"duration"`
	}
	if err := c.decode(&body); err != nil {
		return err
	}
	d, err := seconds(body.Duration, defaultTimeout)
	if err != nil {
		return err
	}
	if d < time.Second || d > time.Hour {
		return fail(http.StatusBadRequest, "duration: want 1 to 3600 s")
	}
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	if end := sb.GetEndAt(); end != nil && time.Until(end.AsTime()) < d {
		if _, err := a.setLifetime(c, sb.GetId(), d); err != nil {
			return err
		}
	}
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}

func (a *API) pause(c *call) error {
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	if e2bState(sb) == "paused" {
		return fail(http.StatusConflict, "sandbox %s is already paused", sb.GetId())
	}
	if _, err := c.c.Sandboxes.PauseSandbox(c.ctx, connect.NewRequest(&pb.PauseSandboxRequest{Sandbox: sb.GetId()})); err != nil {
		return err
	}
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}

// resumeBody is E2B's ResumedSandbox and ConnectSandbox (their autoPause is the
// sandbox's, kept from its create).
type resumeBody struct {
	Timeout *int64 `json:"timeout"`
}

// resume is the older call: a paused sandbox only (409 for a running one).
func (a *API) resume(c *call) error {
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	if e2bState(sb) != "paused" {
		return fail(http.StatusConflict, "sandbox %s is already running", sb.GetId())
	}
	return a.connectTo(c, sb)
}

// connect resumes a paused sandbox (201) or returns a running one (200), its lifetime
// set as the call asks (for a running one: only ever extended).
func (a *API) connect(c *call) error {
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	return a.connectTo(c, sb)
}

func (a *API) connectTo(c *call, sb *pb.Sandbox) error {
	var body resumeBody
	if err := c.decode(&body); err != nil {
		return err
	}
	d, err := seconds(body.Timeout, 0)
	if err != nil {
		return err
	}
	if e2bState(sb) == "running" {
		if d > 0 && (sb.GetEndAt() == nil || time.Until(sb.GetEndAt().AsTime()) < d) {
			if sb, err = a.setLifetime(c, sb.GetId(), d); err != nil {
				return err
			}
		}
		if sb, err = a.waitRunning(c, sb); err != nil {
			return err
		}
		writeJSON(c.w, http.StatusOK, a.created(sb))
		return nil
	}
	req := &pb.ResumeSandboxRequest{Sandbox: sb.GetId()}
	if d > 0 {
		req.Lifetime = durationpb.New(d)
	}
	resp, err := c.c.Sandboxes.ResumeSandbox(c.ctx, connect.NewRequest(req))
	if err != nil {
		return err
	}
	writeJSON(c.w, http.StatusCreated, a.created(resp.Msg.GetSandbox()))
	return nil
}

func (a *API) fork(c *call) error {
	var body struct {
		Timeout *int64 `json:"timeout"`
		Count   *int   `json:"count"`
	}
	if err := c.decode(&body); err != nil {
		return err
	}
	n := 1
	if body.Count != nil {
		n = *body.Count
	}
	if n < 1 || n > maxForks {
		return fail(http.StatusBadRequest, "count %d: want 1 to %d", n, maxForks)
	}
	d, err := seconds(body.Timeout, 0)
	if err != nil {
		return err
	}
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	resp, err := c.c.Sandboxes.ForkSandbox(c.ctx, connect.NewRequest(&pb.ForkSandboxRequest{Sandbox: sb.GetId(), Count: int32(n)}))
	if err != nil {
		return err
	}
	out := []map[string]any{}
	for _, f := range resp.Msg.GetForks() {
		if d > 0 {
			if nf, err := a.setLifetime(c, f.GetId(), d); err == nil {
				f = nf
			}
		}
		if f, err = a.waitRunning(c, f); err != nil {
			ae := a.publicError(c.r, err)
			out = append(out, map[string]any{"error": map[string]any{"code": ae.code, "message": ae.msg}})
			continue
		}
		out = append(out, map[string]any{"sandbox": a.created(f)})
	}
	writeJSON(c.w, http.StatusCreated, out)
	return nil
}

// snapshot takes a snapshot of the sandbox with its memory (E2B's snapshots resume
// processes), usable as a templateID.
func (a *API) snapshot(c *call) error {
	var body struct {
		Name string `json:"name"`
	}
	if err := c.decode(&body); err != nil {
		return err
	}
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	name := body.Name
	if name == "" {
		name = "snapshot-" + sb.GetId() + "-" + strconv.FormatInt(time.Now().UnixMilli(), 36)
	}
	resp, err := c.c.Sandboxes.CreateSnapshot(c.ctx, connect.NewRequest(&pb.CreateSnapshotRequest{Sandbox: sb.GetId(), Name: name, Memory: true}))
	if err != nil {
		return err
	}
	s := resp.Msg.GetSnapshot()
	writeJSON(c.w, http.StatusCreated, map[string]any{"snapshotID": s.GetId(), "names": []string{s.GetName()}})
	return nil
}

func (a *API) listSnapshots(c *call) error {
	q := c.r.URL.Query()
	resp, err := c.c.Sandboxes.ListSnapshots(c.ctx, connect.NewRequest(&pb.ListSnapshotsRequest{Mine: true}))
	if err != nil {
		return err
	}
	snaps := slices.DeleteFunc(resp.Msg.GetSnapshots(), func(s *pb.Snapshot) bool {
		sid, name := q.Get("sandboxID"), q.Get("name")
		return sid != "" && s.GetSandbox() != sid || name != "" && s.GetName() != name
	})
	slices.SortFunc(snaps, func(x, y *pb.Snapshot) int { return cmp.Compare(x.GetId(), y.GetId()) })
	if snaps, err = page(c, snaps, (*pb.Snapshot).GetId); err != nil {
		return err
	}
	items := []map[string]any{}
	for _, s := range snaps {
		items = append(items, map[string]any{"snapshotID": s.GetId(), "names": []string{s.GetName()}})
	}
	writeJSON(c.w, http.StatusOK, items)
	return nil
}

// page is the page of items (in order) that the call's nextToken and limit (≤ 100)
// ask for; when more follow, the X-Next-Token header names the page's last item.
func page[T any](c *call, items []T, id func(T) string) ([]T, error) {
	q := c.r.URL.Query()
	limit := maxListLimit
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > maxListLimit {
			return nil, fail(http.StatusBadRequest, "limit %.20q: want 1 to %d", l, maxListLimit)
		}
		limit = n
	}
	if after := q.Get("nextToken"); after != "" {
		i := slices.IndexFunc(items, func(x T) bool { return id(x) == after })
		if i < 0 {
			return nil, fail(http.StatusBadRequest, "nextToken %.40q: not from this listing", after)
		}
		items = items[i+1:]
	}
	if len(items) > limit {
		items = items[:limit]
		c.w.Header().Set("X-Next-Token", id(items[len(items)-1]))
	}
	return items, nil
}

// network replaces a running sandbox's egress rules (PUT .../network).
func (a *API) network(c *call) error {
	var body networkBody
	if err := c.decode(&body); err != nil {
		return err
	}
	if body.AllowPublicTraffic != nil {
		return fail(http.StatusBadRequest, "allowPublicTraffic is set when the sandbox is created")
	}
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	policy, _, err := policyOf(&body)
	if err != nil {
		return err
	}
	if _, err := c.c.Sandboxes.SetPolicy(c.ctx, connect.NewRequest(&pb.SetPolicyRequest{Sandbox: sb.GetId(), Policy: policy})); err != nil {
		return err
	}
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}

// metrics: Fireworks keeps no time series of a guest's CPU and memory; the list is
// empty (the SDK's getMetrics returns []).
func (a *API) metrics(c *call) error {
	if _, err := c.sandbox(); err != nil {
		return err
	}
	writeJSON(c.w, http.StatusOK, []any{})
	return nil
}

// logs is the output of the sandbox's main process (a sandbox made through this API
// has none of its own: its template's image runs no command), at most 1000 lines.
func (a *API) logs(c *call) error {
	sb, err := c.sandbox()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	st, err := c.c.Sandboxes.Logs(ctx, connect.NewRequest(&pb.LogsRequest{Sandbox: sb.GetId()}))
	if err != nil {
		return err
	}
	defer st.Close()
	var text strings.Builder
	for st.Receive() && text.Len() < 1<<20 {
		text.Write(st.Msg().GetOutput().GetData())
	}
	now := time.Now().UTC().Format(time.RFC3339Nano)
	logs, entries := []map[string]any{}, []map[string]any{}
	for line := range strings.Lines(text.String()) {
		if len(logs) == maxLogLines {
			break
		}
		line = strings.TrimRight(line, "\n")
		logs = append(logs, map[string]any{"timestamp": now, "line": line})
		entries = append(entries, map[string]any{"timestamp": now, "message": line, "level": "info", "fields": map[string]string{}})
	}
	writeJSON(c.w, http.StatusOK, map[string]any{"logs": logs, "logEntries": entries})
	return nil
}

// template is E2B's Template for a named template.
func template(t *pb.NamedTemplate) map[string]any {
	at := t.GetCreatedAt().AsTime().Format(time.RFC3339Nano)
	return map[string]any{
		"templateID": t.GetId(), "buildID": t.GetId(), "cpuCount": cmp.Or(t.GetVcpus(), 1), "memoryMB": cmp.Or(t.GetMemoryMib(), 512),
		"diskSizeMB": t.GetDiskMib(), "public": false, "aliases": []string{t.GetName()}, "names": []string{t.GetName()},
		"createdAt": at, "updatedAt": at, "createdBy": nil, "lastSpawnedAt": nil, "spawnCount": 0, "buildCount": 1,
		"buildStatus": "ready", "envdVersion": EnvdVersion,
	}
}

func (a *API) listTemplates(c *call) error {
	resp, err := c.c.Templates.ListNamedTemplates(c.ctx, connect.NewRequest(&pb.ListNamedTemplatesRequest{}))
	if err != nil {
		return err
	}
	items := []map[string]any{}
	for _, t := range resp.Msg.GetTemplates() {
		items = append(items, template(t))
	}
	writeJSON(c.w, http.StatusOK, items)
	return nil
}

func (a *API) getTemplate(c *call) error {
	resp, err := c.c.Templates.GetTemplate(c.ctx, connect.NewRequest(&pb.GetTemplateRequest{Template: c.r.PathValue("id")}))
	if err != nil {
		return err
	}
	out := template(resp.Msg.GetTemplate())
	out["builds"] = []any{}
	writeJSON(c.w, http.StatusOK, out)
	return nil
}

// deleteTemplate removes a named template, or a snapshot (the SDK's deleteSnapshot
// calls this with a snapshot's ID).
func (a *API) deleteTemplate(c *call) error {
	id := c.r.PathValue("id")
	var built string // the snapshot a build made for it goes with it
	if t, err := c.c.Templates.GetTemplate(c.ctx, connect.NewRequest(&pb.GetTemplateRequest{Template: id})); err == nil {
		built = t.Msg.GetTemplate().GetSnapshot()
	}
	_, err := c.c.Templates.DeleteTemplate(c.ctx, connect.NewRequest(&pb.DeleteTemplateRequest{Template: id}))
	if err == nil && built != "" {
		if s, lerr := c.snapshot(built); lerr == nil && s != nil && strings.HasPrefix(s.GetName(), buildSnapshotPrefix) {
			_, err = c.c.Sandboxes.DeleteSnapshot(c.ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: s.GetId()}))
		}
	}
	if connect.CodeOf(err) == connect.CodeNotFound {
		s, lerr := c.snapshot(id)
		if lerr != nil {
			return lerr
		}
		if s == nil {
			return fail(http.StatusNotFound, "template or snapshot %.64q not found", id)
		}
		_, err = c.c.Sandboxes.DeleteSnapshot(c.ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: s.GetId()}))
	}
	if err != nil {
		return err
	}
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}
