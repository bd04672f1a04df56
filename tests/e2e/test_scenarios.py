"""Issue 11's scenarios on the real cluster, in order (later ones use the claims of earlier ones, as
a user's cluster would): each asserts what a user would check with kubectl, and the times a user
waits are measured and printed (PVC created -> pod Running, snapshot -> readyToUse, expansion)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import time
from typing import Any

from tests import conftest as tiers
from tests.e2e import cluster as cluster_mod
from tests.e2e.conftest import DRIVER_NS, NS, Driver

Mi = 1024 * 1024
TOPOLOGY_KEY = "csi-thin.io/node"


# -- what the scenarios apply ------------------------------------------------------------------------


def _pvc(
    name: str,
    size: str,
    sc: str,
    *,
    block: bool = False,
    source: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": sc,
        "resources": {"requests": {"storage": size}},
        "volumeMode": "Block" if block else "Filesystem",
    }
    if source:
        spec["dataSource"] = source
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
            "spec": spec,
        }
    )


def _pod(name: str, claim: str, *, block: bool = False, command: str = "sleep 3600") -> str:
    """A busybox pod using one claim: mounted at /data, or as the device /dev/xvda."""
    container: dict[str, Any] = {
        "name": "c",
        "image": cluster_mod.BUSYBOX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", f"{command}"],
    }
    if block:
        container["volumeDevices"] = [{"name": "v", "devicePath": "/dev/xvda"}]
    else:
        container["volumeMounts"] = [{"name": "v", "mountPath": "/data"}]
    spec = {
        # the cluster's pods have no network of their own (loopback-only CNI): host networking
        "hostNetwork": True,
        # busybox sh as PID 1 ignores SIGTERM: do not wait 30 s for nothing
        "terminationGracePeriodSeconds": 1,
        "containers": [container],
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
    }
    return json.dumps(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS}, "spec": spec}
    )


def _ready(c: cluster_mod.Cluster, pod: str, timeout: float = 180) -> float:
    """Wait for a pod to be Ready; the seconds it took from now."""
    t0 = time.monotonic()
    c.kubectl(
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        f"pod/{pod}",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 10,
    )
    return time.monotonic() - t0


def _exec(c: cluster_mod.Cluster, pod: str, script: str) -> str:
    return c.kubectl("exec", "-n", NS, pod, "--", "sh", "-c", script)


def _fs_bytes(c: cluster_mod.Cluster, pod: str) -> int:
    """The size of the filesystem at /data, as `df` in the pod shows it."""
    line = _exec(c, pod, "df -Pk /data").splitlines()[1]
    return int(line.split()[1]) * 1024


def _capacities(c: cluster_mod.Cluster, sc: str) -> list[dict[str, Any]]:
    return [x for x in c.get("csistoragecapacities", "-A")["items"] if x["storageClassName"] == sc]


def _node_capacity(c: cluster_mod.Cluster, sc: str) -> dict[str, Any]:
    """The CSIStorageCapacity of this node and StorageClass (exactly one)."""
    mine = [
        x
        for x in _capacities(c, sc)
        if (x.get("nodeTopology") or {}).get("matchLabels", {}).get(TOPOLOGY_KEY) == cluster_mod.NODE
    ]
    assert len(mine) == 1, f"CSIStorageCapacity for {cluster_mod.NODE}: {mine}"
    return mine[0]


def _quantity(q: str) -> int:
    units = {
        "": 1,
        "k": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "Ki": 1024,
        "Mi": Mi,
        "Gi": 1024 * Mi,
        "Ti": 1024**4,
    }
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", q)
    assert m, f"unexpected quantity {q!r}"
    return int(m.group(1)) * units[m.group(2)]


def _events(c: cluster_mod.Cluster, kind: str, name: str) -> list[str]:
    got = c.get(
        "events", "-n", NS, "--field-selector", f"involvedObject.kind={kind},involvedObject.name={name}"
    )
    return [f"{e['reason']}: {e['message']}" for e in got["items"]]


def _node_plugin_pods(c: cluster_mod.Cluster) -> list[dict[str, Any]]:
    (ds,) = c.get("daemonsets", "-n", DRIVER_NS)["items"]
    labels = ",".join(f"{k}={v}" for k, v in ds["spec"]["selector"]["matchLabels"].items())
    return list(c.get("pods", "-n", DRIVER_NS, "-l", labels)["items"])


def _csi_mounts(c: cluster_mod.Cluster) -> list[str]:
    """kubelet's mounts of CSI volumes: staging (globalmount) and each pod's publish target."""
    prefix = f"{c.kubelet_dir}/"
    out = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(prefix) and (
            "kubernetes.io~csi" in point or "/plugins/kubernetes.io/csi/" in point
        ):
            out.append(point)
    return out


def _volume_mounts(c: cluster_mod.Cluster, pv: dict[str, Any]) -> tuple[list[str], list[str]]:
    """kubelet's mounts of one PV: where pods have it (a dir named after the PV) and where the node
    stages it (kubelet names that dir by the SHA-256 of the volume handle)."""
    handle = hashlib.sha256(pv["spec"]["csi"]["volumeHandle"].encode()).hexdigest()
    mounts = _csi_mounts(c)
    return (
        [m for m in mounts if f"/kubernetes.io~csi/{pv['metadata']['name']}/" in m],
        [m for m in mounts if f"/{handle}/globalmount" in m],
    )


# -- the scenarios -----------------------------------------------------------------------------------


def test_1_pvc_and_pod(driver: Driver) -> None:
    """PVC (WaitForFirstConsumer) + pod: the PVC is Bound, its PV pinned to the node, the pod writes."""
    c = driver.cluster
    sc = c.get("storageclass", driver.storage_class)
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer" and sc["allowVolumeExpansion"] is True
    t0 = time.monotonic()
    c.apply(_pvc("data", "512Mi", driver.storage_class))
    c.apply(_pod("writer", "data", command="echo hello-e2e > /data/file && sync && exec sleep 3600"))
    _ready(c, "writer")
    tiers.report(f"e2e: PVC created -> pod Running {time.monotonic() - t0:.1f}s")
    pvc = c.get("pvc", "-n", NS, "data")
    assert pvc["status"]["phase"] == "Bound"
    pv = c.get("pv", pvc["spec"]["volumeName"])
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert {"key": TOPOLOGY_KEY, "operator": "In", "values": [cluster_mod.NODE]} in terms[0][
        "matchExpressions"
    ]
    assert _exec(c, "writer", "cat /data/file").strip() == "hello-e2e"


def test_2_snapshot_restored_larger(driver: Driver) -> None:
    """A VolumeSnapshot of the mounted PVC becomes readyToUse; a larger PVC from it, in a second pod,
    holds the file and has the larger filesystem."""
    c = driver.cluster
    t0 = time.monotonic()
    c.apply(
        json.dumps(
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "metadata": {"name": "snap", "namespace": NS},
                "spec": {
                    "volumeSnapshotClassName": driver.snapshot_class,
                    "source": {"persistentVolumeClaimName": "data"},
                },
            }
        )
    )
    c.kubectl(
        "wait", "-n", NS, "--for=jsonpath={.status.readyToUse}=true", "volumesnapshot/snap", "--timeout=120s"
    )
    tiers.report(f"e2e: VolumeSnapshot -> readyToUse {time.monotonic() - t0:.1f}s")
    original = _fs_bytes(c, "writer")
    source = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    c.apply(_pvc("restored", "1Gi", driver.storage_class, source=source))
    c.apply(_pod("restorer", "restored"))
    _ready(c, "restorer")
    assert _exec(c, "restorer", "cat /data/file").strip() == "hello-e2e"
    restored = _fs_bytes(c, "restorer")
    assert restored > original + 400 * Mi, f"restored filesystem {restored} B, source {original} B"


def test_3_clone(driver: Driver) -> None:
    """A PVC cloned from another PVC holds its data."""
    c = driver.cluster
    c.apply(
        _pvc("clone", "512Mi", driver.storage_class, source={"kind": "PersistentVolumeClaim", "name": "data"})
    )
    c.apply(_pod("cloner", "clone"))
    _ready(c, "cloner")
    assert _exec(c, "cloner", "cat /data/file").strip() == "hello-e2e"


def test_4_online_expansion(driver: Driver) -> None:
    """Patching the PVC's size grows the filesystem the running pod sees, without a restart."""
    c = driver.cluster
    before = _fs_bytes(c, "writer")
    uid = c.get("pod", "-n", NS, "writer")["metadata"]["uid"]
    t0 = time.monotonic()
    c.kubectl(
        "patch",
        "pvc",
        "-n",
        NS,
        "data",
        "--type=merge",
        "-p",
        '{"spec": {"resources": {"requests": {"storage": "1Gi"}}}}',
    )
    grown = cluster_mod.wait_for(
        "the pod's filesystem to grow",
        lambda: (n := _fs_bytes(c, "writer")) > before + 400 * Mi and n,
        timeout=120,
    )
    tiers.report(f"e2e: PVC size patched -> pod sees the grown filesystem {time.monotonic() - t0:.1f}s")
    c.kubectl("wait", "-n", NS, "--for=jsonpath={.status.capacity.storage}=1Gi", "pvc/data", "--timeout=60s")
    pod = c.get("pod", "-n", NS, "writer")
    assert pod["metadata"]["uid"] == uid and pod["status"]["containerStatuses"][0]["restartCount"] == 0
    assert _exec(c, "writer", "cat /data/file").strip() == "hello-e2e", f"grown to {grown} B"


