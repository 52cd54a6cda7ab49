package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// Metadata keys the controller puts on the Fireworks sandboxes it makes, so that one can
// be traced back to its object (and the controller's own sweep finds its sandboxes).
const (
	MetaNamespace = "k8s.namespace"
	MetaName      = "k8s.name"
	MetaUID       = "k8s.uid"
	MetaKind      = "k8s.kind"
)

// errUnsupported marks a spec Fireworks cannot run as written: the object's Ready
// condition says so, and it is not retried until the object changes.
var errUnsupported = errors.New("unsupported")

func unsupported(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUnsupported, fmt.Sprintf(format, args...))
}

// Bounds on what one object may ask of Fireworks (the API bounds them again).
const (
	maxEnv       = 256
	maxEnvBytes  = 128 << 10
	maxPorts     = 32
	maxArgsBytes = 64 << 10
)

// lookup reads a key of a Secret or ConfigMap in the object's namespace, for env's
// valueFrom and envFrom; optional says a missing one is not an error.
type lookup interface {
	secret(ctx context.Context, name string) (map[string][]byte, error)
	configMap(ctx context.Context, name string) (map[string]string, error)
}

// specFromPod turns a pod template into a Fireworks sandbox spec. Fireworks runs the
// pod's one container in a microVM: image, command/args (Kubernetes' meaning: command
// replaces the image's entrypoint, args its cmd), env and envFrom, workingDir,
// runAsUser/runAsGroup, ports (published at the edge, private: the sandbox's access
// token opens them), resources (limits, else requests: cpu → vCPUs rounded up, memory →
// MiB) and restartPolicy. What a VM cannot honour the way a pod would is refused, not
// ignored: more than one container, init containers, and volumes (Fireworks volumes are
// its own API).
func specFromPod(ctx context.Context, pt agentsv1.PodTemplate, meta objectRef, look lookup) (*pb.SandboxSpec, error) {
	ps := pt.Spec
	switch {
	case len(ps.Containers) == 0:
		return nil, unsupported("the pod template has no container")
	case len(ps.Containers) > 1:
		return nil, unsupported("the pod template has %d containers; a Fireworks sandbox runs one (use one Sandbox per container)", len(ps.Containers))
	case len(ps.InitContainers) > 0:
		return nil, unsupported("init containers are not run by Fireworks (%s): run that step in the container's command", ps.InitContainers[0].Name)
	case len(ps.Volumes) > 0:
		return nil, unsupported("pod volumes are not mounted in a microVM (%s)", ps.Volumes[0].Name)
	}
	c := ps.Containers[0]
	if c.Image == "" {
		return nil, unsupported("container %s has no image", c.Name)
	}
	if strings.HasPrefix(c.Image, "oci:") || strings.HasPrefix(c.Image, "docker-archive:") {
		// Paths on the nodes: a user's pull takes registry images only.
		return nil, unsupported("image %q is a path on the nodes: a Sandbox's image comes from a registry", c.Image)
	}
	spec := &pb.SandboxSpec{Image: c.Image, WorkingDir: c.WorkingDir, Tty: c.TTY, Stdin: c.Stdin}
	if len(c.Command) > 0 {
		spec.Entrypoint, spec.EntrypointSet = c.Command, true
	}
	spec.Cmd = c.Args
	if n := argsBytes(c.Command) + argsBytes(c.Args); n > maxArgsBytes {
		return nil, unsupported("command and args are %d bytes, more than %d", n, maxArgsBytes)
	}
	env, err := envOf(ctx, c, meta, look)
	if err != nil {
		return nil, err
	}
	spec.Env = env
	if u, err := userOf(ps.SecurityContext, c.SecurityContext); err != nil {
		return nil, err
	} else {
		spec.User = u
	}
	if spec.NonRoot = nonRootOf(ps.SecurityContext, c.SecurityContext); spec.NonRoot && (spec.User == "0" || strings.HasPrefix(spec.User, "0:")) {
		// As the kubelet refuses it: the two settings contradict each other.
		return nil, unsupported("runAsNonRoot with runAsUser 0")
	}
	if spec.Vcpus, spec.MemoryMib, err = shapeOf(c.Resources); err != nil {
		return nil, err
	}
	if len(c.Ports) > maxPorts {
		return nil, unsupported("%d ports, more than %d", len(c.Ports), maxPorts)
	}
	for _, p := range c.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			return nil, unsupported("port %d/%s: the edge carries TCP (HTTP) only", p.ContainerPort, p.Protocol)
		}
		if p.ContainerPort <= 0 || p.ContainerPort > 65535 {
			return nil, unsupported("port %d is out of range", p.ContainerPort)
		}
		spec.Ports = append(spec.Ports, &pb.Port{Port: uint32(p.ContainerPort)})
	}
	switch ps.RestartPolicy {
	case corev1.RestartPolicyAlways, "":
		spec.Restart = "always"
	case corev1.RestartPolicyOnFailure:
		spec.Restart = "on-failure"
	case corev1.RestartPolicyNever:
		spec.Restart = "never"
	default:
		return nil, unsupported("restartPolicy %q: want Always, OnFailure or Never", ps.RestartPolicy)
	}
	spec.Metadata = map[string]string{MetaNamespace: meta.namespace, MetaName: meta.name, MetaUID: meta.uid, MetaKind: meta.kind}
	return spec, nil
}

