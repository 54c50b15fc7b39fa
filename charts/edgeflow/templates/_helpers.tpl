{{/* Names. */}}
{{- define "edgeflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edgeflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "edgeflow.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "edgeflow.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels: pass (dict "ctx" $ "component" "candidates"). */}}
{{- define "edgeflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgeflow.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "edgeflow.labels" -}}
{{ include "edgeflow.selectorLabels" . }}
app.kubernetes.io/part-of: edgeflow
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Images. */}}
{{- define "edgeflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "edgeflow.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* Endpoints: in-cluster by default, or the external ones. Empty when the URL is in
     redis.existingSecret (edgeflow.redisSecret). */}}
{{- define "edgeflow.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "edgeflow.fullname" .) .Release.Namespace -}}
{{- else if not (include "edgeflow.redisSecret" .) -}}
{{- required "redis.externalUrl (or redis.existingSecret) is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The Secret whose redis.existingSecretKey holds REDIS_URL (an external Redis's URL with
     its password); empty: REDIS_URL is a plain value. Fails on values that contradict it. */}}
{{- define "edgeflow.redisSecret" -}}
{{- with .Values.redis.existingSecret -}}
{{- if $.Values.redis.enabled -}}
{{- fail "redis.existingSecret holds the URL of an external Redis: set redis.enabled=false (the chart's in-cluster Redis has no password)" -}}
{{- end -}}
{{- if $.Values.redis.externalUrl -}}
{{- fail "redis.existingSecret and redis.externalUrl are both set: the URL belongs in the Secret only, leave redis.externalUrl empty (and list the Redis ports in redis.externalPorts)" -}}
{{- end -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* REDIS_URL and QDRANT_API_KEY from the Secrets the values name, as container env entries
     (valueFrom.secretKeyRef); nothing when neither is set. */}}
{{- define "edgeflow.secretEnv" -}}
{{- with include "edgeflow.redisSecret" . }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.redis.existingSecretKey | quote }}}
{{- end }}
{{- with .Values.qdrant.existingSecret }}
- name: QDRANT_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.qdrant.existingSecretKey | quote }}}
{{- end }}
{{- end -}}

