// Package v1beta1 is agent-sandbox's extensions.agents.x-k8s.io/v1beta1 API as Fireworks
// serves it (SandboxTemplate, SandboxWarmPool, SandboxClaim): agent-sandbox's JSON fields,
// Fireworks' own types.
//
// +kubebuilder:object:generate=true
// +groupName=extensions.agents.x-k8s.io
package v1beta1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is extensions.agents.x-k8s.io/v1beta1.
	GroupVersion = schema.GroupVersion{Group: "extensions.agents.x-k8s.io", Version: "v1beta1"}
	// SchemeBuilder registers the kinds.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}
	// AddToScheme adds them to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
