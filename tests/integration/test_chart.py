"""The helm chart, checked by the real tools: `helm lint --strict`, `helm template` over a matrix of
values (dm-thin devices or loop files, reflink, monitoring on/off, the snapshot and monitoring APIs
present or absent, the e2e cluster's settings), its values schema refusing bad values, deploy/ being
what `make manifests` renders, and the rendered pool config being one the driver itself accepts.

Applying the objects to a real API server, and what their RBAC allows, is test_chart_apply.py."""

from __future__ import annotations

import base64
import json
import pathlib
import re
import subprocess
import tomllib
from typing import Any

import grpc
import pytest
import yaml

from csi_thin import cli, config, errors, httpserver
from csi_thin.csi import snapshot_metadata_link as link
from csi_thin.csi import snapshot_metadata_service
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from csi_thin.node import agent
from tests import conftest
from tests import csi_harness as h
from tests import helmchart as hc

pytestmark = pytest.mark.tools


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


@pytest.mark.parametrize("case", list(hc.MATRIX))
def test_lint_strict(tmp_path: pathlib.Path, case: str) -> None:
    values, _ = hc.MATRIX[case]
    vfile = tmp_path / "values.yaml"
    vfile.write_text(yaml.safe_dump(values))
    out = hc.helm("lint", "--strict", str(hc.CHART), "--kube-version", hc.kube_version(), "-f", str(vfile))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout, out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize("case", list(hc.MATRIX))
def test_template_renders(tmp_path: pathlib.Path, case: str) -> None:
    values, apis = hc.MATRIX[case]
    docs = hc.render(tmp_path, values, apis)
    kinds = sorted(d["kind"] for d in docs)
    monitoring = _deep(values, "monitoring.serviceMonitor.enabled") is True
    # optional objects appear exactly when asked for and when the cluster serves their API
    assert kinds.count("VolumeSnapshotClass") == (hc.SNAPSHOT_API in apis)
    assert kinds.count("VolumeGroupSnapshotClass") == (hc.GROUP_SNAPSHOT_API in apis)
    assert kinds.count("ServiceMonitor") == (monitoring and hc.MONITORING_APIS[0] in apis)
    assert kinds.count("PrometheusRule") == (monitoring and hc.MONITORING_APIS[1] in apis)
    assert kinds.count("ConfigMap") == 1 + (_deep(values, "grafanaDashboard.enabled") is True)
    # changed-block tracking: the sidecar's Service, three TLS Secrets, and the
    # SnapshotMetadataService where the cluster serves its API
    cbt = _deep(values, "snapshotMetadata.enabled") is True
    assert kinds.count("SnapshotMetadataService") == (cbt and hc.CBT_API in apis)
    assert kinds.count("Secret") == 3 * cbt
    assert kinds.count("Service") == 1 + cbt, kinds
    assert ("csi-snapshot-metadata" in {c["name"] for c in containers(docs)}) is cbt
    for kind in ("CSIDriver", "Deployment", "DaemonSet", "StorageClass"):
        assert kinds.count(kind) == 1, kinds
    # the controller's in its namespace, the node's Events in `default`
    for kind in ("Role", "RoleBinding"):
        assert kinds.count(kind) == 2, kinds
    # the sidecars and the driver: every image pulled only when missing, every process pointed at
    # the API server override when hc.one is given, every pod on the node's network when asked
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
        pod = hc.one(docs, kind, name)["spec"]["template"]["spec"]
        assert pod.get("hostNetwork", False) is values.get("hostNetwork", False), kind
    # a rollout on the node's network cannot surge: the new pod would need the old one's ports
    strategy = hc.one(docs, "Deployment", "csi-thin-controller")["spec"].get("strategy", {})
    if values.get("hostNetwork"):
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    else:
        assert strategy == {}


