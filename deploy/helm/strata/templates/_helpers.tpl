{{/* Names and labels shared by the templates. */}}

{{- define "strata.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "strata.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "strata.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strata.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: stratad
{{- end -}}

{{- define "strata.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "strata.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "strata.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* true when stratad runs replicated over etcd. */}}
{{- define "strata.etcdMode" -}}
{{- if .Values.etcd.endpoints -}}true{{- end -}}
{{- end -}}

{{/*
The stratad pod template, shared by the StatefulSet (embedded store) and the
Deployment (etcd).
*/}}
{{- define "strata.podTemplate" -}}
metadata:
  labels:
    {{- include "strata.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "strata.serviceAccountName" . }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # SIGTERM drain: stratad's own grace plus the preStop pause, with margin.
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: stratad
      image: {{ include "strata.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["stratad"]
      args:
        - --listen=0.0.0.0:{{ .Values.port }}
        - --data-dir=/var/lib/strata
        - --shutdown-grace={{ .Values.shutdownGrace }}
        - --auth={{ .Values.auth.mode }}
        - --metrics-auth={{ .Values.auth.metrics }}
      env:
        {{- if include "strata.etcdMode" . }}
        - name: STRATA_ETCD_ENDPOINTS
          value: {{ join "," .Values.etcd.endpoints | quote }}
        - name: STRATA_ETCD_PREFIX
          value: {{ .Values.etcd.prefix | quote }}
        {{- if .Values.etcd.tlsSecret }}
        - name: STRATA_ETCD_CA_FILE
          value: /etc/strata/etcd-tls/ca.crt
        - name: STRATA_ETCD_CERT_FILE
          value: /etc/strata/etcd-tls/tls.crt
        - name: STRATA_ETCD_KEY_FILE
          value: /etc/strata/etcd-tls/tls.key
        {{- end }}
        {{- if .Values.etcd.username }}
        - name: STRATA_ETCD_USERNAME
          value: {{ .Values.etcd.username | quote }}
        - name: STRATA_ETCD_PASSWORD_FILE
          value: /etc/strata/etcd-password/password
        {{- end }}
        {{- end }}
        {{- if .Values.otlpEndpoint }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ .Values.otlpEndpoint | quote }}
        {{- end }}
        {{- range $name, $value := .Values.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.port }}
          protocol: TCP
      # /readyz is 200 once the store is open and the view loaded, and turns
      # 503 as soon as SIGTERM arrives, so the Service stops sending new
      # requests while in-flight ones drain.
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: 2
        failureThreshold: 2
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 10
        failureThreshold: 3
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 2
        failureThreshold: 60
      lifecycle:
        preStop:
          # Endpoints controllers and kube-proxy take a moment to drop the pod;
          # keep serving meanwhile, then SIGTERM starts the drain.
          exec:
            command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /var/lib/strata
        {{- if and (include "strata.etcdMode" .) .Values.etcd.tlsSecret }}
        - name: etcd-tls
          mountPath: /etc/strata/etcd-tls
          readOnly: true
        {{- end }}
        {{- if and (include "strata.etcdMode" .) .Values.etcd.username }}
        - name: etcd-password
          mountPath: /etc/strata/etcd-password
          readOnly: true
        {{- end }}
  {{- if include "strata.etcdMode" . }}
  volumes:
    # etcd mode keeps nothing on local disk but the admin token written on
    # first start.
    - name: data
      emptyDir: {}
    {{- if .Values.etcd.tlsSecret }}
    - name: etcd-tls
      secret:
        secretName: {{ .Values.etcd.tlsSecret }}
    {{- end }}
    {{- if .Values.etcd.username }}
    - name: etcd-password
      secret:
        secretName: {{ .Values.etcd.passwordSecret }}
    {{- end }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.affinity }}
  affinity:
    {{- toYaml .Values.affinity | nindent 4 }}
  {{- else if include "strata.etcdMode" . }}
  # Spread replicas over nodes so one node's loss leaves the others serving.
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "strata.selectorLabels" . | nindent 16 }}
  {{- end }}
{{- end -}}
