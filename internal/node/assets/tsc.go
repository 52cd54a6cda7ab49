package assets

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// FallbackTSCKHz is used when the host TSC frequency cannot be read; it is the value
// measured on the machines this project was first developed on.
const FallbackTSCKHz = 2100000

var tscOnce = sync.OnceValues(detectTSC)

// HostTSCKHz returns the host's TSC frequency in kHz and where it came from. Under TCG the
// guest reads the host TSC, so the guest must be told the host's rate; /proc/cpuinfo's
// "cpu MHz" is the current core clock, not the TSC, so it is not used. Sources, in order:
// /sys/devices/system/cpu/cpu0/tsc_freq_khz (some kernels export it), the kernel log's
// "tsc: Refined TSC clocksource calibration: X MHz" or "tsc: Detected X MHz processor",
// else FallbackTSCKHz.
func HostTSCKHz() (int, string) { return tscOnce() }

var (
	refinedRe  = regexp.MustCompile(`tsc: Refined TSC clocksource calibration: ([0-9]+(?:\.[0-9]+)?) MHz`)
	detectedRe = regexp.MustCompile(`tsc: Detected ([0-9]+(?:\.[0-9]+)?) MHz (?:processor|TSC)`)
)

func detectTSC() (int, string) {
	if b, err := os.ReadFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && v > 0 {
			return v, "sysfs tsc_freq_khz"
		}
	}
	if log := kernelLog(); len(log) > 0 {
		if v := parseTSCLog(log); v > 0 {
			return v, "kernel log"
		}
	}
	return FallbackTSCKHz, "fallback"
}

// parseTSCLog prefers the refined calibration over the early estimate.
func parseTSCLog(log []byte) int {
	for _, re := range []*regexp.Regexp{refinedRe, detectedRe} {
		if m := re.FindAllSubmatch(log, -1); len(m) > 0 {
			mhz, err := strconv.ParseFloat(string(m[len(m)-1][1]), 64)
			if err == nil && mhz > 100 && mhz < 20000 {
				return int(mhz*1000 + 0.5)
			}
		}
	}
	return 0
}

// kernelLog returns the boot messages about the TSC from dmesg, if the caller may read
// them. The boot lines may have rotated out of the ring buffer on a long-running host;
// then the fallback applies.
func kernelLog() []byte {
	out, err := exec.Command("dmesg").Output()
	if err != nil {
		return nil
	}
	var keep bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if bytes.Contains(sc.Bytes(), []byte("tsc: ")) {
			keep.Write(sc.Bytes())
			keep.WriteByte('\n')
		}
	}
	return keep.Bytes()
}