@pytest.mark.parametrize("case", list(hc.MATRIX))
def test_pool_config_is_one_the_driver_accepts(tmp_path: pathlib.Path, case: str) -> None:
    """The ConfigMap's pool.yaml goes through csi_thin.config, as `csi-thin node` will read it, and
    every file the pool makes lives in the state dir the DaemonSet mounts from the host."""
    values, apis = hc.MATRIX[case]
    docs = hc.render(tmp_path, values, apis)
    raw = yaml.safe_load(hc.one(docs, "ConfigMap", "csi-thin-pool")["data"]["pool.yaml"])
    cfg = config.pool_from_dict(raw)
    pool = values.get("pool", {})
    assert cfg.backend.value == pool.get("backend", "dmthin")
    ds = hc.one(docs, "DaemonSet", "csi-thin-node")["spec"]["template"]["spec"]
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
    not the default hc.one, host networking, the API server on loopback)."""
    docs = hc.render(tmp_path, hc.E2E, (hc.SNAPSHOT_API,))
    ds = hc.one(docs, "DaemonSet", "csi-thin-node")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (c,) = pod["containers"]  # hc.one container: it registers with kubelet itself
    assert c["securityContext"]["privileged"] is True
    kubelet = hc.E2E["kubeletDir"]
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
    # kubelet waits longer than the process takes to stop after SIGTERM: it drains in-flight CSI
    # calls within --grace, and then lets the agent finish the CR it is reconciling (a snapshot may
    # hold its origin frozen or suspended meanwhile: a SIGKILL there leaves it so until the plugin
    # starts again, after an uninstall never), which is bounded by the agent's reconcile deadline
    grace = next(int(a.split("=")[1]) for a in args if a.startswith("--grace="))
    assert pod["terminationGracePeriodSeconds"] > grace + agent.RECONCILE_SECONDS


def test_controller_pod(tmp_path: pathlib.Path) -> None:
    docs = hc.render(tmp_path, {})
    pod = hc.one(docs, "Deployment", "csi-thin-controller")["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    assert set(by_name) == {"csi-thin", "csi-provisioner", "csi-snapshotter", "csi-resizer"}
    assert by_name["csi-thin"]["args"][:2] == ["controller", "--endpoint=unix:///csi/csi.sock"]
    assert (
        by_name["csi-thin"]["image"]
        == f"localhost/csi-thin:{yaml.safe_load((hc.CHART / 'Chart.yaml').read_text())['appVersion']}"
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
    # (the driver's is localhost/: no registry, see test_the_default_driver_image_is_found...)
    hosts = {i.split("/")[0] for i in images if "/" in i}
    assert hosts == {"registry.k8s.io", "localhost"}
    for path in hc.CHART.rglob("*"):
        if path.is_file() and path.name != "values.yaml":
            assert "registry.k8s.io" not in path.read_text(), path


@pytest.mark.parametrize("case", list(hc.MATRIX))
def test_driver_args_are_ones_the_cli_accepts(tmp_path: pathlib.Path, case: str) -> None:
    """The csi-thin containers' command lines go through csi-thin's own parser (a flag it does not
    know ends the process at start), with kubelet's $(VAR) expansion of the pod's env done first."""
    values, apis = hc.MATRIX[case]
    docs = hc.render(tmp_path, values, apis)
    env = {"NODE_NAME": "node-a", "POD_IP": "10.1.2.3", "POD_NAME": "p", "NAMESPACE": hc.NS}
    seen = set()
    for c in containers(docs):
        if c["name"] != "csi-thin":
            continue
        assert c["command"] == ["csi-thin"]
        argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
        assert {e["name"] for e in c["env"]} >= {n for a in c["args"] for n in re.findall(r"\$\((\w+)\)", a)}
        try:
            args = cli.build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"csi-thin refuses {argv}") from exc
        seen.add(args.command)
        if args.command == "node":
            assert args.node_id == "node-a"
            assert httpserver.parse_address(args.http_endpoint) == (
                "10.1.2.3",
                values.get("node", {}).get("httpPort", 9808),
            )
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert pathlib.PurePath(args.pool_config).parent.as_posix() in mounts
    assert seen == {"controller", "node"}


def test_app_version_is_the_driver_version() -> None:
    """The default image tag is the chart's appVersion, and `make image` tags the driver's version."""
    chart = yaml.safe_load((hc.CHART / "Chart.yaml").read_text())
    project = tomllib.loads((conftest.ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_the_default_driver_image_is_found_where_it_was_imported(tmp_path: pathlib.Path) -> None:
    """A container runtime normalizes a pod's image name before it looks it up (containerd's CRI,
    like docker, by distribution/reference): a first path component that is no host (no "." or
    ":", not "localhost") makes it a public registry's library image. The archive of `make image`,
    imported into a node's runtime, keeps its name as given, so an unqualified default
    (csi-thin:<version>) is never found there and kubelet tries to pull it. `localhost/` is the
    qualification that names no registry."""
    docs = hc.render(tmp_path, {})
    for kind, name in (("Deployment", "csi-thin-controller"), ("DaemonSet", "csi-thin-node")):
        pod = hc.one(docs, kind, name)["spec"]["template"]["spec"]
        image = next(c["image"] for c in pod["containers"] if c["name"] == "csi-thin")
        first, _, rest = image.partition("/")
        assert rest and (first == "localhost" or "." in first or ":" in first), image


def test_controller_http_endpoint_is_optional(tmp_path: pathlib.Path) -> None:
    """Off by default (no probe, no port); on, the driver serves /healthz there and kubelet probes it."""
    for port in (0, 9812):
        docs = hc.render(tmp_path, {"controller": {"httpPort": port}})
        pod = hc.one(docs, "Deployment", "csi-thin-controller")["spec"]["template"]["spec"]
        c = next(c for c in pod["containers"] if c["name"] == "csi-thin")
        flags = [a for a in c["args"] if a.startswith("--http-endpoint")]
        if port:
            assert flags == [f"--http-endpoint=$(POD_IP):{port}"]
            assert c["ports"] == [{"name": "http", "containerPort": port}]
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        else:
            assert not flags and "livenessProbe" not in c and "ports" not in c


def test_storage_and_snapshot_classes(tmp_path: pathlib.Path) -> None:
    docs = hc.render(tmp_path, {"storageClass": {"fsType": "xfs", "default": True}}, (hc.SNAPSHOT_API,))
    sc = hc.one(docs, "StorageClass", "csi-thin")
    assert sc["provisioner"] == "csi-thin.io"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert sc["parameters"] == {"csi.storage.k8s.io/fstype": "xfs"}
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert hc.one(docs, "VolumeSnapshotClass", "csi-thin")["driver"] == "csi-thin.io"
    # without the group snapshot API: no VolumeGroupSnapshotClass (it would fail the install)
    assert not [d for d in docs if d["kind"] == "VolumeGroupSnapshotClass"]
    drv = hc.one(docs, "CSIDriver", "csi-thin.io")["spec"]
    assert drv["attachRequired"] is False and drv["storageCapacity"] is True
    assert drv["fsGroupPolicy"] == "File" and drv["volumeLifecycleModes"] == ["Persistent"]


def test_group_snapshot_class_and_snapshotter_gate(tmp_path: pathlib.Path) -> None:
    docs = hc.render(
        tmp_path, {"volumeGroupSnapshotClass": {"default": True}}, (hc.SNAPSHOT_API, hc.GROUP_SNAPSHOT_API)
    )
    vgsc = hc.one(docs, "VolumeGroupSnapshotClass", "csi-thin")
    assert vgsc["apiVersion"] == "groupsnapshot.storage.k8s.io/v1"
    assert vgsc["driver"] == "csi-thin.io" and vgsc["deletionPolicy"] == "Delete"
    assert vgsc["metadata"]["annotations"]["groupsnapshot.storage.kubernetes.io/is-default-class"] == "true"
    off = hc.render(tmp_path, {"volumeGroupSnapshotClass": {"create": False}}, (hc.GROUP_SNAPSHOT_API,))
    assert not [d for d in off if d["kind"] == "VolumeGroupSnapshotClass"]
    # the snapshotter's gate, and only its: another sidecar refuses a gate it does not know (found
    # by the e2e tier, where the provisioner given it crash-looped)
    gated = [
        c["name"] for c in containers(docs) if "--feature-gates=CSIVolumeGroupSnapshot=true" in c["args"]
    ]
    assert gated == ["csi-snapshotter"], gated


def test_prometheus_rule_is_the_alerts_file(tmp_path: pathlib.Path) -> None:
    docs = hc.render(tmp_path, hc.MONITORING_ON, hc.MONITORING_APIS)
    rule = hc.one(docs, "PrometheusRule", "csi-thin")
    assert rule["spec"] == yaml.safe_load((hc.CHART / "files" / "alerts.yaml").read_text())
    sm = hc.one(docs, "ServiceMonitor", "csi-thin-node")
    svc = hc.one(docs, "Service", "csi-thin-node")
    # the alerts expect the scrape job csi-thin-node: the ServiceMonitor's job is its Service's name
    assert "jobLabel" not in sm["spec"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def test_dashboard_reads_only_metrics_the_process_exports(tmp_path: pathlib.Path) -> None:
    docs = hc.render(tmp_path, {"grafanaDashboard": {"enabled": True}})
    dash = json.loads(hc.one(docs, "ConfigMap", "csi-thin-dashboard")["data"]["csi-thin.json"])
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
    out = hc.render_text(tmp_path, values)
    assert out.returncode != 0, f"rendered with bad values {values}"
    assert "don't meet the specifications of the schema" in out.stderr, out.stderr
    assert says in out.stderr, out.stderr


@pytest.mark.parametrize(
    "pool",
    [
        *({"dmthin": {"blockSize": bs}} for bs in ("64KiB", "192KiB", "0064KiB", "1MiB", "1G", "65536")),
        *({"dmthin": {"blockSize": bs}} for bs in ("32KiB", "100KiB", "2GiB", "1T", "1048640K", "0")),
        {"dmthin": {"dataSize": "0"}},
        {"dmthin": {"dataSize": "0", "dataDevice": "/dev/sdb", "metadataDevice": "/dev/sdc"}},
        {"backend": "reflink", "reflink": {"imageSize": "0"}},
        {"backend": "reflink", "reflink": {"imageSize": "0", "directory": "/srv/csi-thin"}},
    ],
)
def test_chart_refuses_the_pools_the_node_plugin_refuses(
    tmp_path: pathlib.Path, pool: dict[str, Any]
) -> None:
    """A pool config csi_thin.config refuses stops the node plugin at start, on every node at once:
    helm must refuse the same values (the schema checks their form, the template what a pattern
    cannot: ranges, multiples, zero sizes), and render every one the driver takes."""
    out = hc.render_text(tmp_path, {"pool": pool})
    dm, rl = pool.get("dmthin", {}), pool.get("reflink", {})
    if pool.get("backend") == "reflink":
        section = {"directory": rl.get("directory") or "/s/mnt", "image_size": rl.get("imageSize", "1GiB")}
        if not rl.get("directory"):
            section["image_file"] = "/s/pool.img"
        raw: dict[str, Any] = {"reflink": section}
    elif dm.get("dataDevice"):
        raw = {"dmthin": {"data_device": dm["dataDevice"], "metadata_device": dm["metadataDevice"]}}
    else:
        raw = {"dmthin": {"data_file": "/s/d", "data_size": dm.get("dataSize", "10GiB")}}
    raw["dmthin" if "dmthin" in raw else "reflink"].setdefault("block_size", dm.get("blockSize", "64KiB"))
    try:
        cfg = config.pool_from_dict(
            {"name": "pool", "backend": pool.get("backend", "dmthin"), "state_dir": "/s", **raw}
        )
        if cfg.reflink is not None and cfg.reflink.image_file and cfg.reflink.image_size == 0:
            # what a fresh node does with it (csi_thin.pool.reflink: no image to make of size 0)
            raise errors.InvalidArgument("reflink pool image is missing and image_size is 0")
    except errors.InvalidArgument as exc:
        assert out.returncode != 0, f"helm renders {pool}, which the node plugin refuses: {exc.message}"
        assert "pool." in out.stderr, out.stderr
    else:
        assert out.returncode == 0, out.stderr


def test_one_disk_as_data_and_metadata_is_refused(tmp_path: pathlib.Path) -> None:
    """The schema cannot compare two values; the template does: one disk as both would have the
    volumes' data overwrite the pool's metadata."""
    devices = {"dataDevice": "/dev/sdb", "metadataDevice": "/dev/sdb"}
    out = hc.render_text(tmp_path, {"pool": {"dmthin": devices}})
    assert out.returncode != 0, "rendered with one disk as data and metadata"
    assert "dataDevice and metadataDevice must be two devices" in out.stderr, out.stderr


def test_set_on_the_command_line_passes_the_schema(tmp_path: pathlib.Path) -> None:
    """helm's --set hands 0.9 over as a string: the schema takes it, and the pool config gets a number."""
    docs = hc.render(tmp_path, {}, (), "--set", "pool.thresholds.data=0.9", "--set", "overprovisionRatio=2.5")
    raw = yaml.safe_load(hc.one(docs, "ConfigMap", "csi-thin-pool")["data"]["pool.yaml"])
    assert config.pool_from_dict(raw).thresholds.data == 0.9
    out = hc.render_text(tmp_path, {}, (), "--set", "pool.thresholds.data=1.5")
    assert out.returncode != 0 and "/pool/thresholds/data" in out.stderr, out.stderr


