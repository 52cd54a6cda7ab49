package controller

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	extv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/extensions/v1beta1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/netpolicy"
)

// A template's networkPolicy becomes the sandboxes' eBPF policy file: agent-sandbox's
// secure default, its egress rules one to one, and a refusal for what a microVM cannot
// honour (never a looser policy than written).
func TestEgressPolicy(t *testing.T) {
	udp := corev1.ProtocolUDP
	sctp := corev1.ProtocolSCTP
	end := int32(8090)
	port := func(p int) *intstr.IntOrString { v := intstr.FromInt32(int32(p)); return &v }
	named := intstr.FromString("http")
	for _, c := range []struct {
		name   string
		spec   extv1.SandboxTemplateSpec
		want   []string // lines, in order
		refuse string
	}{
		{name: "unmanaged: the node's defaults", spec: extv1.SandboxTemplateSpec{NetworkPolicyManagement: extv1.NetworkPolicyUnmanaged}},
		{name: "managed, no policy: the secure default", spec: extv1.SandboxTemplateSpec{},
			want: []string{"default out allow", "deny out 10.0.0.0/8", "deny out 172.16.0.0/12", "deny out 192.168.0.0/16", "deny out 169.254.0.0/16"}},
		{name: "no egress rules: nothing out", spec: extv1.SandboxTemplateSpec{NetworkPolicy: &extv1.NetworkPolicySpec{}},
			want: []string{"default out deny"}},
		{name: "ip blocks and ports", spec: extv1.SandboxTemplateSpec{NetworkPolicy: &extv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{
			{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "203.0.113.7/32"}}, {IPBlock: &networkingv1.IPBlock{CIDR: "2001:db8::/32"}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: port(8080)}, {Protocol: &udp, Port: port(8080), EndPort: &end}}},
			{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "0.0.0.0/0", Except: []string{"10.0.0.0/8"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: port(443)}}},
			{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: port(53)}}},
		}}},
			want: []string{"default out deny", "allow out 203.0.113.7/32 tcp 8080", "allow out 203.0.113.7/32 udp 8080-8090",
				"allow out 0.0.0.0/0 tcp 443", "deny out 10.0.0.0/8 tcp 443", "allow out 0.0.0.0/0 udp 53"}},
		{name: "pod selector", refuse: "pod or namespace labels", spec: extv1.SandboxTemplateSpec{NetworkPolicy: &extv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{
			{To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}}}}}}},
		{name: "named port", refuse: "named port", spec: extv1.SandboxTemplateSpec{NetworkPolicy: &extv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{
			{Ports: []networkingv1.NetworkPolicyPort{{Port: &named}}}}}}},
		{name: "sctp", refuse: "SCTP", spec: extv1.SandboxTemplateSpec{NetworkPolicy: &extv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{
			{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &sctp}}}}}}},
		{name: "bad cidr", refuse: "not a CIDR", spec: extv1.SandboxTemplateSpec{NetworkPolicy: &extv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{
			{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.300/8"}}}}}}}},
	} {
		got, err := egressPolicy(&c.spec)
		if c.refuse != "" {
			if err == nil || !errors.Is(err, errUnsupported) || !strings.Contains(err.Error(), c.refuse) {
				t.Errorf("%s: got %q, %v; want a refusal with %q", c.name, got, err, c.refuse)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		var lines []string
		for _, l := range strings.Split(got, "\n") {
			if l != "" && !strings.HasPrefix(l, "#") {
				lines = append(lines, l)
			}
		}
		if strings.Join(lines, "\n") != strings.Join(c.want, "\n") {
			t.Errorf("%s:\ngot  %q\nwant %q", c.name, lines, c.want)
		}
		if got != "" {
			if _, err := netpolicy.ParsePolicy(got); err != nil {
				t.Errorf("%s: the policy does not parse: %v\n%s", c.name, err, got)
			}
		}
	}
}