def test_5_raw_block(driver: Driver) -> None:
    """A volumeMode: Block PVC is a device in the pod: written and read back through it."""
    c = driver.cluster
    c.apply(_pvc("raw", "64Mi", driver.storage_class, block=True))
    c.apply(_pod("blockuser", "raw", block=True))
    _ready(c, "blockuser")
    out = _exec(
        c,
        "blockuser",
        "echo block-e2e | dd of=/dev/xvda conv=fsync 2>/dev/null; dd if=/dev/xvda bs=9 count=1 2>/dev/null",
    )
    assert out == "block-e2e"
    assert _exec(c, "blockuser", "test -b /dev/xvda && echo device").strip() == "device"


def test_6_storage_capacity(driver: Driver) -> None:
    """CSIStorageCapacity objects exist for the node and shrink when a volume is created."""
    c = driver.cluster
    before = _node_capacity(c, driver.storage_class)
    available = _quantity(before["capacity"])
    assert available > 0 and _quantity(before["maximumVolumeSize"]) > 0
    c.apply(_pvc("counted", "512Mi", driver.storage_class))
    c.apply(_pod("counter", "counted"))
    _ready(c, "counter")
    after = cluster_mod.wait_for(
        "the node's CSIStorageCapacity to shrink",
        lambda: (n := _quantity(_node_capacity(c, driver.storage_class)["capacity"])) < available and n,
        timeout=60,
    )
    assert available - after >= 512 * Mi, f"capacity {available} -> {after}"


