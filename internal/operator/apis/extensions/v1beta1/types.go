package v1beta1

import (
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentsv1beta1 "github.com/fireworks-sandbox/fireworks/internal/operator/apis/agents/v1beta1"
)

// NetworkPolicyManagement says whether the controller enforces NetworkPolicy.
// +kubebuilder:validation:Enum=Managed;Unmanaged
type NetworkPolicyManagement string

const (
	NetworkPolicyManaged   NetworkPolicyManagement = "Managed"
	NetworkPolicyUnmanaged NetworkPolicyManagement = "Unmanaged"
)

// EnvVarsInjectionPolicy says whether a claim may add environment variables.
// +kubebuilder:validation:Enum=Allowed;Overrides;Disallowed
type EnvVarsInjectionPolicy string

const (
	EnvVarsAllowed    EnvVarsInjectionPolicy = "Allowed"
	EnvVarsOverrides  EnvVarsInjectionPolicy = "Overrides"
	EnvVarsDisallowed EnvVarsInjectionPolicy = "Disallowed"
)

// VolumeClaimTemplatesPolicy says whether a claim may bring volume claim templates.
// +kubebuilder:validation:Enum=Disallowed;Allowed;Overrides
type VolumeClaimTemplatesPolicy string

// NetworkPolicySpec is the sandboxes' network policy: egress rules become the
// microVM's eBPF egress policy (allowed CIDRs and ports); ingress is the edge's.
type NetworkPolicySpec struct {
	// +optional
	// +listType=atomic
	Ingress []networkingv1.NetworkPolicyIngressRule `json:"ingress,omitempty"`
	// +optional
	// +listType=atomic
	Egress []networkingv1.NetworkPolicyEgressRule `json:"egress,omitempty"`
}

// SandboxTemplateSpec is a reusable sandbox blueprint.
type SandboxTemplateSpec struct {
	agentsv1beta1.SandboxBlueprint `json:",inline"`
	// +optional
	NetworkPolicy *NetworkPolicySpec `json:"networkPolicy,omitempty"`
	// +kubebuilder:default=Managed
	// +optional
	NetworkPolicyManagement NetworkPolicyManagement `json:"networkPolicyManagement,omitempty"`
	// +kubebuilder:default=Disallowed
	// +optional
	EnvVarsInjectionPolicy EnvVarsInjectionPolicy `json:"envVarsInjectionPolicy,omitempty"`
	// +kubebuilder:default=Disallowed
	// +optional
	VolumeClaimTemplatesPolicy VolumeClaimTemplatesPolicy `json:"volumeClaimTemplatesPolicy,omitempty"`
}

// SandboxTemplateStatus is Fireworks' addition: the template it registered.
type SandboxTemplateStatus struct {
	// Template is the Fireworks template's name.
	// +optional
	Template string `json:"template,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// SandboxTemplate is a sandbox blueprint; Fireworks registers it as a template.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
type SandboxTemplate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SandboxTemplateSpec   `json:"spec"`
	Status            SandboxTemplateStatus `json:"status,omitempty"`
}

// SandboxTemplateList is a list of SandboxTemplates.
// +kubebuilder:object:root=true
type SandboxTemplateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SandboxTemplate `json:"items"`
}

// SandboxTemplateRef names a SandboxTemplate in the same namespace.
type SandboxTemplateRef struct {
	// +required
	Name string `json:"name"`
}

// WarmPoolUpdateStrategyType is how a pool treats warm sandboxes of an old template.
// +kubebuilder:validation:Enum=Recreate;OnReplenish
type WarmPoolUpdateStrategyType string

// SandboxWarmPoolUpdateStrategy is a pool's update strategy.
type SandboxWarmPoolUpdateStrategy struct {
	// +optional
	Type WarmPoolUpdateStrategyType `json:"type,omitempty"`
}

// SandboxWarmPoolSpec is a warm pool's desired state.
type SandboxWarmPoolSpec struct {
	// At most 64: a Fireworks warm pool keeps at most that many microVMs per node.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=64
	// +optional
	Replicas *int32 `json:"replicas,omitempty"`
	// +required
	TemplateRef SandboxTemplateRef `json:"sandboxTemplateRef"`
	// +optional
	UpdateStrategy *SandboxWarmPoolUpdateStrategy `json:"updateStrategy,omitempty"`
}

// SandboxWarmPoolStatus is a warm pool's observed state.
type SandboxWarmPoolStatus struct {
	// +optional
	Replicas int32 `json:"replicas,omitempty"`
	// +optional
	ReadyReplicas int32 `json:"readyReplicas,omitempty"`
	// +optional
	Selector string `json:"selector,omitempty"`
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Image is the image of the Fireworks warm pool this one fills (Fireworks' addition).
	// +optional
	Image string `json:"image,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// SandboxWarmPool keeps microVMs of a template booted and waiting: Fireworks' warm pool.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:subresource:scale:specpath=.spec.replicas,statuspath=.status.replicas,selectorpath=.status.selector
// +kubebuilder:printcolumn:name="Desired",type=integer,JSONPath=`.spec.replicas`
// +kubebuilder:printcolumn:name="Ready",type=integer,JSONPath=`.status.readyReplicas`
// +kubebuilder:printcolumn:name="Template",type=string,JSONPath=`.spec.sandboxTemplateRef.name`
type SandboxWarmPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SandboxWarmPoolSpec   `json:"spec"`
	Status            SandboxWarmPoolStatus `json:"status,omitempty"`
}

