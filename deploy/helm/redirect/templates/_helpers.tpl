{{/*
Names are fixed, not prefixed with the release name: the agent owns node-wide state (the
programs at the cgroup root, the pins under /sys/fs/bpf/redirect, the router port), so there
is one installation per cluster, and the kustomize base uses the same names.
*/}}

{{/* Labels on every object. Pod templates carry only the selector labels plus component. */}}
{{- define "redirect.labels" -}}
app.kubernetes.io/part-of: redirect
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The image reference: repository:tag (tag defaults to appVersion), or repository@digest. */}}
{{- define "redirect.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* A comma-separated key list, which must not be empty. */}}
{{- define "redirect.keyList" -}}
{{- $names := .names | default list -}}
{{- if eq (len $names) 0 -}}
{{- fail (printf "keys.%s must name at least one key" .what) -}}
{{- end -}}
{{- join "," $names -}}
{{- end }}

{{/* Where the admin endpoint listens, and whether the probes need host 127.0.0.1. */}}
{{- define "redirect.adminHost" -}}
{{- if eq .Values.agent.adminListen "loopback" -}}
127.0.0.1
{{- else if eq .Values.agent.adminListen "node" -}}
$(NODE_IP)
{{- else -}}
{{- fail (printf "agent.adminListen must be loopback or node, not %q" .Values.agent.adminListen) -}}
{{- end -}}
{{- end }}

{{/* An httpGet probe on the agent's admin endpoint. */}}
{{- define "redirect.adminProbe" -}}
httpGet:
  {{- if eq .root.Values.agent.adminListen "loopback" }}
  host: 127.0.0.1
  {{- end }}
  path: {{ .path }}
  port: {{ .root.Values.agent.adminPort }}
{{- end }}

{{/*
The agent's container security context, shared with the cleanup hook (the same bpf() calls
and pin removals need the same rights). deploy/agent-daemonset.yaml says why each part is
there.
*/}}
{{- define "redirect.agentSecurityContext" -}}
privileged: {{ .Values.agent.privileged }}
runAsUser: 0
runAsNonRoot: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
  add: ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
seccompProfile:
  type: RuntimeDefault
appArmorProfile:
  type: Unconfined
seLinuxOptions:
  type: spc_t
  level: s0
{{- end }}
