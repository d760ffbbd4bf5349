{{/*
The public templates an application chart includes to carry the gateway as a sidecar; README.md
shows a complete pod spec. Each takes either

  .                                          the including chart's context, with this chart as a
                                             dependency named "ci-gateway" (its values under
                                             .Values.ci-gateway), or this chart's own context;
  (dict "root" . "values" .Values.<alias>)   when the dependency has an alias.

Set ci-gateway's mode to "sidecar" in the application chart's values, so that the dependency
renders only the objects these templates refer to (ConfigMap, optional Secret/ServiceAccount).
*/}}

{{/* Fills the dict given as the second element with Values, Release and Capabilities. */}}
{{- define "ci-gateway.sidecar.context" -}}
{{- $in := index . 0 -}}
{{- $out := index . 1 -}}
{{- $root := $in -}}
{{- $values := dict -}}
{{- if hasKey $in "root" -}}
{{- $root = $in.root -}}
{{- $values = $in.values -}}
{{- else if hasKey $in.Values "ci-gateway" -}}
{{- $values = index $in.Values "ci-gateway" -}}
{{- else if and (hasKey $in.Values "auth") (hasKey $in.Values "sidecar") -}}
{{- $values = $in.Values -}}
{{- end -}}
{{- if not (and (kindIs "map" $values) (hasKey $values "sidecar")) -}}
{{- fail "ci-gateway.sidecar: no ci-gateway values found. Add the chart as a dependency named ci-gateway, or pass (dict \"root\" . \"values\" .Values.<alias>)" -}}
{{- end -}}
{{- $_ := set $out "Values" $values -}}
{{- $_ := set $out "Release" $root.Release -}}
{{- $_ := set $out "Capabilities" $root.Capabilities -}}
{{- end -}}

{{/* The gateway container, as one list item. Native (the default): put it under initContainers. */}}
{{- define "ci-gateway.sidecar" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- include "ci-gateway.validate" $ctx -}}
{{- if and $ctx.Values.sidecar.native (semverCompare "<1.29.0-0" $ctx.Capabilities.KubeVersion.Version) -}}
{{- fail (printf "ci-gateway: a native sidecar needs Kubernetes >= 1.29 (this cluster: %s); set ci-gateway's sidecar.native=false for a classic sidecar container" $ctx.Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- include "ci-gateway.container" (dict "ctx" $ctx "role" "sidecar") -}}
{{- end -}}

{{/* The sidecar when it is native, else nothing: include it under initContainers. */}}
{{- define "ci-gateway.sidecar.initContainers" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- if $ctx.Values.sidecar.native -}}
{{- include "ci-gateway.sidecar" . -}}
{{- end -}}
{{- end -}}

{{/* The sidecar when it is classic (sidecar.native=false), else nothing: include it under containers. */}}
{{- define "ci-gateway.sidecar.containers" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- if not $ctx.Values.sidecar.native -}}
{{- include "ci-gateway.sidecar" . -}}
{{- end -}}
{{- end -}}

{{/* The sidecar's volumes, as list items: include them under volumes. */}}
{{- define "ci-gateway.sidecar.volumes" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- include "ci-gateway.volumes" $ctx -}}
{{- end -}}

{{/* Pod labels: ci-gateway/sidecar (selected by the PodMonitor) and, with workload identity,
azure.workload.identity/use. */}}
{{- define "ci-gateway.sidecar.podLabels" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
ci-gateway/sidecar: {{ include "ci-gateway.fullname" $ctx }}
{{- with include "ci-gateway.identityPodLabels" $ctx }}
{{ . }}
{{- end }}
{{- end -}}

{{/* Pod annotations: config checksum and, unless metrics.podAnnotations=false, prometheus.io/*
for the admin port (that convention allows one port per pod). */}}
{{- define "ci-gateway.sidecar.podAnnotations" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- include "ci-gateway.podAnnotations" $ctx -}}
{{- end -}}

{{/* The ServiceAccount this chart creates (annotated for workload identity) or names. */}}
{{- define "ci-gateway.sidecar.serviceAccountName" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- include "ci-gateway.serviceAccountName" $ctx -}}
{{- end -}}

{{/* Seconds the sidecar needs to stop; the pod's terminationGracePeriodSeconds should be the
application's own shutdown time plus this. */}}
{{- define "ci-gateway.sidecar.terminationGracePeriodSeconds" -}}
{{- $ctx := dict -}}
{{- include "ci-gateway.sidecar.context" (list . $ctx) -}}
{{- include "ci-gateway.shutdownSeconds" (dict "ctx" $ctx "role" "sidecar") -}}
{{- end -}}