// SandboxWarmPoolList is a list of SandboxWarmPools.
// +kubebuilder:object:root=true
type SandboxWarmPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SandboxWarmPool `json:"items"`
}

// ClaimShutdownPolicy is what happens to an expired claim.
// +kubebuilder:validation:Enum=Delete;DeleteForeground;Retain
type ClaimShutdownPolicy string

const (
	ClaimShutdownDelete           ClaimShutdownPolicy = "Delete"
	ClaimShutdownDeleteForeground ClaimShutdownPolicy = "DeleteForeground"
	ClaimShutdownRetain           ClaimShutdownPolicy = "Retain"
)

// ClaimLifecycle is when a claim's sandbox ends.
type ClaimLifecycle struct {
	// +kubebuilder:validation:Format="date-time"
	// +optional
	ShutdownTime *metav1.Time `json:"shutdownTime,omitempty"`
	// +kubebuilder:validation:Minimum=0
	// +optional
	TTLSecondsAfterFinished *int32 `json:"ttlSecondsAfterFinished,omitempty"`
	// +kubebuilder:default=Retain
	// +optional
	ShutdownPolicy ClaimShutdownPolicy `json:"shutdownPolicy,omitempty"`
}

// SandboxWarmPoolRef names a SandboxWarmPool in the same namespace.
type SandboxWarmPoolRef struct {
	// +required
	Name string `json:"name"`
}

// EnvVar is an environment variable a claim adds (when its template allows it).
type EnvVar struct {
	// +required
	Name string `json:"name"`
	// +required
	Value string `json:"value"`
	// +optional
	ContainerName string `json:"containerName,omitempty"`
}

// SandboxClaimSpec is a request for a sandbox from a warm pool.
type SandboxClaimSpec struct {
	// +required
	WarmPoolRef SandboxWarmPoolRef `json:"warmPoolRef"`
	// +optional
	Lifecycle *ClaimLifecycle `json:"lifecycle,omitempty"`
	// +optional
	AdditionalPodMetadata agentsv1beta1.PodMetadata `json:"additionalPodMetadata,omitempty"`
	// +optional
	// +listType=atomic
	Env []EnvVar `json:"env,omitempty"`
	// +optional
	// +listType=atomic
	VolumeClaimTemplates []agentsv1beta1.PersistentVolumeClaimTemplate `json:"volumeClaimTemplates,omitempty"`
}

// ClaimedSandbox names the Sandbox a claim got.
type ClaimedSandbox struct {
	// +optional
	Name string `json:"name,omitempty"`
	// +optional
	PodIPs []string `json:"podIPs,omitempty"`
}

// SandboxClaimStatus is a claim's observed state.
type SandboxClaimStatus struct {
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// +optional
	SandboxStatus ClaimedSandbox `json:"sandbox,omitempty"`
}

// SandboxClaim takes a sandbox from a warm pool.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Sandbox",type=string,JSONPath=`.status.sandbox.name`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
type SandboxClaim struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SandboxClaimSpec   `json:"spec"`
	Status            SandboxClaimStatus `json:"status,omitempty"`
}

// SandboxClaimList is a list of SandboxClaims.
// +kubebuilder:object:root=true
type SandboxClaimList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SandboxClaim `json:"items"`
}

func init() {
	SchemeBuilder.Register(&SandboxTemplate{}, &SandboxTemplateList{}, &SandboxWarmPool{}, &SandboxWarmPoolList{}, &SandboxClaim{}, &SandboxClaimList{})
}
