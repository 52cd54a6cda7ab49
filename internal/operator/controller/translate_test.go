package controller

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/runtime/schema"

	agentsv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
)

// mapLookup is a test double of the Kubernetes reads env makes: Secrets and ConfigMaps
// from maps.
type mapLookup struct {
	secrets map[string]map[string][]byte
	cms     map[string]map[string]string
}

func (m mapLookup) secret(_ context.Context, name string) (map[string][]byte, error) {
	if d, ok := m.secrets[name]; ok {
		return d, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, name)
}

func (m mapLookup) configMap(_ context.Context, name string) (map[string]string, error) {
	if d, ok := m.cms[name]; ok {
		return d, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "configmaps"}, name)
}

func pod(c corev1.Container, mut ...func(*corev1.PodSpec)) agentsv1.PodTemplate {
	ps := corev1.PodSpec{Containers: []corev1.Container{c}}
	for _, m := range mut {
		m(&ps)
	}
	return agentsv1.PodTemplate{Spec: ps}
}

func TestSpecFromPod(t *testing.T) {
	yes := true
	look := mapLookup{
		secrets: map[string]map[string][]byte{"s": {"k": []byte("secret-v"), "A": []byte("from-secret")}},
		cms:     map[string]map[string]string{"cm": {"B": "from-cm", "k": "cm-v"}},
	}
	ref := objectRef{kind: "Sandbox", namespace: "ns", name: "n", uid: "u-1"}
	uid, gid := int64(1000), int64(100)
	spec, err := specFromPod(context.Background(), pod(corev1.Container{
		Name: "c", Image: "python:3", Command: []string{"python3"}, Args: []string{"-m", "http.server"},
		WorkingDir: "/srv", TTY: true,
		EnvFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "s"}}, Prefix: "S_"},
			{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}, Optional: &yes}}},
		Env: []corev1.EnvVar{{Name: "PLAIN", Value: "v"},
			{Name: "SEC", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "s"}, Key: "k"}}},
			{Name: "CM", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cm"}, Key: "k"}}},
			{Name: "OPT", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "s"}, Key: "none", Optional: &yes}}},
			{Name: "ME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
		Ports:     []corev1.ContainerPort{{ContainerPort: 8000}},
		Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1500m"), corev1.ResourceMemory: resource.MustParse("1Gi")}, Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m")}},
	}, func(ps *corev1.PodSpec) {
		ps.SecurityContext = &corev1.PodSecurityContext{RunAsUser: &uid, RunAsGroup: &gid, RunAsNonRoot: &yes}
		ps.RestartPolicy = corev1.RestartPolicyOnFailure
	}), ref, look)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Image != "python:3" || !spec.EntrypointSet || !slices.Equal(spec.Entrypoint, []string{"python3"}) || !slices.Equal(spec.Cmd, []string{"-m", "http.server"}) {
		t.Errorf("image/command: %v", spec)
	}
	slices.Sort(spec.Env)
	if want := []string{"CM=cm-v", "ME=n", "PLAIN=v", "SEC=secret-v", "S_A=from-secret", "S_k=secret-v"}; !slices.Equal(spec.Env, want) {
		t.Errorf("env = %v, want %v", spec.Env, want)
	}
	if spec.Vcpus != 2 || spec.MemoryMib != 1024 || spec.User != "1000:100" || !spec.NonRoot || spec.WorkingDir != "/srv" || !spec.Tty || spec.Restart != "on-failure" {
		t.Errorf("shape/user/dir/tty/restart: %v", spec)
	}
	if len(spec.Ports) != 1 || spec.Ports[0].Port != 8000 || spec.Ports[0].Public {
		t.Errorf("ports: %v", spec.Ports)
	}
	if spec.Metadata[MetaName] != "n" || spec.Metadata[MetaNamespace] != "ns" || spec.Metadata[MetaUID] != "u-1" {
		t.Errorf("metadata: %v", spec.Metadata)
	}
	// Without a command the image's entrypoint stays; args alone replace its cmd.
	spec, err = specFromPod(context.Background(), pod(corev1.Container{Name: "c", Image: "i", Args: []string{"x"}}), ref, look)
	if err != nil || spec.EntrypointSet || !slices.Equal(spec.Cmd, []string{"x"}) || spec.Restart != "always" {
		t.Errorf("args only: %v %v", spec, err)
	}

	for _, tc := range []struct {
		name        string
		pt          agentsv1.PodTemplate
		want        string
		unsupported bool
	}{
		{"no container", agentsv1.PodTemplate{}, "no container", true},
		{"two containers", pod(corev1.Container{Name: "a", Image: "i"}, func(ps *corev1.PodSpec) {
			ps.Containers = append(ps.Containers, corev1.Container{Name: "b", Image: "i"})
		}), "2 containers", true},
		{"init container", pod(corev1.Container{Name: "a", Image: "i"}, func(ps *corev1.PodSpec) { ps.InitContainers = []corev1.Container{{Name: "git", Image: "i"}} }), "init containers", true},
		{"volumes", pod(corev1.Container{Name: "a", Image: "i"}, func(ps *corev1.PodSpec) { ps.Volumes = []corev1.Volume{{Name: "v"}} }), "volumes", true},
		{"no image", pod(corev1.Container{Name: "a"}), "no image", true},
		{"image from a path", pod(corev1.Container{Name: "a", Image: "oci:/var/lib/x"}), "registry", true},
		{"unknown restartPolicy", pod(corev1.Container{Name: "a", Image: "i"}, func(ps *corev1.PodSpec) { ps.RestartPolicy = "Sometimes" }), "restartPolicy", true},
		{"udp port", pod(corev1.Container{Name: "a", Image: "i", Ports: []corev1.ContainerPort{{ContainerPort: 53, Protocol: corev1.ProtocolUDP}}}), "TCP", true},
		{"tiny memory", pod(corev1.Container{Name: "a", Image: "i", Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Mi")}}}), "memory", true},
		{"huge cpu", pod(corev1.Container{Name: "a", Image: "i", Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1000")}}}), "cpu", true},
		{"unknown fieldRef", pod(corev1.Container{Name: "a", Image: "i", Env: []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}}}}), "fieldRef", true},
		{"missing secret", pod(corev1.Container{Name: "a", Image: "i", Env: []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "nope"}, Key: "k"}}}}}), "secret nope", false},
		{"missing key", pod(corev1.Container{Name: "a", Image: "i", Env: []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "s"}, Key: "zz"}}}}}), "no key zz", false},
		{"runAsNonRoot as root", pod(corev1.Container{Name: "a", Image: "i", SecurityContext: &corev1.SecurityContext{RunAsUser: new(int64(0))}}, func(ps *corev1.PodSpec) {
			ps.SecurityContext = &corev1.PodSecurityContext{RunAsNonRoot: &yes}
		}), "runAsNonRoot", true},
		{"too many env", pod(corev1.Container{Name: "a", Image: "i", Env: slices.Repeat([]corev1.EnvVar{{Name: "X", Value: "y"}}, maxEnv+1)}), "environment variables", true},
	} {
		_, err := specFromPod(context.Background(), tc.pt, ref, look)
		if err == nil || !strings.Contains(err.Error(), tc.want) || errors.Is(err, errUnsupported) != tc.unsupported {
			t.Errorf("%s: err = %v, want one with %q (unsupported: %v)", tc.name, err, tc.want, tc.unsupported)
		}
	}
}

func TestFireworksName(t *testing.T) {
	a := fireworksName("", "hello-world", "uid-1")
	b := fireworksName("", "hello-world", "uid-2")
	if a == b || !strings.HasPrefix(a, "hello-world-k") {
		t.Errorf("names %q and %q", a, b)
	}
	for _, n := range []string{"a.b.c", strings.Repeat("x", 253), "---", "UPPER_case.name"} {
		got := fireworksName("", n, "u")
		if len(got) > 63 || strings.HasPrefix(got, "-") || strings.HasSuffix(got, "-") || strings.Trim(got, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" {
			t.Errorf("fireworksName(%q) = %q: not a valid Fireworks name", n, got)
		}
	}
}
