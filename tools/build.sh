#!/usr/bin/env bash
# Build the pinned Go test tools into bin/.
#
# Each tool has its own module under tools/<name>/ (their dependency graphs conflict if merged).
# A build is keyed by the hash of that module's go.mod + go.sum: bin/ holds a stamp per tool, and
# finished binaries are also kept in $CSI_THIN_CACHE/tools/<key>/ so a fresh clone on the same machine
# copies them instead of rebuilding. Go's own module and build caches live under $HOME as usual.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BIN=${BIN:-$ROOT/bin}
CACHE=${CSI_THIN_CACHE:-$HOME/.cache/csi-thin}/tools
command -v go >/dev/null || { echo "tools: the Go toolchain is required (go not found on PATH)" >&2; exit 1; }
mkdir -p "$BIN" "$CACHE"

modver() { (cd "$HERE/$1" && go list -m -f '{{.Version}}' "$2"); }

# name module-dir package ldflags [test]: a main package's binary, or with "test" the package's test
# binary (go test -c: a suite of someone else's that only runs as a Go test)
build() {
  local name=$1 dir=$2 pkg=$3 ldflags=$4 verb=${5:-build}
  # a module of our own (pause) has no go.sum but sources: they are part of its key; so are the
  # ldflags (a version stamp changed here must not be served the binary stamped before)
  local key; key=$( (cd "$HERE/$dir" && cat go.mod $(ls go.sum ./*.go 2>/dev/null); echo "$verb $pkg $ldflags") | sha256sum | cut -c1-16)
  if [ -x "$BIN/$name" ] && [ "$(cat "$BIN/.$name.stamp" 2>/dev/null)" = "$key" ]; then
    echo "tools: $name up to date"; return
  fi
  if [ -x "$CACHE/$key/$name" ]; then
    cp "$CACHE/$key/$name" "$BIN/$name"; echo "$key" > "$BIN/.$name.stamp"
    echo "tools: $name from cache"; return
  fi
  local t0=$SECONDS
  echo "tools: building $name ($pkg) ..."
  if [ "$verb" = test ]; then
    (cd "$HERE/$dir" && CGO_ENABLED=0 go test -c -trimpath -ldflags "$ldflags" -o "$BIN/$name.tmp" "$pkg")
  else
    (cd "$HERE/$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$BIN/$name.tmp" "$pkg")
  fi
  mv "$BIN/$name.tmp" "$BIN/$name"
  mkdir -p "$CACHE/$key" && cp "$BIN/$name" "$CACHE/$key/$name"
  echo "$key" > "$BIN/.$name.stamp"
  echo "tools: built $name in $((SECONDS - t0))s"
}

# name module-dir module subdir files...: copy YAML files of a pinned module (verified against the
# module dir's go.sum by `go mod download`) into bin/crds/<name>/, keyed and cached like a binary
crds() {
  local name=$1 dir=$2 module=$3 subdir=$4; shift 4
  local out="$BIN/crds/$name"
  # the list of files is part of the key: a file added to it must not be served the old copy
  local key; key=$( (cat "$HERE/$dir/go.mod" "$HERE/$dir/go.sum"; echo "$subdir $*") | sha256sum | cut -c1-16)
  if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$key" ]; then
    echo "tools: $name CRDs up to date"; return
  fi
  rm -rf "$out" && mkdir -p "$out"
  if [ -d "$CACHE/$key/crds-$name" ]; then
    cp "$CACHE/$key/crds-$name"/*.yaml "$out/"; echo "$key" > "$out/.stamp"
    echo "tools: $name CRDs from cache"; return
  fi
  local src; src=$(cd "$HERE/$dir" && go mod download -json "$module" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -d "$src/$subdir" ] || { echo "tools: $module has no $subdir" >&2; exit 1; }
  local f
  for f in "$@"; do install -m 0644 "$src/$subdir/$f" "$out/$f"; done
  mkdir -p "$CACHE/$key/crds-$name" && cp "$out"/*.yaml "$CACHE/$key/crds-$name/"
  echo "$key" > "$out/.stamp"
  echo "tools: $name CRDs from $module $(modver "$dir" "$module")"
}

# the e2e cluster adds kubelet, kube-controller-manager, kube-scheduler, kubectl, the CSI sidecars and
# pause; the root tier adds ctrd-suite; the kube tier the snapshot-metadata sidecar and its lister
want=${*:-csi-sanity etcd helm kube-apiserver promtool snapshot-crds monitoring-crds kubelet kube-controller-manager kube-scheduler kubectl csi-provisioner csi-snapshotter snapshot-controller csi-resizer pause ctrd-suite csi-snapshot-metadata snapshot-metadata-lister snapshot-metadata-crds}
for tool in $want; do
  case $tool in
    csi-sanity)
      v=$(modver csi github.com/kubernetes-csi/csi-test/v5)
      build csi-sanity csi github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity "-X main.VERSION=$v";;
    etcd)
      build etcd etcd go.etcd.io/etcd/server/v3 "";;
    helm)
      # and the Kubernetes version helm assumes without a cluster (template, lint), as helm's own
      # Makefile stamps it: one minor above its client-go's (v0.37 -> 1.37); unstamped it is 1.20
      v=$(modver helm helm.sh/helm/v3); cg=$(modver helm k8s.io/client-go); cg=${cg#v0.}; kminor=${cg%%.*}
      H=helm.sh/helm/v3/pkg
      build helm helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$v \
-X $H/chartutil.k8sVersionMajor=1 -X $H/chartutil.k8sVersionMinor=$kminor \
-X $H/lint/rules.k8sVersionMajor=1 -X $H/lint/rules.k8sVersionMinor=$kminor";;
    kube-apiserver|kubelet|kube-controller-manager|kube-scheduler|kubectl)
      # all from one pinned k8s.io/kubernetes, so the e2e cluster's parts are one release
      v=$(modver kube k8s.io/kubernetes); mm=${v#v}; major=${mm%%.*}; rest=${mm#*.}; minor=${rest%%.*}
      P=k8s.io/component-base/version
      build "$tool" kube "k8s.io/kubernetes/cmd/$tool" \
        "-X $P.gitVersion=$v -X $P.gitMajor=$major -X $P.gitMinor=$minor -X $P.gitTreeState=clean -X $P.buildDate=1970-01-01T00:00:00Z";;
    # the CSI sidecars of the e2e cluster (images under their upstream names); upstream stamps
    # main.version, else --version prints "unknown"
    csi-provisioner)
      v=$(modver provisioner github.com/kubernetes-csi/external-provisioner/v6)
      build csi-provisioner provisioner github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner "-X main.version=$v";;
    csi-snapshotter|snapshot-controller)
      v=$(modver snapshotter github.com/kubernetes-csi/external-snapshotter/v8)
      build "$tool" snapshotter "github.com/kubernetes-csi/external-snapshotter/v8/cmd/$tool" "-X main.version=$v";;
    csi-resizer)
      v=$(modver resizer github.com/kubernetes-csi/external-resizer/v2)
      build csi-resizer resizer github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer "-X main.version=$v";;
    csi-snapshot-metadata)
      # Kubernetes' changed-block tracking sidecar (the chart runs it beside the controller)
      v=$(modver snapshot-metadata github.com/kubernetes-csi/external-snapshot-metadata)
      build csi-snapshot-metadata snapshot-metadata \
        github.com/kubernetes-csi/external-snapshot-metadata/cmd/csi-snapshot-metadata "-X main.version=$v";;
    snapshot-metadata-lister)
      # upstream's example backup client (its Go iterator: a ServiceAccount token, the
      # SnapshotMetadataService's address and CA): the kube tier reads ranges through the sidecar with it
      build snapshot-metadata-lister snapshot-metadata \
        github.com/kubernetes-csi/external-snapshot-metadata/examples/snapshot-metadata-lister "";;
    pause)
      build pause pause csi-thin.io/tools/pause "-s -w";;
    ctrd-suite)
      # containerd's snapshotter conformance suite against `csi-thin snapshotter` (tests/root)
      build ctrd-suite ctrd-suite . "" test;;
    promtool)
      # Prometheus' Go module is versioned v0.3XX.Y for release 3.XX.Y: print the release, and the
      # module version as the revision
      v=$(modver promtool github.com/prometheus/prometheus); mm=${v#v0.}; mm=${mm%%.*}
      rel=${mm:0:1}.$((10#${mm:1})).${v##*.}; P=github.com/prometheus/common/version
      build promtool promtool github.com/prometheus/prometheus/cmd/promtool \
        "-X $P.Version=$rel -X $P.Revision=$v -X $P.Branch=module -X $P.BuildUser=csi-thin -X $P.BuildDate=19700101-00:00:00";;
    snapshot-crds)
      # the VolumeSnapshot API and the VolumeGroupSnapshot API (groupsnapshot.storage.k8s.io, v1 in
      # this client version): snapshot-controller and csi-snapshotter run their group controllers
      # only where the group CRDs are served
      crds snapshot snapshot-crds github.com/kubernetes-csi/external-snapshotter/client/v8 config/crd \
        snapshot.storage.k8s.io_volumesnapshotclasses.yaml snapshot.storage.k8s.io_volumesnapshotcontents.yaml \
        snapshot.storage.k8s.io_volumesnapshots.yaml \
        groupsnapshot.storage.k8s.io_volumegroupsnapshotclasses.yaml \
        groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml \
        groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml;;
    snapshot-metadata-crds)
      # the SnapshotMetadataService CRD (cbt.storage.k8s.io/v1alpha1), from the sidecar's client module
      crds snapshot-metadata snapshot-metadata github.com/kubernetes-csi/external-snapshot-metadata/client config/crd \
        cbt.storage.k8s.io_snapshotmetadataservices.yaml;;
    monitoring-crds)
      # only the two kinds the chart renders
      crds monitoring monitoring-crds github.com/prometheus-operator/prometheus-operator example/prometheus-operator-crd \
        monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml;;
    *) echo "tools: unknown tool $tool" >&2; exit 2;;
  esac
done
