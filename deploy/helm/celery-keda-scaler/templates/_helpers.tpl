{{/* Chart name, overridable. */}}
{{- define "cks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name if it already contains the chart name, else <release>-<chart>. */}}
{{- define "cks.fullname" -}}
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

{{/* Labels that select the scaler's pods. */}}
{{- define "cks.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cks.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "cks.labels" -}}
{{ include "cks.selectorLabels" . }}
app.kubernetes.io/part-of: celery-keda-scaler
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cks.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cks.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, or repository:tag@digest when a digest is given. */}}
{{- define "cks.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret mounted for TLS: the existing one, or the one cert-manager writes. */}}
{{- define "cks.tlsSecret" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "cks.fullname" .) }}
{{- end }}
{{- end }}

{{/* Secret with KEDA's side of mTLS (ca.crt, tls.crt, tls.key). */}}
{{- define "cks.clientSecret" -}}
{{- if .Values.tls.triggerAuthentication.clientSecret }}
{{- .Values.tls.triggerAuthentication.clientSecret }}
{{- else }}
{{- printf "%s-client-tls" (include "cks.fullname" .) }}
{{- end }}
{{- end }}

{{- define "cks.triggerAuthName" -}}
{{- default (printf "%s-tls" (include "cks.fullname" .)) .Values.tls.triggerAuthentication.name }}
{{- end }}

{{/* An environment variable name for a broker name: upper case, `-` as `_` (the scaler matches
     names case-insensitively with `-` and `_` equal). */}}
{{- define "cks.envName" -}}
{{- . | upper | replace "-" "_" }}
{{- end }}

{{/* The in-cluster address triggers put in scalerAddress. */}}
{{- define "cks.scalerAddress" -}}
{{- printf "%s.%s.svc.cluster.local:%v" (include "cks.fullname" .) .Release.Namespace .Values.service.grpcPort }}
{{- end }}

{{/* PromQL label matchers selecting the scaler's series. */}}
{{- define "cks.promSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "cks.fullname" .) }}
{{- end }}
{{- end }}

{{/* Refuses value combinations the schema cannot express. */}}
{{- define "cks.validate" -}}
{{- if and .Values.tls.existingSecret .Values.tls.certManager.enabled }}
{{- fail "tls: set either tls.existingSecret or tls.certManager.enabled, not both" }}
{{- end }}
{{- if and .Values.tls.enabled (not (or .Values.tls.existingSecret .Values.tls.certManager.enabled)) }}
{{- fail "tls.enabled needs tls.existingSecret (a Secret with tls.crt, tls.key, ca.crt) or tls.certManager.enabled" }}
{{- end }}
{{- if and (not .Values.tls.enabled) (or .Values.tls.existingSecret .Values.tls.certManager.enabled) }}
{{- fail "tls.existingSecret / tls.certManager.enabled are set but tls.enabled is false" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.existingSecret .Values.tls.triggerAuthentication.create (not .Values.tls.triggerAuthentication.clientSecret) }}
{{- fail "tls.triggerAuthentication.create with tls.existingSecret needs tls.triggerAuthentication.clientSecret (KEDA's ca.crt, tls.crt, tls.key), or set create to false" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.certManager.enabled (not .Values.tls.certManager.clientCertificate) .Values.tls.triggerAuthentication.create (not .Values.tls.triggerAuthentication.clientSecret) }}
{{- fail "tls.triggerAuthentication.create with tls.certManager.clientCertificate false needs tls.triggerAuthentication.clientSecret" }}
{{- end }}
{{- range $name, $_ := .Values.tenancy.namespaces }}
{{- if not (or (hasKey $.Values.brokers.named $name) $.Values.brokers.existingSecret) }}
{{- fail (printf "tenancy.namespaces.%s: no broker %s is configured (brokers.named or brokers.existingSecret); the scaler would refuse to start" $name $name) }}
{{- end }}
{{- end }}
{{- end }}
