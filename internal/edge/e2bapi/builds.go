package e2bapi

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// E2B's template builds (the SDK's Template.build). A build's steps are the user's own
// code: they run in Fireworks sandboxes of the caller's, never on the edge or a server.
//
//  1. POST /v3/templates starts a build: it waits for its files here.
//  2. GET /templates/{id}/files/{hash} answers, per COPY, whether its files are here and
//     where to PUT them if not (a URL of this edge with a token of the build's).
//  3. POST /v2/templates/{id}/builds/{buildID} gives the steps, and the build runs:
//     a sandbox of the base image (or template) runs them (RUN through exec; COPY,
//     WORKDIR through init's build helper, proto.BuildCommand, so no tool of the image
//     is needed); its filesystem is snapshotted; a second sandbox starts from that
//     snapshot with the environment, user and working directory the steps set, runs the
//     start command until the ready command succeeds, and is snapshotted with its
//     memory. The template (state.Template.Snapshot) names that snapshot: a sandbox
//     created from it resumes it, start command running, in about the time of a restore.
//  4. GET /templates/{id}/builds/{buildID}/status reports progress and the steps' output.
//
// A build's state (its files, its log) is this edge's, in memory and on its disk, until
// an hour after it ends: the SDK's calls for one build must reach the same edge (one
// edge, or a load balancer that keeps a client on one). Its outcome, the template and its
// snapshot, is the cluster's.
const (
	maxBuildBytes     = 1 << 30     // files uploaded for one build
	maxUploadBytes    = 8 << 30     // files uploaded, on this edge
	maxBuildsPerOwner = 2           // builds running, per token
	maxBuilds         = 16          // builds running, on this edge
	maxWaitingPerKey  = 4           // builds waiting for their steps, per token (the oldest give way)
	maxWaiting        = 64          // and on this edge
	maxEndedPerOwner  = 16          // ended builds whose status is kept, per token
	maxEnded          = 64          // and on this edge
	maxKeyBytes       = 2 << 30     // files uploaded for one key's builds
	maxKeyUploads     = 8           // uploads under way, per key
	uploadIdle        = time.Minute // an upload that sends nothing this long ends
	maxBuildSteps     = 256         // and files (one per COPY)
	maxBuildLog       = 10000       // log entries kept per build
	maxBuildLogBytes  = 2 << 20     // and their bytes
	maxBuildLogLine   = 4096
	buildUploadWindow = 30 * time.Minute // a build whose steps never come is dropped after this
	buildKept         = time.Hour        // an ended build's status is kept this long
	buildTimeout      = time.Hour        // a build's whole run
	readyTimeout      = 10 * time.Minute
	// buildSnapshotPrefix names the snapshots builds make: a template's is removed with
	// it, or when a rebuild replaces it.
	buildSnapshotPrefix = "e2b-build-"
	uploadTokenHeader   = "X-Fireworks-Upload-Token"
)

var filesHashRE = regexp.MustCompile(`^[0-9a-f]{16,128}$`)

// builds is the edge's template builds. It owns their goroutines: Close stops them.
type builds struct {
	dir    string // where uploads wait ("": a private temporary directory, made at the first build)
	made   bool   // dir is made (and emptied of a previous process's files)
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	bytes atomic.Int64 // uploaded files on disk, or reserved by uploads under way

	// mu is taken before any build's.
	mu     sync.Mutex
	all    map[string]*build
	closed bool // no build starts any more
}

type build struct {
	bs              *builds
	id, name, owner string
	keyHash         [sha256.Size]byte // of the key that started it (see call.keyHash)
	c               *client.Client    // the caller's key: every call of the build is theirs
	vcpus, memMiB   int
	token           string // the upload URL's
	dir             string
	created         time.Time

	mu      sync.Mutex
	files   map[string]string // filesHash → its uploaded tar
	pending map[string]bool   // uploads under way
	bytes   int64             // uploaded or reserved by an upload under way (counted on the edge)
	linked  int64             // taken from another build of the template (counted there)
	status  string            // waiting (for its steps), building, ready, error
	reason  map[string]any
	logs    []logEntry
	logSize int // the logs' bytes
	dropped int // log entries past the bounds
	ended   time.Time
	gone    bool // its files are removed (their bytes given back)
}

func newBuilds(dir string) *builds {
	ctx, cancel := context.WithCancel(context.Background())
	return &builds{dir: dir, ctx: ctx, cancel: cancel, all: map[string]*build{}}
}

// logEntry is a line of a build's log.
type logEntry struct {
	at         time.Time
	level, msg string
}

func (e logEntry) json() map[string]any {
	return map[string]any{"timestamp": e.at.UTC().Format(time.RFC3339Nano), "level": e.level, "message": e.msg}
}

// dropFiles removes b's files and gives their bytes back (b.mu held). A build whose
// files are gone takes no upload and no trigger.
func (b *build) dropFiles() {
	if !b.gone {
		_ = os.RemoveAll(b.dir)
		b.bs.bytes.Add(-b.bytes)
		b.gone = true
	}
}

