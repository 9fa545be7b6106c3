{{/* The release's full name, shortened to what a Kubernetes name allows. */}}
{{- define "kandle.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object the chart creates. */}}
{{- define "kandle.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "kandle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator pods. The name differs from the models' children
     (app.kubernetes.io/name=kandle) so that the two never select each other. */}}
{{- define "kandle.selectorLabels" -}}
app.kubernetes.io/name: kandle-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kandle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kandle.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kandle.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* What the operator does to LanguageModels and the children it owns. One list, bound
     cluster-wide (ClusterRole) or per watched namespace (Role). Secrets: get only, by the name
     a LanguageModel gives (tokenSecretRef) — never list or watch. */}}
{{- define "kandle.modelRules" -}}
- apiGroups: ["kandle.dev"]
  resources: ["languagemodels"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["kandle.dev"]
  resources: ["languagemodels/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["kandle.dev"]
  resources: ["languagemodels/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
