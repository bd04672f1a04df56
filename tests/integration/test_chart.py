"""The helm chart, checked by the real tools: `helm lint --strict`, `helm template` over a matrix of
values (dm-thin devices or loop files, reflink, monitoring on/off, the snapshot and monitoring APIs
present or absent, the e2e cluster's settings), its values schema refusing bad values, deploy/ being
what `make manifests` renders, and the rendered pool config being one the driver itself accepts.

Applying the objects to a real API server, and what their RBAC allows, is test_chart_apply.py."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from typing import Any

import pytest
import yaml

from csi_thin import config
from tests import conftest
from tests import csi_harness as h

pytestmark = pytest.mark.tools

CHART = conftest.ROOT / "charts" / "csi-thin"
SNAPSHOT_API = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass"
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
NS = "csi-thin"
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
    "monitoring-on-api-absent": (MONITORING_ON, ()),
    "monitoring-on-api-present": (MONITORING_ON, (SNAPSHOT_API, *MONITORING_APIS)),
    "monitoring-off-api-present": ({}, MONITORING_APIS),
    "e2e-cluster": (E2E, (SNAPSHOT_API,)),
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


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def _deep(base: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        base = base.get(key, {})
    return base


@pytest.mark.parametrize("case", list(MATRIX))
def test_lint_strict(tmp_path: pathlib.Path, case: str) -> None:
    values, _ = MATRIX[case]
    vfile = tmp_path / "values.yaml"
    vfile.write_text(yaml.safe_dump(values))
    out = helm("lint", "--strict", str(CHART), "--kube-version", kube_version(), "-f", str(vfile))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout, out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize("case", list(MATRIX))
def test_template_renders(tmp_path: pathlib.Path, case: str) -> None:
    values, apis = MATRIX[case]
    docs = render(tmp_path, values, apis)
    kinds = sorted(d["kind"] for d in docs)
    monitoring = _deep(values, "monitoring.serviceMonitor.enabled") is True
    # optional objects appear exactly when asked for and when the cluster serves their API
    assert kinds.count("VolumeSnapshotClass") == (SNAPSHOT_API in apis)
    assert kinds.count("ServiceMonitor") == (monitoring and MONITORING_APIS[0] in apis)
    assert kinds.count("PrometheusRule") == (monitoring and MONITORING_APIS[1] in apis)
    assert kinds.count("ConfigMap") == 1 + (_deep(values, "grafanaDashboard.enabled") is True)
    for kind in ("CSIDriver", "Deployment", "DaemonSet", "StorageClass", "Service", "Role", "RoleBinding"):
        assert kinds.count(kind) == 1, kinds
    # the sidecars and the driver: every image pulled only when missing, every process pointed at
    # the API server override when one is given, every pod on the node's network when asked
    api = values.get("apiServer", {})
    for c in containers(docs):
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if api:
            assert env["KUBERNETES_SERVICE_HOST"] == api["host"], c["name"]
            assert env["KUBERNETES_SERVICE_PORT"] == str(api["port"]), c["name"]
        else:
            assert "KUBERNETES_SERVICE_HOST" not in env, c["name"]
    for kind, name in (("Deployment", "csi-thin-controller"), ("DaemonSet", "csi-thin-node")):
        pod = one(docs, kind, name)["spec"]["template"]["spec"]
        assert pod.get("hostNetwork", False) is values.get("hostNetwork", False), kind


@pytest.mark.parametrize("case", list(MATRIX))
def test_pool_config_is_one_the_driver_accepts(tmp_path: pathlib.Path, case: str) -> None:
    """The ConfigMap's pool.yaml goes through csi_thin.config, as `csi-thin node` will read it, and
    every file the pool makes lives in the state dir the DaemonSet mounts from the host."""
    values, apis = MATRIX[case]
    docs = render(tmp_path, values, apis)
    raw = yaml.safe_load(one(docs, "ConfigMap", "csi-thin-pool")["data"]["pool.yaml"])
    cfg = config.pool_from_dict(raw)
    pool = values.get("pool", {})
    assert cfg.backend.value == pool.get("backend", "dmthin")
    ds = one(docs, "DaemonSet", "csi-thin-node")["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in ds["containers"][0]["volumeMounts"]}
    state = "/var/lib/csi-thin"
    assert state in mounts
    assert cfg.state_dir.startswith(state + "/")
    if cfg.dmthin is not None:
        devices = pool.get("dmthin", {}).get("dataDevice")
        if devices:
            assert (cfg.dmthin.data_device, cfg.dmthin.metadata_device) == (
                "/dev/vg0/thin-data",
                "/dev/vg0/thin-meta",
            )
            assert "/dev" in mounts
        else:
            assert cfg.dmthin.data_file is not None and cfg.dmthin.data_file.startswith(state + "/")
            assert cfg.dmthin.data_size == config.parse_size(pool.get("dmthin", {}).get("dataSize", "10GiB"))
    else:
        assert cfg.reflink is not None
        directory = pool.get("reflink", {}).get("directory")
        if directory:
            assert cfg.reflink.directory == directory and cfg.reflink.image_file is None
            assert directory in mounts
        else:
            assert cfg.reflink.image_file is not None and cfg.reflink.image_file.startswith(state + "/")
            assert cfg.reflink.directory.startswith(state + "/")


def test_node_plugin_pod(tmp_path: pathlib.Path) -> None:
    """What the issue asks of the node DaemonSet, in the e2e cluster's settings (a kubelet dir that is
    not the default one, host networking, the API server on loopback)."""
    docs = render(tmp_path, E2E, (SNAPSHOT_API,))
    ds = one(docs, "DaemonSet", "csi-thin-node")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (c,) = pod["containers"]  # one container: it registers with kubelet itself
    assert c["securityContext"]["privileged"] is True
    kubelet = E2E["kubeletDir"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[kubelet]["mountPropagation"] == "Bidirectional"
    assert "/dev" in mounts
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths[mounts[kubelet]["name"]] == kubelet  # the same path inside as outside
    args = c["args"]
    assert args[0] == "node"
    assert f"--endpoint=unix://{kubelet}/plugins/csi-thin.io/csi.sock" in args
    assert f"--kubelet-dir={kubelet}" in args
    assert "--node-id=$(NODE_NAME)" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # kubelet waits longer than the process drains in-flight calls after SIGTERM
    grace = next(int(a.split("=")[1]) for a in args if a.startswith("--grace="))
    assert pod["terminationGracePeriodSeconds"] > grace


def test_controller_pod(tmp_path: pathlib.Path) -> None:
    docs = render(tmp_path, {})
    pod = one(docs, "Deployment", "csi-thin-controller")["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    assert set(by_name) == {"csi-thin", "csi-provisioner", "csi-snapshotter", "csi-resizer"}
    assert by_name["csi-thin"]["args"][:2] == ["controller", "--endpoint=unix:///csi/csi.sock"]
    assert (
        by_name["csi-thin"]["image"]
        == f"csi-thin:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    )
    # the provisioner's flags, as issue 10 lists them
    assert {
        "--feature-gates=Topology=true",
        "--enable-capacity",
        "--capacity-ownerref-level=2",
        "--strict-topology",
        "--immediate-topology=false",
        "--extra-create-metadata",
    } <= set(by_name["csi-provisioner"]["args"])
    for name, tag in (
        ("csi-provisioner", "v6.4.0"),
        ("csi-snapshotter", "v8.7.0"),
        ("csi-resizer", "v2.3.0"),
    ):
        c = by_name[name]
        assert c["image"].endswith(f"/sig-storage/{name}:{tag}"), c["image"]
        assert "--leader-election" in c["args"]
        assert "--csi-address=/csi/csi.sock" in c["args"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz/leader-election"
        assert c["resources"]["requests"] and c["resources"]["limits"]
        env = {e["name"] for e in c["env"]}
        assert {"POD_NAME", "NAMESPACE"} <= env  # CSIStorageCapacity's owner, leader election
    images = {c["image"] for c in pod["containers"]}
    # the sidecar image names are the only registry host in the chart, and they are in values.yaml
    hosts = {i.split("/")[0] for i in images if "/" in i}
    assert hosts == {"registry.k8s.io"}
    for path in CHART.rglob("*"):
        if path.is_file() and path.name != "values.yaml":
            assert "registry.k8s.io" not in path.read_text(), path


def test_storage_and_snapshot_classes(tmp_path: pathlib.Path) -> None:
    docs = render(tmp_path, {"storageClass": {"fsType": "xfs", "default": True}}, (SNAPSHOT_API,))
    sc = one(docs, "StorageClass", "csi-thin")
    assert sc["provisioner"] == "csi-thin.io"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert sc["parameters"] == {"csi.storage.k8s.io/fstype": "xfs"}
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert one(docs, "VolumeSnapshotClass", "csi-thin")["driver"] == "csi-thin.io"
    drv = one(docs, "CSIDriver", "csi-thin.io")["spec"]
    assert drv["attachRequired"] is False and drv["storageCapacity"] is True
    assert drv["fsGroupPolicy"] == "File" and drv["volumeLifecycleModes"] == ["Persistent"]


def test_prometheus_rule_is_the_alerts_file(tmp_path: pathlib.Path) -> None:
    docs = render(tmp_path, MONITORING_ON, MONITORING_APIS)
    rule = one(docs, "PrometheusRule", "csi-thin")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    sm = one(docs, "ServiceMonitor", "csi-thin-node")
    svc = one(docs, "Service", "csi-thin-node")
    # the alerts expect the scrape job csi-thin-node: the ServiceMonitor's job is its Service's name
    assert "jobLabel" not in sm["spec"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def test_dashboard_reads_only_metrics_the_process_exports(tmp_path: pathlib.Path) -> None:
    docs = render(tmp_path, {"grafanaDashboard": {"enabled": True}})
    dash = json.loads(one(docs, "ConfigMap", "csi-thin-dashboard")["data"]["csi-thin.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bcsi_thin_\w+", e)}
    for wanted in ("csi_thin_pool_data_used_bytes", "csi_thin_pool_metadata_capacity_bytes"):
        assert wanted in used  # pool data and metadata, used vs capacity
    assert used <= h.exported_metric_names(tmp_path), "the dashboard reads metrics nobody exports"


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"pool": {"backend": "lvm"}}, "/pool/backend"),
        ({"pool": {"name": "Bad_Name"}}, "/pool/name"),
        ({"pool": {"stateDir": "var/lib/csi-thin"}}, "/pool/stateDir"),
        ({"pool": {"dmthin": {"dataDevice": "/dev/sdb"}}}, "/pool/dmthin/metadataDevice"),
        ({"pool": {"dmthin": {"dataSize": ""}}}, "/pool/dmthin/dataSize"),
        ({"pool": {"dmthin": {"dataSize": "10 gigs"}}}, "/pool/dmthin/dataSize"),
        ({"pool": {"dmthin": {"blockSize": "64KB!"}}}, "/pool/dmthin/blockSize"),
        ({"pool": {"backend": "reflink", "reflink": {"imageSize": ""}}}, "/pool/reflink/imageSize"),
        ({"pool": {"reflink": {"fsType": "ext4"}}}, "/pool/reflink/fsType"),
        ({"pool": {"thresholds": {"data": 1.5}}}, "/pool/thresholds/data"),
        ({"pool": {"thresholds": {"metadata": 0}}}, "/pool/thresholds/metadata"),
        ({"kubeletDir": "var/lib/kubelet"}, "/kubeletDir"),
        ({"storageClass": {"fsType": "ntfs"}}, "/storageClass/fsType"),
        ({"hostnetwork": True}, "'hostnetwork' not allowed"),
        ({"apiServer": {"host": "127.0.0.1"}}, "/apiServer/port"),
        ({"apiServer": {"host": "127.0.0.1", "port": 70000}}, "/apiServer/port"),
        ({"apiServer": {"host": "https://127.0.0.1:6443", "port": 6443}}, "/apiServer/host"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"sidecars": {"provisioner": {"image": {"tag": ""}}}}, "/sidecars/provisioner/image/tag"),
        ({"sidecars": {"provisioner": {"capacityPollInterval": "1 minute"}}}, "capacityPollInterval"),
        ({"node": {"httpPort": 0}}, "/node/httpPort"),
        ({"controller": {"replicas": 0}}, "/controller/replicas"),
        ({"logLevel": "verbose"}, "/logLevel"),
        ({"overprovisionRatio": 0.5}, "/overprovisionRatio"),
    ],
)
def test_schema_refuses_bad_values(tmp_path: pathlib.Path, values: dict[str, Any], says: str) -> None:
    out = render_text(tmp_path, values)
    assert out.returncode != 0, f"rendered with bad values {values}"
    assert "don't meet the specifications of the schema" in out.stderr, out.stderr
    assert says in out.stderr, out.stderr


def test_kube_version_below_the_chart_minimum_is_refused(tmp_path: pathlib.Path) -> None:
    major, minor, _ = kube_version().split(".")
    older = f"{major}.{int(minor) - 1}.0"
    out = helm("template", "csi-thin", str(CHART), "--kube-version", older)
    assert out.returncode != 0 and "incompatible with Kubernetes" in out.stderr, out.stderr


def test_deploy_manifests_are_fresh(tmp_path: pathlib.Path) -> None:
    """deploy/ is what `make manifests` renders from the chart now (run it after changing the chart)."""
    subprocess.run(
        [str(conftest.ROOT / "scripts" / "manifests.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HELM": str(conftest.tool("helm"))},
    )
    deploy = conftest.ROOT / "deploy"
    rendered = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in deploy.iterdir()) == rendered
    for name in rendered:
        assert (deploy / name).read_text() == (tmp_path / name).read_text(), (
            f"deploy/{name} is stale: run `make manifests`"
        )