def test_7_pool_exhaustion(driver: Driver) -> None:
    """A PVC larger than what is left stays Pending with a clear event; deleting another PVC lets
    it provision."""
    c = driver.cluster
    left = _quantity(_node_capacity(c, driver.storage_class)["maximumVolumeSize"])
    filler = left - 400 * Mi
    assert filler > 300 * Mi, f"pool too small for this scenario: {left} B left"
    c.apply(_pvc("filler", f"{filler // Mi}Mi", driver.storage_class))
    c.apply(_pod("fill", "filler"))
    _ready(c, "fill")
    c.apply(_pvc("big", "800Mi", driver.storage_class))
    c.apply(_pod("bigger", "big"))
    # the scheduler finds no node with that much storage: the pod says so, the PVC waits
    (event, *_) = cluster_mod.wait_for(
        "the pod's FailedScheduling event naming storage",
        lambda: [e for e in _events(c, "Pod", "bigger") if "FailedScheduling" in e and "storage" in e],
        timeout=120,
    )
    tiers.report(f"e2e: a PVC larger than what is left: {event}")
    assert c.get("pvc", "-n", NS, "big")["status"]["phase"] == "Pending"
    assert c.get("pod", "-n", NS, "bigger")["status"]["phase"] == "Pending"
    c.kubectl("delete", "pod", "-n", NS, "fill", "--wait=true", "--timeout=60s")
    c.kubectl("delete", "pvc", "-n", NS, "filler", "--wait=true", "--timeout=60s")
    _ready(c, "bigger", timeout=240)
    assert c.get("pvc", "-n", NS, "big")["status"]["phase"] == "Bound"


