package cli

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/fireworks-sandbox/fireworks/internal/node/agent"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// warmFlags are a node's own template and warm-pool settings (dev and agent).
type warmFlags struct {
	templateDiskMiB, imageDiskMiB, imageMiBPerToken, logMiBPerToken, savedDiskMiB int
	tcgCacheMiB                                                                   int
	pools                                                                         []string
}

func (w *warmFlags) register(fl *pflag.FlagSet) {
	fl.IntVar(&w.templateDiskMiB, "template-disk-mib", 8192, "disk space for template snapshots, MiB; the least recently used are removed past it")
	fl.IntVar(&w.savedDiskMiB, "saved-disk-mib", 65536, "disk space for paused sandboxes' saved states and snapshots on this node together, MiB; a pause or snapshot that would pass it is refused")
	fl.IntVar(&w.logMiBPerToken, "log-mib-per-token", 4096, "stored output of one token's sandboxes on this node together, MiB; past it their output is discarded until finished ones are removed")
	fl.IntVar(&w.imageDiskMiB, "image-disk-mib", 32768, "disk space for images (layers and root disks), MiB; the least recently used that nothing runs from are removed past it")
	fl.IntVar(&w.imageMiBPerToken, "image-mib-per-token", 16384, "disk space the images one user token pulled or ran may take on this node, MiB; past it that token's least recently used images go first, then its pull fails")
	fl.IntVar(&w.tcgCacheMiB, "tcg-cache-mib", agent.DefaultTCGCacheMiB, "under TCG: each VM's translation cache, MiB (QEMU's tb-size; its own default is 1024); most of an idle VM's memory, and re-translation costs CPU-bound guests time when it is too small")
	fl.StringArrayVar(&w.pools, "warm-pool", nil, "keep warm VMs of an image on this node: IMAGE=SIZE[:MAX] (repeatable; 'fireworks pool set' overrides it cluster-wide)")
}

func (w *warmFlags) apply(cfg *agent.Config) error {
	if w.templateDiskMiB < 1 {
		return fmt.Errorf("--template-disk-mib %d: want at least 1", w.templateDiskMiB)
	}
	if w.imageDiskMiB < 1 {
		return fmt.Errorf("--image-disk-mib %d: want at least 1", w.imageDiskMiB)
	}
	if w.imageMiBPerToken < 1 {
		return fmt.Errorf("--image-mib-per-token %d: want at least 1", w.imageMiBPerToken)
	}
	if w.savedDiskMiB < 1 {
		return fmt.Errorf("--saved-disk-mib %d: want at least 1", w.savedDiskMiB)
	}
	if w.logMiBPerToken < 1 {
		return fmt.Errorf("--log-mib-per-token %d: want at least 1", w.logMiBPerToken)
	}
	cfg.TemplateDiskMiB, cfg.ImageDiskMiB, cfg.ImageMiBPerOwner = w.templateDiskMiB, w.imageDiskMiB, w.imageMiBPerToken
	cfg.MaxLogBytesPerOwner = int64(w.logMiBPerToken) << 20
	cfg.SavedDiskMiB = w.savedDiskMiB
	if w.tcgCacheMiB < 1 || w.tcgCacheMiB > 4096 {
		return fmt.Errorf("--tcg-cache-mib %d: want 1 to 4096", w.tcgCacheMiB)
	}
	cfg.TCGCacheMiB = w.tcgCacheMiB
	for _, p := range w.pools {
		pool, err := parseWarmPool(p)
		if err != nil {
			return err
		}
		cfg.Pools = append(cfg.Pools, pool)
	}
	return nil
}

// parseWarmPool reads IMAGE=SIZE[:MAX]. The image may contain ':' and '=' is the last one.
func parseWarmPool(s string) (state.Pool, error) {
	i := strings.LastIndex(s, "=")
	if i <= 0 {
		return state.Pool{}, fmt.Errorf("--warm-pool %q: want IMAGE=SIZE[:MAX]", s)
	}
	img, sizes := localImageRef(s[:i]), s[i+1:]
	sz, mx, hasMax := strings.Cut(sizes, ":")
	size, err := strconv.Atoi(sz)
	if err != nil || size < 0 || size > state.MaxPoolSize {
		return state.Pool{}, fmt.Errorf("--warm-pool %q: size %q is not a number in 0..%d", s, sz, state.MaxPoolSize)
	}
	max := size
	if hasMax {
		if max, err = strconv.Atoi(mx); err != nil || max < size || max > state.MaxPoolSize {
			return state.Pool{}, fmt.Errorf("--warm-pool %q: max %q is not a number in %d..%d", s, mx, size, state.MaxPoolSize)
		}
	}
	return state.Pool{Image: img, Size: size, Max: max}, nil
}
