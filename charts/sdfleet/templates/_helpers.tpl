{{- define "sdfleet.name" -}}sdfleet{{- end }}

{{- define "sdfleet.fullname" -}}
{{- if contains "sdfleet" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-sdfleet" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end }}

{{- define "sdfleet.labels" -}}
app.kubernetes.io/name: sdfleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "sdfleet.selectorLabels" -}}
app.kubernetes.io/name: sdfleet
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sdfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "sdfleet.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end }}
