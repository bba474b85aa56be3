{{/*
Public named templates (see README.md), each taking a root context: this chart's own, or that of
a chart that has agentproxy as a dependency (its values then under `agentproxy:`).

  agentproxy.sidecar         the proxy's container, for a pod's `containers:` list
  agentproxy.volumes         its volumes, for the pod's `volumes:` list
  agentproxy.podLabels       the label that the Service, NetworkPolicy and PDB select on
  agentproxy.podAnnotations  Prometheus scrape annotations and podAnnotations

The rest take a "scope" (a dict built by agentproxy.scope) so that every name and port is
computed in one place, whichever chart the template is included from.
*/}}

{{- define "agentproxy.sidecar" -}}
{{- $scope := dict -}}
{{- include "agentproxy.scope" (dict "root" . "out" $scope) -}}
{{- include "agentproxy.container" $scope -}}
{{- end -}}

{{- define "agentproxy.volumes" -}}
{{- $scope := dict -}}
{{- include "agentproxy.scope" (dict "root" . "out" $scope) -}}
{{- include "agentproxy.volumeList" $scope -}}
{{- end -}}

{{- define "agentproxy.podLabels" -}}
{{- $scope := dict -}}
{{- include "agentproxy.scope" (dict "root" . "out" $scope) -}}
{{- include "agentproxy.podSelector" $scope -}}
{{- end -}}

{{- define "agentproxy.podAnnotations" -}}
{{- $scope := dict -}}
{{- include "agentproxy.scope" (dict "root" . "out" $scope) -}}
{{- $annotations := dict -}}
{{- if $scope.values.metrics.scrapeAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString $scope.adminPort) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $annotations = merge (deepCopy $scope.values.podAnnotations) $annotations -}}
{{- if $annotations -}}
{{- toYaml $annotations -}}
{{- end -}}
{{- end -}}

{{/*
agentproxy.scope (dict "root" ROOT "out" DICT) fills DICT with: values (this chart's values),
root, release, fullname, appVersion, httpPort, adminPort, demoIssuer (the example supplies the
issuer), demoPolicy (the example supplies the policy), secretsVolume (a secrets volume exists).
*/}}
{{- define "agentproxy.scope" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $appVersion := $root.Chart.AppVersion -}}
{{- $chartVersion := $root.Chart.Version -}}
{{- if ne $root.Chart.Name "agentproxy" -}}
{{- if not (kindIs "map" (index $root.Values "agentproxy")) -}}
{{- fail (printf "the agentproxy templates are included from chart %q, which has no `agentproxy:` values: add agentproxy to its dependencies (name agentproxy, no alias)" $root.Chart.Name) -}}
{{- end -}}
{{- $values = index $root.Values "agentproxy" -}}
{{- $appVersion = "" -}}
{{- $chartVersion = "" -}}
{{- if and $root.Subcharts (index $root.Subcharts "agentproxy") -}}
{{- $appVersion = (index $root.Subcharts "agentproxy").Chart.AppVersion -}}
{{- $chartVersion = (index $root.Subcharts "agentproxy").Chart.Version -}}
{{- end -}}
{{- end -}}
{{- $name := default "agentproxy" $values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- $fullname := "" -}}
{{- if $values.fullnameOverride -}}
{{- $fullname = $values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains $name $root.Release.Name -}}
{{- $fullname = $root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $fullname = printf "%s-%s" $root.Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- $listen := default (dict) $values.config.listen -}}
{{- $issuers := (default (dict) $values.config.identity).issuers -}}
{{- $demoIssuer := and $values.example.enabled (empty $issuers) -}}
{{- $demoPolicy := and $values.example.enabled (empty $values.policies) -}}
{{- $_ := set .out "values" $values -}}
{{- $_ := set .out "root" $root -}}
{{- $_ := set .out "release" $root.Release -}}
{{- $_ := set .out "name" $name -}}
{{- $_ := set .out "fullname" $fullname -}}
{{- $_ := set .out "appVersion" $appVersion -}}
{{- $_ := set .out "chartVersion" $chartVersion -}}
{{- $_ := set .out "httpPort" (include "agentproxy.port" (default "0.0.0.0:8080" $listen.http) | atoi) -}}
{{- $_ := set .out "adminPort" (include "agentproxy.port" (default "0.0.0.0:9901" $listen.admin) | atoi) -}}
{{- /* gRPC listeners exist only when configured: 0 means none. */ -}}
{{- $_ := set .out "grpcPort" (include "agentproxy.port" (default "" $listen.grpc) | atoi) -}}
{{- $_ := set .out "adminGrpcPort" (include "agentproxy.port" (default "" $listen.admin_grpc) | atoi) -}}
{{- /* Envoy's ext_authz: configured, or 9191 for the decision service (mode c). */ -}}
{{- $extAuthz := default (ternary "0.0.0.0:9191" "" $values.decisionService.enabled) $listen.ext_authz -}}
{{- $_ := set .out "extAuthzListen" $extAuthz -}}
{{- $_ := set .out "extAuthzPort" (include "agentproxy.port" $extAuthz | atoi) -}}
{{- $_ := set .out "demoIssuer" $demoIssuer -}}
{{- $_ := set .out "demoPolicy" $demoPolicy -}}
{{- $_ := set .out "chartSecret" (or (not (empty $values.secrets.files)) $demoIssuer) -}}
{{- $_ := set .out "secretsVolume" (or (not (empty $values.secrets.files)) $demoIssuer (not (empty $values.secrets.existingSecret))) -}}
{{- end -}}

