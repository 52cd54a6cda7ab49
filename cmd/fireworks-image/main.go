// Command fireworks-image builds the Fireworks container image (the one the Helm chart
// runs) without a Docker daemon, as a docker-archive tar: see internal/release/nodeimage.
//
//	go run ./cmd/fireworks-image --out bin/fireworks-image.tar
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/fireworks-sandbox/fireworks/internal/release/nodeimage"
	"github.com/fireworks-sandbox/fireworks/internal/shared/version"
)

func main() {
	bin := flag.String("bin", "bin", "directory with the built fireworks, fireworks-init and fireworks-volume-server")
	cache := flag.String("cache", "/var/cache/fireworks/nodeimage", "cache of the Debian base root and the guest kernel")
	tag := flag.String("tag", "fireworks:"+version.Version, "image reference to tag the archive with")
	out := flag.String("out", "bin/fireworks-image.tar", "docker-archive tar to write")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	img, err := nodeimage.Build(ctx, nodeimage.Options{BinDir: *bin, CacheDir: *cache, Version: version.Version, Log: log})
	if err == nil {
		err = nodeimage.WriteArchive(*out, *tag, img)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fireworks-image:", err)
		os.Exit(1)
	}
	d, _ := img.Digest()
	fmt.Printf("%s %s %s\n", *out, *tag, d)
}