// close stops every build, waits for their cleanup, and removes their files.
func (bs *builds) close() {
	bs.mu.Lock()
	bs.closed = true // before Wait: no trigger adds to bs.wg after this
	bs.mu.Unlock()
	bs.cancel()
	bs.wg.Wait()
	bs.mu.Lock()
	defer bs.mu.Unlock()
	for id, b := range bs.all {
		b.mu.Lock()
		b.dropFiles()
		b.mu.Unlock()
		delete(bs.all, id)
	}
	if bs.made {
		_ = os.RemoveAll(bs.dir)
	}
}

// prune forgets builds whose steps never came (once no upload is under way: an upload's
// read deadline is the end of the window), ended builds kept long enough, and the oldest
// ended builds past the bounds on how many are kept.
func (bs *builds) prune(now time.Time) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	var ended []*build
	for id, b := range bs.all {
		b.mu.Lock()
		stale := b.status == "waiting" && now.Sub(b.created) > buildUploadWindow && len(b.pending) == 0 ||
			!b.ended.IsZero() && now.Sub(b.ended) > buildKept
		if !stale && !b.ended.IsZero() {
			ended = append(ended, b)
		}
		if stale {
			b.dropFiles()
			delete(bs.all, id)
		}
		b.mu.Unlock()
	}
	// Newest first; ended builds hold only their status and log.
	slices.SortFunc(ended, func(x, y *build) int { return y.ended.Compare(x.ended) })
	perOwner := map[string]int{}
	for i, b := range ended {
		perOwner[b.owner]++
		if i >= maxEnded || perOwner[b.owner] > maxEndedPerOwner {
			delete(bs.all, b.id)
		}
	}
}

// find is the caller's build by ID, of the template the path names.
func (bs *builds) find(c *call) (*build, error) {
	id, tmpl := c.r.PathValue("buildID"), c.r.PathValue("id")
	bs.prune(time.Now())
	bs.mu.Lock()
	b := bs.all[id]
	bs.mu.Unlock()
	if b == nil || !b.mine(c) || (tmpl != b.name && tmpl != b.id) {
		return nil, fail(http.StatusNotFound, "build %.40q of template %.64q not found (a build is known to the edge that started it, until an hour after it ends; a key's builds that wait for their steps give way to its newer ones)", id, tmpl)
	}
	return b, nil
}

// mine says whether the call is made with the key that started the build.
func (b *build) mine(c *call) bool {
	return b.owner == c.owner && subtle.ConstantTimeCompare(b.keyHash[:], c.keyHash[:]) == 1
}

// log adds a line of a step's output to the build's log, within its bounds.
func (b *build) log(level, msg string) { b.add(level, msg, false) }

// logf adds the build's own message (a step begins, the outcome): kept whatever the
// steps' output took, so the end of a long log still says what happened.
func (b *build) logf(format string, args ...any) { b.add("info", fmt.Sprintf(format, args...), true) }

func (b *build) add(level, msg string, own bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(msg) > maxBuildLogLine {
		msg = msg[:maxBuildLogLine] + "…"
	}
	if !own && (len(b.logs) >= maxBuildLog || b.logSize+len(msg) > maxBuildLogBytes) {
		b.dropped++
		return
	}
	b.logSize += len(msg)
	b.logs = append(b.logs, logEntry{at: time.Now(), level: level, msg: msg})
}

// end records the build's outcome (err nil: ready).
func (b *build) end(step string, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.endLocked(step, err)
}

