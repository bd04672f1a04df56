#!/usr/bin/env bash
# Generate the Python stubs (<name>_pb2, <name>_pb2_grpc + .pyi) into csi_thin/csi/pb/ from the proto
# files of pinned Go modules: the CSI spec (tools/csi/go.mod) and kubelet's plugin-registration API
# (tools/kubelet/go.mod, k8s.io/kubelet pkg/apis/pluginregistration/v1/api.proto). Go downloads each
# module and verifies its checksum against the go.sum beside it; no proto is copied into the repository.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/csi_thin/csi/pb
command -v go >/dev/null || { echo "proto: the Go toolchain is required to fetch the pinned proto modules (go not found on PATH)" >&2; exit 1; }
# Lay the protos out under the package path so the generated modules import each other absolutely.
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/csi_thin/csi/pb"

# tools-dir module proto-in-module name -> prints the module version; copies the proto to <name>.proto
fetch() {
  local tools=$1 mod=$2 file=$3 name=$4 ver dir
  ver=$(cd "$ROOT/tools/$tools" && go list -m -f '{{.Version}}' "$mod")
  dir=$(cd "$ROOT/tools/$tools" && go mod download -json "$mod@$ver" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  [ -f "$dir/$file" ] || { echo "proto: $dir/$file missing" >&2; exit 1; }
  cp "$dir/$file" "$W/csi_thin/csi/pb/$name.proto"
  echo "$ver"
}
CSI_MOD=github.com/container-storage-interface/spec
CSI_VER=$(fetch csi "$CSI_MOD" csi.proto csi)
KUBELET_MOD=k8s.io/kubelet
KUBELET_VER=$(fetch kubelet "$KUBELET_MOD" pkg/apis/pluginregistration/v1/api.proto pluginregistration)
# api.proto declares `package pluginregistration;` (kubelet dials /pluginregistration.Registration/...):
# the file is renamed, the proto package is kept, so the wire names stay exactly kubelet's.
grep -q '^package pluginregistration;' "$W/csi_thin/csi/pb/pluginregistration.proto" \
  || { echo "proto: $KUBELET_MOD@$KUBELET_VER api.proto no longer declares package pluginregistration" >&2; exit 1; }

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
PATH="$(dirname "$PY"):$PATH" "$PY" -m grpc_tools.protoc -I "$W" \
  --python_out="$W" --grpc_python_out="$W" --mypy_out="$W" --mypy_grpc_out="$W" \
  "$W/csi_thin/csi/pb/csi.proto" "$W/csi_thin/csi/pb/pluginregistration.proto"
cp "$W"/csi_thin/csi/pb/*.py "$W"/csi_thin/csi/pb/*.pyi "$OUT.tmp/"
printf '"""Generated from %s@%s and %s@%s by scripts/gen-proto.sh; not committed."""\n\nSPEC_VERSION = "%s"\nKUBELET_VERSION = "%s"\n' \
  "$CSI_MOD" "$CSI_VER" "$KUBELET_MOD" "$KUBELET_VER" "$CSI_VER" "$KUBELET_VER" > "$OUT.tmp/__init__.py"
touch "$OUT.tmp/py.typed"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "proto: generated CSI $CSI_VER and kubelet plugin-registration $KUBELET_VER stubs into csi_thin/csi/pb/"
