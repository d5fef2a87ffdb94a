{{/* Names: <release>-<component>, cut to the 63 characters Kubernetes allows. */}}
{{- define "sluice.name" -}}
{{- printf "%s-%s" .root.Release.Name .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.labels" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "sluice.selector" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A stage's consumer group, as Settings.group_id builds it. */}}
{{- define "sluice.group" -}}
{{- $base := printf "%s-%s" (trimSuffix "." .root.Values.topicPrefix) .component -}}
{{- if .root.Values.groupSuffix -}}
{{- printf "%s-%s" $base .root.Values.groupSuffix -}}
{{- else -}}
{{- $base -}}
{{- end -}}
{{- end -}}

{{/* The environment every Sluice container gets; the instance id is the pod's name (stable
     for StatefulSets: exactly-once stages need it for their transactional id). */}}
{{- define "sluice.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "sluice.name" (dict "root" .root "component" "settings") }}
{{- with .root.Values.secretName }}
  - secretRef:
      name: {{ . }}
{{- end }}
env:
  - name: SLUICE_INSTANCE_ID
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
{{- end -}}

{{- define "sluice.image" -}}
{{- $image := ternary .root.Values.cudaImage .root.Values.image (default false .gpu) -}}
image: {{ printf "%s:%s" $image.repository $image.tag | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
{{- end -}}