func (b *build) endLocked(step string, err error) {
	if b.dropped > 0 {
		b.logs = append(b.logs, logEntry{at: time.Now(), level: "warn",
			msg: fmt.Sprintf("%d lines of the steps' output were left out (a build keeps %d entries, %d MiB)", b.dropped, maxBuildLog, maxBuildLogBytes>>20)})
	}
	b.c = nil // the caller's key is no longer needed here
	b.ended, b.status = time.Now(), "ready"
	if err != nil {
		b.status = "error"
		b.reason = map[string]any{"message": err.Error(), "logEntries": []any{}}
		if step != "" {
			b.reason["step"] = step
		}
	}
	b.dropFiles() // its files are in the template now, or of no use
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// requestBuild is POST /v3/templates: a new build of the caller's template, waiting for
// its files and steps.
func (a *API) requestBuild(c *call) error {
	var body struct {
		Name     string   `json:"name"`
		Alias    string   `json:"alias"` // the older SDKs'
		Tags     []string `json:"tags"`
		CPUCount int      `json:"cpuCount"`
		MemoryMB int      `json:"memoryMB"`
	}
	if err := c.decode(&body); err != nil {
		return err
	}
	name, tag, _ := strings.Cut(cmp.Or(body.Name, body.Alias), ":")
	if !state.ValidTemplateName(name) {
		return fail(http.StatusBadRequest, "template name %.64q: 1 to 128 letters, digits, '-', '_', '.' or '/'", name)
	}
	if body.CPUCount < 0 || body.CPUCount > 64 || body.MemoryMB < 0 || body.MemoryMB > 1<<20 {
		return fail(http.StatusBadRequest, "cpuCount %d, memoryMB %d: out of bounds", body.CPUCount, body.MemoryMB)
	}
	// The key is checked by the servers before the edge keeps anything for it.
	if _, err := c.c.Templates.ListNamedTemplates(c.ctx, connect.NewRequest(&pb.ListNamedTemplatesRequest{})); err != nil {
		return err
	}
	bs := a.builds
	bs.prune(time.Now())
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if bs.closed {
		return fail(http.StatusServiceUnavailable, "the edge is stopping")
	}
	// Builds waiting for their steps hold only their files: a key's oldest give way to
	// its new ones (an SDK that gave up leaves one behind), unless an upload runs.
	var mine []*build
	waiting := 0
	for _, o := range bs.all {
		o.mu.Lock()
		if o.status == "waiting" {
			waiting++
			if o.owner == c.owner {
				mine = append(mine, o)
			}
		}
		o.mu.Unlock()
	}
	slices.SortFunc(mine, func(x, y *build) int { return x.created.Compare(y.created) })
	for _, o := range mine {
		if len(mine) < maxWaitingPerKey {
			break
		}
		o.mu.Lock()
		if len(o.pending) == 0 {
			o.dropFiles()
			delete(bs.all, o.id)
			mine, waiting = mine[1:], waiting-1
		}
		o.mu.Unlock()
	}
	if len(mine) >= maxWaitingPerKey || waiting >= maxWaiting {
		return fail(http.StatusTooManyRequests, "too many template builds wait for their files (at most %d per key, %d on this edge)", maxWaitingPerKey, maxWaiting)
	}
	if !bs.made {
		// Builds live in this process's memory: files found there are a previous one's.
		var err error
		if bs.dir == "" {
			bs.dir, err = os.MkdirTemp("", "fireworks-e2b-builds-")
		} else if err = os.RemoveAll(bs.dir); err == nil {
			err = os.MkdirAll(bs.dir, 0o700)
		}
		if err != nil {
			return fmt.Errorf("make the builds' directory: %w", err)
		}
		bs.made = true
	}
	id := randomHex(16)
	dir := filepath.Join(bs.dir, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("make build %s's directory: %w", id, err)
	}
	b := &build{bs: bs, id: id, name: name, owner: c.owner, keyHash: c.keyHash, c: c.c, vcpus: body.CPUCount, memMiB: body.MemoryMB,
		token: randomHex(32), dir: dir, created: time.Now(), files: map[string]string{}, pending: map[string]bool{}, status: "waiting"}
	bs.all[id] = b
	tags := []string{}
	if tag != "" {
		tags = append(tags, tag)
	}
	writeJSON(c.w, http.StatusAccepted, map[string]any{"templateID": name, "buildID": id, "public": false,
		"aliases": []string{name}, "names": []string{name}, "tags": append(tags, body.Tags...)})
	return nil
}

// uploadLink is GET /templates/{id}/files/{hash}: whether a COPY's files are here, and
// where to put them if not (a build's files are its own: no cache across builds).
func (a *API) uploadLink(c *call) error {
	hash := c.r.PathValue("hash")
	if !filesHashRE.MatchString(hash) {
		return fail(http.StatusBadRequest, "files hash %.80q: want lowercase hex", hash)
	}
	tmpl, _, _ := strings.Cut(c.r.PathValue("id"), ":")
	// The SDK names the template, not the build: of the key's builds of it waiting for
	// files, the newest takes uploads, and files any of them has count as present (a
	// build takes them from the others when its steps come: builds of one template,
	// tags or not, may run side by side).
	var b *build
	present := false
	a.builds.prune(time.Now())
	a.builds.mu.Lock()
	for _, o := range a.builds.all {
		o.mu.Lock()
		if o.mine(c) && o.name == tmpl && o.status == "waiting" {
			if b == nil || o.created.After(b.created) {
				b = o
			}
			present = present || o.files[hash] != ""
		}
		o.mu.Unlock()
	}
	a.builds.mu.Unlock()
	if b == nil {
		return fail(http.StatusNotFound, "no build of template %.64q waits for files (POST /v3/templates first)", tmpl)
	}
	if present {
		writeJSON(c.w, http.StatusOK, map[string]any{"present": true})
		return nil
	}
	scheme := "http"
	if c.r.TLS != nil {
		scheme = "https"
	}
	url := scheme + "://" + c.r.Host + "/fireworks/e2b-builds/" + b.id + "/files/" + hash
	writeJSON(c.w, http.StatusOK, map[string]any{"present": false, "url": url, "headers": map[string]string{uploadTokenHeader: b.token}})
	return nil
}

// upload is the PUT of a COPY's files (a tar, gzipped or not) to the URL uploadLink
// gave. It needs no API key (the SDK sends only the headers uploadLink returned): the
// build's upload token is the right to add files to that build, and to nothing else.
func (a *API) upload(w http.ResponseWriter, r *http.Request) {
	fail := func(code int, format string, args ...any) {
		writeError(w, &apiError{code, fmt.Sprintf(format, args...)})
	}
	id, hash := r.PathValue("build"), r.PathValue("hash")
	a.builds.mu.Lock()
	b := a.builds.all[id]
	a.builds.mu.Unlock()
	if b == nil || subtle.ConstantTimeCompare([]byte(r.Header.Get(uploadTokenHeader)), []byte(b.token)) != 1 {
		fail(http.StatusNotFound, "no such upload")
		return
	}
	if !filesHashRE.MatchString(hash) {
		fail(http.StatusBadRequest, "files hash %.80q: want lowercase hex", hash)
		return
	}
	size := r.ContentLength
	if code, msg := a.builds.reserve(b, hash, size); code != 0 {
		fail(code, "%s", msg)
		return
	}
	// An upload that stalls ends (until it does, the build is not dropped and takes no
	// trigger, and its bytes stay counted).
	body := &idleReader{r: r.Body, rc: http.NewResponseController(w)}
	path := filepath.Join(b.dir, hash+".tar")
	err := receive(body, path, size)
	b.mu.Lock()
	delete(b.pending, hash)
	if err == nil && b.status == "waiting" && !b.gone {
		b.files[hash] = path
	} else {
		b.bytes -= size
		if !b.gone {
			a.builds.bytes.Add(-size) // else dropFiles gave back what b.bytes held
		}
		if err == nil {
			err = fmt.Errorf("build %s takes no more files: it is %s", b.id, b.status)
		}
	}
	b.mu.Unlock()
	switch {
	case errors.Is(err, syscall.ENOSPC):
		fail(http.StatusInsufficientStorage, "no room for the files on the edge")
	case err != nil:
		a.cfg.Log.Warn("e2b build upload", "build", b.id, "err", err)
		fail(http.StatusBadRequest, "upload failed: the body ended before its Content-Length, or could not be stored")
	default:
		w.WriteHeader(http.StatusOK)
	}
}

// reserve checks an upload of size bytes of files hash to b against every bound and, if
// it may go on, counts it (code 0); else the answer's code and message.
func (bs *builds) reserve(b *build, hash string, size int64) (int, string) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	var keyBytes int64
	keyUploads := 0
	for _, o := range bs.all {
		if o.owner != b.owner {
			continue
		}
		o.mu.Lock()
		if !o.gone {
			keyBytes += o.bytes
		}
		keyUploads += len(o.pending)
		o.mu.Unlock()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.gone || bs.all[b.id] != b || b.status != "waiting":
		return http.StatusConflict, fmt.Sprintf("build %s takes no more files", b.id)
	case size < 0:
		return http.StatusLengthRequired, "an upload needs its Content-Length"
	case b.pending[hash] || b.files[hash] != "":
		return http.StatusConflict, "these files are uploaded already"
	case len(b.files)+len(b.pending) >= maxBuildSteps:
		return http.StatusRequestEntityTooLarge, fmt.Sprintf("a build takes at most %d uploads", maxBuildSteps)
	case b.bytes+b.linked+size > maxBuildBytes:
		return http.StatusRequestEntityTooLarge, fmt.Sprintf("a build's files are at most %d MiB", maxBuildBytes>>20)
	case keyBytes+size > maxKeyBytes || keyUploads >= maxKeyUploads:
		return http.StatusTooManyRequests, fmt.Sprintf("a key's builds hold at most %d MiB of files, %d uploads at once", maxKeyBytes>>20, maxKeyUploads)
	case bs.bytes.Load()+size > maxUploadBytes:
		return http.StatusInsufficientStorage, "the edge holds as many builds' files as it takes: retry later"
	}
	bs.bytes.Add(size)
	b.bytes += size
	b.pending[hash] = true
	return 0, ""
}

