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

{{/* Labels common to every object. part-of is what the webhook's default objectSelector excludes. */}}
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
The namespaces whose namespaced resources the operator may touch: the watch list, or nil for the
whole cluster.
*/}}
{{- define "mmo.clusterWide" -}}
{{- if .Values.watchNamespaces }}false{{ else }}true{{ end }}
{{- end }}
