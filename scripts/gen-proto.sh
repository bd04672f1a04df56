#!/usr/bin/env bash
# Generate the Python stubs (<name>_pb2, <name>_pb2_grpc + .pyi) from the proto files of pinned Go
# modules: into csi_thin/csi/pb/ the CSI spec (tools/csi/go.mod) and kubelet's plugin-registration API
# (tools/kubelet/go.mod, k8s.io/kubelet pkg/apis/pluginregistration/v1/api.proto); into
# csi_thin/snapshotter/pb/ containerd's Snapshots service (tools/containerd/go.mod,
# github.com/containerd/containerd/api services/snapshots/v1/snapshots.proto + types/mount.proto).
# Go downloads each module and verifies its checksum against the go.sum beside it; no proto is copied
# into the repository.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/csi_thin/csi/pb
command -v go >/dev/null || { echo "proto: the Go toolchain is required to fetch the pinned proto modules (go not found on PATH)" >&2; exit 1; }
# Lay the protos out under the package path so the generated modules import each other absolutely.
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/csi_thin/csi/pb"

# tools-dir module proto-in-module name -> prints the module version; copies the proto to <name>.proto
# (name: its path under the work dir, i.e. its Python module path)
fetch() {
  local tools=$1 mod=$2 file=$3 name=$4 ver dir
  ver=$(cd "$ROOT/tools/$tools" && go list -m -f '{{.Version}}' "$mod")
  dir=$(cd "$ROOT/tools/$tools" && go mod download -json "$mod@$ver" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  [ -f "$dir/$file" ] || { echo "proto: $dir/$file missing" >&2; exit 1; }
  mkdir -p "$W/$(dirname "$name")"
  cp "$dir/$file" "$W/$name.proto"
  echo "$ver"
}
CSI_MOD=github.com/container-storage-interface/spec
CSI_VER=$(fetch csi "$CSI_MOD" csi.proto csi_thin/csi/pb/csi)
KUBELET_MOD=k8s.io/kubelet
KUBELET_VER=$(fetch kubelet "$KUBELET_MOD" pkg/apis/pluginregistration/v1/api.proto csi_thin/csi/pb/pluginregistration)
# api.proto declares `package pluginregistration;` (kubelet dials /pluginregistration.Registration/...):
# the file is renamed, the proto package is kept, so the wire names stay exactly kubelet's.
grep -q '^package pluginregistration;' "$W/csi_thin/csi/pb/pluginregistration.proto" \
  || { echo "proto: $KUBELET_MOD@$KUBELET_VER api.proto no longer declares package pluginregistration" >&2; exit 1; }

CTRD_MOD=github.com/containerd/containerd/api
CTRD_PB=csi_thin/snapshotter/pb
CTRD_VER=$(fetch containerd "$CTRD_MOD" services/snapshots/v1/snapshots.proto $CTRD_PB/snapshots)
fetch containerd "$CTRD_MOD" types/mount.proto $CTRD_PB/mount >/dev/null
# snapshots.proto imports "types/mount.proto": Python would generate `from types import mount_pb2`,
# which is the standard library's `types`. The import path is rewritten to where the file lies here;
# both proto packages (containerd.services.snapshots.v1, containerd.types) are kept, so the wire
# names stay exactly containerd's.
grep -q '^import "types/mount.proto";$' "$W/$CTRD_PB/snapshots.proto" \
  || { echo "proto: $CTRD_MOD@$CTRD_VER snapshots.proto no longer imports types/mount.proto" >&2; exit 1; }
sed -i "s|^import \"types/mount.proto\";\$|import \"$CTRD_PB/mount.proto\";|" "$W/$CTRD_PB/snapshots.proto"

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
PATH="$(dirname "$PY"):$PATH" "$PY" -m grpc_tools.protoc -I "$W" \
  --python_out="$W" --grpc_python_out="$W" --mypy_out="$W" --mypy_grpc_out="$W" \
  "$W/csi_thin/csi/pb/csi.proto" "$W/csi_thin/csi/pb/pluginregistration.proto" \
  "$W/$CTRD_PB/snapshots.proto" "$W/$CTRD_PB/mount.proto"
cp "$W"/csi_thin/csi/pb/*.py "$W"/csi_thin/csi/pb/*.pyi "$OUT.tmp/"
printf '"""Generated from %s@%s and %s@%s by scripts/gen-proto.sh; not committed."""\n\nSPEC_VERSION = "%s"\nKUBELET_VERSION = "%s"\n' \
  "$CSI_MOD" "$CSI_VER" "$KUBELET_MOD" "$KUBELET_VER" "$CSI_VER" "$KUBELET_VER" > "$OUT.tmp/__init__.py"
touch "$OUT.tmp/py.typed"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
SOUT=$ROOT/$CTRD_PB
rm -rf "$SOUT.tmp" && mkdir -p "$SOUT.tmp"
cp "$W/$CTRD_PB"/*.py "$W/$CTRD_PB"/*.pyi "$SOUT.tmp/"
printf '"""Generated from %s@%s by scripts/gen-proto.sh; not committed."""\n\nCONTAINERD_API_VERSION = "%s"\n' \
  "$CTRD_MOD" "$CTRD_VER" "$CTRD_VER" > "$SOUT.tmp/__init__.py"
touch "$SOUT.tmp/py.typed"
rm -rf "$SOUT" && mv "$SOUT.tmp" "$SOUT"
echo "proto: generated CSI $CSI_VER and kubelet plugin-registration $KUBELET_VER stubs into csi_thin/csi/pb/,"
echo "proto: containerd snapshots API $CTRD_VER stubs into $CTRD_PB/"
