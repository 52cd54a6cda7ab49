package cli

import (
	"bytes"
	"strings"
	"testing"
)

// A command group refuses a subcommand it does not have (cobra alone prints the help
// and exits 0: `fireworks token rm ID` would seem to have worked).
func TestUnknownSubcommandFails(t *testing.T) {
	for _, args := range [][]string{{"token", "rm", "abc"}, {"node", "remove", "n1"}, {"pool", "delete", "img"}} {
		root, _ := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(args)
		err := root.Execute()
		if err == nil || !strings.Contains(err.Error(), "is not a fireworks "+args[0]+" command") {
			t.Errorf("fireworks %s: %v, want an error naming the unknown subcommand", strings.Join(args, " "), err)
		}
	}
}
