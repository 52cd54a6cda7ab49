package scheduler

import (
	"strings"
	"testing"
)

func TestParseConstraint(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Constraint
	}{
		{"zone==a", Constraint{"zone", OpEq, "a"}},
		{"zone=a", Constraint{"zone", OpEq, "a"}},
		{" zone == a ", Constraint{"zone", OpEq, "a"}},
		{"gpu!=true", Constraint{"gpu", OpNe, "true"}},
		{"ssd", Constraint{"ssd", OpExists, ""}},
		{"!ssd", Constraint{"ssd", OpNotExists, ""}},
		{"node.kubernetes.io/instance-type==m5.large", Constraint{"node.kubernetes.io/instance-type", OpEq, "m5.large"}},
		{"arch==x86_64", Constraint{"arch", OpEq, "x86_64"}},
	} {
		got, err := ParseConstraint(tc.in)
		if err != nil {
			t.Errorf("ParseConstraint(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseConstraint(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		// The canonical form reads back to the same constraint.
		again, err := ParseConstraint(got.String())
		if err != nil || again != got {
			t.Errorf("round trip of %q via %q = %+v, %v", tc.in, got.String(), again, err)
		}
	}
}

func TestParseConstraintErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "empty"},
		{"   ", "empty"},
		{"zone==", `missing value after "=="`},
		{"zone!=", `missing value after "!="`},
		{"zone=", `missing value after "="`},
		{"==a", "missing label key"},
		{"!", "missing label key"},
		{"zone==a=b", `value "a=b" contains '='`},
		{"zone===a", `value "=a" contains '='`},
		{"zo ne==a", `invalid character ' '`},
		{"zone==a b", "whitespace"},
		{"-zone", "must start with a letter or digit"},
		{"zone<5", `invalid character '<'`},
	} {
		_, err := ParseConstraint(tc.in)
		if err == nil {
			t.Errorf("ParseConstraint(%q) succeeded, want error containing %q", tc.in, tc.want)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, tc.want) || !strings.Contains(msg, "want KEY==VALUE") || !strings.Contains(msg, "constraint \""+tc.in+"\"") {
			t.Errorf("ParseConstraint(%q) error %q: want it to quote the input, contain %q and the syntax", tc.in, msg, tc.want)
		}
	}
}

func TestConstraintMatches(t *testing.T) {
	labels := map[string]string{"zone": "a", "gpu": "false"}
	for _, tc := range []struct {
		c    string
		want bool
	}{
		{"zone==a", true},
		{"zone==b", false},
		{"missing==a", false},
		{"zone!=b", true},
		{"zone!=a", false},
		{"missing!=a", true}, // absent label satisfies != (like Nomad)
		{"gpu!=true", true},
		{"zone", true},
		{"missing", false},
		{"!zone", false},
		{"!missing", true},
	} {
		c, err := ParseConstraint(tc.c)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Matches(labels); got != tc.want {
			t.Errorf("%s on %v = %v, want %v", tc.c, labels, got, tc.want)
		}
	}
	if (Constraint{Key: "zone", Op: "~=", Value: "a"}).Matches(labels) {
		t.Error("unknown operator matched")
	}
}

func TestConstraintValidate(t *testing.T) {
	for _, c := range []Constraint{
		{Key: "zone", Op: "~=", Value: "a"},
		{Key: "", Op: OpExists},
		{Key: "zone", Op: OpEq},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want error", c)
		}
	}
	// Place refuses a request carrying an invalid constraint instead of matching nothing.
	snap := &Snapshot{Nodes: []Node{ready("n1", 4, 4096)}}
	_, err := Place(snap, Config{}, Request{SandboxID: "s", Constraints: []Constraint{{Key: "zone", Op: "~="}}})
	if err == nil || !strings.Contains(err.Error(), `unknown operator "~="`) {
		t.Fatalf("Place with bad constraint: %v", err)
	}
}
