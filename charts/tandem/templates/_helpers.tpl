{{/* Names and labels shared by every template (the conventions of `helm create`). */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object-name prefix: the release name alone when it already says "tandem". */}}
{{- define "tandem.fullname" -}}
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

{{/* Name of the operator's objects: "tandem-operator" for a release called tandem, like manifests/. */}}
{{- define "tandem.operatorName" -}}
{{- printf "%s-operator" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades, so only name, instance and component. */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object; (dict "context" $ "component" "...") overrides the component (default operator). */}}
{{- define "tandem.labels" -}}
{{- $context := .context | default . -}}
helm.sh/chart: {{ include "tandem.chart" $context }}
app.kubernetes.io/name: {{ include "tandem.name" $context }}
app.kubernetes.io/instance: {{ $context.Release.Name }}
app.kubernetes.io/component: {{ .component | default "operator" }}
app.kubernetes.io/version: {{ $context.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $context.Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces that get the worker NetworkPolicy, joined by commas. */}}
{{- define "tandem.workerNamespaces" -}}
{{- .Values.networkPolicy.workerNamespaces | default (list (.Values.watchNamespace | default .Release.Namespace)) | join "," }}
{{- end }}

{{/*
The operator's permissions: exactly the rules of manifests/rbac/rbac.yaml (tests/kube/test_chart.py compares
them), used by the ClusterRole or, with watchNamespace, by a Role in that namespace.
*/}}
{{- define "tandem.operatorRules" -}}
# Jobs: watched, finalised (TTL deletes them), status written only through the subresource.
- apiGroups: [tandem.dev]
  resources: [distributedtrainingjobs]
  verbs: [get, list, watch, delete]
- apiGroups: [tandem.dev]
  resources: [distributedtrainingjobs/status]
  verbs: [update]
# Children carry ownerReferences with blockOwnerDeletion: clusters that enforce owner-reference
# permissions (the OwnerReferencesPermissionEnforcement admission plugin, on by default in OpenShift)
# allow setting it only to who may update the owner's finalizers.
- apiGroups: [tandem.dev]
  resources: [distributedtrainingjobs/finalizers]
  verbs: [update]
# The children of a job: created whole, never edited in place, deleted on restart and clean-up.
- apiGroups: [""]
  resources: [pods, services, configmaps]
  verbs: [get, list, watch, create, delete]
# Rendezvous Secrets: created only. Never read (that would expose every Secret of the cluster), nor
# deleted (a DELETE answers with the object, data included): each goes with its job (owner reference).
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
# Events mirror every status transition.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# Nodes, read only: a pod stuck terminating is force-deleted only when its node is unreachable (a namespaced
# Role cannot grant this; the operator then recognises lost nodes by pod status only).
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
{{- end }}
