// The containerd API module: source of containerd.services.snapshots.v1 (snapshots.proto) and the
// types/mount.proto it imports, from which scripts/gen-proto.sh generates the Python stubs of the
// proxy snapshotter (no Go code is built from it).
module csi-thin.io/tools/containerd

go 1.26.0
require github.com/containerd/containerd/api v1.12.0