def test_8_node_plugin_restarted(driver: Driver) -> None:
    """The node plugin's pod is deleted while a pod uses a volume: the DaemonSet recreates it, the
    volume stays mounted and usable, and unpublish/unstage work afterwards."""
    c = driver.cluster
    (old,) = _node_plugin_pods(c)
    c.kubectl("delete", "pod", "-n", DRIVER_NS, old["metadata"]["name"], "--wait=true", "--timeout=120s")

    def new_ready() -> bool:
        pods = _node_plugin_pods(c)
        return (
            len(pods) == 1
            and pods[0]["metadata"]["uid"] != old["metadata"]["uid"]
            and any(
                x["type"] == "Ready" and x["status"] == "True"
                for x in pods[0]["status"].get("conditions", [])
            )
        )

    cluster_mod.wait_for("a new node plugin pod Ready", new_ready, timeout=180)
    assert _exec(c, "writer", "cat /data/file").strip() == "hello-e2e"
    _exec(c, "writer", "echo after-restart > /data/file2 && sync")
    assert _exec(c, "writer", "cat /data/file2").strip() == "after-restart"
    # unpublish and unstage through the new plugin: the pod goes, and so do kubelet's mounts of it,
    # the pod's (publish) at once, the node's (stage) once kubelet's reconciler sees it unused
    pv = c.get("pv", c.get("pvc", "-n", NS, "data")["spec"]["volumeName"])
    publish, stage = _volume_mounts(c, pv)
    assert publish and stage, f"the writer's volume is not published and staged: {_csi_mounts(c)}"
    c.kubectl("delete", "pod", "-n", NS, "writer", "--wait=true", "--timeout=120s")
    cluster_mod.wait_for(
        "the writer's volume unpublished and unstaged", lambda: _volume_mounts(c, pv) == ([], []), timeout=60
    )


def test_9_group_snapshot(driver: Driver) -> None:
    """A VolumeGroupSnapshot over two PVCs (by label) written by two pods becomes readyToUse, cut at
    one instant by one CreateVolumeGroupSnapshot; each member VolumeSnapshot restores into a new PVC
    holding its source's data."""
    c = driver.cluster
    # 300Mi: the smallest XFS (the class's fsType) the driver makes; a restore must be at least its
    # snapshot's size
    for name, text in (("db-data", "data-e2e"), ("db-wal", "wal-e2e")):
        c.apply(_pvc(name, "300Mi", driver.storage_class, labels={"app": "db"}))
        c.apply(_pod(f"w-{name}", name, command=f"echo {text} > /data/file && sync && exec sleep 3600"))
    for name in ("db-data", "db-wal"):
        _ready(c, f"w-{name}")
    t0 = time.monotonic()
    c.apply(
        json.dumps(
            {
                "apiVersion": "groupsnapshot.storage.k8s.io/v1",
                "kind": "VolumeGroupSnapshot",
                "metadata": {"name": "db", "namespace": NS},
                "spec": {
                    "volumeGroupSnapshotClassName": driver.group_snapshot_class,
                    "source": {"selector": {"matchLabels": {"app": "db"}}},
                },
            }
        )
    )
    c.kubectl(
        "wait",
        "-n",
        NS,
        "--for=jsonpath={.status.readyToUse}=true",
        "volumegroupsnapshot/db",
        "--timeout=120s",
    )
    tiers.report(f"e2e: VolumeGroupSnapshot of 2 PVCs -> readyToUse {time.monotonic() - t0:.1f}s")
    # one group on the node, naming both members; the members are the group's VolumeSnapshots
    (tg,) = c.get("thingroupsnapshots")["items"]
    assert tg["status"]["readyToUse"] and len(tg["spec"]["members"]) == 2
    members = {
        vs["spec"]["source"]["persistentVolumeClaimName"]: vs
        for vs in c.get("volumesnapshots", "-n", NS)["items"]
        if any(o["kind"] == "VolumeGroupSnapshot" for o in vs["metadata"].get("ownerReferences", []))
    }
    assert sorted(members) == ["db-data", "db-wal"], sorted(members)
    for pvc in ("db-data", "db-wal"):
        # the snapshot-controller syncs each member VolumeSnapshot's status on its own, after the
        # group's: the group readyToUse does not mean both members say so yet (seen: db-wal's
        # readyToUse false right after the group's wait)
        name = members[pvc]["metadata"]["name"]
        c.kubectl(
            "wait",
            "-n",
            NS,
            "--for=jsonpath={.status.readyToUse}=true",
            f"volumesnapshot/{name}",
            "--timeout=60s",
        )
        vs = c.get("volumesnapshot", name, "-n", NS)
        assert vs["status"]["readyToUse"] and vs["status"]["volumeGroupSnapshotName"] == "db"
        source = {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": vs["metadata"]["name"],
        }
        c.apply(_pvc(f"r-{pvc}", "300Mi", driver.storage_class, source=source))
        c.apply(_pod(f"r-{pvc}", f"r-{pvc}"))
    for pvc, text in (("db-data", "data-e2e"), ("db-wal", "wal-e2e")):
        _ready(c, f"r-{pvc}")
        assert _exec(c, f"r-{pvc}", "cat /data/file").strip() == text