// idleReader reads an upload's body, ending it once the client sends nothing for
// uploadIdle.
type idleReader struct {
	r  io.Reader
	rc *http.ResponseController
}

func (i *idleReader) Read(p []byte) (int, error) {
	_ = i.rc.SetReadDeadline(time.Now().Add(uploadIdle))
	return i.r.Read(p)
}

// receive writes exactly size bytes of body to path (through a temporary file: a broken
// upload leaves nothing).
func receive(body io.Reader, path string, size int64) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".upload-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	n, err := io.Copy(f, io.LimitReader(body, size+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("got %d bytes, Content-Length said %d", n, size)
	}
	return os.Rename(f.Name(), path)
}

// buildSpec is E2B's template build request: the base and the steps.
type buildSpec struct {
	FromImage         string          `json:"fromImage"`
	FromTemplate      string          `json:"fromTemplate"`
	FromImageRegistry json.RawMessage `json:"fromImageRegistry"`
	Steps             []buildStep     `json:"steps"`
	StartCmd          string          `json:"startCmd"`
	ReadyCmd          string          `json:"readyCmd"`
}

type buildStep struct {
	Type      string   `json:"type"`
	Args      []string `json:"args"`
	FilesHash string   `json:"filesHash"`
}

// triggerBuild is POST /v2/templates/{id}/builds/{buildID}: the steps; the build runs.
func (a *API) triggerBuild(c *call) error {
	var spec buildSpec
	if err := c.decode(&spec); err != nil {
		return err
	}
	b, err := a.builds.find(c)
	if err != nil {
		return err
	}
	// A build refused here is over: its slot and its files are given back.
	refuse := func(code int, format string, args ...any) error {
		err := fail(code, format, args...)
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.status == "waiting" && len(b.pending) == 0 {
			b.endLocked("", err)
		}
		return err
	}
	if len(spec.FromImageRegistry) > 0 && string(spec.FromImageRegistry) != "null" {
		return refuse(http.StatusBadRequest, "fromImageRegistry: registry credentials through the SDK are not supported by Fireworks (push the image where the nodes pull from, or register it with `fireworks template create`)")
	}
	if (spec.FromImage == "") == (spec.FromTemplate == "") {
		return refuse(http.StatusBadRequest, "give fromImage or fromTemplate, one of them")
	}
	if len(spec.Steps) > maxBuildSteps {
		return refuse(http.StatusBadRequest, "%d steps: at most %d", len(spec.Steps), maxBuildSteps)
	}
	bs := a.builds
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if bs.closed {
		return fail(http.StatusServiceUnavailable, "the edge is stopping")
	}
	running, mine := 0, 0
	for _, o := range bs.all {
		if o == b {
			continue
		}
		o.mu.Lock()
		if o.status == "building" {
			running++
			if o.owner == b.owner {
				mine++
			}
		}
		o.mu.Unlock()
	}
	b.mu.Lock()
	if bs.all[b.id] != b || b.gone {
		b.mu.Unlock()
		return fail(http.StatusNotFound, "build %s is gone (a newer build of the key's took its place)", b.id)
	}
	if b.status != "waiting" {
		b.mu.Unlock()
		return fail(http.StatusConflict, "build %s is %s already", b.id, b.status)
	}
	if len(b.pending) > 0 {
		b.mu.Unlock()
		return fail(http.StatusConflict, "build %s has uploads under way: give its steps once they end", b.id)
	}
	bs.takeSiblingFiles(b, spec.Steps)
	for i, s := range spec.Steps {
		if err := checkStep(s, b.files); err != nil {
			b.mu.Unlock()
			return refuse(http.StatusBadRequest, "step %d: %v", i+1, err)
		}
	}
	if mine >= maxBuildsPerOwner || running >= maxBuilds {
		b.mu.Unlock()
		return refuse(http.StatusTooManyRequests, "too many template builds run (at most %d per key, %d on this edge): wait for one to end", maxBuildsPerOwner, maxBuilds)
	}
	b.status = "building"
	b.mu.Unlock()
	// Before the run starts: a status read after the trigger has this at least.
	b.logf("Building template %s: %d steps", b.name, len(spec.Steps))
	bs.wg.Add(1)
	go func() {
		defer bs.wg.Done()
		ctx, cancel := context.WithTimeout(bs.ctx, buildTimeout)
		defer cancel()
		step, err := a.runBuild(ctx, b, spec)
		if err != nil {
			b.logf("%v", err)
		} else {
			b.logf("Template %s is ready", b.name)
		}
		b.end(step, err)
	}()
	c.w.WriteHeader(http.StatusAccepted)
	return nil
}

