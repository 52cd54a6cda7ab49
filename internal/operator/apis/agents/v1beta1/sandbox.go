package v1beta1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types and reasons, as agent-sandbox names them.
const (
	ConditionReady     = "Ready"
	ConditionSuspended = "Suspended"
	ConditionFinished  = "Finished"

	ReasonDependenciesReady    = "DependenciesReady"
	ReasonDependenciesNotReady = "DependenciesNotReady"
	ReasonSuspended            = "SandboxSuspended"
	ReasonExpired              = "SandboxExpired"
	ReasonReconcilerError      = "ReconcilerError"
	// ReasonUnsupported (Fireworks' own) says the object asks for what Fireworks cannot
	// do, or asks it wrongly: the message says what; nothing is retried until it changes.
	ReasonUnsupported          = "Unsupported"
	ReasonPodSucceeded         = "PodSucceeded"
	ReasonPodFailed            = "PodFailed"
	ReasonSuspendedTerminated  = "PodTerminated"
	ReasonSuspendedTerminating = "PodTerminating"
	ReasonNotSuspended         = "NotSuspended"
)

// PodMetadata is the pod template's metadata: only labels and annotations are used.
type PodMetadata struct {
	// +optional
	Labels map[string]string `json:"labels,omitempty"`
	// +optional
	Annotations map[string]string `json:"annotations,omitempty"`
}

// EmbeddedObjectMetadata is the metadata of an embedded object (a volume claim template).
type EmbeddedObjectMetadata struct {
	// +optional
	Name string `json:"name,omitempty"`
	// +optional
	Labels map[string]string `json:"labels,omitempty"`
	// +optional
	Annotations map[string]string `json:"annotations,omitempty"`
}

// PodTemplate is what the sandbox runs. Fireworks runs its first container in a microVM:
// image, command and args, env, workingDir, ports, and resources (limits, else requests:
// cpu → vCPUs, memory → guest memory).
type PodTemplate struct {
	// +required
	Spec corev1.PodSpec `json:"spec"`
	// +optional
	ObjectMeta PodMetadata `json:"metadata"`
}

// PersistentVolumeClaimTemplate is a volume claim template.
type PersistentVolumeClaimTemplate struct {
	// +optional
	EmbeddedObjectMetadata `json:"metadata"`
	// +required
	Spec corev1.PersistentVolumeClaimSpec `json:"spec"`
}

// OperatingMode is the desired state: Running or Suspended.
// +kubebuilder:validation:Enum=Running;Suspended
type OperatingMode string

const (
	OperatingModeRunning   OperatingMode = "Running"
	OperatingModeSuspended OperatingMode = "Suspended"
)

// SandboxBlueprint is what a Sandbox and a SandboxTemplate share.
type SandboxBlueprint struct {
	// +required
	PodTemplate PodTemplate `json:"podTemplate"`
	// +optional
	// +listType=atomic
	VolumeClaimTemplates []PersistentVolumeClaimTemplate `json:"volumeClaimTemplates,omitempty"`
	// +optional
	Service *bool `json:"service,omitempty"`
}

// ShutdownPolicy is what happens to an expired Sandbox object.
// +kubebuilder:validation:Enum=Delete;Retain
type ShutdownPolicy string

const (
	ShutdownPolicyDelete ShutdownPolicy = "Delete"
	ShutdownPolicyRetain ShutdownPolicy = "Retain"
)

// Lifecycle is when and how the sandbox ends.
type Lifecycle struct {
	// +kubebuilder:validation:Format="date-time"
	// +optional
	ShutdownTime *metav1.Time `json:"shutdownTime,omitempty"`
	// +kubebuilder:default=Retain
	// +optional
	ShutdownPolicy *ShutdownPolicy `json:"shutdownPolicy,omitempty"`
}

// SandboxSpec is the desired state of a Sandbox.
type SandboxSpec struct {
	SandboxBlueprint `json:",inline"`
	// +optional
	Lifecycle `json:",inline"`
	// +kubebuilder:default=Running
	// +optional
	OperatingMode OperatingMode `json:"operatingMode,omitempty"`
}

// SandboxStatus is the observed state of a Sandbox.
type SandboxStatus struct {
	// ServiceFQDN is the sandbox's host at the Fireworks edge: its ports answer at
	// <port>-<ServiceFQDN>.
	// +optional
	ServiceFQDN string `json:"serviceFQDN,omitempty"`
	// +optional
	Service string `json:"service,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// +optional
	LabelSelector string `json:"selector,omitempty"`
	// +optional
	PodIPs []string `json:"podIPs,omitempty"`
	// NodeName is the Fireworks node the microVM runs on.
	// +optional
	NodeName string `json:"nodeName,omitempty"`
	// SandboxID is the Fireworks sandbox behind this object (Fireworks' addition).
	// +optional
	SandboxID string `json:"sandboxID,omitempty"`
}

// Sandbox is one microVM, run by Fireworks.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=sandbox
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.status.nodeName`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Sandbox struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SandboxSpec   `json:"spec"`
	Status            SandboxStatus `json:"status,omitempty"`
}

// SandboxList is a list of Sandboxes.
// +kubebuilder:object:root=true
type SandboxList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Sandbox `json:"items"`
}

func init() { SchemeBuilder.Register(&Sandbox{}, &SandboxList{}) }
