package testutil

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// SharedKiB sums Shared_Clean and Shared_Dirty of process pid's mappings of the files
// whose path match accepts: the pages of them that another process maps too.
func SharedKiB(t testing.TB, pid int, match func(path string) bool) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	total, in := 0, false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			in = len(f) >= 6 && match(f[5])
			continue
		}
		if in && len(f) >= 2 && (f[0] == "Shared_Clean:" || f[0] == "Shared_Dirty:") {
			n, _ := strconv.Atoi(f[1])
			total += n
		}
	}
	return total
}
