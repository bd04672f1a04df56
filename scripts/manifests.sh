#!/usr/bin/env bash
# Render deploy/ (plain manifests for `kubectl apply`) from the chart's defaults with the pinned helm:
#   scripts/manifests.sh [OUT_DIR]        (default: deploy/; `make manifests`)
# tests/integration/test_chart.py renders into a temporary dir and fails when deploy/ differs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/deploy}
HELM=${HELM:-$ROOT/bin/helm}
CHART=$ROOT/charts/csi-thin
NS=csi-thin
[ -x "$HELM" ] || { echo "manifests: $HELM missing: run \`make tools\`" >&2; exit 1; }
# helm checks the chart's kubeVersion against this; the output does not depend on it
KUBE=$(sed -n 's/^kubeVersion: ">=\([0-9.]*\)-0"$/\1/p' "$CHART/Chart.yaml")
[ -n "$KUBE" ] || { echo "manifests: no kubeVersion in $CHART/Chart.yaml" >&2; exit 1; }
mkdir -p "$OUT"
header() {
  echo "# Rendered from charts/csi-thin with its default values by \`make manifests\`: do not edit."
  echo "# $1"
}
{
  header "The driver in namespace $NS: kubectl apply --server-side -f deploy/csi-thin.yaml"
  printf -- '---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n' "$NS"
  "$HELM" template csi-thin "$CHART" --namespace "$NS" --kube-version "$KUBE" --include-crds
} > "$OUT/csi-thin.yaml.tmp"
{
  header "Where the cluster serves snapshot.storage.k8s.io/v1: kubectl apply -f deploy/volumesnapshotclass.yaml"
  "$HELM" template csi-thin "$CHART" --namespace "$NS" --kube-version "$KUBE" \
    --api-versions snapshot.storage.k8s.io/v1/VolumeSnapshotClass --show-only templates/volumesnapshotclass.yaml
} > "$OUT/volumesnapshotclass.yaml.tmp"
{
  header "Where the cluster serves groupsnapshot.storage.k8s.io/v1: kubectl apply -f deploy/volumegroupsnapshotclass.yaml"
  "$HELM" template csi-thin "$CHART" --namespace "$NS" --kube-version "$KUBE" \
    --api-versions groupsnapshot.storage.k8s.io/v1/VolumeGroupSnapshotClass \
    --show-only templates/volumegroupsnapshotclass.yaml
} > "$OUT/volumegroupsnapshotclass.yaml.tmp"
mv "$OUT/csi-thin.yaml.tmp" "$OUT/csi-thin.yaml"
mv "$OUT/volumesnapshotclass.yaml.tmp" "$OUT/volumesnapshotclass.yaml"
mv "$OUT/volumegroupsnapshotclass.yaml.tmp" "$OUT/volumegroupsnapshotclass.yaml"
