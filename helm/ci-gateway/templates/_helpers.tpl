{{/*
Internal helpers. Each takes a "context" with .Values, .Release and .Capabilities: the chart's own
root context, or the one "ci-gateway.sidecar.context" builds for an application chart that
includes the public sidecar templates (_sidecar.tpl). .Chart is only read by templates that
render this chart's own objects, since an including chart's .Chart is its own.
*/}}

{{- define "ci-gateway.name" -}}
{{- default "ci-gateway" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
"ci-gateway" rather than .Chart.Name: the name must come out the same when an application chart
computes it (to find the ConfigMap) as when this chart does (to create it).
*/}}
{{- define "ci-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "ci-gateway" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ci-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ci-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ci-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ci-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ci-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ci-gateway.gatewaySelectorLabels" -}}
{{ include "ci-gateway.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* The tag is set in values.yaml (kept equal to appVersion by a test): an including chart's
.Chart.AppVersion would be its own. */}}
{{- define "ci-gateway.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s:%s@%s" $image.repository $image.tag $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $image.tag -}}
{{- end -}}
{{- end -}}

{{- define "ci-gateway.authSecretName" -}}
{{- default (printf "%s-credentials" (include "ci-gateway.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "ci-gateway.subscriptionKeysSecretName" -}}
{{- default (include "ci-gateway.authSecretName" .) .Values.subscriptionKeys.existingSecret -}}
{{- end -}}

{{- define "ci-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ci-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether a container rendered for this role runs as a native sidecar. */}}
{{- define "ci-gateway.isNative" -}}
{{- if and (eq .role "sidecar") .ctx.Values.sidecar.native -}}true{{- end -}}
{{- end -}}

{{/*
Seconds the gateway container needs from the start of pod termination until it has exited: the
preStop sleep (not for a native sidecar, which the kubelet stops only after the application
containers), the drain (config.shutdownGraceSeconds), and 5 s of margin.
*/}}
{{- define "ci-gateway.shutdownSeconds" -}}
{{- $v := .ctx.Values -}}
{{- $preStop := ternary 0 (int $v.preStopSleepSeconds) (eq (include "ci-gateway.isNative" .) "true") -}}
{{- add $preStop (int $v.config.shutdownGraceSeconds) 5 -}}
{{- end -}}

{{/* terminationGracePeriodSeconds for a pod this chart owns, with the role of its gateway. */}}
{{- define "ci-gateway.podTerminationGracePeriodSeconds" -}}
{{- $needed := int (include "ci-gateway.shutdownSeconds" .) -}}
{{- $set := .ctx.Values.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $set -}}
{{- $needed -}}
{{- else if lt (int $set) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds=%d is shorter than the %d s the gateway needs to stop (preStopSleepSeconds + config.shutdownGraceSeconds + 5): raise it, or set it to null to derive it" (int $set) $needed) -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end -}}

{{/*
Non-secret settings, as the ConfigMap's data. A setting left null (or "") is left out so that the
gateway's own default applies. Integers go through int64: Helm reads YAML numbers as float64,
which would otherwise print large ones as 1e+07.
*/}}
{{- define "ci-gateway.configData" -}}
{{- $c := .Values.config -}}
{{- $a := .Values.auth -}}
{{- $rl := $c.rateLimit -}}
{{- if not .Values.routes -}}
{{- /* With routes each route has its own; the gateway refuses both together. */}}
CIGW_UPSTREAM_URL: {{ $c.upstreamUrl | quote }}
CIGW_SCOPE: {{ $c.scope | quote }}
{{- end }}
CIGW_SHUTDOWN_GRACE: {{ int64 $c.shutdownGraceSeconds | quote }}
CIGW_LOG_LEVEL: {{ $c.logLevel | quote }}
CIGW_LOG_FORMAT: {{ $c.logFormat | quote }}
{{- if not (kindIs "invalid" $c.upstreamTimeoutSeconds) }}
CIGW_UPSTREAM_TIMEOUT: {{ $c.upstreamTimeoutSeconds | toString | quote }}
{{- end }}
{{- with $a.tenantId }}
AZURE_TENANT_ID: {{ . | quote }}
{{- end }}
{{- with $a.clientId }}
AZURE_CLIENT_ID: {{ . | quote }}
{{- end }}
{{- with $a.authorityHost }}
AZURE_AUTHORITY_HOST: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.instanceDiscovery) }}
CIGW_INSTANCE_DISCOVERY: {{ ternary "true" "false" $a.instanceDiscovery | quote }}
{{- end }}
{{- range $env, $value := dict "CIGW_RETRY_ATTEMPTS" $c.retryAttempts "CIGW_MAX_BODY_BYTES" $c.maxBodyBytes "CIGW_MAX_CONNECTIONS" $c.maxConnections "CIGW_WORKERS" $c.workers "CIGW_RATE_LIMIT_BURST" $rl.burst "CIGW_RATE_LIMIT_CALLER_BURST" $rl.callerBurst }}
{{- if not (kindIs "invalid" $value) }}
{{ $env }}: {{ int64 $value | quote }}
{{- end }}
{{- end }}
{{- range $env, $value := dict "CIGW_RATE_LIMIT_RPS" $rl.rps "CIGW_RATE_LIMIT_CALLER_RPS" $rl.callerRps }}
{{- if not (kindIs "invalid" $value) }}
{{ $env }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- with $rl.callerHeader }}
CIGW_RATE_LIMIT_CALLER_HEADER: {{ . | quote }}
{{- end }}
{{- $fleet := .Values.fleet -}}
{{- with $fleet.redis.url }}
CIGW_REDIS_URL: {{ . | quote }}
{{- if not (kindIs "invalid" $fleet.redis.timeoutSeconds) }}
CIGW_REDIS_TIMEOUT: {{ $fleet.redis.timeoutSeconds | toString | quote }}
{{- end }}
{{- with $fleet.name }}
CIGW_FLEET_NAME: {{ . | quote }}
{{- end }}
{{- end }}
{{- if eq .Values.mode "gateway" }}
{{- $cl := .Values.gateway.callers }}
CIGW_CALLER_AUTH: {{ $cl.auth | quote }}
{{- if eq $cl.auth "kubernetes" }}
CIGW_CALLER_ISSUER: {{ $cl.issuer | quote }}
{{- with $cl.jwksUrl }}
CIGW_CALLER_JWKS_URL: {{ . | quote }}
{{- end }}
CIGW_CALLER_AUDIENCE: {{ $cl.audience | quote }}
CIGW_CALLER_ALLOW: {{ join "," (default (list (printf "%s/*" .Release.Namespace)) $cl.allow) | quote }}
{{- with $cl.rateLimits }}
CIGW_RATE_LIMIT_CALLERS: {{ join "," . | quote }}
{{- end }}
{{- with $cl.privilegedHeadersAllow }}
CIGW_PRIVILEGED_HEADERS_ALLOW: {{ join "," . | quote }}
{{- end }}
{{- else if $cl.allowUnauthenticated }}
CIGW_ALLOW_UNAUTHENTICATED_CALLERS: "true"
{{- end }}
{{- end }}
{{- end -}}

{{/*
Routes (values.yaml `routes`): the gateway's YAML configuration file, mounted from the
"<fullname>-routes" ConfigMap and named by CIGW_CONFIG. Subscription keys and CA bundles never
enter it: each route's Secret (or CA ConfigMap) is mounted under routes/<index>/ and the file names
the mounted files (subscription_key_file, upstream_ca_file), which the gateway re-reads on
rotation. Renders nothing without routes.
*/}}
{{- define "ci-gateway.routesConfigMapName" -}}
{{- printf "%s-routes" (include "ci-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ci-gateway.mountRoot" -}}/etc/ci-gateway{{- end -}}

{{/* The directory a route's mounted Secret or ConfigMap lands in: what is "keys" or "ca". */}}
{{- define "ci-gateway.routeDir" -}}
{{- printf "%s/routes/%d/%s" (include "ci-gateway.mountRoot" .ctx) (int .index) .what -}}
{{- end -}}

{{- define "ci-gateway.routesFile" -}}
{{- printf "%s/config/gateway.yaml" (include "ci-gateway.mountRoot" .) -}}
{{- end -}}

{{- define "ci-gateway.routesConfig" -}}
{{- if .Values.routes -}}
{{- $ctx := . -}}
{{- $routes := list -}}
{{- range $i, $r := .Values.routes -}}
{{- $out := dict "prefix" $r.prefix "upstream_url" $r.upstreamUrl "scope" $r.scope -}}
{{- with $r.subscriptionKeySecret -}}
{{- $dir := include "ci-gateway.routeDir" (dict "ctx" $ctx "index" $i "what" "keys") -}}
{{- $_ := set $out "subscription_key_file" (printf "%s/%s" $dir .key) -}}
{{- with .secondaryKey -}}
{{- $_ := set $out "subscription_key_secondary_file" (printf "%s/%s" $dir .) -}}
{{- end -}}
{{- end -}}
{{- with (or $r.upstreamCaSecret $r.upstreamCaConfigMap) -}}
{{- $dir := include "ci-gateway.routeDir" (dict "ctx" $ctx "index" $i "what" "ca") -}}
{{- $_ := set $out "upstream_ca_file" (printf "%s/%s" $dir .key) -}}
{{- end -}}
{{- with $r.rateLimit -}}
{{- if not (kindIs "invalid" .rps) -}}
{{- $_ := set $out "rate_limit_rps" .rps -}}
{{- end -}}
{{- if not (kindIs "invalid" .burst) -}}
{{- $_ := set $out "rate_limit_burst" (int64 .burst) -}}
{{- end -}}
{{- end -}}
{{- if not (kindIs "invalid" $r.rewriteLinks) -}}
{{- $_ := set $out "rewrite_links" $r.rewriteLinks -}}
{{- end -}}
{{- with $r.stripHeaders -}}
{{- $_ := set $out "strip_headers" . -}}
{{- end -}}
{{- $routes = append $routes $out -}}
{{- end -}}
{{- dict "routes" $routes | toYaml -}}
{{- end -}}
{{- end -}}

{{/* The shared gateway's TLS Secret. */}}
{{- define "ci-gateway.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "ci-gateway.fullname" .)) .Values.gateway.tls.secretName -}}
{{- end -}}

{{/*
Rejects combinations that would render objects the gateway cannot use, with a message that says
how to fix them. Renders nothing. Called once per render, from the ConfigMap and from the public
sidecar template.
*/}}
{{- define "ci-gateway.validate" -}}
{{- $v := .Values -}}
{{- $a := $v.auth -}}
{{- $cs := $v.createSecret -}}
{{- if and (eq $a.method "workloadIdentity") (not $a.clientId) -}}
{{- fail "auth.method=workloadIdentity needs auth.clientId: the ServiceAccount's azure.workload.identity/client-id annotation names the identity" -}}
{{- end -}}
{{- if and $a.certificatePassword (ne $a.method "certificate") -}}
{{- fail "auth.certificatePassword=true only applies to auth.method=certificate" -}}
{{- end -}}
{{- if and $v.subscriptionKeys.secondary (not $v.subscriptionKeys.enabled) -}}
{{- fail "subscriptionKeys.secondary=true needs subscriptionKeys.enabled=true: the gateway uses a secondary key only beside a primary one" -}}
{{- end -}}
{{- if $cs.enabled -}}
{{- if or $a.existingSecret $v.subscriptionKeys.existingSecret -}}
{{- fail "createSecret.enabled=true creates <fullname>-credentials: leave auth.existingSecret and subscriptionKeys.existingSecret empty, or disable createSecret" -}}
{{- end -}}
{{- if and (eq $a.method "clientSecret") (not $cs.clientSecret) -}}
{{- fail "createSecret.enabled=true with auth.method=clientSecret needs createSecret.clientSecret" -}}
{{- end -}}
{{- if and (eq $a.method "certificate") (not $cs.certificate) -}}
{{- fail "createSecret.enabled=true with auth.method=certificate needs createSecret.certificate (PEM: certificate and private key)" -}}
{{- end -}}
{{- if and $a.certificatePassword (not $cs.certificatePassword) -}}
{{- fail "createSecret.enabled=true with auth.certificatePassword=true needs createSecret.certificatePassword" -}}
{{- end -}}
{{- if and $v.subscriptionKeys.enabled (not $cs.subscriptionKey) -}}
{{- fail "createSecret.enabled=true with subscriptionKeys.enabled=true needs createSecret.subscriptionKey" -}}
{{- end -}}
{{- if and $v.subscriptionKeys.secondary (not $cs.subscriptionKeySecondary) -}}
{{- fail "createSecret.enabled=true with subscriptionKeys.secondary=true needs createSecret.subscriptionKeySecondary" -}}
{{- end -}}
{{- end -}}
{{- range $v.extraEnv -}}
{{- if and (has .name (list "AZURE_CLIENT_SECRET" "AZURE_CLIENT_CERTIFICATE_PASSWORD" "CIGW_SUBSCRIPTION_KEY" "CIGW_SUBSCRIPTION_KEY_SECONDARY")) (hasKey . "value") -}}
{{- fail (printf "extraEnv: %s must not have a literal value (it would be stored in the Deployment in clear): use valueFrom.secretKeyRef, or the chart's auth/subscriptionKeys settings" .name) -}}
{{- end -}}
{{- if and (has (upper .name) (list "HTTPS_PROXY" "HTTP_PROXY" "ALL_PROXY" "CIGW_EGRESS_PROXY")) (hasKey . "value") (contains "@" (toString .value)) -}}
{{- fail (printf "extraEnv: %s holds proxy credentials in a literal value (it would be stored in the Deployment in clear): use valueFrom.secretKeyRef" .name) -}}
{{- end -}}
{{- end -}}
{{- if $v.routes -}}
{{- /* values.yaml's defaults (a test keeps them equal): anything else was set on purpose. */ -}}
{{- $defaults := dict "upstreamUrl" "https://api.ci.ai.dynamics.com/v1" "scope" "https://api.ci.ai.microsoft.com/.default" -}}
{{- range $key, $default := $defaults -}}
{{- $set := index $v.config $key -}}
{{- if and $set (ne $set $default) -}}
{{- fail (printf "config.%s configures the single upstream, which the gateway refuses together with routes: give each route its own routes[i].%s (and leave config.%s at its default)" $key $key $key) -}}
{{- end -}}
{{- end -}}
{{- if $v.subscriptionKeys.enabled -}}
{{- fail "subscriptionKeys.enabled=true configures the single upstream's keys, which the gateway refuses together with routes: give each route its own routes[i].subscriptionKeySecret" -}}
{{- end -}}
{{- range $v.extraEnv -}}
{{- if has .name (list "CIGW_UPSTREAM_URL" "CIGW_SCOPE" "CIGW_UPSTREAM_CA_FILE" "CIGW_SUBSCRIPTION_KEY" "CIGW_SUBSCRIPTION_KEY_FILE" "CIGW_SUBSCRIPTION_KEY_SECONDARY" "CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE" "CIGW_CONFIG") -}}
{{- fail (printf "extraEnv: %s cannot be set together with routes (each route has its own upstreamUrl, scope, subscriptionKeySecret and upstreamCa*; the chart sets CIGW_CONFIG)" .name) -}}
{{- end -}}
{{- end -}}
{{- $prefixes := dict -}}
{{- range $i, $r := $v.routes -}}
{{- $prefix := printf "%s/" (trimSuffix "/" $r.prefix) -}}
{{- if hasKey $prefixes $prefix -}}
{{- fail (printf "routes[%d].prefix %q is also routes[%v]'s: each route needs its own prefix" $i $r.prefix (index $prefixes $prefix)) -}}
{{- end -}}
{{- $_ := set $prefixes $prefix $i -}}
{{- if and $r.upstreamCaSecret $r.upstreamCaConfigMap -}}
{{- fail (printf "routes[%d]: set upstreamCaSecret or upstreamCaConfigMap, not both" $i) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled (eq $v.mode "sidecar") -}}
{{- fail "metrics.serviceMonitor needs mode=gateway (a sidecar has no Service of its own): use metrics.podMonitor" -}}
{{- end -}}
{{- $redis := $v.fleet.redis -}}
{{- if and (not $redis.url) (or $redis.passwordSecret $redis.caSecret $v.fleet.name (not (kindIs "invalid" $redis.timeoutSeconds))) -}}
{{- fail "fleet.redis.passwordSecret, caSecret, timeoutSeconds and fleet.name need fleet.redis.url (fleet mode is off without it)" -}}
{{- end -}}
{{- if and $redis.caSecret (not (hasPrefix "rediss://" $redis.url)) -}}
{{- fail "fleet.redis.caSecret needs a rediss:// fleet.redis.url: a CA pins nothing on plain redis://" -}}
{{- end -}}
{{- if and $v.sidecar.demo.enabled (ne $v.mode "sidecar") -}}
{{- fail "sidecar.demo.enabled=true needs mode=sidecar" -}}
{{- end -}}
{{- if eq $v.mode "gateway" -}}
{{- $cl := $v.gateway.callers -}}
{{- if and (eq $cl.auth "none") (not $cl.allowUnauthenticated) -}}
{{- fail "gateway.callers.auth=none lets anyone who reaches the Service use the gateway's credentials: set gateway.callers.auth=kubernetes, or gateway.callers.allowUnauthenticated=true deliberately" -}}
{{- end -}}
{{- if and (eq $cl.auth "none") (or $cl.rateLimits $cl.privilegedHeadersAllow) -}}
{{- fail "gateway.callers.rateLimits and privilegedHeadersAllow need gateway.callers.auth=kubernetes (verified identities)" -}}
{{- end -}}
{{- if and $v.gateway.tls.certManager.enabled (not $v.gateway.tls.certManager.issuerRef.name) -}}
{{- fail "gateway.tls.certManager.enabled=true needs gateway.tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and $v.gateway.tls.certManager.enabled (not $v.gateway.tls.enabled) -}}
{{- fail "gateway.tls.certManager.enabled=true needs gateway.tls.enabled=true" -}}
{{- end -}}
{{- if and $v.gateway.exampleClient.enabled (ne $cl.auth "kubernetes") -}}
{{- fail "gateway.exampleClient.enabled=true shows token authentication: it needs gateway.callers.auth=kubernetes" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The gateway container. Arguments: ctx (see above) and role: "gateway" (the shared Deployment:
the proxy listens on the pod IP) or "sidecar" (the proxy listens on 127.0.0.1 only and the
admin port is the only one on the pod IP; native or classic by sidecar.native).
*/}}
{{- define "ci-gateway.container" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $native := eq (include "ci-gateway.isNative" .) "true" -}}
{{- $mount := include "ci-gateway.mountRoot" $ctx -}}
- name: {{ ternary $v.sidecar.containerName "ci-gateway" (eq .role "sidecar") }}
  image: {{ include "ci-gateway.image" $ctx | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["serve"]
  {{- if $native }}
  # A native sidecar: started before the application containers (which wait for its
  # startupProbe, i.e. the first token) and stopped after them.
  restartPolicy: Always
  {{- end }}
  ports:
    {{- if eq .role "gateway" }}
    - name: cigw-proxy
      containerPort: {{ $v.ports.proxy }}
      protocol: TCP
    {{- end }}
    - name: cigw-admin
      containerPort: {{ $v.ports.admin }}
      protocol: TCP
  envFrom:
    - configMapRef:
        name: {{ include "ci-gateway.fullname" $ctx }}
  env:
    - name: CIGW_LISTEN
      value: {{ printf "%s:%d" (ternary "0.0.0.0" "127.0.0.1" (eq .role "gateway")) (int $v.ports.proxy) | quote }}
    - name: CIGW_ADMIN_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $v.ports.admin) | quote }}
    {{- if eq $v.auth.method "clientSecret" }}
    - name: CIGW_CLIENT_SECRET_FILE
      value: {{ printf "%s/credentials/%s" $mount $v.auth.secretKeys.clientSecret | quote }}
    {{- else if eq $v.auth.method "certificate" }}
    - name: AZURE_CLIENT_CERTIFICATE_PATH
      value: {{ printf "%s/credentials/%s" $mount $v.auth.secretKeys.certificate | quote }}
    {{- if $v.auth.certificatePassword }}
    - name: AZURE_CLIENT_CERTIFICATE_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ include "ci-gateway.authSecretName" $ctx }}
          key: {{ $v.auth.secretKeys.certificatePassword }}
    {{- end }}
    {{- end }}
    {{- /* workloadIdentity: the webhook injects AZURE_FEDERATED_TOKEN_FILE and the token volume. */}}
    {{- if $v.subscriptionKeys.enabled }}
    - name: CIGW_SUBSCRIPTION_KEY_FILE
      value: {{ printf "%s/subscription-keys/%s" $mount $v.subscriptionKeys.secretKeys.primary | quote }}
    {{- if $v.subscriptionKeys.secondary }}
    - name: CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE
      value: {{ printf "%s/subscription-keys/%s" $mount $v.subscriptionKeys.secretKeys.secondary | quote }}
    {{- end }}
    {{- end }}
    {{- if $v.routes }}
    - name: CIGW_CONFIG
      value: {{ include "ci-gateway.routesFile" $ctx | quote }}
    {{- end }}
    {{- if $v.fleet.redis.passwordSecret }}
    - name: CIGW_REDIS_PASSWORD_FILE
      value: {{ printf "%s/redis-password/%s" $mount $v.fleet.redis.passwordKey | quote }}
    {{- end }}
    {{- if $v.fleet.redis.caSecret }}
    - name: CIGW_REDIS_CA_FILE
      value: {{ printf "%s/redis-ca/%s" $mount $v.fleet.redis.caKey | quote }}
    {{- end }}
    {{- if eq .role "gateway" }}
    {{- if $v.gateway.tls.enabled }}
    - name: CIGW_TLS_CERT_FILE
      value: {{ printf "%s/tls/tls.crt" $mount | quote }}
    - name: CIGW_TLS_KEY_FILE
      value: {{ printf "%s/tls/tls.key" $mount | quote }}
    {{- end }}
    {{- if and (eq $v.gateway.callers.auth "kubernetes") $v.gateway.callers.caConfigMap }}
    - name: CIGW_CALLER_CA_FILE
      value: {{ printf "%s/issuer-ca/ca.crt" $mount | quote }}
    {{- end }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /readyz
      port: cigw-admin
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: cigw-admin
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
  {{- if $v.probes.readiness.enabled }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: cigw-admin
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
  {{- end }}
  {{- if and (not $native) (gt (int $v.preStopSleepSeconds) 0) }}
  lifecycle:
    preStop:
      # Keep serving while endpoints and the application stop sending; then SIGTERM starts the
      # drain of config.shutdownGraceSeconds.
      exec:
        command: ["sleep", {{ int $v.preStopSleepSeconds | quote }}]
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.containerSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: cigw-tmp
      mountPath: /tmp
    {{- if ne $v.auth.method "workloadIdentity" }}
    - name: cigw-credentials
      mountPath: {{ printf "%s/credentials" $mount }}
      readOnly: true
    {{- end }}
    {{- if $v.subscriptionKeys.enabled }}
    - name: cigw-subscription-keys
      mountPath: {{ printf "%s/subscription-keys" $mount }}
      readOnly: true
    {{- end }}
    {{- if $v.routes }}
    - name: cigw-routes
      mountPath: {{ printf "%s/config" $mount }}
      readOnly: true
    {{- range $i, $r := $v.routes }}
    {{- if $r.subscriptionKeySecret }}
    - name: {{ printf "cigw-route-%d-keys" $i }}
      mountPath: {{ include "ci-gateway.routeDir" (dict "ctx" $ctx "index" $i "what" "keys") }}
      readOnly: true
    {{- end }}
    {{- if or $r.upstreamCaSecret $r.upstreamCaConfigMap }}
    - name: {{ printf "cigw-route-%d-ca" $i }}
      mountPath: {{ include "ci-gateway.routeDir" (dict "ctx" $ctx "index" $i "what" "ca") }}
      readOnly: true
    {{- end }}
    {{- end }}
    {{- end }}
    {{- if $v.fleet.redis.passwordSecret }}
    - name: cigw-redis-password
      mountPath: {{ printf "%s/redis-password" $mount }}
      readOnly: true
    {{- end }}
    {{- if $v.fleet.redis.caSecret }}
    - name: cigw-redis-ca
      mountPath: {{ printf "%s/redis-ca" $mount }}
      readOnly: true
    {{- end }}
    {{- if eq .role "gateway" }}
    {{- if $v.gateway.tls.enabled }}
    - name: cigw-tls
      mountPath: {{ printf "%s/tls" $mount }}
      readOnly: true
    {{- end }}
    {{- if and (eq $v.gateway.callers.auth "kubernetes") $v.gateway.callers.caConfigMap }}
    - name: cigw-issuer-ca
      mountPath: {{ printf "%s/issuer-ca" $mount }}
      readOnly: true
    {{- end }}
    {{- end }}
{{- end -}}

{{/*
The gateway container's volumes. Secrets are mounted as whole directories (items select keys,
no subPath): the kubelet then swaps rotated contents in place and the gateway re-reads the files
without a restart. A missing Secret or key keeps the pod from starting, with an event that
names it.
*/}}
{{- define "ci-gateway.volumes" -}}
{{- $v := .Values -}}
- name: cigw-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if ne $v.auth.method "workloadIdentity" }}
- name: cigw-credentials
  secret:
    secretName: {{ include "ci-gateway.authSecretName" . }}
    items:
      {{- if eq $v.auth.method "clientSecret" }}
      - key: {{ $v.auth.secretKeys.clientSecret }}
        path: {{ $v.auth.secretKeys.clientSecret }}
      {{- else }}
      - key: {{ $v.auth.secretKeys.certificate }}
        path: {{ $v.auth.secretKeys.certificate }}
      {{- end }}
{{- end }}
{{- if $v.subscriptionKeys.enabled }}
- name: cigw-subscription-keys
  secret:
    secretName: {{ include "ci-gateway.subscriptionKeysSecretName" . }}
    items:
      - key: {{ $v.subscriptionKeys.secretKeys.primary }}
        path: {{ $v.subscriptionKeys.secretKeys.primary }}
      {{- if $v.subscriptionKeys.secondary }}
      - key: {{ $v.subscriptionKeys.secretKeys.secondary }}
        path: {{ $v.subscriptionKeys.secretKeys.secondary }}
      {{- end }}
{{- end }}
{{- if $v.routes }}
- name: cigw-routes
  configMap:
    name: {{ include "ci-gateway.routesConfigMapName" . }}
    items:
      - key: gateway.yaml
        path: gateway.yaml
{{- range $i, $r := $v.routes }}
{{- with $r.subscriptionKeySecret }}
- name: {{ printf "cigw-route-%d-keys" $i }}
  secret:
    secretName: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
      {{- with .secondaryKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- with $r.upstreamCaSecret }}
- name: {{ printf "cigw-route-%d-ca" $i }}
  secret:
    secretName: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- with $r.upstreamCaConfigMap }}
- name: {{ printf "cigw-route-%d-ca" $i }}
  configMap:
    name: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.fleet.redis.passwordSecret }}
- name: cigw-redis-password
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $v.fleet.redis.passwordKey }}
        path: {{ $v.fleet.redis.passwordKey }}
{{- end }}
{{- with $v.fleet.redis.caSecret }}
- name: cigw-redis-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $v.fleet.redis.caKey }}
        path: {{ $v.fleet.redis.caKey }}
{{- end }}
{{- if eq $v.mode "gateway" }}
{{- if $v.gateway.tls.enabled }}
- name: cigw-tls
  secret:
    secretName: {{ include "ci-gateway.tlsSecretName" . }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if and (eq $v.gateway.callers.auth "kubernetes") $v.gateway.callers.caConfigMap }}
- name: cigw-issuer-ca
  configMap:
    name: {{ $v.gateway.callers.caConfigMap }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* Labels a pod carrying the gateway needs: workload identity's opt-in label. */}}
{{- define "ci-gateway.identityPodLabels" -}}
{{- if eq .Values.auth.method "workloadIdentity" -}}
azure.workload.identity/use: "true"
{{- end -}}
{{- end -}}

{{/* Annotations for a pod carrying the gateway: config checksum (restart on change) and scrape. */}}
{{- define "ci-gateway.podAnnotations" -}}
checksum/ci-gateway-config: {{ printf "%s%s" (include "ci-gateway.configData" .) (include "ci-gateway.routesConfig" .) | sha256sum }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.admin | int | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}