// takeSiblingFiles gives b (b.mu and bs.mu held) the files its COPY steps need that
// another waiting build of the same key and template has (see uploadLink).
func (bs *builds) takeSiblingFiles(b *build, steps []buildStep) {
	for _, s := range steps {
		if s.Type != "COPY" || b.files[s.FilesHash] != "" || !filesHashRE.MatchString(s.FilesHash) {
			continue
		}
		for _, o := range bs.all {
			if o == b || o.owner != b.owner || o.keyHash != b.keyHash || o.name != b.name {
				continue
			}
			o.mu.Lock()
			from := ""
			if o.status == "waiting" && !o.gone {
				from = o.files[s.FilesHash]
			}
			o.mu.Unlock()
			fi, err := os.Stat(from)
			if from == "" || err != nil {
				continue
			}
			to := filepath.Join(b.dir, s.FilesHash+".tar")
			if b.bytes+b.linked+fi.Size() <= maxBuildBytes && os.Link(from, to) == nil {
				// Within the build's bound; on the edge's, the upload counts (once).
				b.files[s.FilesHash] = to
				b.linked += fi.Size()
				break
			}
		}
	}
}

// checkStep checks a step's shape before anything runs (files: what was uploaded).
func checkStep(s buildStep, files map[string]string) error {
	want := map[string][2]int{"RUN": {1, 2}, "COPY": {2, 4}, "ENV": {2, 2 * 64}, "WORKDIR": {1, 1}, "USER": {1, 1}}
	n, ok := want[s.Type]
	switch {
	case !ok:
		return fmt.Errorf("instruction %.20q is not one Fireworks builds (RUN, COPY, ENV, WORKDIR, USER)", s.Type)
	case len(s.Args) < n[0] || len(s.Args) > n[1] || s.Type == "ENV" && len(s.Args)%2 != 0:
		return fmt.Errorf("%s with %d arguments", s.Type, len(s.Args))
	case s.Type == "COPY" && files[s.FilesHash] == "":
		return fmt.Errorf("COPY %.100q: its files (hash %.80q) were not uploaded", s.Args[0], s.FilesHash)
	}
	for _, a := range s.Args {
		if strings.ContainsRune(a, 0) {
			return fmt.Errorf("%s: an argument holds a NUL byte", s.Type)
		}
	}
	if s.Type == "ENV" {
		for i := 0; i < len(s.Args); i += 2 {
			if k := s.Args[i]; k == "" || strings.ContainsAny(k, "=") {
				return fmt.Errorf("ENV: invalid name %.40q", k)
			}
		}
	}
	return nil
}

