package cli

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/spf13/cobra"

	"github.com/fireworks-sandbox/fireworks/internal/node/image/busybox"
)

// newDemoImageCmd writes the quickstart's image: no registry can be reached from these
// machines, so the demo builds its image from Debian's busybox-static and runs it from an
// OCI layout directory (`fireworks run oci:DIR`).
func newDemoImageCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:    "demo-image DIR",
		Short:  "Write a small busybox OCI image (from the host's busybox-static) into an OCI layout directory",
		Args:   cobra.ExactArgs(1),
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := args[0]
			img, err := busybox.Image(busybox.Cmd("sh"))
			if err != nil {
				return fmt.Errorf("build demo image: %w", err)
			}
			// Start from a clean layout so repeated runs do not pile up manifests, but never
			// delete a directory that is something else.
			if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
				if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
					return fmt.Errorf("%s exists and is not an OCI layout; refusing to replace it", dir)
				}
			}
			if err := os.RemoveAll(dir); err != nil {
				return fmt.Errorf("clear %s: %w", dir, err)
			}
			p, err := layout.Write(dir, empty.Index)
			if err != nil {
				return fmt.Errorf("create OCI layout %s: %w", dir, err)
			}
			if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "latest"})); err != nil {
				return fmt.Errorf("write demo image to %s: %w", dir, err)
			}
			fmt.Fprintf(g.stdout, "oci:%s\n", dir)
			return nil
		},
	}
}
