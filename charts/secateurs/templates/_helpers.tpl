{{/* Names, labels and the values every template shares. */}}

{{- define "secateurs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "secateurs.fullname" -}}
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

{{- define "secateurs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "secateurs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "mlflow"). */}}
{{- define "secateurs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "secateurs.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "secateurs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "secateurs.tensorrtLlmImage" -}}
{{- printf "%s:%s" .Values.tensorrtLlmImage.repository (default .Chart.AppVersion .Values.tensorrtLlmImage.tag) }}
{{- end }}

{{- define "secateurs.mlflow.image" -}}
{{- $repository := default .Values.image.repository .Values.mlflow.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.mlflow.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "secateurs.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "secateurs.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "secateurs.postgres.fullname" -}}
{{- printf "%s-postgres" (include "secateurs.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "secateurs.pipeline.serviceAccountName" -}}
{{- default (printf "%s-pipeline" (include "secateurs.fullname" .)) .Values.pipeline.serviceAccount.name }}
{{- end }}

{{/* The in-cluster URL of the tracking server; `<svc>.<ns>.svc` resolves from every namespace whatever the
cluster domain is. */}}
{{- define "secateurs.mlflow.trackingUri" -}}
{{- printf "http://%s.%s.svc:%d" (include "secateurs.mlflow.fullname" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- end }}

{{/* Host headers MLflow accepts (fnmatch patterns, comma-separated): the service by every in-cluster name,
localhost for kubectl port-forward, then mlflow.allowedHosts. */}}
{{- define "secateurs.mlflow.allowedHosts" -}}
{{- $svc := include "secateurs.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list $svc (printf "%s:*" $svc) (printf "%s.%s" $svc $ns) (printf "%s.%s:*" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc:*" $svc $ns) (printf "%s.%s.svc.*" $svc $ns) "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" }}
{{- concat $hosts .Values.mlflow.allowedHosts | join "," }}
{{- end }}

{{/* Database host, secret and secret key of the backend store, whichever type it is. */}}
{{- define "secateurs.db.host" -}}
{{- if eq .Values.mlflow.backendStore.type "postgres-bundled" }}
{{- printf "%s.%s.svc" (include "secateurs.postgres.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.mlflow.backendStore.external.host }}
{{- end }}
{{- end }}

{{- define "secateurs.db.port" -}}
{{- if eq .Values.mlflow.backendStore.type "postgres-bundled" }}5432{{ else }}{{ .Values.mlflow.backendStore.external.port }}{{ end }}
{{- end }}

{{- define "secateurs.db.secretName" -}}
{{- default (include "secateurs.postgres.fullname" .) .Values.mlflow.backendStore.existingSecret }}
{{- end }}

{{/* The SQLAlchemy URI without a password: libpq reads it from PGPASSWORD, which comes from a Secret, so no
password appears in a manifest or on a command line (and none needs URL-escaping). */}}
{{- define "secateurs.db.uri" -}}
{{- $b := .Values.mlflow.backendStore }}
{{- $uri := printf "postgresql://%s@%s:%s/%s" $b.user (include "secateurs.db.host" .) (include "secateurs.db.port" .) $b.database }}
{{- if eq $b.type "postgres-external" }}
{{- $uri = printf "%s?sslmode=%s" $uri $b.external.sslMode }}
{{- end }}
{{- $uri }}
{{- end }}

{{- define "secateurs.mlflow.artifactsDestination" -}}
{{- if eq .Values.mlflow.artifactStore.type "s3" }}
{{- $s3 := .Values.mlflow.artifactStore.s3 }}
{{- printf "s3://%s/%s" $s3.bucket (trimAll "/" $s3.prefix) | trimSuffix "/" }}
{{- else }}
{{- "/mlflow/artifacts" }}
{{- end }}
{{- end }}

{{/* Render-time checks of value combinations the schema cannot express; each message names the values. */}}
{{- define "secateurs.validate" -}}
{{- $up := .Values.pipeline.upload }}
{{- if $up.enabled }}
{{- if and $up.pipelineYaml $up.existingConfigMap }}
{{- fail "pipeline.upload: set pipeline.upload.pipelineYaml or pipeline.upload.existingConfigMap, not both" }}
{{- end }}
{{- if not (or $up.pipelineYaml $up.existingConfigMap) }}
{{- fail "pipeline.upload.enabled=true needs the compiled pipeline: set pipeline.upload.pipelineYaml (e.g. --set-file) or pipeline.upload.existingConfigMap" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.mlflow.artifactStore.type "persistentVolume") (gt (int .Values.mlflow.replicaCount) 1) }}
{{- fail (printf "mlflow.replicaCount=%d needs mlflow.artifactStore.type=s3: the persistentVolume artifact store is a ReadWriteOnce volume that one replica mounts" (int .Values.mlflow.replicaCount)) }}
{{- end }}
{{- if and (not .Values.pipeline.serviceAccount.create) (not .Values.pipeline.serviceAccount.name) }}
{{- fail "pipeline.serviceAccount.create=false needs pipeline.serviceAccount.name (the existing ServiceAccount pipeline pods run as)" }}
{{- end }}
{{- end }}

{{/* The /tmp emptyDir every container gets because its root file system is read-only. */}}
{{- define "secateurs.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end }}