// buildRun is what the steps so far have set.
type buildRun struct {
	b       *build
	c       *call
	sandbox string
	env     []string
	user    string
	workdir string
}

// startLog is where a template's start command writes its output, in its sandboxes.
const startLog = "/tmp/.e2b-start.log"

// runBuild runs a build (see the top of this file); step is the failed step's name in
// E2B's terms ("base", its number, "finalize") with the error.
func (a *API) runBuild(ctx context.Context, b *build, spec buildSpec) (step string, err error) {
	c := &call{ctx: ctx, c: b.c, owner: b.owner}
	// What a caller is told of a server's failure (as for any call of theirs).
	req := &http.Request{Method: "BUILD", URL: &url.URL{Path: "/templates/" + b.name + "/builds/" + b.id}}
	pub := func(err error) error {
		if ce := new(connect.Error); errors.As(err, &ce) {
			return a.publicError(req, err) // a server's message, told as to any caller
		}
		return err // the build's own (a step's exit)
	}
	// Whatever happens, what the build made for itself goes (with a context of its own:
	// a build cut short by the edge's stop cleans up too). Should the edge die first,
	// the sandbox ends with its lifetime.
	var sandbox, snapshot string
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if sandbox != "" {
			if _, err := b.c.Sandboxes.RemoveSandbox(cctx, connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: sandbox, Force: true})); err != nil && connect.CodeOf(err) != connect.CodeNotFound {
				a.cfg.Log.Warn("e2b build: remove the build's sandbox", "build", b.id, "sandbox", sandbox, "err", err)
			}
		}
		if snapshot != "" {
			if _, err := b.c.Sandboxes.DeleteSnapshot(cctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Snapshot: snapshot})); err != nil && connect.CodeOf(err) != connect.CodeNotFound {
				a.cfg.Log.Warn("e2b build: delete a build snapshot", "build", b.id, "snapshot", snapshot, "err", err)
			}
		}
	}()
	base := &pb.SandboxSpec{KeepAlive: true, Metadata: map[string]string{"e2b.build": b.id, "e2b.template": b.name},
		Lifetime: durationpb.New(buildTimeout)}
	if spec.FromTemplate != "" {
		if err := a.fromTemplate(c, spec.FromTemplate, base); err != nil {
			return "base", fmt.Errorf("base template %s: %w", spec.FromTemplate, pub(err))
		}
		b.logf("Building from template %s", spec.FromTemplate)
	} else {
		base.Image = spec.FromImage
		b.logf("Building from image %s", spec.FromImage)
	}
	// The build's shape if it asks for one, else its base's. (A built template's
	// sandboxes resume its memory: they have its shape, and another is refused.)
	base.Vcpus, base.MemoryMib = cmp.Or(int32(b.vcpus), base.Vcpus), cmp.Or(int32(b.memMiB), base.MemoryMib)
	resp, err := b.c.Sandboxes.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Spec: base}))
	if err != nil {
		return "base", fmt.Errorf("start the build's sandbox: %w", pub(err))
	}
	sandbox = resp.Msg.GetSandbox().GetId()
	running, err := a.waitRunning(c, resp.Msg.GetSandbox())
	if err != nil {
		return "base", fmt.Errorf("start the build's sandbox: %w", pub(err))
	}
	// The steps start from what the base set: a template's environment, and a built
	// template's user and working directory too.
	bspec := running.GetSpec()
	run := &buildRun{b: b, c: c, sandbox: sandbox, env: slices.Clone(bspec.GetEnv()), user: bspec.GetUser(), workdir: bspec.GetWorkingDir()}
	for i, s := range spec.Steps {
		if err := run.step(s); err != nil {
			return strconv.Itoa(i + 1), fmt.Errorf("step %d (%s): %w", i+1, s.Type, pub(err))
		}
	}
	if err := run.startAndWait(ctx, spec.StartCmd, spec.ReadyCmd); err != nil {
		return "finalize", pub(err)
	}

	// Its memory, which the template names with the defaults the steps set for the
	// commands its sandboxes run (the sandbox's own spec cannot change while it runs).
	mem, err := b.c.Sandboxes.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{Sandbox: sandbox, Name: buildSnapshotPrefix + b.id, Memory: true}))
	if err != nil {
		return "finalize", fmt.Errorf("snapshot the template: %w", pub(err))
	}
	snapshot = mem.Msg.GetSnapshot().GetId() // until the template holds it
	var old string
	if t, err := b.c.Templates.GetTemplate(ctx, connect.NewRequest(&pb.GetTemplateRequest{Template: b.name})); err == nil {
		old = t.Msg.GetTemplate().GetSnapshot()
	}
	if _, err := b.c.Templates.CreateTemplate(ctx, connect.NewRequest(&pb.CreateTemplateRequest{Replace: true,
		Template: &pb.NamedTemplate{Name: b.name, Snapshot: snapshot, Env: run.env, User: run.user, WorkingDir: run.workdir}})); err != nil {
		return "finalize", fmt.Errorf("register template %s: %w", b.name, pub(err))
	}
	snapshot = ""
	if old != "" {
		// The template's previous build, if a build made it (a snapshot of the user's
		// own that a template named stays theirs).
		if s, err := c.snapshot(old); err == nil && s != nil && strings.HasPrefix(s.GetName(), buildSnapshotPrefix) {
			snapshot = old
		}
	}
	return "", nil
}

