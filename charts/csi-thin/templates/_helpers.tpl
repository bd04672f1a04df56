{{/* The CSI driver's name: the CSIDriver object, the provisioner of the classes, the plugin's
registration. Fixed (csi_thin.csi.identity_service.DEFAULT_NAME): the topology key and the CRDs'
group carry it too. */}}
{{- define "csi-thin.driver" -}}csi-thin.io{{- end }}

{{- define "csi-thin.labels" -}}
app.kubernetes.io/name: csi-thin
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels of one component (controller, node): stable across upgrades. */}}
{{- define "csi-thin.selector" -}}
app.kubernetes.io/name: csi-thin
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "csi-thin.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The environment every container gets: its pod's name, namespace and IP (the provisioner's
CSIStorageCapacity owner, the HTTP endpoints' address), and the API server override. */}}
{{- define "csi-thin.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
{{- with .Values.apiServer }}
{{- if .host }}
# the in-cluster client of every process (Python's and client-go's) reads these two
- name: KUBERNETES_SERVICE_HOST
  value: {{ .host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .port | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level networking: the node's namespace when hostNetwork is on (DNS then still resolves
cluster names, with ClusterFirstWithHostNet). */}}
{{- define "csi-thin.podNetwork" -}}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The pool's paths on the node: everything under <stateDir>/<pool name>/. */}}
{{- define "csi-thin.poolDir" -}}
{{ trimSuffix "/" .Values.pool.stateDir }}/{{ .Values.pool.name }}
{{- end }}

{{/* Bytes of a size as csi_thin.config.parse_size reads it (the schema has checked its form: digits,
then an optional K/M/G/T, binary either way). Leading zeros are dropped: helm's int reads "0064" as
octal. */}}
{{- define "csi-thin.bytes" -}}
{{- $s := toString . -}}
{{- $digits := regexFind "^[0-9]+" $s -}}
{{- $n := regexReplaceAll "^0+" $digits "" | default "0" | int64 -}}
{{- $unit := upper (trimPrefix $digits $s | trunc 1) -}}
{{- $scale := get (dict "" 1 "K" 1024 "M" 1048576 "G" 1073741824 "T" 1099511627776) $unit -}}
{{- mul $n $scale -}}
{{- end }}

{{/* What the schema cannot say about the pool and the node plugin would refuse at start, on every
node at once (csi_thin.config): refused here, at helm install/upgrade, instead. */}}
{{- define "csi-thin.checkPool" -}}
{{- $p := .Values.pool -}}
{{- if eq $p.backend "dmthin" }}
{{- $bs := include "csi-thin.bytes" $p.dmthin.blockSize | int64 -}}
{{- if or (lt $bs 65536) (gt $bs 1073741824) (ne (mod $bs 65536) 0) }}
{{- fail (printf "pool.dmthin.blockSize %s: must be 64KiB..1GiB in multiples of 64KiB" (toString $p.dmthin.blockSize)) }}
{{- end }}
{{- if and (not $p.dmthin.dataDevice) (eq (include "csi-thin.bytes" $p.dmthin.dataSize) "0") }}
{{- fail "pool.dmthin.dataSize: the loop file of the pool's data must have a size above 0" }}
{{- end }}
{{- else if and (not $p.reflink.directory) (eq (include "csi-thin.bytes" $p.reflink.imageSize) "0") }}
{{- fail "pool.reflink.imageSize: the pool's image file must have a size above 0" }}
{{- end }}
{{- end }}

{{/* The node's pool config file (csi_thin.config.pool_from_dict), from .Values.pool. */}}
{{- define "csi-thin.poolConfig" -}}
{{- include "csi-thin.checkPool" . -}}
{{- $p := .Values.pool -}}
{{- $dir := include "csi-thin.poolDir" . -}}
name: {{ $p.name }}
backend: {{ $p.backend }}
state_dir: {{ $dir }}/store
{{- if eq $p.backend "dmthin" }}
dmthin:
  {{- if $p.dmthin.dataDevice }}
  {{- if eq (clean $p.dmthin.dataDevice) (clean $p.dmthin.metadataDevice) }}
  {{- /* the schema cannot compare two values: one disk as both would have data overwrite metadata */}}
  {{- fail (printf "pool.dmthin: dataDevice and metadataDevice must be two devices, both are %s" $p.dmthin.dataDevice) }}
  {{- end }}
  data_device: {{ $p.dmthin.dataDevice }}
  metadata_device: {{ $p.dmthin.metadataDevice }}
  {{- else }}
  data_file: {{ $dir }}/data.img
  data_size: {{ $p.dmthin.dataSize }}
  metadata_file: {{ $dir }}/metadata.img
  {{- with $p.dmthin.metadataSize }}
  metadata_size: {{ . }}
  {{- end }}
  {{- end }}
  block_size: {{ $p.dmthin.blockSize }}
{{- else }}
reflink:
  {{- if $p.reflink.directory }}
  directory: {{ $p.reflink.directory }}
  {{- else }}
  directory: {{ $dir }}/mnt
  image_file: {{ $dir }}/pool.img
  image_size: {{ $p.reflink.imageSize }}
  fs_type: {{ $p.reflink.fsType }}
  {{- end }}
{{- end }}
thresholds:
  data: {{ $p.thresholds.data }}
  metadata: {{ $p.thresholds.metadata }}
{{- end }}

{{/*
A checksum of the snapshot metadata link's certificates, in the controller's and the nodes' pod
templates: the processes read them at start only, so certificates made anew (templates/
snapshot-metadata.yaml makes them when any of its three Secrets is missing) must restart all of them
together, or restarted pods (the new CA) and the others (the old) refuse each other. Kept certificates
keep the checksum: no restart. Made anew, the value is new (this template cannot see the certificates
being made, so it is a random one; the next upgrade then reads the new ones: one more restart).
*/}}
{{- define "csi-thin.snapshotMetadataTlsChecksum" -}}
{{- $ns := .Release.Namespace }}
{{- $parts := list }}
{{- range (list "csi-thin-snapshot-metadata-controller" "csi-thin-snapshot-metadata-node" "csi-thin-snapshot-metadata-server") }}
{{- with lookup "v1" "Secret" $ns . }}
{{- $parts = append $parts (printf "%s:%s:%s" .metadata.name (index .data "ca.crt") (index .data "tls.crt")) }}
{{- end }}
{{- end }}
{{- if eq (len $parts) 3 }}{{ join "," $parts | sha256sum }}{{ else }}new-{{ randAlphaNum 20 }}{{ end }}
{{- end }}
