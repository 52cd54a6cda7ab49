package state

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Template is a named recipe for sandboxes: an image and the shape of the VMs started
// from it, registered by a user. E2B's template IDs name these (templateID on create);
// `fireworks template` manages them. A template is its owner's: others neither see nor
// use it.
type Template struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Owner     string    `json:"owner,omitempty"` // as Sandbox.Owner
	Image     string    `json:"image"`
	VCPUs     int       `json:"vcpus,omitempty"`
	MemoryMiB int       `json:"memory_mib,omitempty"`
	DiskMiB   int       `json:"disk_mib,omitempty"`
	Env       []string  `json:"env,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// Snapshot, if set, is the ID of the owner's snapshot its sandboxes start from (in
	// the snapshot's shape; Image is the snapshot's). E2B's template builds make these.
	Snapshot string `json:"snapshot,omitempty"`
	// User and WorkingDir, on a template of a snapshot, are the default user and working
	// directory of the commands its sandboxes run (E2B's USER and WORKDIR).
	User       string `json:"user,omitempty"`
	WorkingDir string `json:"working_dir,omitempty"`
}

// Bounds on templates: they are state every replica keeps.
const (
	MaxTemplatesPerOwner = 100
	maxTemplateName      = 128
	maxTemplateEnv       = 64
	maxTemplateEnvBytes  = 16 << 10
)

// ValidTemplateName: letters, digits, '-', '_', '.', and '/' (E2B names such as
// "team/name"), 1 to 128 bytes, not starting with '.', '-' or '/', no empty, "." or
// ".." part between slashes (a name may become a path: `template build`'s output).
func ValidTemplateName(n string) bool {
	if n == "" || len(n) > maxTemplateName || n[0] == '.' || n[0] == '-' || n[0] == '/' {
		return false
	}
	for _, part := range strings.Split(n, "/") {
		if part == "" || part == "." || part == ".." {
			return false
		}
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '/') {
			return false
		}
	}
	return true
}

type putTemplateCmd struct {
	Template Template `json:"template"`
	// Replace allows replacing the owner's template of the same name (its ID is kept).
	Replace bool `json:"replace,omitempty"`
}

type deleteTemplateCmd struct {
	ID string `json:"id"`
}

func (f *fsm) putTemplate(c putTemplateCmd) any {
	t := c.Template
	switch {
	case t.ID == "" || t.Image == "" || t.CreatedAt.IsZero():
		return fmt.Errorf("%w: a template needs an ID, an image and a time", ErrInvalid)
	case !ValidTemplateName(t.Name):
		return fmt.Errorf("%w: template name %.40q: 1 to %d letters, digits, '-', '_', '.' or '/'", ErrInvalid, t.Name, maxTemplateName)
	case len(t.Env) > maxTemplateEnv:
		return fmt.Errorf("%w: %d environment variables (at most %d)", ErrInvalid, len(t.Env), maxTemplateEnv)
	case total(t.Env) > maxTemplateEnvBytes:
		return fmt.Errorf("%w: environment of %d bytes (at most %d)", ErrInvalid, total(t.Env), maxTemplateEnvBytes)
	case len(t.Image) > 1024 || len(t.Snapshot) > 128 || len(t.User) > 256 || len(t.WorkingDir) > 4096:
		return fmt.Errorf("%w: image reference of %d bytes", ErrInvalid, len(t.Image))
	case t.VCPUs < 0 || t.MemoryMiB < 0 || t.DiskMiB < 0:
		return fmt.Errorf("%w: negative size", ErrInvalid)
	}
	n := 0
	for _, o := range f.templates {
		if o.Owner != t.Owner {
			continue
		}
		n++
		if o.Name == t.Name {
			if !c.Replace {
				return fmt.Errorf("template %q: %w", t.Name, ErrExists)
			}
			t.ID, t.CreatedAt = o.ID, o.CreatedAt
			n--
		}
	}
	if _, ok := f.templates[t.ID]; ok && f.templates[t.ID].Owner != t.Owner {
		return fmt.Errorf("template ID %w", ErrExists)
	}
	if n >= MaxTemplatesPerOwner {
		return fmt.Errorf("%w: %d templates already (at most %d per token)", ErrQuota, n, MaxTemplatesPerOwner)
	}
	t.CreatedAt = utc(t.CreatedAt)
	t.Env = slices.Clone(t.Env)
	f.templates[t.ID] = &t
	return t
}

func (f *fsm) deleteTemplate(id string) any {
	if _, ok := f.templates[id]; !ok {
		return ErrNotFound
	}
	delete(f.templates, id)
	return nil
}

// PutTemplate records t (replace: or replaces the owner's template of that name, keeping
// its ID) and returns it as stored.
func (s *Store) PutTemplate(ctx context.Context, t Template, replace bool) (Template, error) {
	resp, err := s.apply(ctx, cmdPutTemplate, putTemplateCmd{Template: t, Replace: replace})
	if err != nil {
		return Template{}, fmt.Errorf("put template %s: %w", t.Name, err)
	}
	out, ok := resp.(Template)
	if !ok {
		return Template{}, fmt.Errorf("put template %s: state machine answered %T", t.Name, resp)
	}
	return out, nil
}

// DeleteTemplate forgets a template.
func (s *Store) DeleteTemplate(ctx context.Context, id string) error {
	if _, err := s.apply(ctx, cmdDeleteTemplate, deleteTemplateCmd{ID: id}); err != nil {
		return fmt.Errorf("delete template %s: %w", id, err)
	}
	return nil
}

// Templates lists the templates owned by owner (all of them for all), by name.
func (s *Store) Templates(owner string, all bool) []Template {
	s.fsm.mu.RLock()
	defer s.fsm.mu.RUnlock()
	var out []Template
	for _, t := range s.fsm.templates {
		if all || t.Owner == owner {
			c := *t
			c.Env = slices.Clone(t.Env)
			out = append(out, c)
		}
	}
	slices.SortFunc(out, func(a, b Template) int { return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.Owner, b.Owner)) })
	return out
}

// FindTemplate resolves an owner's template by ID or name.
func (s *Store) FindTemplate(owner, idOrName string) (Template, error) {
	for _, t := range s.Templates(owner, false) {
		if t.ID == idOrName || t.Name == idOrName {
			return t, nil
		}
	}
	return Template{}, fmt.Errorf("template %.64q: %w", idOrName, ErrNotFound)
}