// startAndWait runs the template's start command in the background (it runs on in the
// template, its output in startLog) and its ready command until it succeeds; without
// one, the start command must still run after two seconds. A start command that ends
// fails the build, with its output.
func (r *buildRun) startAndWait(ctx context.Context, startCmd, readyCmd string) error {
	if startCmd == "" {
		if readyCmd != "" {
			r.b.logf("Checking readiness: %s", readyCmd)
			return r.exec([]string{"/bin/sh", "-c", readyCmd}, nil, r.user, false)
		}
		return nil
	}
	r.b.logf("Starting: %s", startCmd)
	pid := &cappedBuffer{max: 32}
	bg := []string{"/bin/sh", "-c", `/bin/sh -c "$1" </dev/null >` + startLog + ` 2>&1 & echo $!`, "fireworks-start", startCmd}
	if err := r.execAs(bg, nil, r.user, pid, io.Discard); err != nil {
		return fmt.Errorf("start command: %w", err)
	}
	// The PID comes from the guest: a number, or the start failed.
	p, err := strconv.Atoi(strings.TrimSpace(pid.String()))
	if err != nil || p <= 0 {
		return fmt.Errorf("start command: no process ID from its shell (%.32q)", pid.String())
	}
	alive := func() bool {
		return r.execAs([]string{"/bin/sh", "-c", "kill -0 " + strconv.Itoa(p)}, nil, "0", io.Discard, io.Discard) == nil
	}
	ended := func() error {
		r.b.logf("The start command's output:")
		_ = r.exec([]string{"/bin/sh", "-c", "tail -n 50 " + startLog}, nil, "0", false)
		return errors.New("the start command ended")
	}
	if readyCmd == "" {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
		if !alive() {
			return ended()
		}
		return nil
	}
	r.b.logf("Waiting until ready: %s", readyCmd)
	deadline := time.Now().Add(readyTimeout)
	for {
		err := r.exec([]string{"/bin/sh", "-c", readyCmd}, nil, r.user, true)
		if err == nil {
			return nil
		}
		if !alive() {
			return ended()
		}
		if time.Now().After(deadline) {
			r.b.logf("The start command's output so far:")
			_ = r.exec([]string{"/bin/sh", "-c", "tail -n 50 " + startLog}, nil, "0", false)
			return fmt.Errorf("ready command not ready within %s (last: %w)", readyTimeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// userName is a name a USER step may make (not a uid, not user:group).
var userName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// step runs one step in the build's sandbox.
func (r *buildRun) step(s buildStep) error {
	switch s.Type {
	case "ENV":
		// $VAR and ${VAR} in values are the sandbox's environment so far (the image's
		// too: PATH=/opt/bin:$PATH), as Docker's ENV: nothing else is interpreted.
		out := &cappedBuffer{max: 1 << 20}
		if err := r.execAs([]string{proto.BuildCommand, "env"}, nil, "", out, &logWriter{b: r.b}); err != nil {
			return fmt.Errorf("read the environment: %w", err)
		}
		if out.over {
			return errors.New("the sandbox's environment is over 1 MiB")
		}
		have := map[string]string{}
		for _, kv := range strings.Split(out.String(), "\x00") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				have[k] = v
			}
		}
		for i := 0; i < len(s.Args); i += 2 {
			k, v := s.Args[i], os.Expand(s.Args[i+1], func(name string) string { return have[name] })
			have[k] = v
			r.env = slices.DeleteFunc(r.env, func(e string) bool { return strings.HasPrefix(e, k+"=") })
			r.env = append(r.env, k+"="+v)
		}
		r.b.logf("ENV %s", strings.Join(s.Args, " "))
	case "USER":
		r.b.logf("USER %s", s.Args[0])
		if userName.MatchString(s.Args[0]) {
			// E2B makes a user that does not exist: with the image's tools if it has
			// them, else by init's helper (which does nothing if the user is there now).
			mk := `id -u "$1" >/dev/null 2>&1 || useradd -m "$1" 2>/dev/null || adduser -D "$1" 2>/dev/null`
			_ = r.exec([]string{"/bin/sh", "-c", mk, "fireworks-user", s.Args[0]}, nil, "0", true)
			if err := r.exec([]string{proto.BuildCommand, "adduser", s.Args[0]}, nil, "", false); err != nil {
				return fmt.Errorf("make user %s: %w", s.Args[0], err)
			}
		}
		r.user = s.Args[0]
	case "WORKDIR":
		r.b.logf("WORKDIR %s", s.Args[0])
		out := &cappedBuffer{max: 4096} // a path; the guest may write more
		if err := r.execAs([]string{proto.BuildCommand, "workdir", s.Args[0], r.user}, nil, "", out, &logWriter{b: r.b}); err != nil {
			return err
		}
		if out.over {
			return errors.New("the working directory's path is too long")
		}
		r.workdir = strings.TrimSpace(out.String())
	case "RUN":
		user := r.user
		if len(s.Args) > 1 && s.Args[1] != "" {
			user = s.Args[1]
		}
		r.b.logf("RUN %s", s.Args[0])
		return r.exec([]string{"/bin/sh", "-c", s.Args[0]}, nil, user, false)
	case "COPY":
		owner, mode := r.user, ""
		if len(s.Args) > 2 && s.Args[2] != "" {
			owner = s.Args[2]
		}
		if len(s.Args) > 3 {
			mode = s.Args[3]
		}
		r.b.mu.Lock()
		path := r.b.files[s.FilesHash]
		r.b.mu.Unlock()
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("the uploaded files: %w", err)
		}
		defer f.Close()
		r.b.logf("COPY %s %s", s.Args[0], s.Args[1])
		return r.exec([]string{proto.BuildCommand, "copy", s.Args[0], s.Args[1], owner, mode}, f, "", false)
	}
	return nil
}

// exec runs argv in the build's sandbox with the build's environment and working
// directory, as user (init's build helper runs as root whatever is asked), its output to
// the build's log (quiet: nowhere); an exit other than 0 is an error.
func (r *buildRun) exec(argv []string, stdin io.Reader, user string, quiet bool) error {
	w := &logWriter{b: r.b}
	var out io.Writer = w
	if quiet {
		out = io.Discard
	}
	err := r.execAs(argv, stdin, user, out, out)
	w.flush()
	return err
}

func (r *buildRun) execAs(argv []string, stdin io.Reader, user string, stdout, stderr io.Writer) error {
	ctx, cancel := context.WithCancel(r.c.ctx)
	defer cancel()
	sess, err := client.Exec(r.b.c.Sandboxes.Exec(ctx), &pb.ExecStart{Sandbox: r.sandbox, Argv: argv, Env: r.env,
		WorkingDir: r.workdir, User: user, Stdin: stdin != nil})
	if err != nil {
		return err
	}
	if stdin != nil {
		sess.PumpStdin(stdin)
	}
	exit, err := sess.Wait(stdout, stderr)
	if w, ok := stderr.(*logWriter); ok {
		w.flush()
	}
	if err != nil {
		return fmt.Errorf("exec: %w", err)
	}
	if exit.GetCode() != 0 || exit.GetSignal() != 0 {
		why := fmt.Sprintf("exited with code %d", exit.GetCode())
		if exit.GetSignal() != 0 {
			why = fmt.Sprintf("killed by signal %d", exit.GetSignal())
		}
		if exit.GetReason() != "" {
			why += ": " + exit.GetReason()
		}
		return errors.New(why)
	}
	return nil
}

// cappedBuffer keeps the first max bytes written to it.
type cappedBuffer struct {
	bytes.Buffer
	max  int
	over bool
}

func (c *cappedBuffer) Write(p []byte) (int, error) {
	n := len(p) // taken whole: the rest is dropped, not refused
	if room := c.max - c.Len(); len(p) > room {
		c.over = true
		p = p[:max(room, 0)]
	}
	c.Buffer.Write(p)
	return n, nil
}

// logWriter turns a step's output into log entries, a line each.
type logWriter struct {
	b   *build
	buf []byte
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.b.log("info", strings.TrimRight(string(w.buf[:i]), "\r"))
		w.buf = w.buf[i+1:]
	}
	if len(w.buf) > maxBuildLogLine {
		w.flush()
	}
	return len(p), nil
}