{{/* The port of a "host:port" listen address. */}}
{{- define "agentproxy.port" -}}
{{- regexFind "[0-9]+$" . | default "0" -}}
{{- end -}}

{{/* (list SCOPE "suffix"): a resource name, fullname-suffix, kept within 63 characters. */}}
{{- define "agentproxy.resourceName" -}}
{{- $scope := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" ($scope.fullname | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{/* Chart labels for the resources this chart creates (SCOPE). */}}
{{- define "agentproxy.labels" -}}
helm.sh/chart: {{ printf "agentproxy-%s" (.chartVersion | default "unknown") | replace "+" "_" | trunc 63 | quote }}
app.kubernetes.io/name: {{ .name | quote }}
app.kubernetes.io/instance: {{ .release.Name | quote }}
app.kubernetes.io/managed-by: {{ .release.Service | quote }}
{{- with .appVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
The label on every pod that runs the sidecar (SCOPE). Its own key, not app.kubernetes.io/*,
so that it never collides with the labels of the user's own workload.
*/}}
{{- define "agentproxy.podSelector" -}}
agentproxy/sidecar: {{ .fullname | quote }}
{{- end -}}

{{- define "agentproxy.image" -}}
{{- $image := .values.image -}}
{{- $tag := $image.tag | default .appVersion -}}
{{- if not $tag -}}
{{- fail "agentproxy.image.tag is empty and the chart's appVersion is unknown here: set agentproxy.image.tag" -}}
{{- end -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}

{{/* The proxy's container (SCOPE), one item of a pod's `containers:` list. */}}
{{- define "agentproxy.container" -}}
{{- $v := .values -}}
- name: agentproxy
  image: {{ include "agentproxy.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["run", "--config", "/etc/agentproxy/config/agentproxy.yaml"]
  ports:
    - name: proxy-http
      containerPort: {{ .httpPort }}
      protocol: TCP
    - name: proxy-admin
      containerPort: {{ .adminPort }}
      protocol: TCP
    {{- if .grpcPort }}
    - name: proxy-grpc
      containerPort: {{ .grpcPort }}
      protocol: TCP
    {{- end }}
    {{- if .adminGrpcPort }}
    - name: proxy-admingrpc
      containerPort: {{ .adminGrpcPort }}
      protocol: TCP
    {{- end }}
    {{- if .extAuthzPort }}
    - name: proxy-extauthz
      containerPort: {{ .extAuthzPort }}
      protocol: TCP
    {{- end }}
  {{- with $v.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: proxy-admin
    {{- with $v.probes.liveness }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: proxy-admin
    {{- with $v.probes.readiness }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: agentproxy-config
      mountPath: /etc/agentproxy/config
      readOnly: true
    - name: agentproxy-policies
      mountPath: /etc/agentproxy/policies
      readOnly: true
    {{- if .secretsVolume }}
    - name: agentproxy-secrets
      mountPath: {{ $v.secrets.mountPath }}
      readOnly: true
    {{- end }}
    - name: agentproxy-tmp
      mountPath: /tmp
    - name: agentproxy-audit
      mountPath: /var/log/agentproxy
{{- end -}}

{{/*
The proxy's volumes (SCOPE), items of a pod's `volumes:` list. ConfigMaps are mounted as
directories, never with subPath, so that an update reaches the running pod.
*/}}
{{- define "agentproxy.volumeList" -}}
{{- $v := .values -}}
- name: agentproxy-config
  configMap:
    name: {{ include "agentproxy.resourceName" (list . "config") }}
- name: agentproxy-policies
  configMap:
    name: {{ include "agentproxy.resourceName" (list . "policies") }}
{{- if .secretsVolume }}
- name: agentproxy-secrets
  projected:
    defaultMode: 0444
    sources:
      {{- if .chartSecret }}
      - secret:
          name: {{ include "agentproxy.resourceName" (list . "secrets") }}
      {{- end }}
      {{- with $v.secrets.existingSecret }}
      - secret:
          name: {{ . }}
      {{- end }}
{{- end }}
- name: agentproxy-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
- name: agentproxy-audit
  {{- toYaml $v.auditVolume | nindent 2 }}
{{- end -}}

{{/* The Redis URL the chart puts into config.store.redis.url, or "" (SCOPE). */}}
{{- define "agentproxy.redisUrl" -}}
{{- $redis := .values.redis -}}
{{- if and $redis.enabled $redis.url -}}
{{- fail "redis: set either redis.url (your Redis) or redis.enabled (the bundled one), not both" -}}
{{- end -}}
{{- if $redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "agentproxy.resourceName" (list . "redis")) -}}
{{- else if $redis.url -}}
{{- if contains "@" $redis.url -}}
{{- fail "redis.url carries credentials, which would land in the config ConfigMap: use a Redis without a password in the URL (e.g. network-restricted), or keep it out of Helm values" -}}
{{- end -}}
{{- $redis.url -}}
{{- end -}}
{{- end -}}

{{/* The store.redis settings the chart puts into the config (SCOPE), as YAML, or "": one
of redis.url / redis.enabled (a URL), redis.sentinel, redis.clusterNodes. */}}
{{- define "agentproxy.redisStore" -}}
{{- $v := .values -}}
{{- $redis := $v.redis -}}
{{- $sentinel := default (dict) $redis.sentinel -}}
{{- $out := dict -}}
{{- $chosen := list -}}
{{- $url := include "agentproxy.redisUrl" . -}}
{{- if $url -}}
{{- $chosen = append $chosen (ternary "redis.enabled" "redis.url" (default false $redis.enabled)) -}}
{{- $_ := set $out "url" $url -}}
{{- end -}}
{{- if or $sentinel.service $sentinel.nodes -}}
{{- $chosen = append $chosen "redis.sentinel" -}}
{{- if not $sentinel.service -}}
{{- fail "redis.sentinel.service is empty: name the master the sentinels watch (e.g. mymaster)" -}}
{{- end -}}
{{- if not $sentinel.nodes -}}
{{- fail "redis.sentinel.nodes is empty: name at least one sentinel as host:port" -}}
{{- end -}}
{{- $_ := set $out "sentinel" (dict "service" $sentinel.service "nodes" $sentinel.nodes) -}}
{{- end -}}
{{- if $redis.clusterNodes -}}
{{- $chosen = append $chosen "redis.clusterNodes" -}}
{{- $_ := set $out "cluster_nodes" $redis.clusterNodes -}}
{{- end -}}
{{- if gt (len $chosen) 1 -}}
{{- fail (printf "redis: set one of redis.url, redis.enabled, redis.sentinel or redis.clusterNodes, not %s" (join " and " $chosen)) -}}
{{- end -}}
{{- if $redis.passwordFile -}}
{{- if not (or $out.sentinel $out.cluster_nodes) -}}
{{- fail "redis.passwordFile is for redis.sentinel or redis.clusterNodes (a single Redis is named by redis.url)" -}}
{{- end -}}
{{- $_ := set $out "password_file" (printf "%s/%s" $v.secrets.mountPath $redis.passwordFile) -}}
{{- end -}}
{{- if $out -}}
{{- toYaml $out -}}
{{- end -}}
{{- end -}}

{{/* agentproxy.yaml (SCOPE): the `config` value plus what the chart owns. */}}
{{- define "agentproxy.configFile" -}}
{{- $v := .values -}}
{{- $config := deepCopy $v.config -}}
{{- $chartRedis := include "agentproxy.redisStore" . | fromYaml -}}
{{- if $chartRedis -}}
{{- $store := default (dict) $config.store -}}
{{- $redis := default (dict) $store.redis -}}
{{- if $redis.url -}}
{{- fail "the Redis URL is set twice: in config.store.redis.url and by the redis values; keep one" -}}
{{- end -}}
{{- if or $redis.sentinel $redis.cluster_nodes -}}
{{- fail "the Redis store is set twice: in config.store.redis and by the redis values; keep one" -}}
{{- end -}}
{{- $redis = merge $redis $chartRedis -}}
{{- $_ := set $store "redis" $redis -}}
{{- $_ := set $config "store" $store -}}
{{- end -}}
{{- if .extAuthzListen -}}
{{- $listen := default (dict) $config.listen -}}
{{- $_ := set $listen "ext_authz" .extAuthzListen -}}
{{- $_ := set $config "listen" $listen -}}
{{- end -}}
{{- $identity := default (dict) $config.identity -}}
{{- if .demoIssuer -}}
{{- $demo := dict "issuer" $v.example.issuer "audiences" (list "agentproxy") "algorithms" (list "HS256") "hs256_secret_file" (printf "%s/example-issuer-hs256" $v.secrets.mountPath) -}}
{{- $_ := set $identity "issuers" (list $demo) -}}
{{- $_ := set $config "identity" $identity -}}
{{- else if empty $identity.issuers -}}
{{- fail "config.identity.issuers is empty: agentproxy verifies every call's token against a trusted issuer, so name at least one (see values.yaml), or set example.enabled=true for the demo" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The bundled Redis pods' labels (SCOPE): not the sidecar's, so no proxy selector takes them. */}}
{{- define "agentproxy.redisSelector" -}}
app.kubernetes.io/name: {{ printf "%s-redis" .name | quote }}
app.kubernetes.io/instance: {{ .release.Name | quote }}
{{- end -}}
