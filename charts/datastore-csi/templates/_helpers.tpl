{{/* Names, labels and shared snippets of the datastore-csi chart. */}}

{{/* The prefix of every object this release names (cluster-wide objects included). */}}
{{- define "datastore-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "datastore-csi.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: pass (list $ "controller"). */}}
{{- define "datastore-csi.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "datastore-csi.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "datastore-csi.fullname" .)) .Values.serviceAccount.controller.name -}}
{{- end -}}

{{- define "datastore-csi.nodeServiceAccount" -}}
{{- default (printf "%s-node" (include "datastore-csi.fullname" .)) .Values.serviceAccount.node.name -}}
{{- end -}}

{{- define "datastore-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The store URL written into the ConfigMap. */}}
{{- define "datastore-csi.store" -}}
{{- if .Values.store.url -}}
{{- .Values.store.url -}}
{{- else -}}
{{- $bucket := required "store.bucket (or store.url) is required: the S3 bucket of the store" .Values.store.bucket -}}
{{- $prefix := trimAll "/" .Values.store.prefix -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s" $bucket $prefix -}}
{{- else -}}
{{- printf "s3://%s" $bucket -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap the driver, the operator and the kubectl plugin read (fixed name). */}}
{{- define "datastore-csi.configMapName" -}}datastore-csi{{- end -}}

{{/* Checks of value combinations that cannot work; renders nothing. */}}
{{- define "datastore-csi.validate" -}}
{{- if and .Values.irsa.roleArn .Values.credentials.secret.name -}}
{{- fail "set either irsa.roleArn or credentials.secret.name, not both: static keys would override the IRSA role" -}}
{{- end -}}
{{- if and .Values.credentials.secret.create (not .Values.credentials.secret.name) -}}
{{- fail "credentials.secret.create needs credentials.secret.name" -}}
{{- end -}}
{{- if and .Values.credentials.secret.create (not (and .Values.credentials.secret.accessKeyId .Values.credentials.secret.secretAccessKey)) -}}
{{- fail "credentials.secret.create needs credentials.secret.accessKeyId and credentials.secret.secretAccessKey" -}}
{{- end -}}
{{- if .Values.fsx.enabled -}}
{{- $_ := required "fsx.clusterName is required when fsx.enabled (it tags the file systems)" .Values.fsx.clusterName -}}
{{- $_ := required "fsx.subnetId is required when fsx.enabled" .Values.fsx.subnetId -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by our containers: store, S3 settings, logging, credentials. */}}
{{- define "datastore-csi.env" -}}
- name: DATASTORE_STORE
  valueFrom:
    configMapKeyRef:
      name: {{ include "datastore-csi.configMapName" . }}
      key: store
# s3Endpoint is in the ConfigMap only when set (an empty variable would count as set).
- name: DATASTORE_S3_ENDPOINT
  valueFrom:
    configMapKeyRef:
      name: {{ include "datastore-csi.configMapName" . }}
      key: s3Endpoint
      optional: true
{{- if .Values.store.region }}
# Only when set: on EKS the IRSA webhook sets AWS_REGION itself unless the pod names it.
- name: AWS_REGION
  valueFrom:
    configMapKeyRef:
      name: {{ include "datastore-csi.configMapName" . }}
      key: s3Region
{{- end }}
- name: DATASTORE_LOG
  value: {{ .Values.logLevel | quote }}
- name: DATASTORE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end -}}

{{/* Static AWS keys from credentials.secret.name (include only when it is set). */}}
{{- define "datastore-csi.envFrom" -}}
envFrom:
  - secretRef:
      name: {{ .Values.credentials.secret.name }}
{{- end -}}

{{/* Pod annotations that roll pods when the store settings change. */}}
{{- define "datastore-csi.configChecksum" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}
