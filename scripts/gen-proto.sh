#!/usr/bin/env bash
# Generate the CSI Python stubs (csi_pb2, csi_pb2_grpc + .pyi) into csi_thin/csi/pb/ from the spec
# module pinned in tools/csi/go.mod. Go downloads the module and verifies its checksum against
# tools/csi/go.sum; nothing of the spec is copied into the repository.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/csi_thin/csi/pb
command -v go >/dev/null || { echo "proto: the Go toolchain is required to fetch the pinned CSI spec (go not found on PATH)" >&2; exit 1; }
MOD=github.com/container-storage-interface/spec
VER=$(cd "$ROOT/tools/csi" && go list -m -f '{{.Version}}' "$MOD")
DIR=$(cd "$ROOT/tools/csi" && go mod download -json "$MOD@$VER" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
[ -f "$DIR/csi.proto" ] || { echo "proto: $DIR/csi.proto missing" >&2; exit 1; }
# Lay the proto out under the package path so the generated modules import each other absolutely.
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/csi_thin/csi/pb"
cp "$DIR/csi.proto" "$W/csi_thin/csi/pb/csi.proto"
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
PATH="$(dirname "$PY"):$PATH" "$PY" -m grpc_tools.protoc -I "$W" \
  --python_out="$W" --grpc_python_out="$W" --mypy_out="$W" --mypy_grpc_out="$W" \
  "$W/csi_thin/csi/pb/csi.proto"
cp "$W"/csi_thin/csi/pb/*.py "$W"/csi_thin/csi/pb/*.pyi "$OUT.tmp/"
printf '"""Generated from %s@%s by scripts/gen-proto.sh; not committed."""\n\nSPEC_VERSION = "%s"\n' \
  "$MOD" "$VER" "$VER" > "$OUT.tmp/__init__.py"
touch "$OUT.tmp/py.typed"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "proto: generated CSI $VER stubs into csi_thin/csi/pb/"
