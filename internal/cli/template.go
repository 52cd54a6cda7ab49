package cli

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	gcrname "github.com/google/go-containerregistry/pkg/name"
	"github.com/spf13/cobra"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// newTemplateCmd: named templates, what E2B's template IDs name.
func newTemplateCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "template", Short: "Named templates: an image and a VM shape, registered under a name (E2B's templateID)"}
	var (
		memory, disk string
		cpus         int
		env          []string
		replace      bool
	)
	register := func(ctx context.Context, name, image string) error {
		t := &pb.NamedTemplate{Name: name, Image: image, Vcpus: int32(cpus), Env: env}
		if memory != "" {
			mib, err := parseMemory(memory)
			if err != nil {
				return fmt.Errorf("--memory: %w", err)
			}
			t.MemoryMib = int32(mib)
		}
		if disk != "" {
			mib, err := parseMemory(disk)
			if err != nil {
				return fmt.Errorf("--disk: %w", err)
			}
			t.DiskMib = int32(mib)
		}
		c, err := g.client()
		if err != nil {
			return err
		}
		r, err := c.Templates.CreateTemplate(ctx, connect.NewRequest(&pb.CreateTemplateRequest{Template: t, Replace: replace}))
		if err != nil {
			return err
		}
		fmt.Fprintf(g.stdout, "%s\t%s\t%s\n", printable(r.Msg.GetTemplate().GetName()), r.Msg.GetTemplate().GetId(), printable(image))
		return nil
	}
	shape := func(c *cobra.Command) {
		c.Flags().IntVar(&cpus, "cpus", 0, "vCPUs of its sandboxes (default: the node's default)")
		c.Flags().StringVar(&memory, "memory", "", "memory of its sandboxes, e.g. 512M or 2G")
		c.Flags().StringVar(&disk, "disk", "", "scratch disk of its sandboxes, e.g. 2G")
		c.Flags().StringArrayVarP(&env, "env", "e", nil, "environment variable KEY=VALUE of its sandboxes (repeatable)")
		c.Flags().BoolVar(&replace, "replace", false, "replace this token's template of the same name")
	}
	create := &cobra.Command{
		Use:   "create NAME IMAGE",
		Short: "Register IMAGE (any reference `run` takes) as template NAME",
		Args:  cobra.ExactArgs(2),
		RunE:  func(cmd *cobra.Command, args []string) error { return register(cmd.Context(), args[0], args[1]) },
	}
	shape(create)

	var file, out, push string
	tlsVerify := true
	build := &cobra.Command{
		Use:   "build NAME -f Dockerfile [CONTEXT] [--push REGISTRY/REPO:TAG]",
		Short: "Build an image from a Dockerfile with buildah (no Docker daemon) and register it as template NAME",
		Long: `Build an image from a Dockerfile with buildah (Debian's, run as root: chroot isolation,
vfs storage; no Docker daemon), then register it as template NAME.

The Dockerfile's RUN steps run on THIS machine, as root, isolated by a chroot only, which is
not a security boundary: build only Dockerfiles (and FROM images) you trust.

Where the image goes:

  --push REF   push it to a registry and register REF (any token; the nodes pull it)
  (default)    write an OCI layout directory (--out) and register oci:DIR: an admin's
               token only (the node reads the directory from its own disk; on
               ` + "`fireworks dev`" + ` that is this machine)`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return errors.New("-f Dockerfile is required")
			}
			if !state.ValidTemplateName(args[0]) {
				return fmt.Errorf("template name %q: letters, digits, '-', '_', '.' and '/' (no empty, . or .. parts), 1 to 128 of them", args[0])
			}
			bctx := "."
			if len(args) == 2 {
				bctx = args[1]
			}
			dir := out
			if dir == "" {
				// One directory per name ("team" and "team/name" apart).
				dir = filepath.Join(DefaultDataDir(), "built-templates", url.PathEscape(args[0]))
			}
			ref, err := buildahBuild(cmd.Context(), g, args[0], file, bctx, dir, push, tlsVerify)
			if err != nil {
				return err
			}
			replace = true
			return register(cmd.Context(), args[0], ref)
		},
	}
	build.Flags().StringVarP(&file, "file", "f", "", "the Dockerfile")
	build.Flags().StringVar(&out, "out", "", "OCI layout directory to write (default: DATA_DIR/built-templates/NAME)")
	build.Flags().StringVar(&push, "push", "", "push the image to this registry reference and register that (instead of a local OCI layout)")
	build.Flags().BoolVar(&tlsVerify, "tls-verify", true, "with --push: require HTTPS and a verified certificate from the registry")
	shape(build)

	ls := &cobra.Command{
		Use:   "ls",
		Short: "List this token's templates",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := c.Templates.ListNamedTemplates(cmd.Context(), connect.NewRequest(&pb.ListNamedTemplatesRequest{}))
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(g.stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tID\tIMAGE\tCPUS\tMEMORY\tCREATED")
			for _, t := range r.Msg.GetTemplates() {
				mem := "-"
				if t.GetMemoryMib() > 0 {
					mem = fmt.Sprintf("%dM", t.GetMemoryMib())
				}
				cpu := "-"
				if t.GetVcpus() > 0 {
					cpu = fmt.Sprint(t.GetVcpus())
				}
				img := printable(t.GetImage())
				if t.GetSnapshot() != "" {
					img = "snapshot " + short(t.GetSnapshot()) + " of " + img // an E2B build's
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", printable(t.GetName()), short(t.GetId()), img, cpu, mem,
					t.GetCreatedAt().AsTime().Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	rm := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove templates (sandboxes started from them run on)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			var errs []error
			for _, a := range args {
				if _, err := c.Templates.DeleteTemplate(cmd.Context(), connect.NewRequest(&pb.DeleteTemplateRequest{Template: a})); err != nil {
					errs = append(errs, err)
					continue
				}
				fmt.Fprintln(g.stdout, printable(a))
			}
			return errors.Join(errs...)
		},
	}
	cmd.AddCommand(create, build, ls, rm)
	return cmd
}

// buildahBuild builds dockerfile in bctx with buildah, pushes it to push (if set) or
// writes it into the OCI layout dir, and returns the image reference. buildah's storage
// is a directory of its own, removed afterwards: nothing of the build stays behind but
// the image.
func buildahBuild(ctx context.Context, g *globals, name, dockerfile, bctx, dir, push string, tlsVerify bool) (string, error) {
	if _, err := exec.LookPath("buildah"); err != nil {
		return "", errors.New("template build needs buildah (Debian: apt-get install buildah; scripts/install-deps.sh installs it)")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	// Each build is a new tag of the layout, beside the earlier ones (the template's
	// earlier sandboxes and snapshots name those): the directory is written to only if it
	// is one, or empty, or new. Checked before a build that may take minutes.
	if push == "" {
		if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
			if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
				return "", fmt.Errorf("--out %s: not empty and not an OCI layout; refusing to write into it", dir)
			}
		}
	}
	store, err := os.MkdirTemp("", "fireworks-buildah-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(store)
	common := []string{"--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "run"), "--storage-driver", "vfs"}
	tag := "localhost/fireworks-template-build:latest"
	run := func(args ...string) error {
		c := exec.CommandContext(ctx, "buildah", append(append([]string{}, common...), args...)...)
		c.Stdout, c.Stderr = g.stderr, g.stderr
		if err := c.Run(); err != nil {
			return fmt.Errorf("buildah %s: %w", args[0], err)
		}
		return nil
	}
	if err := run("bud", "--isolation", "chroot", "--layers=false", "-f", dockerfile, "-t", tag, bctx); err != nil {
		return "", err
	}
	// The template names exactly this build (a digest, a new tag): nodes keep images by
	// reference, so a rebuild under the old reference would start the old image.
	if push != "" {
		r, err := gcrname.ParseReference(push)
		if err != nil {
			return "", fmt.Errorf("--push %s: %w", push, err)
		}
		digestFile := filepath.Join(store, "digest")
		if err := run("push", "--tls-verify="+strconv.FormatBool(tlsVerify), "--digestfile", digestFile, tag, "docker://"+push); err != nil {
			return "", err
		}
		d, err := os.ReadFile(digestFile)
		if err != nil {
			return "", fmt.Errorf("buildah push left no digest: %w", err)
		}
		ref := r.Context().Name() + "@" + strings.TrimSpace(string(d))
		fmt.Fprintf(g.stderr, "built %s and pushed it to %s (%s)\n", name, push, ref)
		return ref, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", err
	}
	build := "build-" + time.Now().UTC().Format("20060102t150405.000000000z")
	if err := run("push", tag, "oci:"+dir+":"+build); err != nil {
		return "", err
	}
	fmt.Fprintf(g.stderr, "built %s into %s\n", name, dir)
	return "oci:" + dir + ":" + build, nil
}
