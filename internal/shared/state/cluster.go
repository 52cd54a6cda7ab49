package state

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"time"
)

// NodeStatus is whether the control plane hears from a node's agent.
type NodeStatus string

const (
	// NodeReady: the agent heartbeats; the node takes new sandboxes unless cordoned.
	NodeReady NodeStatus = "ready"
	// NodeDown: the agent missed its heartbeats; its sandboxes were declared lost.
	NodeDown NodeStatus = "down"
)

// Resources is an amount of node capacity, or what a sandbox reserves.
type Resources struct {
	VCPUs     int `json:"vcpus"`
	MemoryMiB int `json:"memory_mib"`
	DiskMiB   int `json:"disk_mib,omitempty"`
}

// Node is one host running a Fireworks agent.
type Node struct {
	ID string `json:"id"`
	// Address is where servers reach the agent's internal API (host:port).
	Address  string            `json:"address"`
	Labels   map[string]string `json:"labels,omitempty"`
	Capacity Resources         `json:"capacity"`
	Accel    string            `json:"accel,omitempty"`
	Kernel   string            `json:"kernel,omitempty"`
	Version  string            `json:"version,omitempty"`
	// Images are the digests whose root disk the node holds (scheduler locality).
	Images []string `json:"images,omitempty"`
	// Warm are the image digests and references the node holds a template snapshot or
	// warm pool for (scheduler locality): references too, so a sandbox whose image has not
	// been resolved to a digest yet still finds them.
	Warm   []string   `json:"warm,omitempty"`
	Status NodeStatus `json:"status"`
	// StatusReason says why the node has its status ("missed heartbeats for 15s").
	StatusReason string `json:"status_reason,omitempty"`
	// Cordoned nodes take no new sandboxes; Draining ones also have theirs moved off.
	Cordoned bool `json:"cordoned,omitempty"`
	Draining bool `json:"draining,omitempty"`
	// DrainingSince is when the drain began (a live migration that failed since is
	// not tried again for the drain).
	DrainingSince time.Time `json:"draining_since,omitzero"`
	// Parked nodes were given back by the node autoscaler (drained, then released to
	// their provider): cordoned while parked, until it takes them back.
	Parked       bool      `json:"parked,omitempty"`
	RegisteredAt time.Time `json:"registered_at"`
	UpdatedAt    time.Time `json:"updated_at"`
}

func (n *Node) clone() *Node {
	c := *n
	c.Labels = maps.Clone(n.Labels)
	c.Images = slices.Clone(n.Images)
	c.Warm = slices.Clone(n.Warm)
	return &c
}

// NodeUpdate is a partial change to a node. Nil pointers leave fields alone.
type NodeUpdate struct {
	Status       *NodeStatus `json:"status,omitempty"`
	StatusReason *string     `json:"status_reason,omitempty"`
	Cordoned     *bool       `json:"cordoned,omitempty"`
	Draining     *bool       `json:"draining,omitempty"`
	// Parked sets or clears Node.Parked, and the cordon that comes with it.
	Parked *bool     `json:"parked,omitempty"`
	Images *[]string `json:"images,omitempty"`
	Warm   *[]string `json:"warm,omitempty"`
	Time   time.Time `json:"time"`
}

// Role is what an API token may do.
type Role string

const (
	// RoleAdmin may do everything: all sandboxes, nodes, tokens.
	RoleAdmin Role = "admin"
	// RoleUser may create sandboxes and act on the ones it owns, and read cluster info.
	RoleUser Role = "user"
	// RoleJoin is a node join token: it only lets an agent obtain a certificate.
	RoleJoin Role = "join"
	// RoleIngress is an HTTP edge's token: it may watch the route table (which holds the
	// access tokens of private ports) and get an edge certificate, and nothing else.
	RoleIngress Role = "ingress"
)

func (r Role) valid() bool {
	return r == RoleAdmin || r == RoleUser || r == RoleJoin || r == RoleIngress
}

// Token is an API or join credential. Only a hash of its secret is stored: a leaked
// snapshot or Raft log does not leak usable tokens.
type Token struct {
	ID         string    `json:"id"`
	Name       string    `json:"name,omitempty"`
	Role       Role      `json:"role"`
	SecretHash string    `json:"secret_hash"`
	CreatedAt  time.Time `json:"created_at"`
	CreatedBy  string    `json:"created_by,omitempty"`
	// ExpiresAt, when set, ends the token's validity (join tokens are short-lived).
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// MaxUses bounds how many certificates a join token buys (0: unbounded, as join
	// tokens made before the bound were); Uses counts them.
	MaxUses int `json:"max_uses,omitempty"`
	Uses    int `json:"uses,omitempty"`
}

// ValidAt reports whether t may be used at now.
func (t Token) ValidAt(now time.Time) bool { return t.ExpiresAt.IsZero() || now.Before(t.ExpiresAt) }

type upsertNodeCmd struct {
	Node Node `json:"node"`
}

type updateNodeCmd struct {
	ID     string     `json:"id"`
	Update NodeUpdate `json:"update"`
}

type deleteNodeCmd struct {
	ID string `json:"id"`
}

type createTokenCmd struct {
	Token Token `json:"token"`
}

type deleteTokenCmd struct {
	ID string `json:"id"`
	// Time is when the token was revoked: the edge certificates it got are revoked then
	// (zero in entries written before edge certificates were recorded).
	Time time.Time `json:"time,omitzero"`
}

