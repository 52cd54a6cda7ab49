package cli

import "testing"

func TestPrintableStripsEscapes(t *testing.T) {
	if got := printable("ok\n\x1b[2Jcleared\x07\tdone\u009b"); got != "ok\n?[2Jcleared?\tdone?" {
		t.Errorf("printable = %q", got)
	}
}
