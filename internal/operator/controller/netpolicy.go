package controller

import (
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	extv1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/extensions/v1beta1"
)

// SandboxTemplateAnnotation names the SandboxTemplate a claim's Sandbox was made from:
// its microVM gets the template's network policy.
const SandboxTemplateAnnotation = "fireworks.dev/sandbox-template"

// secureDefaultEgress is agent-sandbox's "secure by default" egress (a Managed template
// with no networkPolicy): the public internet only, not private ranges or link-local (the
// metadata service). The node protects more on top (its own addresses, other sandboxes).
var secureDefaultEgress = []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}

// egressPolicy is the Fireworks network policy (the policy file format,
// netpolicy.ParsePolicy) of the sandboxes of template spec: "" for an Unmanaged one (the
// node's defaults); agent-sandbox's secure default for a Managed one without a policy;
// otherwise deny by default and allow what the egress rules name. Rules on IP blocks and
// TCP/UDP ports map one to one; peers chosen by pod or namespace labels, named ports and
// SCTP have no meaning for a microVM and are refused, so a template is never enforced
// looser than written. Ingress rules are not enforced here: a sandbox is reached through
// the edge, by its access token.
func egressPolicy(spec *extv1.SandboxTemplateSpec) (string, error) {
	if spec.NetworkPolicyManagement == extv1.NetworkPolicyUnmanaged {
		return "", nil
	}
	var b strings.Builder
	b.WriteString("# from the SandboxTemplate's networkPolicy (egress)\n")
	if spec.NetworkPolicy == nil {
		b.WriteString("default out allow\n")
		for _, c := range secureDefaultEgress {
			fmt.Fprintf(&b, "deny out %s\n", c)
		}
		return b.String(), nil
	}
	b.WriteString("default out deny\n")
	for i, r := range spec.NetworkPolicy.Egress {
		var dests []string
		var excepts []string
		if len(r.To) == 0 {
			dests = []string{"0.0.0.0/0"}
		}
		for _, p := range r.To {
			if p.PodSelector != nil || p.NamespaceSelector != nil {
				return "", fmt.Errorf("%w: networkPolicy.egress[%d]: a peer chosen by pod or namespace labels has no meaning for a microVM (use ipBlock)", errUnsupported, i)
			}
			if p.IPBlock == nil {
				return "", fmt.Errorf("%w: networkPolicy.egress[%d]: a peer with no ipBlock", errUnsupported, i)
			}
			c, err := v4Prefix(p.IPBlock.CIDR)
			if err != nil {
				return "", fmt.Errorf("networkPolicy.egress[%d].to.ipBlock.cidr: %w", i, err)
			}
			if c == "" {
				continue // IPv6: sandboxes have no IPv6
			}
			dests = append(dests, c)
			for _, e := range p.IPBlock.Except {
				ec, err := v4Prefix(e)
				if err != nil {
					return "", fmt.Errorf("networkPolicy.egress[%d].to.ipBlock.except: %w", i, err)
				}
				if ec != "" {
					excepts = append(excepts, ec)
				}
			}
		}
		ports, err := egressPorts(i, r.Ports)
		if err != nil {
			return "", err
		}
		for _, d := range dests {
			for _, p := range ports {
				fmt.Fprintf(&b, "allow out %s%s\n", d, p)
			}
		}
		// The policy's most specific prefix decides: an exception is a deny inside the
		// block (for the rule's ports).
		for _, e := range excepts {
			for _, p := range ports {
				fmt.Fprintf(&b, "deny out %s%s\n", e, p)
			}
		}
	}
	return b.String(), nil
}

// v4Prefix checks a CIDR and returns it, or "" for an IPv6 one.
func v4Prefix(s string) (string, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return "", fmt.Errorf("%w: %q is not a CIDR", errUnsupported, s)
	}
	if !p.Addr().Is4() {
		return "", nil
	}
	return p.Masked().String(), nil
}

// egressPorts are the " tcp 80", " udp 53-60" suffixes of a rule ("" = any port).
func egressPorts(i int, ports []networkingv1.NetworkPolicyPort) ([]string, error) {
	if len(ports) == 0 {
		return []string{""}, nil
	}
	var out []string
	for j, p := range ports {
		proto := "tcp"
		if p.Protocol != nil {
			switch *p.Protocol {
			case corev1.ProtocolTCP:
			case corev1.ProtocolUDP:
				proto = "udp"
			default:
				return nil, fmt.Errorf("%w: networkPolicy.egress[%d].ports[%d]: protocol %s (TCP and UDP only)", errUnsupported, i, j, *p.Protocol)
			}
		}
		if p.Port == nil {
			out = append(out, " "+proto)
			continue
		}
		if p.Port.StrVal != "" {
			return nil, fmt.Errorf("%w: networkPolicy.egress[%d].ports[%d]: a named port (%q) names a container's port, which a destination outside has not", errUnsupported, i, j, p.Port.StrVal)
		}
		lo := int(p.Port.IntVal)
		hi := lo
		if p.EndPort != nil {
			hi = int(*p.EndPort)
		}
		if lo < 1 || hi < lo || hi > 65535 {
			return nil, fmt.Errorf("%w: networkPolicy.egress[%d].ports[%d]: port %d..%d", errUnsupported, i, j, lo, hi)
		}
		if hi == lo {
			out = append(out, fmt.Sprintf(" %s %d", proto, lo))
		} else {
			out = append(out, fmt.Sprintf(" %s %d-%d", proto, lo, hi))
		}
	}
	return out, nil
}