def test_10_everything_deleted(driver: Driver) -> None:
    """Deleting everything leaves no ThinVolume, ThinSnapshot, ThinGroupSnapshot, PV,
    VolumeSnapshotContent, VolumeGroupSnapshotContent, loop device or mount behind; `helm uninstall`
    leaves the pool's data in place."""
    c = driver.cluster
    c.kubectl("delete", "pods", "--all", "-n", NS, "--wait=true", "--timeout=120s")
    # the claims first: a claim restored from a snapshot protects it while it is there; then the
    # groups, whose member VolumeSnapshots go with them (DeleteVolumeGroupSnapshot), never alone;
    # then the other snapshots
    c.kubectl("delete", "pvc", "--all", "-n", NS, "--wait=true", "--timeout=120s")
    c.kubectl("delete", "volumegroupsnapshots", "--all", "-n", NS, "--wait=true", "--timeout=120s")
    c.kubectl("delete", "volumesnapshots", "--all", "-n", NS, "--wait=true", "--timeout=120s")
    kinds = (
        "pv",
        "volumesnapshotcontents",
        "volumegroupsnapshotcontents",
        "thinvolumes",
        "thinsnapshots",
        "thingroupsnapshots",
    )
    cluster_mod.wait_for(
        f"no {', '.join(kinds)} left", lambda: not any(c.get(k)["items"] for k in kinds), timeout=120
    )
    # kubelet unstages after the pods are gone, on its own time (a PV's deletion does not wait for it)
    cluster_mod.wait_for("no CSI mount left", lambda: not _csi_mounts(c), timeout=60)
    # the pool's own loop device stays while the node plugin runs; no volume's is left
    cluster_mod.wait_for(
        "only the pool's own loop devices left",
        lambda: cluster_mod.loops_under(driver.state_dir) == driver.pool_loops,
        timeout=60,
    )
    pool_files = sorted(p.relative_to(driver.state_dir) for p in driver.state_dir.rglob("*") if p.is_file())
    assert pool_files, f"no pool state under {driver.state_dir}"
    c.helm("uninstall", "csi-thin", "--namespace", DRIVER_NS, "--wait", "--timeout", "2m")
    cluster_mod.wait_for(
        "the driver's pods gone", lambda: not c.get("pods", "-n", DRIVER_NS)["items"], timeout=120
    )
    # the pool's volumes' loop devices are gone with the volumes; the pool's own data stays
    left = [p for p in pool_files if (driver.state_dir / p).is_file()]
    assert left == pool_files, f"helm uninstall removed pool data: {sorted(set(pool_files) - set(left))}"