func (w *logWriter) flush() {
	if len(w.buf) > 0 {
		w.b.log("info", string(w.buf))
		w.buf = nil
	}
}

// buildStatus is GET /templates/{id}/builds/{buildID}/status: the build's state and its
// log entries from logsOffset on.
func (a *API) buildStatus(c *call) error {
	b, err := a.builds.find(c)
	if err != nil {
		return err
	}
	off := 0
	if s := c.r.URL.Query().Get("logsOffset"); s != "" {
		if off, err = strconv.Atoi(s); err != nil || off < 0 {
			return fail(http.StatusBadRequest, "logsOffset %.20q: want a number ≥ 0", s)
		}
	}
	b.mu.Lock()
	var picked []logEntry
	if off < len(b.logs) {
		picked = slices.Clone(b.logs[off:min(len(b.logs), off+1000)])
	}
	out := map[string]any{"templateID": b.name, "buildID": b.id, "status": b.status}
	if b.reason != nil {
		out["reason"] = maps.Clone(b.reason)
	}
	b.mu.Unlock()
	entries, logs := []map[string]any{}, []string{}
	for _, e := range picked {
		entries = append(entries, e.json())
		logs = append(logs, e.at.UTC().Format(time.RFC3339Nano)+" "+e.msg)
	}
	out["logEntries"] = entries
	out["logs"] = logs
	writeJSON(c.w, http.StatusOK, out)
	return nil
}

// aliasExists is GET /templates/aliases/{alias} (the SDK's Template.exists): the
// caller's template of that name.
func (a *API) aliasExists(c *call) error {
	name, _, _ := strings.Cut(c.r.PathValue("alias"), ":") // tags are not kept apart
	resp, err := c.c.Templates.GetTemplate(c.ctx, connect.NewRequest(&pb.GetTemplateRequest{Template: name}))
	if err != nil {
		return err
	}
	writeJSON(c.w, http.StatusOK, map[string]any{"templateID": resp.Msg.GetTemplate().GetId(), "public": false})
	return nil
}
