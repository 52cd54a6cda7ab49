package state

import (
	"errors"
	"fmt"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// ErrQuota: a request would take an owner past a limit.
var ErrQuota = errors.New("over quota")

// Quota bounds what one owner holds (0: no bound): Sandboxes counts every sandbox it has
// (exited ones are replicated state too, until removed), VCPUs and MemoryMiB those not
// over yet.
type Quota struct {
	Sandboxes int `json:"sandboxes,omitempty"`
	VCPUs     int `json:"vcpus,omitempty"`
	MemoryMiB int `json:"memory_mib,omitempty"`
	// DiskMiB bounds the scratch disk the owner's sandboxes not over yet reserve on nodes.
	DiskMiB int `json:"disk_mib,omitempty"`
	// SpecBytes bounds the bytes of all the owner's specs together (SandboxSpec.Bytes):
	// what one token makes every server keep.
	SpecBytes int `json:"spec_bytes,omitempty"`
}

// Bytes is about what the spec takes in the state: its strings.
func (s SandboxSpec) Bytes() int {
	n := len(s.Image) + len(s.WorkingDir) + len(s.User) + len(s.Policy) + len(s.Network) + len(s.Boot) + len(s.Restart)
	n += total(s.Entrypoint) + total(s.Cmd) + total(s.Env) + total(s.InsecureRegistries) + total(s.Constraints)
	n += len(s.Ready) + len(s.OnEnd) + len(s.Template)
	for k, v := range s.Metadata {
		n += len(k) + len(v)
	}
	if s.Group != nil {
		for _, m := range s.Group.Members {
			n += len(m.Name) + len(m.ID) + 24
		}
	}
	return n + 8*len(s.Ports)
}

// check refuses sb when its owner, holding used (sb not included), would pass q.
func (q Quota) check(owner string, used Quota, sb Sandbox) error {
	// Each names the server flag that sets the bound, as the operator would change it.
	switch {
	case q.Sandboxes > 0 && used.Sandboxes+1 > q.Sandboxes:
		return fmt.Errorf("%w: token %s holds %d sandboxes, the most one token may (--max-sandboxes-per-token; remove exited ones with `fireworks rm`)", ErrQuota, owner, used.Sandboxes)
	case q.VCPUs > 0 && used.VCPUs+sb.Spec.VCPUs > q.VCPUs:
		return fmt.Errorf("%w: token %s runs sandboxes with %d vCPUs; %d more would pass its %d (--max-vcpus-per-token)", ErrQuota, owner, used.VCPUs, sb.Spec.VCPUs, q.VCPUs)
	case q.MemoryMiB > 0 && used.MemoryMiB+sb.Spec.MemoryMiB > q.MemoryMiB:
		return fmt.Errorf("%w: token %s runs sandboxes with %d MiB of memory; %d more would pass its %d (--max-memory-per-token)", ErrQuota, owner, used.MemoryMiB, sb.Spec.MemoryMiB, q.MemoryMiB)
	case q.DiskMiB > 0 && used.DiskMiB+sb.Spec.DiskMiB > q.DiskMiB:
		return fmt.Errorf("%w: token %s's sandboxes reserve %d MiB of disk; %d more would pass its %d (--max-disk-per-token)", ErrQuota, owner, used.DiskMiB, sb.Spec.DiskMiB, q.DiskMiB)
	case q.SpecBytes > 0 && used.SpecBytes+sb.Spec.Bytes() > q.SpecBytes:
		return fmt.Errorf("%w: token %s's sandbox specs take %d bytes; this one's %d would pass its %d (--max-spec-bytes-per-token; remove finished sandboxes)", ErrQuota, owner, used.SpecBytes, sb.Spec.Bytes(), q.SpecBytes)
	}
	return nil
}

// Bounds on what one sandbox spec may hold. Every spec is replicated to every server and
// kept for the sandbox's life, so nothing in it may grow without bound; the limits are
// far above what a real command line or environment uses (Linux itself takes at most
// 2 MiB of arguments and environment together, 128 KiB per string).
const (
	MaxImageRefBytes  = 1024
	MaxArgs           = 4096      // entrypoint and cmd together
	MaxArgBytes       = 256 << 10 // entrypoint and cmd together
	MaxEnvEntries     = 4096
	MaxEnvBytes       = 256 << 10
	MaxPathBytes      = 4096 // working dir
	MaxUserBytes      = 256
	MaxRegistries     = 16
	MaxConstraints    = 32
	MaxConstraintSize = 256
	MaxPorts          = 64
	MaxPolicyBytes    = 64 << 10 // as netpolicy.MaxPolicyBytes
	MaxHostBytes      = 255
)

// CheckSizes refuses a spec with a field beyond the bounds above, naming the field.
func (s SandboxSpec) CheckSizes() error {
	var errs []error
	tooBig := func(field string, got, limit int, unit string) {
		errs = append(errs, fmt.Errorf("%w: %s has %d %s, more than %d", ErrInvalid, field, got, unit, limit))
	}
	if len(s.Image) > MaxImageRefBytes {
		tooBig("image", len(s.Image), MaxImageRefBytes, "bytes")
	}
	if n := len(s.Entrypoint) + len(s.Cmd); n > MaxArgs {
		tooBig("command (entrypoint and arguments)", n, MaxArgs, "arguments")
	}
	if n := total(s.Entrypoint) + total(s.Cmd); n > MaxArgBytes {
		tooBig("command (entrypoint and arguments)", n, MaxArgBytes, "bytes")
	}
	if len(s.Env) > MaxEnvEntries {
		tooBig("env", len(s.Env), MaxEnvEntries, "entries")
	}
	if n := total(s.Env); n > MaxEnvBytes {
		tooBig("env", n, MaxEnvBytes, "bytes")
	}
	if len(s.WorkingDir) > MaxPathBytes {
		tooBig("working_dir", len(s.WorkingDir), MaxPathBytes, "bytes")
	}
	if len(s.User) > MaxUserBytes {
		tooBig("user", len(s.User), MaxUserBytes, "bytes")
	}
	if len(s.InsecureRegistries) > MaxRegistries {
		tooBig("insecure_registries", len(s.InsecureRegistries), MaxRegistries, "entries")
	}
	if n := longest(s.InsecureRegistries); n > MaxHostBytes {
		tooBig("insecure_registries entry", n, MaxHostBytes, "bytes")
	}
	if len(s.Constraints) > MaxConstraints {
		tooBig("constraints", len(s.Constraints), MaxConstraints, "entries")
	}
	if n := longest(s.Constraints); n > MaxConstraintSize {
		tooBig("constraints entry", n, MaxConstraintSize, "bytes")
	}
	if len(s.Ports) > MaxPorts {
		tooBig("ports", len(s.Ports), MaxPorts, "entries")
	}
	if err := CheckMetadata(s.Metadata); err != nil {
		errs = append(errs, err)
	}
	if len(s.Template) > maxTemplateName {
		tooBig("template", len(s.Template), maxTemplateName, "bytes")
	}
	if len(s.Policy) > MaxPolicyBytes {
		tooBig("policy", len(s.Policy), MaxPolicyBytes, "bytes")
	}
	if len(s.Network) > 16 {
		tooBig("network", len(s.Network), 16, "bytes")
	}
	if len(s.Boot) > 16 {
		tooBig("boot", len(s.Boot), 16, "bytes")
	}
	if len(s.Restart) > 64 {
		tooBig("restart", len(s.Restart), 64, "bytes")
	}
	if len(s.Volumes) > proto.MaxVolumeMounts {
		tooBig("volumes", len(s.Volumes), proto.MaxVolumeMounts, "entries")
	}
	for _, v := range s.Volumes {
		if len(v.Volume) > 64 {
			tooBig("volumes entry's volume", len(v.Volume), 64, "bytes")
		}
		if len(v.Path) > proto.MaxVolumePath {
			tooBig("volumes entry's path", len(v.Path), proto.MaxVolumePath, "bytes")
		}
	}
	return errors.Join(errs...)
}

func longest(ss []string) int {
	n := 0
	for _, s := range ss {
		n = max(n, len(s))
	}
	return n
}

func total(ss []string) int {
	n := 0
	for _, s := range ss {
		n += len(s)
	}
	return n
}
