// Pinned VolumeSnapshot and VolumeGroupSnapshot CRDs (config/crd of the external-snapshotter client module, the version the
// csi-snapshotter sidecar v8.7.0 is built with): `tools/build.sh snapshot-crds` copies them into
// bin/crds/snapshot/ for the chart tests (and a cluster's snapshot API). No Go code is built.
module csi-thin.io/tools/snapshot-crds

go 1.26.0

require github.com/kubernetes-csi/external-snapshotter/client/v8 v8.7.0
