{{/* The chart's name, or nameOverride. */}}
{{- define "batch-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: fullnameOverride, else release name + chart name (once). */}}
{{- define "batch-worker.fullname" -}}
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

{{- define "batch-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "batch-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batch-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "batch-worker.labels" -}}
helm.sh/chart: {{ include "batch-worker.chart" . }}
{{ include "batch-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The status API's pods: their own name label, so that no selector of the workers' (the
Deployment's, the Service's, the PodDisruptionBudget's, the NetworkPolicy's) takes them in.
*/}}
{{- define "batch-worker.webSelectorLabels" -}}
app.kubernetes.io/name: {{ include "batch-worker.name" . | trunc 59 | trimSuffix "-" }}-web
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: web
{{- end }}

{{- define "batch-worker.webLabels" -}}
helm.sh/chart: {{ include "batch-worker.chart" . }}
{{ include "batch-worker.webSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "batch-worker.webName" -}}
{{- include "batch-worker.fullname" . | trunc 59 | trimSuffix "-" }}-web
{{- end }}

{{/*
The chart test pod's labels: the release's, but not the worker's selector labels, so that
neither the Service nor the PodDisruptionBudget nor the NetworkPolicy selects it.
*/}}
{{- define "batch-worker.testLabels" -}}
helm.sh/chart: {{ include "batch-worker.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: chart-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "batch-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "batch-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding CLIENT_SECRET, BROKER_URL and DATABASE_URL. */}}
{{- define "batch-worker.secretName" -}}
{{- default (include "batch-worker.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "batch-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- /* toString: a tag given as a number (the schema refuses one) never renders as %!s(...). */}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
The most worker pods that can run at once: KEDA's ceiling when KEDA scales the fleet,
else the fixed replica count.
*/}}
{{- define "batch-worker.maxPods" -}}
{{- if .Values.keda.enabled }}
{{- if lt (int .Values.keda.maxReplicaCount) (int .Values.keda.minReplicaCount) }}
{{- fail "keda.maxReplicaCount must be at least keda.minReplicaCount" }}
{{- end }}
{{- int .Values.keda.maxReplicaCount }}
{{- else }}
{{- int .Values.replicaCount }}
{{- end }}
{{- end }}

{{/*
The fleet's API budget (BATCH_WORKER_API_BUDGET_PER_MINUTE): the account's limit, less what
is reserved for other clients. Every pod gets the whole of it: the workers share one token
bucket in PostgreSQL, so 1 or 20 pods together stay within it (docs/reliability.md).
*/}}
{{- define "batch-worker.apiBudgetPerPod" -}}
{{- $usable := sub (int .Values.apiBudget.accountLimitPerMinute) (int .Values.apiBudget.reservedPerMinute) }}
{{- if lt $usable 1 }}
{{- fail (printf "apiBudget: reservedPerMinute leaves %d requests/min for the fleet" $usable) }}
{{- end }}
{{- $usable }}
{{- end }}

{{/* Kubernetes' grace after SIGTERM: always longer than the worker's own grace period. */}}
{{- define "batch-worker.terminationGracePeriodSeconds" -}}
{{- $grace := int .Values.gracePeriodSeconds }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $grace 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed gracePeriodSeconds (%d): Kubernetes would kill the worker before it hands its jobs back" (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The liveness probe is the backstop: a stalled worker stops itself (exit code 1) within
gracePeriodSeconds, or ends itself 10 s after that (worker/daemon/liveness.py EXIT_MARGIN). The
probe must give it that long once /healthz fails, or it cuts the hand-back of its jobs short.
*/}}
{{- define "batch-worker.checkLivenessProbe" -}}
{{- $probe := .Values.livenessProbe }}
{{- $window := mul (int (default 10 $probe.periodSeconds)) (int (default 3 $probe.failureThreshold)) }}
{{- $needed := add (int .Values.gracePeriodSeconds) 10 }}
{{- if le (int $window) (int $needed) }}
{{- fail (printf "livenessProbe.periodSeconds x failureThreshold (%d s) must exceed gracePeriodSeconds + 10 (%d s): the probe would restart a stalled worker before it stops itself" (int $window) (int $needed)) }}
{{- end }}
{{- end }}

{{/* Settings the chart sets itself; config must not set them too. */}}
{{- define "batch-worker.checkConfig" -}}
{{- range $key := list "API_BUDGET_PER_MINUTE" "GRACE_PERIOD" "METRICS_PORT" "WORKER_NAME" "SECRETS_DIR" "CLIENT_SECRET" "BROKER_URL" "DATABASE_URL" "WEB_HOST" "WEB_PORT" "WEB_TOKEN" "WEB_BASIC_AUTH" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart; see values.yaml" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The KEDA query: this fleet's jobs in flight (see worker/store/jobs.py, table bw_jobs). */}}
{{- define "batch-worker.activeJobsQuery" -}}
{{- $fleet := default "default" .Values.config.FLEET_ID | toString }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$" $fleet) }}
{{- fail "config.FLEET_ID: letters, digits, '_' and '-' only, 63 at most" }}
{{- end }}
{{- printf "SELECT count(*) FROM bw_jobs WHERE fleet_id = '%s' AND ended_at IS NULL" $fleet }}
{{- end }}
