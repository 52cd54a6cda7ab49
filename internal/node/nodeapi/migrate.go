package nodeapi

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/shared/pki"
)

// MigratePath + SANDBOX/MIGRATION/OP is where a live migration's source drives its
// target (see agent.MigrationPeer): OP is begin, stream, disk or switch; POST, node
// certificates only, and the target checks in the state that the migration is from the
// calling node to it.
const MigratePath = "/fireworks.node/migrate/"

// MigrationOps are the calls of a migration.
var MigrationOps = []string{"begin", "stream", "disk", "switch"}

// maxMigrationID bounds a migration's ID in a path.
const maxMigrationID = 64

func serveMigration(ag *agent.Agent, w http.ResponseWriter, r *http.Request, rest string, log *slog.Logger) {
	role, peer, err := pki.PeerIdentity(r.TLS)
	if err != nil || role != pki.RoleAgent || r.Method != http.MethodPost {
		http.Error(w, "a migration is driven by nodes only, with POST", http.StatusForbidden)
		return
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 3 || checkID(parts[0]) != nil || parts[1] == "" || len(parts[1]) > maxMigrationID || strings.Trim(parts[1], "0123456789abcdef") != "" {
		http.Error(w, "want "+MigratePath+"SANDBOX/MIGRATION/OP", http.StatusBadRequest)
		return
	}
	id, mid, op := parts[0], parts[1], parts[2]
	ctx := r.Context()
	var callErr error
	switch op {
	case "begin":
		callErr = ag.MigrationBegin(ctx, peer, id, mid, r.Body)
	case "stream":
		callErr = ag.MigrationStream(ctx, peer, id, mid, r.Body)
	case "switch":
		callErr = ag.MigrationSwitch(ctx, peer, id, mid, r.Body)
	case "disk":
		conn, err := ag.MigrationDisk(ctx, peer, id, mid)
		if err != nil {
			callErr = err
			break
		}
		serveDuplex(w, r, conn)
		return
	default:
		http.Error(w, "unknown migration call "+op, http.StatusNotFound)
		return
	}
	if callErr != nil {
		log.Warn("migration call refused or failed", "op", op, "sandbox", id, "migration", mid, "from", peer, "err", callErr)
		http.Error(w, callErr.Error(), http.StatusConflict)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// serveDuplex carries conn both ways at once over a full-duplex call: what the caller
// sends (the request body) to conn, and what conn answers back (the response body,
// flushed as it comes), until both directions end; then it closes conn.
func serveDuplex(w http.ResponseWriter, r *http.Request, conn net.Conn) {
	defer conn.Close()
	_ = http.NewResponseController(w).EnableFullDuplex()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	fl := http.NewResponseController(w)
	_ = fl.Flush()
	var wg sync.WaitGroup
	wg.Go(func() {
		_, _ = io.Copy(conn, r.Body)
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	})
	buf := make([]byte, 256<<10)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				break
			}
			_ = fl.Flush()
		}
		if err != nil {
			break
		}
	}
	conn.Close()
	// The caller's side may never end on its own: the call is over once conn is.
	r.Body.Close()
	wg.Wait()
}
