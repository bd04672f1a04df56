"""The csi-thin helm chart rendered by the pinned helm (bin/helm) over a matrix of values: shared by
the chart's tests (tests/integration/test_chart*.py)."""

from __future__ import annotations

import pathlib
import re
import subprocess
from typing import Any

import yaml

from tests import conftest

CHART = conftest.ROOT / "charts" / "csi-thin"
SNAPSHOT_API = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass"
GROUP_SNAPSHOT_API = "groupsnapshot.storage.k8s.io/v1/VolumeGroupSnapshotClass"
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
NS = "csi-thin"
CBT_API = "cbt.storage.k8s.io/v1alpha1/SnapshotMetadataService"
CBT_ON = {"snapshotMetadata": {"enabled": True}}
MONITORING_ON = {
    "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "grafanaDashboard": {"enabled": True},
}
E2E = {
    "hostNetwork": True,
    "apiServer": {"host": "127.0.0.1", "port": 16443},
    "kubeletDir": "/root/.cache/csi-thin/kube-e2e/var/lib/kubelet",
    "pool": {"backend": "reflink", "reflink": {"imageSize": "2GiB"}},
    "storageClass": {"fsType": "xfs"},
}

#: name -> (values, API versions the cluster serves)
MATRIX: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, ()),
    "dmthin-devices": (
        {"pool": {"dmthin": {"dataDevice": "/dev/vg0/thin-data", "metadataDevice": "/dev/vg0/thin-meta"}}},
        (),
    ),
    "dmthin-loop-files": ({"pool": {"dmthin": {"dataSize": "100GiB", "metadataSize": "1GiB"}}}, ()),
    "reflink-image": ({"pool": {"backend": "reflink"}}, ()),
    "reflink-directory": ({"pool": {"backend": "reflink", "reflink": {"directory": "/srv/csi-thin"}}}, ()),
    "snapshot-api": ({}, (SNAPSHOT_API,)),
    "group-snapshot-api": ({}, (SNAPSHOT_API, GROUP_SNAPSHOT_API)),
    "monitoring-on-api-absent": (MONITORING_ON, ()),
    "monitoring-on-api-present": (MONITORING_ON, (SNAPSHOT_API, *MONITORING_APIS)),
    "monitoring-off-api-present": ({}, MONITORING_APIS),
    "e2e-cluster": (E2E, (SNAPSHOT_API, GROUP_SNAPSHOT_API)),
    "snapshot-metadata": (CBT_ON, (SNAPSHOT_API, CBT_API)),
    "snapshot-metadata-e2e": ({**E2E, **CBT_ON}, (SNAPSHOT_API, CBT_API)),
}


def kube_version() -> str:
    """The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion), for `helm template`."""
    m = re.search(r'^kubeVersion: ">=([0-9.]+)-0"$', (CHART / "Chart.yaml").read_text(), re.MULTILINE)
    assert m, "Chart.yaml has no kubeVersion of the form >=X.Y.Z-0"
    return m.group(1)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(conftest.tool("helm")), *args], capture_output=True, text=True, timeout=120, check=False
    )


def render_text(
    tmp_path: pathlib.Path, values: dict[str, Any], api_versions: tuple[str, ...] = (), *extra: str
) -> subprocess.CompletedProcess[str]:
    vfile = tmp_path / "values.yaml"
    vfile.write_text(yaml.safe_dump(values))
    args = ["template", "csi-thin", str(CHART), "--namespace", NS, "--kube-version", kube_version()]
    for api in api_versions:
        args += ["--api-versions", api]
    return helm(*args, "-f", str(vfile), *extra)


def render(
    tmp_path: pathlib.Path, values: dict[str, Any], api_versions: tuple[str, ...] = (), *extra: str
) -> list[dict[str, Any]]:
    out = render_text(tmp_path, values, api_versions, *extra)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]
