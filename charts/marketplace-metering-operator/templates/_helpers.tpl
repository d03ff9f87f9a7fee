{{/* Chart name, truncated to 63 chars (a DNS label). */}}
{{- define "mmo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "mmo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mmo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every object. */}}
{{- define "mmo.labels" -}}
helm.sh/chart: {{ include "mmo.chart" . }}
app.kubernetes.io/name: {{ include "mmo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: marketplace-metering-operator
{{- end }}

{{- define "mmo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mmo.emulatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "mmo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: emulator
{{- end }}

{{- define "mmo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mmo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mmo.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "mmo.webhookServiceName" -}}
{{- printf "%s-webhook" (include "mmo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mmo.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "mmo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mmo.emulatorName" -}}
{{- printf "%s-emulator" (include "mmo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mmo.emulatorURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "mmo.emulatorName" .) .Release.Namespace (int .Values.emulator.port) }}
{{- end }}

{{/*
Watch mode: namespaced (the release namespace; the default), list (watchNamespaces) or cluster
(every namespace but kube-system, an explicit choice). A non-empty watchNamespaces selects list.
*/}}
{{- define "mmo.watchMode" -}}
{{- $mode := .Values.watch.mode }}
{{- if and (eq $mode "cluster") .Values.watchNamespaces }}
{{- fail "watch.mode=cluster watches every namespace: leave watchNamespaces empty (or use watch.mode=list)" }}
{{- else if eq $mode "cluster" }}cluster
{{- else if .Values.watchNamespaces }}
{{- if has "kube-system" .Values.watchNamespaces }}
{{- fail "watchNamespaces must not contain kube-system: the operator never watches or writes there" }}
{{- end }}list
{{- else if eq $mode "list" }}
{{- fail "watch.mode=list needs the namespaces in watchNamespaces" }}
{{- else }}namespaced
{{- end }}
{{- end }}

{{/* The watched namespaces as a JSON list; empty in cluster mode (every namespace but kube-system). */}}
{{- define "mmo.watchedNamespaces" -}}
{{- $mode := include "mmo.watchMode" . }}
{{- if eq $mode "cluster" }}[]
{{- else if eq $mode "list" }}{{ .Values.watchNamespaces | toJson }}
{{- else }}{{ list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{- define "mmo.clusterWide" -}}
{{- if eq (include "mmo.watchMode" .) "cluster" }}true{{ else }}false{{ end }}
{{- end }}

{{/* namespaceSelector of the watched namespaces (the webhook and the admission policy bindings). */}}
{{- define "mmo.namespaceSelector" -}}
{{- $namespaces := include "mmo.watchedNamespaces" . | fromJsonArray }}
matchExpressions:
  - key: kubernetes.io/metadata.name
    {{- if $namespaces }}
    operator: In
    values:
      {{- toYaml (sortAlpha $namespaces) | nindent 6 }}
    {{- else }}
    operator: NotIn
    values: ["kube-system"]
    {{- end }}
{{- end }}

{{/*
How the entitlement gate is added to new product pods: "policy" (MutatingAdmissionPolicy,
admissionregistration.k8s.io/v1, GA in Kubernetes 1.36) or "webhook" (the operator's mutating
webhook, for older servers), or "none" (webhook chosen but disabled: the seller writes the gate
into the pod templates). auto picks policy when the server serves the API (helm install/upgrade
ask it) or, rendering offline, when --kube-version is 1.36 or later.
*/}}
{{- define "mmo.gateMechanism" -}}
{{- $gate := .Values.admissionPolicies.gate }}
{{- if eq $gate "auto" }}
{{- if or (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy") (semverCompare ">=1.36.0-0" .Capabilities.KubeVersion.Version) }}
{{- $gate = "policy" }}
{{- else }}
{{- $gate = "webhook" }}
{{- end }}
{{- end }}
{{- if and (eq $gate "webhook") (not .Values.webhook.enabled) }}none{{ else }}{{ $gate }}{{ end }}
{{- end }}

{{- define "mmo.webhookOn" -}}
{{- if eq (include "mmo.gateMechanism" .) "webhook" }}true{{ end }}
{{- end }}
