package cli

import "testing"

func TestParseMemory(t *testing.T) {
	for in, want := range map[string]int{"512": 512, "512M": 512, "512mib": 512, "2G": 2048, "1GiB": 1024, "1T": 1 << 20, "1TiB": 1 << 20, "": 0} {
		if got, err := parseMemory(in); err != nil || got != want {
			t.Errorf("parseMemory(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"2T", "1048577", "0", "-1G", "lots", "1.5G", "9999999999999999999G"} {
		if got, err := parseMemory(in); err == nil {
			t.Errorf("parseMemory(%q) = %d, want an error", in, got)
		}
	}
}

func TestUsedOf(t *testing.T) {
	for _, c := range []struct {
		used, sched, capacity int64
		want                  string
	}{{5, 8, 2, "5/8 (2 x4)"}, {512, 4096, 4096, "512/4096"}, {1, 0, 2, "1/2"}} {
		if got := usedOf(c.used, c.sched, c.capacity); got != c.want {
			t.Errorf("usedOf(%d, %d, %d) = %q, want %q", c.used, c.sched, c.capacity, got, c.want)
		}
	}
}
