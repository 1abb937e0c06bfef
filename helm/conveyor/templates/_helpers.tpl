{{/* Names and labels, the conventional way. */}}
{{- define "conveyor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "conveyor.fullname" -}}
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

{{- define "conveyor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "conveyor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conveyor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conveyor.labels" -}}
helm.sh/chart: {{ include "conveyor.chart" . }}
{{ include "conveyor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: consumer
{{- end }}

{{- define "conveyor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "conveyor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "conveyor.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The broker the daemon consumes from: "rabbitmq" (its default) or "kafka". */}}
{{- define "conveyor.sourceKind" -}}
{{- dig "source" "kind" "rabbitmq" .Values.config }}
{{- end }}

{{/*
conveyor.drainSeconds: config.shutdown.drain_timeout in whole seconds,
rounded up. Accepts the humantime subset the schema allows: one or more
<integer><unit> with unit ms, s, m or h ("500ms", "20s", "1m30s").
*/}}
{{- define "conveyor.drainSeconds" -}}
{{- $d := dig "shutdown" "drain_timeout" "20s" .Values.config | toString }}
{{- $parts := regexFindAll "[0-9]+(ms|h|m|s)" $d -1 }}
{{- if or (not $parts) (ne (join "" $parts) $d) }}
{{- fail (printf "config.shutdown.drain_timeout: %q is not a duration like \"20s\", \"1m30s\" or \"500ms\"" $d) }}
{{- end }}
{{- $ms := 0 }}
{{- range $parts }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := regexFind "[a-z]+$" . }}
{{- $factor := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit }}
{{- $ms = add $ms (mul $n $factor) }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{- define "conveyor.terminationGracePeriodSeconds" -}}
{{- add (include "conveyor.drainSeconds" . | atoi) .Values.terminationGraceMarginSeconds }}
{{- end }}

{{/*
conveyor.toml: renders a values tree as TOML. Helm's own toToml turns every
YAML integer into a float ("512.0", "1.6777216e+07"), which conveyor's typed
configuration rejects, so scalars are rendered here: integral numbers as
integers, strings as JSON strings (JSON's escapes are valid TOML basic-string
escapes), booleans, and flat arrays of those. Nested maps become [tables].
null values are dropped, so setting a key to null restores its built-in
default. Call with (dict "table" MAP "path" "").
*/}}
{{- define "conveyor.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "conveyor.toml.scalar" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) (kindIs "uint64" .) }}{{ . }}
{{- else }}{{ fail (printf "config: cannot render %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{- define "conveyor.toml" -}}
{{- $table := .table }}
{{- $path := .path }}
{{- range $k, $v := $table }}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{- if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "conveyor.toml.scalar" .) }}{{ end }}
{{ include "conveyor.toml.key" $k }} = [{{ join ", " $items }}]
{{- else }}
{{ include "conveyor.toml.key" $k }} = {{ include "conveyor.toml.scalar" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- range $k, $v := $table }}
{{- if kindIs "map" $v }}
{{- $sub := ternary (include "conveyor.toml.key" $k) (printf "%s.%s" $path (include "conveyor.toml.key" $k)) (eq $path "") }}

[{{ $sub }}]
{{- include "conveyor.toml" (dict "table" $v "path" $sub) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuses combinations that would deploy something broken. */}}
{{- define "conveyor.validate" -}}
{{- if and .Values.keda.enabled .Values.autoscaling.enabled }}
{{- fail "keda.enabled and autoscaling.enabled are mutually exclusive: a KEDA ScaledObject owns its own HPA" }}
{{- end }}
{{- if and .Values.keda.enabled (eq (include "conveyor.sourceKind" .) "rabbitmq") (not .Values.keda.rabbitmq.authenticationRef) (not .Values.secrets.existingSecret) }}
{{- fail "keda with a rabbitmq source needs secrets.existingSecret (key keda.rabbitmq.hostSecretKey holds the AMQP URI) or keda.rabbitmq.authenticationRef" }}
{{- end }}
{{- if and (eq (include "conveyor.sourceKind" .) "kafka") .Values.keda.enabled (not (dig "kafka" "group_id" "" .Values.config)) }}
{{- fail "keda with a kafka source needs config.kafka.group_id: the lag is read for that consumer group" }}
{{- end }}
{{- end }}

{{/*
The ingest Deployment's names and labels. Its pods carry a name label of
their own (<name>-ingest), so that the consumer's Deployment, Service and
PodDisruptionBudget, which select on name and instance, never take them in.
*/}}
{{- define "conveyor.ingest.fullname" -}}
{{- printf "%s-ingest" (include "conveyor.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "conveyor.ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-ingest" (include "conveyor.name" . | trunc 56 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conveyor.ingest.labels" -}}
helm.sh/chart: {{ include "conveyor.chart" . }}
{{ include "conveyor.ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: ingest
app.kubernetes.io/part-of: {{ include "conveyor.name" . }}
{{- end }}

{{/* The ingest pods' grace period: the preStop pause, then the drain. */}}
{{- define "conveyor.ingest.terminationGracePeriodSeconds" -}}
{{- add (include "conveyor.terminationGracePeriodSeconds" . | atoi) .Values.ingest.preStopSleepSeconds }}
{{- end }}

{{/* Passwords from secrets.existingSecret, as CONVEYOR__*__PASSWORD (a list of EnvVar). */}}
{{- define "conveyor.secretEnv" -}}
{{- $secret := .Values.secrets.existingSecret }}
{{- if and $secret .Values.secrets.databasePasswordKey }}
- name: CONVEYOR__DATABASE__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secrets.databasePasswordKey }}
{{- end }}
{{- if and $secret .Values.secrets.rabbitmqPasswordKey (eq (include "conveyor.sourceKind" .) "rabbitmq") }}
- name: CONVEYOR__RABBITMQ__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secrets.rabbitmqPasswordKey }}
{{- end }}
{{- end }}
