package scheduler

import (
	"fmt"
	"strings"
)

// Op is how a constraint compares a node label.
type Op string

const (
	// OpEq: the node has the label with exactly this value.
	OpEq Op = "=="
	// OpNe: the node does not have the label with this value. A node without the
	// label satisfies it (like Nomad's "!="): `gpu!=true` means "not a GPU node".
	OpNe Op = "!="
	// OpExists: the node has the label, whatever its value.
	OpExists Op = "exists"
	// OpNotExists: the node does not have the label.
	OpNotExists Op = "not-exists"
)

// Constraint is a selector over node labels, from `--constraint` strings.
type Constraint struct {
	Key   string
	Op    Op
	Value string // only for OpEq and OpNe
}

const constraintSyntax = "want KEY==VALUE, KEY!=VALUE, KEY (label present) or !KEY (label absent)"

// ParseConstraint reads the CLI form of a constraint:
//
//	zone==a   the label zone is "a" (a single "=" is accepted too)
//	gpu!=true the label gpu is not "true" (or absent)
//	ssd       the label ssd is present
//	!ssd      the label ssd is absent
//
// Spaces around the key and value are ignored.
func ParseConstraint(s string) (Constraint, error) {
	in := strings.TrimSpace(s)
	bad := func(format string, args ...any) (Constraint, error) {
		return Constraint{}, fmt.Errorf("constraint %q: %s (%s)", s, fmt.Sprintf(format, args...), constraintSyntax)
	}
	if in == "" {
		return bad("empty")
	}
	var c Constraint
	var op string
	switch {
	case strings.Contains(in, "!="):
		op, c.Op = "!=", OpNe
	case strings.Contains(in, "=="):
		op, c.Op = "==", OpEq
	case strings.Contains(in, "="):
		op, c.Op = "=", OpEq
	case strings.HasPrefix(in, "!"):
		c.Op, c.Key = OpNotExists, strings.TrimSpace(in[1:])
	default:
		c.Op, c.Key = OpExists, in
	}
	if op != "" {
		k, v, _ := strings.Cut(in, op)
		c.Key, c.Value = strings.TrimSpace(k), strings.TrimSpace(v)
		if c.Value == "" {
			return bad("missing value after %q", op)
		}
		if strings.ContainsAny(c.Value, "=") {
			return bad("value %q contains '='", c.Value)
		}
		if strings.ContainsFunc(c.Value, isSpaceOrControl) {
			return bad("value %q contains whitespace or control characters", c.Value)
		}
	}
	if err := checkKey(c.Key); err != nil {
		return bad("%v", err)
	}
	return c, nil
}

// checkKey accepts label keys like "zone" or "node.kubernetes.io/instance-type".
func checkKey(k string) error {
	if k == "" {
		return fmt.Errorf("missing label key")
	}
	for i, r := range k {
		alnum := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
		if i == 0 && !alnum {
			return fmt.Errorf("label key %q must start with a letter or digit", k)
		}
		if !alnum && r != '.' && r != '_' && r != '-' && r != '/' {
			return fmt.Errorf("label key %q has invalid character %q (allowed: letters, digits, . _ - /)", k, r)
		}
	}
	return nil
}

func isSpaceOrControl(r rune) bool { return r <= ' ' || r == 0x7f }

// Validate reports a constraint that could not have come from ParseConstraint.
func (c Constraint) Validate() error {
	if err := checkKey(c.Key); err != nil {
		return fmt.Errorf("constraint %s: %w", c, err)
	}
	switch c.Op {
	case OpEq, OpNe:
		if c.Value == "" {
			return fmt.Errorf("constraint %s: empty value", c)
		}
	case OpExists, OpNotExists:
	default:
		return fmt.Errorf("constraint on %q: unknown operator %q", c.Key, c.Op)
	}
	return nil
}

// String is the CLI form, which ParseConstraint reads back.
func (c Constraint) String() string {
	switch c.Op {
	case OpExists:
		return c.Key
	case OpNotExists:
		return "!" + c.Key
	default:
		return c.Key + string(c.Op) + c.Value
	}
}

// Matches reports whether a node with these labels satisfies the constraint.
func (c Constraint) Matches(labels map[string]string) bool {
	v, ok := labels[c.Key]
	switch c.Op {
	case OpEq:
		return ok && v == c.Value
	case OpNe:
		return !ok || v != c.Value
	case OpExists:
		return ok
	case OpNotExists:
		return !ok
	}
	return false
}
