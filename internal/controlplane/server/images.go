package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	"connectrpc.com/connect"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
	"github.com/fireworks-sandbox/fireworks/internal/shared/version"
)

type imageService struct{ s *Server }

func (h *imageService) PullImage(ctx context.Context, req *connect.Request[pb.PullImageRequest], stream *connect.ServerStream[pb.PullImageResponse]) error {
	if req.Msg.GetRef() == "" {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("no image reference given"))
	}
	if err := checkImageSource(ctx, req.Msg.GetRef()); err != nil {
		return err
	}
	who, err := caller(ctx)
	if err != nil {
		return err
	}
	if len(req.Msg.GetInsecureRegistries()) > 0 && !who.Admin() {
		// As for a sandbox: plain-HTTP registries make the node connect wherever told.
		return connect.NewError(connect.CodePermissionDenied, errors.New("--insecure-registry needs an admin token"))
	}
	// An admin pulls onto every ready node (or the one named); a user onto one node that
	// takes sandboxes, without learning which: nodes are the operator's, and one user's
	// call must not fill every node's image disk.
	var nodes []string
	if who.Admin() {
		if nodes, err = h.s.targetNodes(req.Msg.GetNode()); err != nil {
			return err
		}
	} else {
		if req.Msg.GetNode() != "" {
			return connect.NewError(connect.CodePermissionDenied, errors.New("--node needs an admin token (a user's pull goes to one node of the cluster's choosing)"))
		}
		if nodes, err = h.s.schedulableNode(); err != nil {
			return err
		}
	}
	// Each node pulls for itself (one after another: a pull's progress is one node's).
	fwd := &pb.PullImageRequest{Ref: req.Msg.GetRef(), InsecureRegistries: req.Msg.GetInsecureRegistries()}
	return h.s.onNodes(ctx, nodes, "pull "+req.Msg.GetRef(), 0, func(ctx context.Context, n *nodeConn) error {
		rs, err := n.images.PullImage(ctx, connect.NewRequest(fwd))
		if err != nil {
			return err
		}
		defer rs.Close()
		for rs.Receive() {
			m := rs.Msg()
			node := n.name // what the node says about itself is not taken for it
			if !who.Admin() {
				node = ""
			}
			if p := m.GetProgress(); p != nil {
				p.Node = node
			}
			if img := m.GetImage(); img != nil {
				img.Node = node
			}
			if err := stream.Send(m); err != nil {
				return connect.NewError(connect.CodeCanceled, err)
			}
		}
		return rs.Err()
	})
}

