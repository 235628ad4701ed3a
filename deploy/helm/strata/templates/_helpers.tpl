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

{{/* The URL the chart's own clients dial: https:// when stratad serves TLS. */}}
{{- define "strata.url" -}}
{{ if .Values.tls.secretName }}https{{ else }}http{{ end }}://{{ include "strata.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.port }}
{{- end -}}

{{/*
Environment of a client of stratad (strata CLI, SDK, sidecar) for TLS: the
CA to trust and the client certificate, as mounted by strata.clientTlsMounts.
*/}}
{{- define "strata.clientTlsEnv" -}}
{{- if and .Values.tls.secretName .Values.tls.caKey }}
- name: STRATA_TLS_CA
  value: /etc/strata/tls-ca/ca.crt
{{- end }}
{{- if and .Values.tls.secretName .Values.tls.clientSecret }}
- name: STRATA_TLS_CLIENT_CERT
  value: /etc/strata/tls-client/tls.crt
- name: STRATA_TLS_CLIENT_KEY
  value: /etc/strata/tls-client/tls.key
{{- end }}
{{- end -}}

{{/* true when a client pod mounts TLS files (a CA or a client certificate). */}}
{{- define "strata.clientTls" -}}
{{- if and .Values.tls.secretName (or .Values.tls.caKey .Values.tls.clientSecret) -}}true{{- end -}}
{{- end -}}

{{- define "strata.clientTlsMounts" -}}
{{- if and .Values.tls.secretName .Values.tls.caKey }}
- name: tls-ca
  mountPath: /etc/strata/tls-ca
  readOnly: true
{{- end }}
{{- if and .Values.tls.secretName .Values.tls.clientSecret }}
- name: tls-client
  mountPath: /etc/strata/tls-client
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes of strata.clientTlsMounts: the CA only, never stratad's key. */}}
{{- define "strata.clientTlsVolumes" -}}
{{- if and .Values.tls.secretName .Values.tls.caKey }}
- name: tls-ca
  secret:
    secretName: {{ .Values.tls.secretName }}
    items:
      - key: {{ .Values.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if and .Values.tls.secretName .Values.tls.clientSecret }}
- name: tls-client
  secret:
    secretName: {{ .Values.tls.clientSecret }}
{{- end }}
{{- end -}}

{{/*
A probe of stratad's port: HTTP(S) GET of `path`, or a TCP connect under
mutual TLS (the kubelet has no client certificate).
*/}}
{{- define "strata.probe" -}}
{{- if .root.Values.tls.clientCASecret }}
tcpSocket:
  port: http
{{- else }}
httpGet:
  path: {{ .path }}
  port: http
  {{- if .root.Values.tls.secretName }}
  scheme: HTTPS
  {{- end }}
{{- end }}
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
        {{- if .Values.tls.secretName }}
        - name: STRATA_TLS_CERT
          value: /etc/strata/tls/tls.crt
        - name: STRATA_TLS_KEY
          value: /etc/strata/tls/tls.key
        {{- end }}
        {{- if and .Values.tls.secretName .Values.tls.clientCASecret }}
        - name: STRATA_TLS_CLIENT_CA
          value: /etc/strata/tls-client-ca/ca.crt
        {{- end }}
        {{- if .Values.otlpEndpoint }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ .Values.otlpEndpoint | quote }}
        {{- end }}
        - name: STRATA_PROBES_DENY_PRIVATE
          value: {{ .Values.probes.denyPrivate | quote }}
        {{- with .Values.probes.allow }}
        - name: STRATA_PROBES_ALLOW
          value: {{ join "," . | quote }}
        {{- end }}
        {{- with .Values.probes.deny }}
        - name: STRATA_PROBES_DENY
          value: {{ join "," . | quote }}
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
      # requests while in-flight ones drain. Under mutual TLS the probes only
      # connect (the kubelet has no client certificate).
      readinessProbe:
        {{- include "strata.probe" (dict "root" . "path" "/readyz") | trim | nindent 8 }}
        periodSeconds: 2
        failureThreshold: 2
      livenessProbe:
        {{- include "strata.probe" (dict "root" . "path" "/healthz") | trim | nindent 8 }}
        periodSeconds: 10
        failureThreshold: 3
      startupProbe:
        {{- include "strata.probe" (dict "root" . "path" "/healthz") | trim | nindent 8 }}
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
        {{- if .Values.tls.secretName }}
        - name: tls
          mountPath: /etc/strata/tls
          readOnly: true
        {{- end }}
        {{- if and .Values.tls.secretName .Values.tls.clientCASecret }}
        - name: tls-client-ca
          mountPath: /etc/strata/tls-client-ca
          readOnly: true
        {{- end }}
  {{- if or (include "strata.etcdMode" .) .Values.tls.secretName }}
  volumes:
    {{- if .Values.tls.secretName }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.secretName }}
    {{- end }}
    {{- if and .Values.tls.secretName .Values.tls.clientCASecret }}
    - name: tls-client-ca
      secret:
        secretName: {{ .Values.tls.clientCASecret }}
    {{- end }}
  {{- end }}
  {{- if include "strata.etcdMode" . }}
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
