// Package v1beta1 is kubernetes-sigs/agent-sandbox's agents.x-k8s.io/v1beta1 API as
// Fireworks serves it: the same group, version, kinds and JSON fields, so manifests
// written for agent-sandbox apply unchanged. The types are Fireworks' own; the CRDs in
// deploy/helm/fireworks/crds are generated from them (make generate-crds).
//
// +kubebuilder:object:generate=true
// +groupName=agents.x-k8s.io
package v1beta1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is agents.x-k8s.io/v1beta1.
	GroupVersion = schema.GroupVersion{Group: "agents.x-k8s.io", Version: "v1beta1"}
	// SchemeBuilder registers the kinds.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}
	// AddToScheme adds them to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