// upsertNode registers a node or refreshes a known one's registration (address, capacity,
// labels, software). Registration makes it ready; cordon and drain survive re-registration
// because an operator set them.
func (f *fsm) upsertNode(n Node) any {
	if n.ID == "" {
		return fmt.Errorf("%w: node without ID", ErrInvalid)
	}
	if n.UpdatedAt.IsZero() {
		return fmt.Errorf("%w: node %s registration without time", ErrInvalid, n.ID)
	}
	if n.Capacity.VCPUs < 0 || n.Capacity.MemoryMiB < 0 || n.Capacity.DiskMiB < 0 {
		return fmt.Errorf("%w: node %s has negative capacity", ErrInvalid, n.ID)
	}
	n = *n.clone()
	n.UpdatedAt = utc(n.UpdatedAt)
	n.Status, n.StatusReason = NodeReady, "registered"
	if cur, ok := f.nodes[n.ID]; ok {
		n.RegisteredAt = cur.RegisteredAt
		n.Cordoned, n.Draining, n.Parked = cur.Cordoned, cur.Draining, cur.Parked
	} else {
		n.RegisteredAt = n.UpdatedAt
	}
	f.nodes[n.ID] = &n
	return *n.clone()
}

func (f *fsm) updateNode(id string, u NodeUpdate) any {
	cur, ok := f.nodes[id]
	if !ok {
		return fmt.Errorf("node %q: %w", id, ErrNotFound)
	}
	if u.Time.IsZero() {
		return fmt.Errorf("%w: node update without time", ErrInvalid)
	}
	n := cur.clone()
	if u.Status != nil {
		if *u.Status != NodeReady && *u.Status != NodeDown {
			return fmt.Errorf("%w: unknown node status %q", ErrInvalid, *u.Status)
		}
		n.Status = *u.Status
	}
	if u.StatusReason != nil {
		n.StatusReason = *u.StatusReason
	}
	if u.Cordoned != nil {
		n.Cordoned = *u.Cordoned
		if !n.Cordoned {
			n.Parked = false // an operator's uncordon takes a parked node back
		}
	}
	if u.Parked != nil {
		n.Parked = *u.Parked
		n.Cordoned = *u.Parked
	}
	if u.Draining != nil {
		if *u.Draining && !n.Draining {
			n.DrainingSince = utc(u.Time)
		}
		n.Draining = *u.Draining
		if n.Draining {
			n.Cordoned = true // a draining node must not take back what it gives up
		} else {
			n.DrainingSince = time.Time{}
		}
	}
	if u.Images != nil {
		n.Images = slices.Clone(*u.Images)
	}
	if u.Warm != nil {
		n.Warm = slices.Clone(*u.Warm)
	}
	n.UpdatedAt = utc(u.Time)
	f.nodes[id] = n
	return *n.clone()
}

func (f *fsm) deleteNode(id string) any {
	if _, ok := f.nodes[id]; !ok {
		return fmt.Errorf("node %q: %w", id, ErrNotFound)
	}
	// In ID order: the error is recorded in the audit log, which every server must
	// write alike (map order differs between servers).
	for _, sid := range slices.Sorted(maps.Keys(f.involved[id])) {
		if sb := f.sandboxes[sid]; sb.Node == id && !sb.Status.Terminal() {
			return fmt.Errorf("%w: node %s still has sandbox %s (%s)", ErrInvalid, id, sb.ID, sb.Status)
		}
	}
	delete(f.nodes, id)
	return nil
}

func (f *fsm) createToken(t Token) any {
	if t.ID == "" || t.SecretHash == "" || t.CreatedAt.IsZero() {
		return fmt.Errorf("%w: token needs ID, secret hash and creation time", ErrInvalid)
	}
	if !t.Role.valid() {
		return fmt.Errorf("%w: unknown role %q", ErrInvalid, t.Role)
	}
	if _, ok := f.tokens[t.ID]; ok {
		return fmt.Errorf("token ID %w", ErrExists)
	}
	t.CreatedAt, t.ExpiresAt = utc(t.CreatedAt), utc(t.ExpiresAt)
	f.tokens[t.ID] = &t
	return nil
}

func (f *fsm) deleteToken(c deleteTokenCmd) any {
	if _, ok := f.tokens[c.ID]; !ok {
		return fmt.Errorf("token %q: %w", c.ID, ErrNotFound)
	}
	delete(f.tokens, c.ID)
	// Remembered, so that restoring an older state file cannot bring it back.
	f.tokenTombs[c.ID] = utc(c.Time)
	// Its templates go with it: nothing can use them any more (they are owner-scoped).
	for id, t := range f.templates {
		if t.Owner == c.ID {
			delete(f.templates, id)
		}
	}
	at := utc(c.Time)
	if at.IsZero() {
		at = time.Unix(1, 0).UTC() // deterministic on every replica; only non-zero matters
	}
	for serial, ic := range f.certs {
		if ic.Token == c.ID && ic.RevokedAt.IsZero() {
			n := *ic
			n.RevokedAt = at
			f.certs[serial] = &n
		}
	}
	return nil
}

func (f *fsm) getNode(id string) (Node, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	n, ok := f.nodes[id]
	if !ok {
		return Node{}, fmt.Errorf("node %q: %w", id, ErrNotFound)
	}
	return *n.clone(), nil
}

func (f *fsm) listNodes() []Node {
	f.mu.RLock()
	out := make([]Node, 0, len(f.nodes))
	for _, n := range f.nodes {
		out = append(out, *n.clone())
	}
	f.mu.RUnlock()
	slices.SortFunc(out, func(a, b Node) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

func (f *fsm) getToken(id string) (Token, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	t, ok := f.tokens[id]
	if !ok {
		return Token{}, fmt.Errorf("token %q: %w", id, ErrNotFound)
	}
	return *t, nil
}

func (f *fsm) listTokens() []Token {
	f.mu.RLock()
	out := make([]Token, 0, len(f.tokens))
	for _, t := range f.tokens {
		out = append(out, *t)
	}
	f.mu.RUnlock()
	slices.SortFunc(out, func(a, b Token) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return out
}
