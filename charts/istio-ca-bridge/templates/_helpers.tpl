{{/*
Naming and labels.
*/}}
{{- define "istio-ca-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "istio-ca-bridge.fullname" -}}
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

{{- define "istio-ca-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "istio-ca-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "istio-ca-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "istio-ca-bridge.labels" -}}
helm.sh/chart: {{ include "istio-ca-bridge.chart" . }}
{{ include "istio-ca-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: certificate-authority
app.kubernetes.io/part-of: istio
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "istio-ca-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "istio-ca-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "istio-ca-bridge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Mount points inside the pod. The config path is fixed: args are `serve --config <it>`.
*/}}
{{- define "istio-ca-bridge.configDir" -}}/etc/istio-ca-bridge{{- end }}
{{- define "istio-ca-bridge.configPath" -}}/etc/istio-ca-bridge/config.yaml{{- end }}
{{- define "istio-ca-bridge.caDir" -}}/etc/istio-ca-bridge/ca{{- end }}
{{- define "istio-ca-bridge.servingDir" -}}/etc/istio-ca-bridge/serving{{- end }}
{{- define "istio-ca-bridge.jwksDir" -}}/etc/istio-ca-bridge/jwks{{- end }}
{{- define "istio-ca-bridge.vaultAuthDir" -}}/etc/istio-ca-bridge/vault/auth{{- end }}
{{- define "istio-ca-bridge.vaultCADir" -}}/etc/istio-ca-bridge/vault/ca{{- end }}
{{- define "istio-ca-bridge.vaultRootsDir" -}}/etc/istio-ca-bridge/vault/roots{{- end }}
{{- define "istio-ca-bridge.vaultTokenDir" -}}/var/run/secrets/istio-ca-bridge/vault{{- end }}
{{- define "istio-ca-bridge.awsRootsDir" -}}/etc/istio-ca-bridge/aws/roots{{- end }}
{{- define "istio-ca-bridge.digicertAuthDir" -}}/etc/istio-ca-bridge/digicert/auth{{- end }}
{{- define "istio-ca-bridge.digicertClientDir" -}}/etc/istio-ca-bridge/digicert/client{{- end }}
{{- define "istio-ca-bridge.digicertTrustDir" -}}/etc/istio-ca-bridge/digicert/trust{{- end }}
{{- define "istio-ca-bridge.digicertCADir" -}}/etc/istio-ca-bridge/digicert/ca{{- end }}
{{/* Where the audit log goes with sink file when config.audit.path is not set. */}}
{{- define "istio-ca-bridge.defaultAuditPath" -}}/var/log/istio-ca-bridge/audit.jsonl{{- end }}
{{/* Directories holding the chart's read-only mounts: nothing writable goes in or above them. */}}
{{- define "istio-ca-bridge.readOnlyRoots" -}}/etc/istio-ca-bridge /var/run/secrets{{- end }}
{{/* The bridge's own default for backend.stateDir (src/config.rs). */}}
{{- define "istio-ca-bridge.defaultStateDir" -}}/var/lib/istio-ca-bridge{{- end }}
{{/* The bridge's own default for server.shutdownGrace (src/config.rs). */}}
{{- define "istio-ca-bridge.defaultShutdownGrace" -}}20s{{- end }}

{{/*
Port of a listen address ("0.0.0.0:15012", "[::]:15012"). Called with (list <address> <field>).
Fails unless the address listens on all interfaces with a non-zero port: a Service can only
reach a pod on its pod IP, and the port must be known to wire the Service and probes.
*/}}
{{- define "istio-ca-bridge.listenPort" -}}
{{- $addr := toString (index . 0) }}
{{- $field := index . 1 }}
{{- if not (regexMatch "^(0\\.0\\.0\\.0|\\[::\\]):[0-9]{1,5}$" $addr) }}
{{- fail (printf "%s must be 0.0.0.0:<port> or [::]:<port> (all interfaces, explicit port), got %q" $field $addr) }}
{{- end }}
{{- $port := regexFind "[0-9]+$" $addr | int }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "%s: port must be 1-65535, got %q" $field $addr) }}
{{- end }}
{{- $port }}
{{- end }}

{{- define "istio-ca-bridge.grpcPort" -}}
{{- include "istio-ca-bridge.listenPort" (list (dig "server" "listen" "0.0.0.0:15012" (.Values.config | default dict)) "config.server.listen") }}
{{- end }}

{{- define "istio-ca-bridge.adminPort" -}}
{{- include "istio-ca-bridge.listenPort" (list (dig "admin" "listen" "0.0.0.0:15014" (.Values.config | default dict)) "config.admin.listen") }}
{{- end }}

{{/*
Whole seconds (rounded up) of a duration written as <n>h/<n>m/<n>s/<n>ms parts ("20s", "1m30s",
"500ms"): the subset of the bridge's humantime syntax the chart can compute with. Called with
(list <duration> <field>).
*/}}
{{- define "istio-ca-bridge.durationSeconds" -}}
{{- $d := toString (index . 0) }}
{{- $field := index . 1 }}
{{- if not (regexMatch "^([0-9]+(ms|h|m|s))+$" $d) }}
{{- fail (printf "%s must be written with h/m/s/ms units only (e.g. 20s, 1m30s) so the chart can derive terminationGracePeriodSeconds from it, got %q" $field $d) }}
{{- end }}
{{- $total := 0.0 }}
{{- range $part := regexFindAll "[0-9]+(ms|h|m|s)" $d -1 }}
{{- $n := regexFind "^[0-9]+" $part | float64 }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" $part) $part }}
{{- if eq $unit "h" }}{{ $total = addf $total (mulf $n 3600) }}
{{- else if eq $unit "m" }}{{ $total = addf $total (mulf $n 60) }}
{{- else if eq $unit "s" }}{{ $total = addf $total $n }}
{{- else }}{{ $total = addf $total (divf $n 1000) }}
{{- end }}
{{- end }}
{{- ceil $total | int }}
{{- end }}

{{/*
Seconds (float) of any duration in the bridge's humantime syntax ("7days", "1h 30m", "72h").
Called with (list <duration> <field>).
*/}}
{{- define "istio-ca-bridge.humantimeSeconds" -}}
{{- $d := toString (index . 0) }}
{{- $field := index . 1 }}
{{- $units := dict "nsec" 1e-9 "ns" 1e-9 "usec" 1e-6 "us" 1e-6 "msec" 1e-3 "ms" 1e-3 "seconds" 1.0 "second" 1.0 "sec" 1.0 "s" 1.0 "minutes" 60.0 "minute" 60.0 "min" 60.0 "m" 60.0 "hours" 3600.0 "hour" 3600.0 "hr" 3600.0 "h" 3600.0 "days" 86400.0 "day" 86400.0 "d" 86400.0 "weeks" 604800.0 "week" 604800.0 "w" 604800.0 "months" 2630016.0 "month" 2630016.0 "M" 2630016.0 "years" 31557600.0 "year" 31557600.0 "y" 31557600.0 }}
{{- if not (regexMatch "^\\s*([0-9]+\\s*[a-zA-Z]+\\s*)+$" $d) }}
{{- fail (printf "%s: %q is not a duration (e.g. 24h, 7days, 1h 30m)" $field $d) }}
{{- end }}
{{- $total := 0.0 }}
{{- range $part := regexFindAll "[0-9]+\\s*[a-zA-Z]+" $d -1 }}
{{- $n := regexFind "^[0-9]+" $part }}
{{- $unit := trimPrefix $n $part | trim }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "%s: unknown unit %q in %q" $field $unit $d) }}
{{- end }}
{{- $total = addf $total (mulf (float64 $n) (get $units $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the bridge's drain bound plus headroom, derived from the same
value the bridge reads so the two cannot drift.
*/}}
{{- define "istio-ca-bridge.terminationGracePeriodSeconds" -}}
{{- $grace := include "istio-ca-bridge.durationSeconds" (list (dig "server" "shutdownGrace" (include "istio-ca-bridge.defaultShutdownGrace" .) (.Values.config | default dict)) "config.server.shutdownGrace") | int }}
{{- add $grace (int .Values.terminationGraceExtraSeconds) }}
{{- end }}

{{/*
How the local backend gets its signing CA: "secret" (backends.local.caSecret), "files" (paths
set in config.backend by the user, e.g. from extraVolumes) or "generated" (a root the bridge
generates on first start: kept in the Kubernetes Secret config.kubernetes.caSecret and shared by
every replica when kubernetes.enabled, see "istio-ca-bridge.kubeAccess" caSecret; otherwise in
stateDir, one per pod).
*/}}
{{- define "istio-ca-bridge.localCAMode" -}}
{{- $b := dig "backend" dict (.Values.config | default dict) }}
{{- if .Values.backends.local.caSecret.name }}secret
{{- else if or $b.caCertFile $b.caKeyFile }}files
{{- else }}generated
{{- end }}
{{- end }}

{{- define "istio-ca-bridge.backendType" -}}
{{- dig "backend" "type" "local" (.Values.config | default dict) }}
{{- end }}

{{/*
"true" when the Vault backend logs in with the projected service-account token the chart mounts
(methods kubernetes and jwt, no tokenFile of your own); empty otherwise.
*/}}
{{- define "istio-ca-bridge.vaultProjectedToken" -}}
{{- $b := dig "backend" dict (.Values.config | default dict) }}
{{- if eq (include "istio-ca-bridge.backendType" .) "vault" }}
{{- $auth := $b.auth | default dict }}
{{- if and (has (toString $auth.method) (list "kubernetes" "jwt")) (not $auth.tokenFile) }}true{{ end }}
{{- end }}
{{- end }}

{{/*
The audit log file when config.audit.sink is file (config.audit.path, else the chart's default);
empty otherwise. Its directory gets the writable auditLog volume.
*/}}
{{- define "istio-ca-bridge.auditPath" -}}
{{- $a := dig "audit" dict (.Values.config | default dict) }}
{{- if eq (toString ($a.sink | default "stdout")) "file" }}
{{- $a.path | default (include "istio-ca-bridge.defaultAuditPath" .) }}
{{- end }}
{{- end }}

{{- define "istio-ca-bridge.auditDir" -}}
{{- with include "istio-ca-bridge.auditPath" . }}{{ dir . }}{{ end }}
{{- end }}

{{/*
"intermediate" when the backend runs in intermediate mode (config.backend.mode: intermediate);
empty otherwise. Which backend types have that mode is the schema's business: only their
branches of config.backend in values.schema.json allow the mode key (the others reject it, and
so does the bridge), so no list of types is kept here.
*/}}
{{- define "istio-ca-bridge.intermediateMode" -}}
{{- $b := dig "backend" dict (.Values.config | default dict) }}
{{- if eq (toString ($b.mode | default "direct")) "intermediate" }}intermediate{{ end }}
{{- end }}

{{/*
config.backend.intermediate.stateDir in intermediate mode (a per-pod emptyDir is mounted there);
empty otherwise (the bridge does not read it in direct mode).
*/}}
{{- define "istio-ca-bridge.intermediateStateDir" -}}
{{- if include "istio-ca-bridge.intermediateMode" . }}
{{- dig "backend" "intermediate" "stateDir" "" (.Values.config | default dict) | default "" }}
{{- end }}
{{- end }}

{{/*
"true" when directories a and b are the same or one contains the other. (list a b)
*/}}
{{- define "istio-ca-bridge.pathsOverlap" -}}
{{- $a := trimSuffix "/" (index . 0) }}
{{- $b := trimSuffix "/" (index . 1) }}
{{- if or (eq $a $b) (hasPrefix (printf "%s/" $a) $b) (hasPrefix (printf "%s/" $b) $a) }}true{{ end }}
{{- end }}

{{/*
Checks a directory the bridge writes to (a writable mount): absolute, not the root, clear of
the chart's read-only mounts and of the other writable directories. (list $ dir field others)
where others is a dict field -> dir.
*/}}
{{- define "istio-ca-bridge.checkWritableDir" -}}
{{- $root := index . 0 }}
{{- $d := index . 1 }}
{{- $field := index . 2 }}
{{- $others := index . 3 }}
{{- if or (not (hasPrefix "/" $d)) (eq (trimSuffix "/" $d) "") }}
{{- fail (printf "%s: %q must be an absolute path below / (a writable volume is mounted there)" $field $d) }}
{{- end }}
{{- range $ro := splitList " " (include "istio-ca-bridge.readOnlyRoots" $root) }}
{{- if include "istio-ca-bridge.pathsOverlap" (list $d $ro) }}
{{- fail (printf "%s: %q overlaps %s, where the chart mounts the config, Secrets and tokens read-only; use a directory of its own (e.g. under /var/lib or /var/log)" $field $d $ro) }}
{{- end }}
{{- end }}
{{- range $of, $od := $others }}
{{- if and $od (include "istio-ca-bridge.pathsOverlap" (list $d $od)) }}
{{- fail (printf "%s: %q overlaps %s (%q); give each its own directory" $field $d $of $od) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when a backends.<type> block wires something into the pod: one of its objects names a
Secret or ConfigMap (name, secretName or configMapName set) or one of its volumes (<x>Volume)
is set; empty otherwise. Called with the block, so a new backend needs no entry here.
*/}}
{{- define "istio-ca-bridge.backendWired" -}}
{{- range $k, $v := . }}
{{- if and (kindIs "map" $v) (or $v.name $v.secretName $v.configMapName (and (hasSuffix "Volume" $k) (not (empty $v)))) }}true{{ end }}
{{- end }}
{{- end }}

{{- define "istio-ca-bridge.stateDir" -}}
{{- dig "backend" "stateDir" (include "istio-ca-bridge.defaultStateDir" .) (.Values.config | default dict) }}
{{- end }}

{{/*
Chart-level invariants that the bridge's own validation cannot see (it does not know about
replicas or Secrets). Rendered (as nothing) from the Deployment, so every install checks them.
*/}}
{{- define "istio-ca-bridge.validate" -}}
{{- $userCfg := .Values.config | default dict }}
{{- if not .Values.kubernetes.enabled }}
{{- if dig "authn" "kubernetes" nil $userCfg }}
{{- fail "config.authn.kubernetes is set but kubernetes.enabled is false: set kubernetes.enabled: true so the chart grants the RBAC and mounts the API token the bridge needs" }}
{{- end }}
{{- range $f := list "rootConfigMap" "istiodCert" "clusterTrustBundle" }}
{{- if dig "kubernetes" $f "enabled" false $userCfg }}
{{- fail (printf "config.kubernetes.%s.enabled needs kubernetes.enabled: true (the bridge writes through the Kubernetes API; the chart then grants the RBAC)" $f) }}
{{- end }}
{{- end }}
{{- end }}
{{- $backend := include "istio-ca-bridge.backendType" . }}
{{- $bs := .Values.backends }}
{{- /* The schema's enum for config.backend.type refuses an unknown type before any template
     runs; this is for renders that skip the schema. Every type has its backends.<type> values. */}}
{{- if not (hasKey $bs $backend) }}
{{- fail (printf "config.backend.type %q: this chart supports %s" $backend (keys $bs | sortAlpha | join ", ")) }}
{{- end }}
{{- /* Wiring for a backend that is not the configured one would silently do nothing. */}}
{{- range $t, $wiring := $bs }}
{{- if and (ne $t $backend) (include "istio-ca-bridge.backendWired" $wiring) }}
{{- fail (printf "backends.%s is set but config.backend.type is %q: move the Secrets/ConfigMaps to backends.%s (or remove them)" $t $backend $backend) }}
{{- end }}
{{- end }}
{{- $b := dig "backend" dict (.Values.config | default dict) }}
{{- if eq $backend "vault" }}
{{- $v := $bs.vault }}
{{- $auth := $b.auth | default dict }}
{{- $method := toString $auth.method }}
{{- if $v.authSecret.name }}
{{- if not (has $method (list "token" "approle")) }}
{{- fail (printf "backends.vault.authSecret.name is set but config.backend.auth.method is %q, which logs in with the projected service-account token (backends.vault.serviceAccountToken); remove authSecret" $method) }}
{{- end }}
{{- if or $auth.tokenFile $auth.tokenEnv $auth.roleIdFile $auth.secretIdFile }}
{{- fail "backends.vault.authSecret.name is set: leave config.backend.auth.tokenFile/tokenEnv/roleIdFile/secretIdFile unset, the chart points them into the mounted Secret" }}
{{- end }}
{{- else if and (eq $method "token") (not (or $auth.tokenFile $auth.tokenEnv)) }}
{{- fail "config.backend.auth.method token needs the token: set backends.vault.authSecret.name (an existing Secret with the token under backends.vault.authSecret.tokenKey)" }}
{{- else if and (eq $method "approle") (not (and $auth.roleIdFile $auth.secretIdFile)) }}
{{- fail "config.backend.auth.method approle needs the role id and secret id: set backends.vault.authSecret.name (an existing Secret with them under roleIdKey and secretIdKey)" }}
{{- end }}
{{- if and $v.caBundle.secretName $v.caBundle.configMapName }}
{{- fail "backends.vault.caBundle: set secretName or configMapName, not both" }}
{{- end }}
{{- if and (or $v.caBundle.secretName $v.caBundle.configMapName) (dig "tls" "caFile" nil $b) }}
{{- fail "backends.vault.caBundle is set: leave config.backend.tls.caFile unset, the chart points it into the mount" }}
{{- end }}
{{- if and $v.rootBundleConfigMap.name $b.rootBundleFile }}
{{- fail "backends.vault.rootBundleConfigMap.name is set: leave config.backend.rootBundleFile unset, the chart points it into the mount" }}
{{- end }}
{{- end }}
{{- if and (eq $backend "awsPca") $bs.awsPca.extraRootsConfigMap.name $b.extraRootsFile }}
{{- fail "backends.awsPca.extraRootsConfigMap.name is set: leave config.backend.extraRootsFile unset, the chart points it into the mount" }}
{{- end }}
{{- if eq $backend "digicert" }}
{{- $dc := $bs.digicert }}
{{- $auth := $b.auth | default dict }}
{{- if and $dc.apiKeySecret.name $dc.clientCertSecret.name }}
{{- fail "backends.digicert: set apiKeySecret.name or clientCertSecret.name, not both (the bridge authenticates with exactly one)" }}
{{- end }}
{{- if and (or $dc.apiKeySecret.name $dc.clientCertSecret.name) (or $auth.apiKeyFile $auth.apiKeyEnv $auth.clientCertFile $auth.clientKeyFile) }}
{{- fail "backends.digicert.apiKeySecret/clientCertSecret is set: leave config.backend.auth.apiKeyFile/apiKeyEnv/clientCertFile/clientKeyFile unset, the chart points them into the mounted Secret" }}
{{- end }}
{{- if not (or $dc.apiKeySecret.name $dc.clientCertSecret.name $auth.apiKeyFile $auth.apiKeyEnv $auth.clientCertFile) }}
{{- fail "config.backend.type digicert needs credentials: set backends.digicert.apiKeySecret.name (an existing Secret with the API key under apiKeySecret.key) or backends.digicert.clientCertSecret.name (client certificate and key for https://clientauth.one.digicert.com)" }}
{{- end }}
{{- if and $dc.trustBundle.configMapName $dc.trustBundle.secretName }}
{{- fail "backends.digicert.trustBundle: set configMapName or secretName, not both" }}
{{- end }}
{{- if or $dc.trustBundle.configMapName $dc.trustBundle.secretName }}
{{- if or $b.trustBundleFile $b.intermediatesFile }}
{{- fail "backends.digicert.trustBundle is set: leave config.backend.trustBundleFile/intermediatesFile unset, the chart points them into the mount" }}
{{- end }}
{{- else if not $b.trustBundleFile }}
{{- fail "config.backend.type digicert needs the root(s) its chains end in: set backends.digicert.trustBundle.configMapName (or secretName), an existing ConfigMap with the roots under trustBundle.rootsKey" }}
{{- end }}
{{- if and $dc.caBundle.secretName $dc.caBundle.configMapName }}
{{- fail "backends.digicert.caBundle: set secretName or configMapName, not both" }}
{{- end }}
{{- if and (or $dc.caBundle.secretName $dc.caBundle.configMapName) $b.caFile }}
{{- fail "backends.digicert.caBundle is set: leave config.backend.caFile unset, the chart points it into the mount" }}
{{- end }}
{{- end }}
{{- /* Writable directories: the audit log's and the intermediate's, each its own volume. */}}
{{- $audit := dig "audit" dict $userCfg }}
{{- if and $audit.path (ne (toString ($audit.sink | default "stdout")) "file") }}
{{- fail (printf "config.audit.path is set but config.audit.sink is %q: set sink: file (or remove the path)" (toString ($audit.sink | default "stdout"))) }}
{{- end }}
{{- $localState := ternary (include "istio-ca-bridge.stateDir" .) "" (eq $backend "local") }}
{{- $interState := include "istio-ca-bridge.intermediateStateDir" . }}
{{- with include "istio-ca-bridge.auditDir" . }}
{{- include "istio-ca-bridge.checkWritableDir" (list $ . "config.audit.path (its directory)" (dict "config.backend.stateDir" $localState "config.backend.intermediate.stateDir" $interState)) }}
{{- end }}
{{- with $interState }}
{{- include "istio-ca-bridge.checkWritableDir" (list $ . "config.backend.intermediate.stateDir" dict) }}
{{- end }}
{{- if and .Values.prometheusRule.enabled (include "istio-ca-bridge.intermediateMode" .) }}
{{- $activate := dig "intermediate" "activateAt" (divf 5.0 6.0) $b | float64 }}
{{- if ge (float64 .Values.prometheusRule.intermediateRemainingFraction) (subf 1.0 $activate) }}
{{- fail (printf "prometheusRule.intermediateRemainingFraction %v must be below 1 - config.backend.intermediate.activateAt (%.3f): a healthy replica hands over to its successor with that much of the lifetime left, so the alert would fire on every rotation" .Values.prometheusRule.intermediateRemainingFraction (subf 1.0 $activate)) }}
{{- end }}
{{- end }}
{{- $mode := include "istio-ca-bridge.localCAMode" . }}
{{- /* A generated root is one per replica only when no shared Secret keeps it: without the
     Kubernetes API, or with config.kubernetes.caSecret switched off. Read from the rendered
     config, like the RBAC that lets the replicas share it. */}}
{{- if and (eq $backend "local") (eq $mode "generated") (gt (int .Values.replicaCount) 1) (not (include "istio-ca-bridge.kubeAccess" . | fromYaml).caSecret) }}
{{- $why := ternary "config.kubernetes.caSecret.enabled is false" "kubernetes.enabled is false" .Values.kubernetes.enabled }}
{{- fail (printf "replicaCount is %d but the local backend's generated root is not shared (%s): each replica would generate its own root and clients would trust only one of them. Either share one generated root through the Kubernetes Secret config.kubernetes.caSecret (kubernetes.enabled: true, the default, and leave config.kubernetes.caSecret.enabled unset or true), give every replica the same CA with backends.local.caSecret.name (an existing Secret with the CA certificate and key), or set replicaCount: 1 (a root generated in backend.stateDir)." (int .Values.replicaCount) $why) }}
{{- end }}
{{- if and (eq $backend "certManager") (not $b.kubeconfig) (not .Values.kubernetes.enabled) }}
{{- fail "config.backend.type is certManager without a kubeconfig: it creates CertificateRequests with the pod's service-account token, so set kubernetes.enabled: true (the chart then grants exactly those calls), or give config.backend.kubeconfig for another cluster" }}
{{- end }}
{{- if and (eq $mode "secret") (or $b.caCertFile $b.caKeyFile $b.chainFile $b.rootBundleFile) }}
{{- fail "backends.local.caSecret.name is set: leave config.backend.caCertFile/caKeyFile/chainFile/rootBundleFile unset, the chart points them into the mounted Secret" }}
{{- end }}
{{- $tls := dig "server" "tls" dict (.Values.config | default dict) }}
{{- if .Values.servingCert.secretName }}
{{- if ne ($tls.mode | default "issued") "files" }}
{{- fail "servingCert.secretName is set: also set config.server.tls.mode: files" }}
{{- end }}
{{- if or $tls.certFile $tls.keyFile }}
{{- fail "servingCert.secretName is set: leave config.server.tls.certFile/keyFile unset, the chart points them into the mounted Secret" }}
{{- end }}
{{- end }}
{{- if eq (include "istio-ca-bridge.grpcPort" .) (include "istio-ca-bridge.adminPort" .) }}
{{- fail "config.admin.listen must use a different port from config.server.listen" }}
{{- end }}
{{- $_ := include "istio-ca-bridge.terminationGracePeriodSeconds" . }}
{{- end }}

{{/*
The config file as rendered into the ConfigMap: config.* verbatim, plus the paths the chart
owns (mounted Secrets, the state dir) and the default serving-cert names.
*/}}
{{- define "istio-ca-bridge.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $server := $cfg.server | default dict }}
{{- $_ := set $cfg "server" $server }}
{{- $tls := $server.tls | default dict }}
{{- $_ := set $server "tls" $tls }}
{{- $_ := set $server "listen" (printf "%s" (dig "server" "listen" "0.0.0.0:15012" (.Values.config | default dict))) }}
{{- $_ := set $server "shutdownGrace" (printf "%s" (dig "server" "shutdownGrace" (include "istio-ca-bridge.defaultShutdownGrace" .) (.Values.config | default dict))) }}
{{- $admin := $cfg.admin | default dict }}
{{- $_ := set $cfg "admin" $admin }}
{{- $_ := set $admin "listen" (printf "%s" (dig "admin" "listen" "0.0.0.0:15014" (.Values.config | default dict))) }}
{{- if and (eq ($tls.mode | default "issued") "issued") (empty $tls.dnsNames) }}
{{- $svc := include "istio-ca-bridge.fullname" . }}
{{- $_ := set $tls "dnsNames" (list (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.%s" $svc .Release.Namespace .Values.clusterDomain)) }}
{{- end }}
{{- if .Values.servingCert.secretName }}
{{- $_ := set $tls "certFile" (printf "%s/%s" (include "istio-ca-bridge.servingDir" .) .Values.servingCert.certKey) }}
{{- $_ := set $tls "keyFile" (printf "%s/%s" (include "istio-ca-bridge.servingDir" .) .Values.servingCert.keyKey) }}
{{- end }}
{{- $backend := $cfg.backend | default dict }}
{{- $_ := set $cfg "backend" $backend }}
{{- if eq (include "istio-ca-bridge.backendType" .) "local" }}
{{- $_ := set $backend "type" "local" }}
{{- $_ := set $backend "stateDir" (include "istio-ca-bridge.stateDir" .) }}
{{- $ca := .Values.backends.local.caSecret }}
{{- if $ca.name }}
{{- $dir := include "istio-ca-bridge.caDir" . }}
{{- $_ := set $backend "caCertFile" (printf "%s/%s" $dir $ca.certKey) }}
{{- $_ := set $backend "caKeyFile" (printf "%s/%s" $dir $ca.keyKey) }}
{{- if $ca.chainKey }}
{{- $_ := set $backend "chainFile" (printf "%s/%s" $dir $ca.chainKey) }}
{{- end }}
{{- if $ca.rootBundleKey }}
{{- $_ := set $backend "rootBundleFile" (printf "%s/%s" $dir $ca.rootBundleKey) }}
{{- end }}
{{- end }}
{{- else if eq (include "istio-ca-bridge.backendType" .) "vault" }}
{{- $v := .Values.backends.vault }}
{{- $auth := $backend.auth | default dict }}
{{- $_ := set $backend "auth" $auth }}
{{- if $v.authSecret.name }}
{{- $dir := include "istio-ca-bridge.vaultAuthDir" . }}
{{- if eq (toString $auth.method) "token" }}
{{- $_ := set $auth "tokenFile" (printf "%s/%s" $dir $v.authSecret.tokenKey) }}
{{- else if eq (toString $auth.method) "approle" }}
{{- $_ := set $auth "roleIdFile" (printf "%s/%s" $dir $v.authSecret.roleIdKey) }}
{{- $_ := set $auth "secretIdFile" (printf "%s/%s" $dir $v.authSecret.secretIdKey) }}
{{- end }}
{{- end }}
{{- if include "istio-ca-bridge.vaultProjectedToken" . }}
{{- $_ := set $auth "tokenFile" (printf "%s/token" (include "istio-ca-bridge.vaultTokenDir" .)) }}
{{- end }}
{{- if or $v.caBundle.secretName $v.caBundle.configMapName }}
{{- $vtls := $backend.tls | default dict }}
{{- $_ := set $backend "tls" $vtls }}
{{- $_ := set $vtls "caFile" (printf "%s/%s" (include "istio-ca-bridge.vaultCADir" .) $v.caBundle.key) }}
{{- end }}
{{- if $v.rootBundleConfigMap.name }}
{{- $_ := set $backend "rootBundleFile" (printf "%s/%s" (include "istio-ca-bridge.vaultRootsDir" .) $v.rootBundleConfigMap.key) }}
{{- end }}
{{- else if eq (include "istio-ca-bridge.backendType" .) "awsPca" }}
{{- $r := .Values.backends.awsPca.extraRootsConfigMap }}
{{- if $r.name }}
{{- $_ := set $backend "extraRootsFile" (printf "%s/%s" (include "istio-ca-bridge.awsRootsDir" .) $r.key) }}
{{- end }}
{{- else if eq (include "istio-ca-bridge.backendType" .) "digicert" }}
{{- $dc := .Values.backends.digicert }}
{{- $auth := $backend.auth | default dict }}
{{- $_ := set $backend "auth" $auth }}
{{- if $dc.apiKeySecret.name }}
{{- $_ := set $auth "apiKeyFile" (printf "%s/%s" (include "istio-ca-bridge.digicertAuthDir" .) $dc.apiKeySecret.key) }}
{{- else if $dc.clientCertSecret.name }}
{{- $_ := set $auth "clientCertFile" (printf "%s/%s" (include "istio-ca-bridge.digicertClientDir" .) $dc.clientCertSecret.certKey) }}
{{- $_ := set $auth "clientKeyFile" (printf "%s/%s" (include "istio-ca-bridge.digicertClientDir" .) $dc.clientCertSecret.keyKey) }}
{{- end }}
{{- if or $dc.trustBundle.configMapName $dc.trustBundle.secretName }}
{{- $_ := set $backend "trustBundleFile" (printf "%s/%s" (include "istio-ca-bridge.digicertTrustDir" .) $dc.trustBundle.rootsKey) }}
{{- if $dc.trustBundle.intermediatesKey }}
{{- $_ := set $backend "intermediatesFile" (printf "%s/%s" (include "istio-ca-bridge.digicertTrustDir" .) $dc.trustBundle.intermediatesKey) }}
{{- end }}
{{- end }}
{{- if or $dc.caBundle.secretName $dc.caBundle.configMapName }}
{{- $_ := set $backend "caFile" (printf "%s/%s" (include "istio-ca-bridge.digicertCADir" .) $dc.caBundle.key) }}
{{- end }}
{{- end }}
{{- with include "istio-ca-bridge.auditPath" . }}
{{- $audit := $cfg.audit | default dict }}
{{- $_ := set $cfg "audit" $audit }}
{{- $_ := set $audit "path" . }}
{{- end }}
{{- if .Values.kubernetes.enabled }}
{{- /* authn.kubernetes: this cluster through the pod's own service account, unless clusters are given. */}}
{{- $authn := $cfg.authn | default dict }}
{{- $_ := set $cfg "authn" $authn }}
{{- $ka := $authn.kubernetes | default dict }}
{{- $_ := set $authn "kubernetes" $ka }}
{{- if not $ka.clusters }}
{{- $_ := set $ka "clusters" (list (dict "id" .Values.kubernetes.clusterId "inCluster" true)) }}
{{- end }}
{{- if not (hasKey $ka "audiences") }}
{{- $_ := set $ka "audiences" (list "istio-ca") }}
{{- end }}
{{- /* What the bridge writes (istiod's duties with ENABLE_CA_SERVER=false): on unless switched off. Names
     are written out, so the RBAC below reads them from the same rendered config. */}}
{{- $k := $cfg.kubernetes | default dict }}
{{- $_ := set $cfg "kubernetes" $k }}
{{- $rc := $k.rootConfigMap | default dict }}
{{- $_ := set $k "rootConfigMap" $rc }}
{{- if not (hasKey $rc "enabled") }}{{ $_ := set $rc "enabled" true }}{{ end }}
{{- if not $rc.name }}{{ $_ := set $rc "name" "istio-ca-root-cert" }}{{ end }}
{{- $ic := $k.istiodCert | default dict }}
{{- $_ := set $k "istiodCert" $ic }}
{{- if not (hasKey $ic "enabled") }}{{ $_ := set $ic "enabled" true }}{{ end }}
{{- if not $ic.namespace }}{{ $_ := set $ic "namespace" .Release.Namespace }}{{ end }}
{{- if not $ic.secretName }}{{ $_ := set $ic "secretName" "istiod-tls" }}{{ end }}
{{- $le := $k.leaderElection | default dict }}
{{- $_ := set $k "leaderElection" $le }}
{{- if not $le.namespace }}{{ $_ := set $le "namespace" .Release.Namespace }}{{ end }}
{{- if not $le.leaseName }}{{ $_ := set $le "leaseName" (include "istio-ca-bridge.fullname" .) }}{{ end }}
{{- /* A generated local root is kept in one Secret every replica shares (unless switched off):
     its namespace (the Lease's, as the bridge defaults it) and name (<fullname>-ca, so two
     releases never share a root by accident; istio-ca-bridge-ca, the bridge's own default,
     for the default release name) written out. A remote backend followed through root
     rotations (rotation.followUpstream, default true) keeps its rotation state there. */}}
{{- $isLocal := eq (include "istio-ca-bridge.backendType" .) "local" }}
{{- $followsUpstream := and (not $isLocal) (ne (toString (dig "rotation" "followUpstream" true $cfg)) "false") }}
{{- if or (and $isLocal (not $backend.caCertFile)) $followsUpstream }}
{{- $cs := $k.caSecret | default dict }}
{{- if or (not (hasKey $cs "enabled")) $cs.enabled }}
{{- $_ := set $k "caSecret" $cs }}
{{- if not $cs.namespace }}{{ $_ := set $cs "namespace" $le.namespace }}{{ end }}
{{- if not $cs.name }}{{ $_ := set $cs "name" (printf "%s-ca" (include "istio-ca-bridge.fullname" .)) }}{{ end }}
{{- end }}
{{- end }}
{{- /* The ClusterTrustBundle (off unless enabled): signer and object name written out. */}}
{{- $ctb := $k.clusterTrustBundle | default dict }}
{{- if $ctb.enabled }}
{{- if not $ctb.signerName }}{{ $_ := set $ctb "signerName" "istio.io/istiod-ca" }}{{ end }}
{{- if not $ctb.name }}{{ $_ := set $ctb "name" (printf "%s:root-cert" (replace "/" ":" $ctb.signerName)) }}{{ end }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
What the rendered config makes the bridge do through the Kubernetes API, as a dict of booleans
and names; RBAC is derived from it (templates/rbac.yaml), so the two cannot disagree.
*/}}
{{- define "istio-ca-bridge.kubeAccess" -}}
{{- $cfg := include "istio-ca-bridge.config" . | fromYaml }}
{{- $ka := dig "authn" "kubernetes" nil $cfg }}
{{- $nodeAccounts := dig "authn" "trustedNodeAccounts" (list "istio-system/ztunnel") $cfg }}
{{- $rc := dig "kubernetes" "rootConfigMap" dict $cfg }}
{{- $ic := dig "kubernetes" "istiodCert" dict $cfg }}
{{- $le := dig "kubernetes" "leaderElection" dict $cfg }}
{{- $cs := dig "kubernetes" "caSecret" dict $cfg }}
{{- $ctb := dig "kubernetes" "clusterTrustBundle" dict $cfg }}
{{- $be := dig "backend" dict $cfg }}
{{- $on := not (empty $ka) }}
{{- $roots := and $on ($rc.enabled | default false) }}
{{- $istiod := and $on ($ic.enabled | default false) }}
{{- $bundle := and $on ($ctb.enabled | default false) }}
{{- /* The bridge's Config::shared_local_ca: local backend without CA files, authn.kubernetes
     set, kubernetes.caSecret.enabled (default true). */}}
{{- $csOn := ne (toString (dig "enabled" true $cs)) "false" }}
{{- /* Config::upstream_rotation_secret: a remote backend whose roots are followed through
     rotations (rotation.followUpstream, default true) keeps that state in the same Secret. */}}
{{- $follows := and (ne (toString $be.type) "local") (ne (toString (dig "rotation" "followUpstream" true $cfg)) "false") }}
{{- $caSecret := and $on $csOn (or (and (eq (toString $be.type) "local") (not $be.caCertFile)) $follows) }}
{{- /* The cert-manager backend in this cluster (no kubeconfig of its own): its
     CertificateRequests, and the ConfigMap or Secret its roots are read from. */}}
{{- $cm := and (eq (toString $be.type) "certManager") (not $be.kubeconfig) }}
{{- $cmNs := $be.namespace | default "istio-system" }}
{{- $cmRootsCm := and $cm $be.rootBundleConfigMap }}
{{- $cmRootsSecret := and $cm $be.rootBundleSecret }}
{{- toYaml (dict
  "tokenReview" $on
  "pods" (and $on (not (empty $nodeAccounts)))
  "rootConfigMap" $roots
  "rootConfigMapName" ($rc.name | default "")
  "istiodCert" $istiod
  "istiodNamespace" ($ic.namespace | default "")
  "istiodSecretName" ($ic.secretName | default "")
  "caSecret" $caSecret
  "caSecretNamespace" ($cs.namespace | default $le.namespace | default "")
  "caSecretName" ($cs.name | default "")
  "certRequests" $cm
  "certRequestsNamespace" $cmNs
  "rootsConfigMap" (ternary (dict "namespace" ((dig "namespace" "" ($be.rootBundleConfigMap | default dict)) | default $cmNs) "name" (dig "name" "" ($be.rootBundleConfigMap | default dict))) dict (not (empty $cmRootsCm)))
  "rootsSecret" (ternary (dict "namespace" ((dig "namespace" "" ($be.rootBundleSecret | default dict)) | default $cmNs) "name" (dig "name" "" ($be.rootBundleSecret | default dict))) dict (not (empty $cmRootsSecret)))
  "clusterTrustBundle" $bundle
  "clusterTrustBundleName" ($ctb.name | default "")
  "clusterTrustBundleSigner" ($ctb.signerName | default "")
  "leases" (or $roots $istiod $bundle)
  "leaseNamespace" ($le.namespace | default "")
  "leaseName" ($le.leaseName | default "")) }}
{{- end }}
