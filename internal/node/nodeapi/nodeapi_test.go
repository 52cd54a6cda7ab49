package nodeapi

import (
	"net/http"
	"testing"

	"github.com/fireworks-sandbox/fireworks/internal/shared/rpc"
)

// The node takes a caller for an admin only when the server says so: a call without the
// headers is a user's (fail closed), and a user cannot name files on the node.
func TestCallerFailsClosed(t *testing.T) {
	h := http.Header{}
	if c := callerOf(h); c.admin || c.token != "" {
		t.Errorf("no headers: %+v, want a user with no token", c)
	}
	h.Set(rpc.CallerTokenHeader, "tok1")
	h.Set(rpc.CallerAdminHeader, "yes")
	if c := callerOf(h); c.admin || c.token != "tok1" {
		t.Errorf("admin header %q: %+v, want a user", "yes", c)
	}
	h.Set(rpc.CallerAdminHeader, "true")
	if c := callerOf(h); !c.admin {
		t.Errorf("admin header true: %+v", c)
	}
	user := caller{token: "tok1"}
	for _, ref := range []string{"oci:/etc", "docker-archive:/etc/shadow"} {
		if user.checkSource(ref) == nil {
			t.Errorf("a user's %s was allowed", ref)
		}
		if (caller{admin: true}).checkSource(ref) != nil {
			t.Errorf("an admin's %s was refused", ref)
		}
	}
	if user.checkSource("registry.example/app:1") != nil {
		t.Error("a user's registry pull was refused")
	}
	for _, id := range []string{"", "../../etc", "0123456789abcdef/..", "ABCDEF0123456789"} {
		if checkID(id) == nil {
			t.Errorf("sandbox ID %q accepted", id)
		}
	}
	if err := checkID("0123456789abcdef"); err != nil {
		t.Errorf("a sandbox ID refused: %v", err)
	}
}