{{- define "edgeflow.qdrantUrl" -}}
{{- if .Values.qdrant.enabled -}}
{{- printf "http://%s-qdrant.%s.svc:6333" (include "edgeflow.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "qdrant.externalUrl is required when qdrant.enabled is false" .Values.qdrant.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The environment every edgeflow process gets, as a name -> value map (JSON); the
     secrets (edgeflow.secretEnv) are not in it. */}}
{{- define "edgeflow.env" -}}
{{- $fullname := include "edgeflow.fullname" . -}}
{{- $env := dict "QDRANT_URL" (include "edgeflow.qdrantUrl" .) "LOG_LEVEL" .Values.logLevel -}}
{{- /* With redis.existingSecret the URL is never a plain value (edgeflow.secretEnv) */ -}}
{{- if not (include "edgeflow.redisSecret" .) -}}
{{- $_ := set $env "REDIS_URL" (include "edgeflow.redisUrl" .) -}}
{{- end -}}
{{- with .Values.qdrant.collection -}}
{{- $_ := set $env "QDRANT_SHARDS" (toString .shards) -}}
{{- $_ := set $env "QDRANT_REPLICAS" (toString .replicas) -}}
{{- $_ := set $env "QDRANT_HNSW_M" (toString .hnsw.m) -}}
{{- $_ := set $env "QDRANT_HNSW_EF_CONSTRUCT" (toString .hnsw.efConstruct) -}}
{{- $_ := set $env "QDRANT_HNSW_EF" (toString .hnsw.ef) -}}
{{- $_ := set $env "QDRANT_QUANTIZATION" .quantization -}}
{{- end -}}
{{- range $name, $svc := .Values.services -}}
{{- $_ := set $env (printf "%s_ADDR" (upper $name)) (printf "%s-%s.%s.svc:%d" $fullname $name $.Release.Namespace (int $svc.port)) -}}
{{- end -}}
{{- if .Values.tracing.otlpEndpoint -}}
{{- $_ := set $env "OTEL_EXPORTER_OTLP_ENDPOINT" .Values.tracing.otlpEndpoint -}}
{{- end -}}
{{- /* scoring.remote may call this release's scoring service and the allowed endpoints only */ -}}
{{- $allow := prepend .Values.remoteScoring.allowedEndpoints (index $env "SCORING_ADDR" | default "") | compact -}}
{{- $_ := set $env "EDGEFLOW_REMOTE_ENDPOINTS" (join "," $allow) -}}
{{- toJson $env -}}
{{- end -}}

{{/* Pod annotations for annotation-based Prometheus discovery (the operator writes the same
     on the gateways and nearline workers it creates). */}}
{{- define "edgeflow.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end -}}

{{/* The operator's RBAC rules. Least privilege: exactly the verbs and resources it uses. */}}
{{- define "edgeflow.operatorRules" }}
rules:
  # Watch EdgeWorkflows, keep kopf's progress in their annotations, write their status.
  - apiGroups: [edgeflow.dev]
    resources: [edgeworkflows]
    verbs: [get, list, watch, patch]
  - apiGroups: [edgeflow.dev]
    resources: [edgeworkflows/status]
    verbs: [get, patch]
  # The children of each workflow.
  - apiGroups: [""]
    resources: [configmaps, services]
    verbs: [get, create, patch, delete]
  - apiGroups: [apps]
    resources: [deployments]
    verbs: [get, create, patch, delete]
  - apiGroups: [batch]
    resources: [cronjobs]
    verbs: [get, create, patch, delete]
  - apiGroups: [autoscaling]
    resources: [horizontalpodautoscalers]
    verbs: [get, create, patch, delete]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [get, create, patch, delete]
  # Events about each workflow (invalid graphs, reconciles).
  - apiGroups: [""]
    resources: [events]
    verbs: [create]
{{- end }}

{{/* The node labels every edgeflow Deployment's pods are spread over (the chart's services and
     the operator's gateways and workers alike), as a JSON list: the non-empty ones of
     availability.topologyKey and zoneTopologyKey, each once. */}}
{{- define "edgeflow.topologyKeys" -}}
{{- $keys := list -}}
{{- range $key := list .Values.availability.topologyKey .Values.availability.zoneTopologyKey -}}
{{- if and $key (not (has $key $keys)) }}{{ $keys = append $keys $key }}{{ end -}}
{{- end -}}
{{- toJson $keys -}}
{{- end }}

{{/* The Secret whose keys.json the gateways check API keys against; empty: keys off. */}}
{{- define "edgeflow.authSecret" -}}
{{- if .Values.auth.enabled -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "edgeflow.fullname" .)) -}}
{{- end -}}
{{- end }}

{{/* The Secret (ca.crt, tls.crt, tls.key) every edgeflow pod mounts for TLS; empty: TLS off.
     Fails unless exactly one source is named. */}}
{{- define "edgeflow.tlsSecret" -}}
{{- if .Values.tls.enabled -}}
{{- $sources := list -}}
{{- if .Values.tls.existingSecret }}{{ $sources = append $sources "tls.existingSecret" }}{{ end -}}
{{- if .Values.tls.certManager.issuerRef.name }}{{ $sources = append $sources "tls.certManager.issuerRef.name" }}{{ end -}}
{{- if .Values.tls.selfSigned }}{{ $sources = append $sources "tls.selfSigned" }}{{ end -}}
{{- if ne (len $sources) 1 -}}
{{- fail (printf "tls.enabled needs exactly one of tls.existingSecret, tls.certManager.issuerRef.name or tls.selfSigned (got %s)" (ternary "none" (join ", " $sources) (empty $sources))) -}}
{{- end -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "edgeflow.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{- define "edgeflow.tlsDir" -}}/etc/edgeflow/tls{{- end -}}

{{/* With TLS on, the kubelet's probes GET /healthz on the metrics port (its gRPC probes
     speak no TLS); without, they call the gRPC health service. Pass (dict "ctx" $ "port" N
     "period" P "failures" F). */}}
{{- define "edgeflow.probe" -}}
{{- if .ctx.Values.tls.enabled -}}
httpGet: {path: /healthz, port: {{ .ctx.Values.metrics.port }}}
{{- else -}}
grpc: {port: {{ .port }}}
{{- end }}
periodSeconds: {{ .period }}
failureThreshold: {{ .failures }}
{{- end -}}

{{/* The TLS Secret as a pod volume: the whole directory (no subPath), so the kubelet swaps
     in a renewed certificate and the services reload it; group-readable only when the pod
     has an fsGroup to own it. */}}
{{- define "edgeflow.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "edgeflow.tlsSecret" . }}
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
    {{- if hasKey .Values.podSecurityContext "fsGroup" }}
    defaultMode: 0440
    {{- end }}
{{- end -}}