func (h *imageService) ListImages(ctx context.Context, req *connect.Request[pb.ListImagesRequest]) (*connect.Response[pb.ListImagesResponse], error) {
	// A node's images are every tenant's: which ones it holds is the operator's to see.
	if _, err := requireAdmin(ctx, "listing images"); err != nil {
		return nil, err
	}
	nodes, err := h.s.targetNodes(req.Msg.GetNode())
	if err != nil {
		return nil, err
	}
	resp := &pb.ListImagesResponse{}
	err = h.s.onNodes(ctx, nodes, "list images", nodeCallTimeout, func(ctx context.Context, n *nodeConn) error {
		got, err := n.images.ListImages(ctx, connect.NewRequest(&pb.ListImagesRequest{}))
		if err == nil {
			for _, img := range got.Msg.GetImages() {
				img.Node = n.name
				resp.Images = append(resp.Images, img)
			}
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (h *imageService) RemoveImage(ctx context.Context, req *connect.Request[pb.RemoveImageRequest]) (*connect.Response[pb.RemoveImageResponse], error) {
	// Images are shared by every user's sandboxes on the node.
	if _, err := requireAdmin(ctx, "removing an image"); err != nil {
		return nil, err
	}
	nodes, err := h.s.targetNodes(req.Msg.GetNode())
	if err != nil {
		return nil, err
	}
	// Removed from every node that holds it; "not found" only if none did.
	removed := 0
	var notFound error
	out := &pb.RemoveImageResponse{}
	err = h.s.onNodes(ctx, nodes, "remove image "+req.Msg.GetRef(), nodeCallTimeout, func(ctx context.Context, n *nodeConn) error {
		r, err := n.images.RemoveImage(ctx, connect.NewRequest(&pb.RemoveImageRequest{Ref: req.Msg.GetRef()}))
		switch {
		case err == nil:
			removed++
			out.TemplatesDropped += r.Msg.GetTemplatesDropped()
			out.SandboxesUsing += r.Msg.GetSandboxesUsing()
		case connect.CodeOf(err) == connect.CodeNotFound:
			notFound = err
		default:
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if removed == 0 && notFound != nil {
		return nil, notFound
	}
	return connect.NewResponse(out), nil
}

type systemService struct{ s *Server }

func (h *systemService) Info(ctx context.Context, _ *connect.Request[pb.InfoRequest]) (*connect.Response[pb.InfoResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := h.info(ctx)
	if err == nil && !who.Admin() {
		// What a tenant needs (versions, the accelerator, the largest sandbox shape), not
		// the node's size, its load or where it keeps its data.
		resp.Msg = &pb.InfoResponse{Version: resp.Msg.GetVersion(), Accel: resp.Msg.GetAccel(), KernelRelease: resp.Msg.GetKernelRelease(),
			InitVersion: resp.Msg.GetInitVersion(), QemuVersion: resp.Msg.GetQemuVersion(), MaxVcpus: resp.Msg.GetMaxVcpus(), MaxMemoryMib: resp.Msg.GetMaxMemoryMib()}
	}
	return resp, err
}

// info is the cluster's: its version and nodes, and, with one node (`fireworks dev`),
// that node's own description (its accelerator and why, its guest kernel, init and QEMU
// versions, its data dir), which the node gives.
func (h *systemService) info(ctx context.Context) (*connect.Response[pb.InfoResponse], error) {
	id, _ := h.s.store.Leader()
	var ready []state.Node
	for _, n := range h.s.store.LocalNodes() {
		if n.Status == state.NodeReady {
			ready = append(ready, n)
		}
	}
	if len(ready) == 1 {
		if c, err := h.s.node(ctx, ready[0].ID); err == nil {
			nctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			resp, err := c.system.Info(nctx, connect.NewRequest(&pb.InfoRequest{}))
			cancel()
			if err == nil {
				resp.Msg.Version = version.Version
				return resp, nil
			}
		}
	}
	resp := &pb.InfoResponse{Version: version.Version, Node: fmt.Sprintf("cluster (leader %s, %d nodes ready)", id, len(ready))}
	for _, n := range ready {
		resp.NodeVcpus += int32(n.Capacity.VCPUs)
		resp.NodeMemoryMib += int64(n.Capacity.MemoryMiB)
		resp.MaxVcpus = max(resp.MaxVcpus, int32(n.Capacity.VCPUs))
		resp.MaxMemoryMib = max(resp.MaxMemoryMib, int32(n.Capacity.MemoryMiB))
		if resp.Accel == "" {
			resp.Accel, resp.KernelRelease = n.Accel, n.Kernel
		}
	}
	return connect.NewResponse(resp), nil
}

// checkImageSource keeps local image sources to admins: oci:DIR and docker-archive:FILE are
// read by the server with its own privileges, so a user token must not name server paths.
func checkImageSource(ctx context.Context, ref string) error {
	// No image reference or path has control characters or spaces; refused here, they
	// never reach logs, the audit log or a terminal that shows them.
	if i := strings.IndexFunc(ref, func(r rune) bool { return r <= ' ' || r == 0x7f || unicode.IsControl(r) || unicode.Is(unicode.Cf, r) }); i >= 0 {
		return toConnectError(invalid("image %q: a reference has no spaces or control characters", ref))
	}
	if !strings.HasPrefix(ref, state.OCIPrefix) && !strings.HasPrefix(ref, state.DockerArchivePrefix) {
		return nil
	}
	_, err := requireAdmin(ctx, "a local image source ("+state.OCIPrefix+" or "+state.DockerArchivePrefix+", read from the server's filesystem)")
	return err
}