func argsBytes(a []string) int {
	n := 0
	for _, s := range a {
		n += len(s)
	}
	return n
}

// objectRef is the Kubernetes object a sandbox stands for.
type objectRef struct {
	kind, namespace, name, uid string
}

func envOf(ctx context.Context, c corev1.Container, meta objectRef, look lookup) ([]string, error) {
	var out []string
	size := 0
	add := func(k, v string) error {
		size += len(k) + len(v) + 1
		if len(out) >= maxEnv || size > maxEnvBytes {
			return unsupported("more than %d environment variables or %d bytes of them", maxEnv, maxEnvBytes)
		}
		out = append(out, k+"="+v)
		return nil
	}
	for _, from := range c.EnvFrom {
		switch {
		case from.SecretRef != nil:
			data, err := look.secret(ctx, from.SecretRef.Name)
			if err != nil {
				if optional(from.SecretRef.Optional) && isNotFound(err) {
					continue
				}
				return nil, fmt.Errorf("envFrom secret %s: %w", from.SecretRef.Name, err)
			}
			for k, v := range data {
				if err := add(from.Prefix+k, string(v)); err != nil {
					return nil, err
				}
			}
		case from.ConfigMapRef != nil:
			data, err := look.configMap(ctx, from.ConfigMapRef.Name)
			if err != nil {
				if optional(from.ConfigMapRef.Optional) && isNotFound(err) {
					continue
				}
				return nil, fmt.Errorf("envFrom configMap %s: %w", from.ConfigMapRef.Name, err)
			}
			for k, v := range data {
				if err := add(from.Prefix+k, v); err != nil {
					return nil, err
				}
			}
		}
	}
	for _, e := range c.Env {
		v := e.Value
		if f := e.ValueFrom; f != nil {
			switch {
			case f.SecretKeyRef != nil:
				data, err := look.secret(ctx, f.SecretKeyRef.Name)
				if err != nil && !(optional(f.SecretKeyRef.Optional) && isNotFound(err)) {
					return nil, fmt.Errorf("env %s: secret %s: %w", e.Name, f.SecretKeyRef.Name, err)
				}
				b, ok := data[f.SecretKeyRef.Key]
				if !ok {
					if optional(f.SecretKeyRef.Optional) {
						continue
					}
					return nil, fmt.Errorf("env %s: secret %s has no key %s", e.Name, f.SecretKeyRef.Name, f.SecretKeyRef.Key)
				}
				v = string(b)
			case f.ConfigMapKeyRef != nil:
				data, err := look.configMap(ctx, f.ConfigMapKeyRef.Name)
				if err != nil && !(optional(f.ConfigMapKeyRef.Optional) && isNotFound(err)) {
					return nil, fmt.Errorf("env %s: configMap %s: %w", e.Name, f.ConfigMapKeyRef.Name, err)
				}
				s, ok := data[f.ConfigMapKeyRef.Key]
				if !ok {
					if optional(f.ConfigMapKeyRef.Optional) {
						continue
					}
					return nil, fmt.Errorf("env %s: configMap %s has no key %s", e.Name, f.ConfigMapKeyRef.Name, f.ConfigMapKeyRef.Key)
				}
				v = s
			case f.FieldRef != nil:
				switch f.FieldRef.FieldPath {
				case "metadata.name":
					v = meta.name
				case "metadata.namespace":
					v = meta.namespace
				case "metadata.uid":
					v = meta.uid
				default:
					return nil, unsupported("env %s: fieldRef %s (metadata.name, metadata.namespace and metadata.uid are known)", e.Name, f.FieldRef.FieldPath)
				}
			default:
				return nil, unsupported("env %s: only value, secretKeyRef, configMapKeyRef and fieldRef are known", e.Name)
			}
		}
		if err := add(e.Name, v); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func optional(b *bool) bool { return b != nil && *b }

// userOf is the container's user as Fireworks (and Docker) write it: uid[:gid].
func userOf(pod *corev1.PodSecurityContext, c *corev1.SecurityContext) (string, error) {
	var uid, gid *int64
	if pod != nil {
		uid, gid = pod.RunAsUser, pod.RunAsGroup
	}
	if c != nil {
		if c.RunAsUser != nil {
			uid = c.RunAsUser
		}
		if c.RunAsGroup != nil {
			gid = c.RunAsGroup
		}
	}
	switch {
	case uid == nil && gid == nil:
		return "", nil
	case uid == nil:
		return "", unsupported("runAsGroup without runAsUser")
	case *uid < 0 || *uid > math.MaxUint32 || (gid != nil && (*gid < 0 || *gid > math.MaxUint32)):
		return "", unsupported("runAsUser/runAsGroup out of range")
	case gid == nil:
		return strconv.FormatInt(*uid, 10), nil
	default:
		return strconv.FormatInt(*uid, 10) + ":" + strconv.FormatInt(*gid, 10), nil
	}
}

// nonRootOf is runAsNonRoot, the container's over the pod's. The guest enforces it when
// it starts the command: the user (runAsUser, else the image's) must resolve to a uid
// other than 0 — checked after name lookup in the image's /etc/passwd, where the kubelet
// refuses a non-numeric image user it cannot check.
func nonRootOf(pod *corev1.PodSecurityContext, c *corev1.SecurityContext) bool {
	if c != nil && c.RunAsNonRoot != nil {
		return *c.RunAsNonRoot
	}
	return pod != nil && pod.RunAsNonRoot != nil && *pod.RunAsNonRoot
}

// shapeOf reads the VM's shape from the container's resources: limits first (what the
// container may use is what the VM has), else requests; 0 leaves Fireworks' default.
func shapeOf(r corev1.ResourceRequirements) (vcpus, memMiB int32, err error) {
	pick := func(name corev1.ResourceName) (resource.Quantity, bool) {
		if q, ok := r.Limits[name]; ok {
			return q, true
		}
		q, ok := r.Requests[name]
		return q, ok
	}
	if q, ok := pick(corev1.ResourceCPU); ok {
		m := q.MilliValue()
		if m <= 0 || m > 64_000 {
			return 0, 0, unsupported("cpu %s: want more than 0 and at most 64", q.String())
		}
		vcpus = int32((m + 999) / 1000)
	}
	if q, ok := pick(corev1.ResourceMemory); ok {
		b := q.Value()
		if b < 64<<20 || b > 256<<30 {
			return 0, 0, unsupported("memory %s: want 64Mi to 256Gi", q.String())
		}
		memMiB = int32((b + (1<<20 - 1)) >> 20)
	}
	return vcpus, memMiB, nil
}

// fireworksName is the Fireworks name of an object's sandbox or template: readable (it
// starts with the object's name) and unique (a hash of the object's UID, so an object
// deleted and made again never meets its predecessor's sandbox).
func fireworksName(prefix, name, uid string) string {
	h := sha256.Sum256([]byte(uid))
	suffix := hex.EncodeToString(h[:])[:10]
	var b strings.Builder
	for _, r := range strings.ToLower(prefix + name) {
		switch {
		case r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	base := strings.Trim(b.String(), "-")
	if len(base) > 63-len(suffix)-3 {
		base = strings.TrimRight(base[:63-len(suffix)-3], "-")
	}
	if base == "" {
		base = "sandbox"
	}
	// "k" keeps the name from being all hex digits (which Fireworks refuses: it could
	// shadow an ID).
	return base + "-k" + suffix
}
