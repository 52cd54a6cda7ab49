package cli

import (
	"strings"
	"testing"
)

func TestPrintableStripsEscapes(t *testing.T) {
	if got := printable("ok\n\x1b[2Jcleared\x07\tdone\u009b"); got != "ok\n?[2Jcleared?\tdone?" {
		t.Errorf("printable = %q", got)
	}
}

func TestPrintableStripsFormatCharacters(t *testing.T) {
	if got := printable("abc\u202edcba\u200b!"); got != "abc?dcba?!" {
		t.Errorf("printable = %q", got)
	}
	if got := oneLine("alpine\n1234  victim\tx"); strings.ContainsAny(got, "\n\t") {
		t.Errorf("oneLine = %q", got)
	}
}
