{{/* The release's base name, at most 40 characters so that "-server-peers" and a
StatefulSet ordinal still fit a DNS label. */}}
{{- define "fireworks.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fireworks.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "server"). */}}
{{- define "fireworks.selector" -}}
app.kubernetes.io/name: {{ (index . 0).Chart.Name }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "fireworks.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fireworks.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "fireworks.fullname" .)) -}}
{{- end -}}

{{- /* The edge's and the controller's own Secrets: each holds its token alone. */ -}}
{{- define "fireworks.edgeSecretName" -}}
{{- .Values.secrets.existingEdgeSecret | default (printf "%s-edge" (include "fireworks.fullname" .)) -}}
{{- end -}}

{{- define "fireworks.controllerSecretName" -}}
{{- .Values.secrets.existingControllerSecret | default (printf "%s-controller" (include "fireworks.fullname" .)) -}}
{{- end -}}

{{- define "fireworks.serverPeersService" -}}
{{ include "fireworks.fullname" . }}-server-peers
{{- end -}}

{{/* The servers' API as clients inside the cluster reach it: the ClusterIP Service. */}}
{{- define "fireworks.serverAPI" -}}
{{ include "fireworks.fullname" . }}-server.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:7766
{{- end -}}

{{/* --peers: every server by its stable DNS name under the headless Service. */}}
{{- define "fireworks.serverPeers" -}}
{{- $full := include "fireworks.fullname" . -}}
{{- $svc := include "fireworks.serverPeersService" . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.server.replicas) -}}
{{- $host := printf "%s-server-%d.%s.%s.svc.%s" $full $i $svc $.Release.Namespace $.Values.clusterDomain -}}
{{- $peers = append $peers (printf "%s-server-%d=%s:7767/%s:7766" $full $i $host $host) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* The agents' nodeSelector as key=value,... (the node autoscaler's pool). */}}
{{- define "fireworks.agentSelector" -}}
{{- $kv := list -}}
{{- range $k, $v := .Values.agent.nodeSelector -}}
{{- $kv = append $kv (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," $kv -}}
{{- end -}}

{{/* The node autoscaler's placeholder pods' namespace. */}}
{{- define "fireworks.capacityNamespace" -}}
{{- .Values.autoscaler.namespace | default (printf "%s-capacity" .Release.Namespace) -}}
{{- end -}}
