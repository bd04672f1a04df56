"""The e2e tier: one real single-node cluster for the session (tests/e2e/cluster.py), the csi-thin
chart installed into it with helm, and scenarios that check what a user checks with kubectl."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests import conftest
from tests.e2e import cluster as cluster_mod
from tests.e2e import images

#: the node's pool: a sparse image file, so only what is written takes space (room for scenarios 1-6
#: and a filler of scenario 7 well above the smallest XFS)
POOL_SIZE = "6GiB"

TOOLS = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl", "helm",
    "snapshot-controller", "pause",
)  # fmt: skip


@pytest.fixture(scope="session")
def cluster() -> Iterator[cluster_mod.Cluster]:
    for name in TOOLS:
        conftest.tool(name)
    if not (conftest.BIN / "crds" / "snapshot").is_dir():
        pytest.fail(f"{conftest.BIN}/crds/snapshot missing: run `make tools`", pytrace=False)
    # a short path: unix sockets under kubelet's dir (plugins, pod volumes) hold at most 107 bytes
    root = pathlib.Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))
    c = cluster_mod.Cluster(root=root, bin=conftest.BIN)
    problems: list[str] = []
    with cluster_mod.sigterm_interrupts():
        try:
            c.start()
            conftest.report("e2e cluster: " + ", ".join(f"{what} {t:.1f}s" for what, t in c.timings.items()))
            yield c
        finally:
            problems = c.stop()
            if not problems:
                shutil.rmtree(root, ignore_errors=True)
    assert not problems, f"the e2e cluster left things behind (state in {root}): {problems}"


#: the test workload's namespace (the chart goes into its own)
NS = "e2e"
RELEASE = "csi-thin"
DRIVER_NS = "csi-thin"
CHART = conftest.ROOT / "charts" / "csi-thin"
#: `make image`'s output: an OCI archive of localhost/csi-thin:<version> (the chart's default)
DRIVER_ARCHIVE = conftest.BIN / "csi-thin-image.tar"
#: the sidecar images: (the chart's values key, the binary in bin/ that is that image)
SIDECARS = (
    ("provisioner", "csi-provisioner"),
    ("snapshotter", "csi-snapshotter"),
    ("resizer", "csi-resizer"),
)


@dataclasses.dataclass(frozen=True)
class Driver:
    """The installed chart: where its pool lives on the host and the objects a user would look at."""

    cluster: cluster_mod.Cluster
    state_dir: pathlib.Path
    storage_class: str
    snapshot_class: str
    group_snapshot_class: str
    #: loop devices backed by files under state_dir once the pool is up (its own, no volume's)
    pool_loops: list[str]


def _driver_image(c: cluster_mod.Cluster) -> tuple[str, str]:
    """Import `make image`'s archive as built: its image must carry the chart's default name (a
    cluster that imports it needs no image value set), and is returned as (repository, tag)."""
    if not DRIVER_ARCHIVE.exists():
        pytest.fail(f"{DRIVER_ARCHIVE} missing: run `make image`", pytrace=False)
    with tarfile.open(DRIVER_ARCHIVE) as tar:
        index = tar.extractfile("index.json")
        assert index is not None, f"{DRIVER_ARCHIVE}: not an OCI archive"
        (manifest,) = json.loads(index.read())["manifests"]
    repository, tag = manifest["annotations"]["org.opencontainers.image.ref.name"].rsplit(":", 1)
    default = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
    assert repository == default, f"make image names {repository}, the chart's default is {default}"
    c.import_image(DRIVER_ARCHIVE)
    return repository, tag


def _sidecar_images(c: cluster_mod.Cluster) -> None:
    """Each sidecar binary as an image under the name the chart's defaults give it (read from the
    chart, never re-typed here)."""
    values = yaml.safe_load(c.helm("show", "values", str(CHART)))
    for key, binary in SIDECARS:
        image = values["sidecars"][key]["image"]
        ref = f"{image['repository']}:{image['tag']}"
        out = c.root / "images" / f"{binary}.tar"
        images.binary_image(out, ref=ref, binary=conftest.BIN / binary)
        c.import_image(out)


@pytest.fixture(scope="session")
def driver(cluster: cluster_mod.Cluster) -> Iterator[Driver]:
    c = cluster
    for _, binary in SIDECARS:
        conftest.tool(binary)
    # the chart installs with its default image: the one `make image` made, imported as built
    _, tag = _driver_image(c)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert tag == app_version, f"make image tags {tag}, the chart's default tag is {app_version}"
    _sidecar_images(c)
    state_dir = c.root / "csi-thin"
    # the node plugin mounts its pool there with Bidirectional propagation, which needs a shared
    # mount: on its own rshared bind mount, as the kubelet dir (a systemd host's / is shared anyway)
    c.shared_dir(state_dir)
    values = {
        # the e2e cluster's network (tests/e2e/cluster.py): host networking, the API server on loopback
        "hostNetwork": True,
        "apiServer": {"host": "127.0.0.1", "port": str(c.api_port)},
        "kubeletDir": str(c.kubelet_dir),
        # host networking: the HTTP ports are the host's, so free ones
        "sidecars": {
            "provisioner": {"httpPort": cluster_mod.free_port(), "capacityPollInterval": "2s"},
            "snapshotter": {"httpPort": cluster_mod.free_port()},
            "resizer": {"httpPort": cluster_mod.free_port()},
        },
        "node": {"httpPort": cluster_mod.free_port(), "refreshSeconds": 2},
        # capacity is what the pool holds (no thin overcommit), so exhaustion is reachable
        "overprovisionRatio": 1.0,
        # this kernel has no device-mapper: the reflink backend, on an image file on a loop device
        "pool": {
            "stateDir": str(state_dir),
            "backend": "reflink",
            "reflink": {"imageSize": POOL_SIZE, "fsType": "xfs"},
        },
        # online grow of ext4 needs CAP_SYS_RESOURCE, which this host's root lacks; xfs grows without it
        "storageClass": {"fsType": "xfs"},
    }
    values_file = c.root / "values.yaml"
    values_file.write_text(json.dumps(values))
    try:
        t0 = time.monotonic()
        c.helm("install", RELEASE, str(CHART), "--namespace", DRIVER_NS, "--create-namespace",
               "--values", str(values_file), "--wait", "--timeout", "5m", timeout=330)  # fmt: skip
        # helm's --wait counts a DaemonSet of one node with maxUnavailable 1 as ready with no pod Ready:
        # wait for the rollout and for every pod, as a user would
        c.kubectl(
            "rollout", "status", "-n", DRIVER_NS, "daemonset/csi-thin-node", "--timeout=180s", timeout=200
        )
        c.kubectl(
            "wait", "-n", DRIVER_NS, "--for=condition=Ready", "pods", "--all", "--timeout=180s", timeout=200
        )
        pods = c.get("pods", "-n", DRIVER_NS)["items"]
        conftest.report(
            f"e2e: helm install -> every pod Ready in {time.monotonic() - t0:.1f}s ({len(pods)} pods)"
        )
        c.kubectl("create", "namespace", NS)
        d = Driver(
            cluster=c,
            state_dir=state_dir,
            storage_class="csi-thin",
            snapshot_class="csi-thin",
            group_snapshot_class="csi-thin",
            pool_loops=cluster_mod.loops_under(state_dir),
        )
        yield d
    finally:
        with cluster_mod.stopped_on_interrupt(c):
            try:
                _remove_workload(c)
            finally:  # the release goes even when a volume would not (the cluster's stop reports leftovers)
                if RELEASE in c.helm("list", "--namespace", DRIVER_NS, "--short"):
                    c.helm(
                        "uninstall",
                        RELEASE,
                        "--namespace",
                        DRIVER_NS,
                        "--wait",
                        "--timeout",
                        "2m",
                        timeout=150,
                    )


def _remove_workload(c: cluster_mod.Cluster) -> None:
    """What a failed test may have left: pods first (unpublish, unstage), then claims and
    snapshots, waiting until the driver has deleted their volumes."""
    wait = ("--wait=true", "--timeout=120s")
    c.kubectl("delete", "pods", "--all", "-n", NS, *wait, check=False, timeout=150)
    c.kubectl("delete", "volumesnapshots,pvc", "--all", "-n", NS, *wait, check=False, timeout=150)
    cluster_mod.wait_for(
        "the driver's PVs and VolumeSnapshotContents deleted",
        lambda: not c.get("pv")["items"] and not c.get("volumesnapshotcontents")["items"],
        timeout=120,
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed scenario's report carries the cluster's state (pods, claims, events, driver logs)."""
    report = yield
    driver = getattr(item, "funcargs", {}).get("driver")
    if report.when == "call" and report.failed and isinstance(driver, Driver):
        report.sections.append(("cluster state", driver.cluster.diagnose((DRIVER_NS, NS))))
    return report