def test_kube_version_below_the_chart_minimum_is_refused(tmp_path: pathlib.Path) -> None:
    major, minor, _ = hc.kube_version().split(".")
    older = f"{major}.{int(minor) - 1}.0"
    out = hc.helm("template", "csi-thin", str(hc.CHART), "--kube-version", older)
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


def _secret_files(docs: list[dict[str, Any]], name: str, where: pathlib.Path) -> dict[str, pathlib.Path]:
    where.mkdir()
    out = {}
    for key, value in hc.one(docs, "Secret", name)["data"].items():
        out[key] = where / key
        out[key].write_bytes(base64.b64decode(value))
    return out


def test_snapshot_metadata_certificates_link_the_controller_to_the_nodes(tmp_path: pathlib.Path) -> None:
    """The chart's certificates as the processes use them: a node's listener (csi_thin.csi.
    snapshot_metadata_link) takes the controller's, and refuses a node's as a client; the sidecar's
    names its Service; the SnapshotMetadataService carries their CA. The servicer's reader is never
    reached: an empty snapshot id is refused first, which proves the handshake and the name check."""
    values, apis = hc.MATRIX["snapshot-metadata"]
    docs = hc.render(tmp_path, values, apis)
    ctl = _secret_files(docs, "csi-thin-snapshot-metadata-controller", tmp_path / "ctl")
    node = _secret_files(docs, "csi-thin-snapshot-metadata-node", tmp_path / "node")
    srv = _secret_files(docs, "csi-thin-snapshot-metadata-server", tmp_path / "srv")
    sms = hc.one(docs, "SnapshotMetadataService", "csi-thin.io")
    assert base64.b64decode(sms["spec"]["caCert"]) == srv["ca.crt"].read_bytes() == ctl["ca.crt"].read_bytes()
    assert sms["spec"]["address"] == f"csi-thin-snapshot-metadata.{hc.NS}:50051"
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(srv["tls.crt"])],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"DNS:csi-thin-snapshot-metadata.{hc.NS}.svc" in text, text

    class Untouched:
        def allocated(self, *a: object, **kw: object) -> Any:
            raise AssertionError("the reader is not reached by these calls")

        delta = allocated

    server = link.NodeServer(
        "127.0.0.1:0",
        snapshot_metadata_service.SnapshotMetadataService(reader=Untouched()),
        tls=link.TlsFiles(cert=str(node["tls.crt"]), key=str(node["tls.key"]), ca=str(node["ca.crt"])),
    )
    server.start()
    try:

        def call(client: dict[str, pathlib.Path]) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(
                root_certificates=client["ca.crt"].read_bytes(),
                private_key=client["tls.key"].read_bytes(),
                certificate_chain=client["tls.crt"].read_bytes(),
            )
            opts = [("grpc.ssl_target_name_override", link.NODE_NAME)]
            with grpc.secure_channel(server.address, creds, options=opts) as ch:
                stub = csi_pb2_grpc.SnapshotMetadataStub(ch)
                req = csi_pb2.GetMetadataAllocatedRequest(snapshot_id="")
                return h.code_of(lambda: list(stub.GetMetadataAllocated(req, timeout=10)))

        assert call(ctl) == grpc.StatusCode.INVALID_ARGUMENT
        assert call(node) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()
