"""Kubernetes mode under faults, with the real processes: a node agent SIGKILLed in the middle of a
create, snapshot or delete and restarted; the API server restarted under load; the node's LMDB
deleted and rebuilt from the CRs; a volume deleted while its node agent is down; a node agent that
stays down (its ThinPool status goes stale: no capacity, creates refused at once).

After each: the CRs and the pool agree exactly (no device leaked, none lost, none twice), and the
CSI calls the sidecars retry succeed."""

from __future__ import annotations

import calendar
import concurrent.futures
import os
import pathlib
import signal
import time

import grpc
import pytest

from csi_thin import deadline as deadline_mod
from csi_thin.csi.pb import csi_pb2
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from tests.kube.conftest import Cluster, MiB
from tests.kube.test_kube_mode import _read, _write, capacity, code_of, create_req, node_of


def _restart(c: Cluster, key: str, *, kill_at: str = "") -> None:
    proc = c.nodes[key].proc
    proc.stop()
    proc.start(kill_at=kill_at)


def _volumes_match(c: Cluster, key: str) -> list[str]:
    """The node's ThinVolume and ThinSnapshot names, which must be exactly its pool's records, each
    Ready with the device id of its record."""
    node = c.nodes[key].name
    crs = c.crs("thinvolumes", node) + c.crs("thinsnapshots", node)
    names = sorted(cr["metadata"]["name"] for cr in crs)
    assert c.devices(key) == names
    for cr in crs:
        assert cr["status"]["phase"] == "Ready", cr
    status = c.pool(key)["status"]
    assert status["orphans"] == [] and status["lost"] == []
    return names


@pytest.mark.parametrize(
    ("point", "op"),
    [
        ("create_volume/create_thin:done", "create"),  # device made, not fenced: rolled back
        ("create_volume/fence:done", "create"),  # fenced, not committed: rolled forward
        ("create_volume/committed", "create"),  # committed, status not written yet
        ("create_snapshot/create_snap:done", "snapshot"),
        ("delete/delete:done", "delete"),
    ],
)
def test_node_agent_killed_mid_operation(cluster: Cluster, point: str, op: str) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl = c.controller()
    vol = ctl.CreateVolume(create_req("pvc-k", 64 * MiB, requisite=[a], preferred=[a])).volume
    _restart(c, "a", kill_at=point)

    def call() -> None:
        if op == "create":
            ctl.CreateVolume(create_req("pvc-k2", 64 * MiB, requisite=[a], preferred=[a]), timeout=10)
        elif op == "snapshot":
            ctl.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name="snap-k", source_volume_id=vol.volume_id), timeout=10
            )
        else:
            ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=10)

    assert code_of(call) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert c.nodes["a"].proc.wait_dead() == -signal.SIGKILL, f"the agent did not reach {point}"
    c.nodes["a"].proc.start()
    # the sidecar retries the same call: it now completes on the same object
    assert code_of(call) == grpc.StatusCode.OK
    names = _volumes_match(c, "a")
    expected = {
        "create": sorted([vol.volume_id, "v-pvc-k2"]),
        "snapshot": sorted([vol.volume_id, "s-snap-k"]),
        "delete": [],
    }[op]
    assert names == expected
    for name in names:
        if name.startswith("s-"):
            ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=name))
        else:
            ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=name))
    assert c.devices("a") == []


def test_volume_deleted_while_its_node_agent_is_down(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl = c.controller()
    vol = ctl.CreateVolume(create_req("pvc-d", 64 * MiB, requisite=[a], preferred=[a])).volume
    c.nodes["a"].proc.kill()
    delete = csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)
    assert code_of(lambda: ctl.DeleteVolume(delete, timeout=3)) == grpc.StatusCode.DEADLINE_EXCEEDED
    cr = c.cr("thinvolumes", vol.volume_id)
    assert cr is not None and cr["metadata"]["deletionTimestamp"]  # held by the finalizer
    assert c.devices("a") == [vol.volume_id]
    c.nodes["a"].proc.start()
    ctl.DeleteVolume(delete)  # the retry waits for the agent, which deletes the device first
    assert c.cr("thinvolumes", vol.volume_id) is None
    assert c.devices("a") == []


def test_lmdb_lost_is_rebuilt_from_the_crs(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl = c.controller()
    vol = ctl.CreateVolume(create_req("pvc-l", 64 * MiB, requisite=[a], preferred=[a])).volume
    _write(c, "a", vol, tmp_path / "w", "kept across a lost store")
    snap = ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-l", source_volume_id=vol.volume_id)
    ).snapshot
    before = {cr["metadata"]["name"]: cr["status"]["deviceId"] for cr in c.crs("thinvolumes", a)}

    c.nodes["a"].proc.stop()
    state = c.nodes["a"].workdir / "state"
    for name in ("data.mdb", "lock.mdb"):
        os.unlink(state / name)
    c.nodes["a"].proc.start()

    # every CR got its record back, with its device id; nothing deleted, nothing orphaned
    assert _volumes_match(c, "a") == sorted([vol.volume_id, snap.snapshot_id])
    assert {cr["metadata"]["name"]: cr["status"]["deviceId"] for cr in c.crs("thinvolumes", a)} == before
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    restored = ctl.CreateVolume(
        create_req("pvc-l2", 64 * MiB, requisite=[a], preferred=[a], source=src)
    ).volume
    assert _read(c, "a", vol, tmp_path / "r1") == "kept across a lost store"
    assert _read(c, "a", restored, tmp_path / "r2") == "kept across a lost store"
    for vid in (restored.volume_id, vol.volume_id):
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert c.devices("a") == []


def test_apiserver_restarted_under_load(cluster: Cluster) -> None:
    """Creates in flight on both nodes while the API server restarts: each volume ends up existing
    once, on its node, and the agents' watches carry on (a create after the restart works)."""
    c = cluster
    a, b = c.nodes["a"].name, c.nodes["b"].name
    ctl = c.controller()
    names = [f"pvc-load-{i}" for i in range(12)]

    def provision(i: int, name: str) -> csi_pb2.Volume:
        node = (a, b)[i % 2]
        end = time.monotonic() + 180
        while True:  # as the external-provisioner does: retry until it succeeds
            try:
                return ctl.CreateVolume(
                    create_req(name, 32 * MiB, requisite=[node], preferred=[node]), timeout=20
                ).volume
            except grpc.RpcError as exc:
                if time.monotonic() > end or exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.ABORTED,
                ):
                    raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(provision, i, n) for i, n in enumerate(names)]
        c.env.restart_apiserver()
        vols = [f.result() for f in futures]
    assert [node_of(v) for v in vols] == [(a, b)[i % 2] for i in range(len(names))]
    on_a = _volumes_match(c, "a")
    on_b = _volumes_match(c, "b")
    assert sorted(on_a + on_b) == sorted(v.volume_id for v in vols)
    # the watches resumed: new work reaches both agents
    for node in (a, b):
        v = ctl.CreateVolume(
            create_req(f"pvc-after-{node}", 32 * MiB, requisite=[node], preferred=[node])
        ).volume
        assert node_of(v) == node
        vols.append(v)
    for v in vols:
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    assert c.devices("a") == [] and c.devices("b") == []


def test_vanished_device_is_lost_and_a_device_without_cr_is_an_orphan(cluster: Cluster) -> None:
    """While the agent is down, one volume's device disappears from the pool and another volume's CR
    is removed by force: at start the first is Lost (never re-created empty), the second's device is
    reported as an orphan in the ThinPool status and kept."""
    c = cluster
    a = c.nodes["a"].name
    ctl = c.controller()
    gone = ctl.CreateVolume(create_req("pvc-gone", 64 * MiB, requisite=[a], preferred=[a])).volume
    kept = ctl.CreateVolume(create_req("pvc-kept", 64 * MiB, requisite=[a], preferred=[a])).volume
    tv = c.cr("thinvolumes", gone.volume_id)
    assert tv is not None
    c.nodes["a"].proc.stop()
    os.unlink(c.nodes["a"].workdir / "pool" / "devices" / f"{tv['status']['deviceId']}.img")
    c.api.patch_cluster_custom_object(
        "csi-thin.io", "v1alpha1", "thinvolumes", kept.volume_id, {"metadata": {"finalizers": None}}
    )
    c.api.delete_cluster_custom_object("csi-thin.io", "v1alpha1", "thinvolumes", kept.volume_id)
    c.nodes["a"].proc.start()

    lost = c.cr("thinvolumes", gone.volume_id)
    assert lost is not None and lost["status"]["phase"] == "Lost"
    assert lost["status"]["code"] == "FAILED_PRECONDITION"
    assert c.devices("a") == sorted([gone.volume_id, kept.volume_id])  # nothing deleted, nothing re-made
    status = c.pool("a")["status"]
    assert status["lost"] == [gone.volume_id] and status["orphans"] == [kept.volume_id]
    got = ctl.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=gone.volume_id))
    assert [(e.status, e.reason) for e in got.volume_health.health_statuses] == [
        (csi_pb2.DATA_LOSS, "DeviceLost")
    ]
    # the node names it in its storage health (the kept volume's device is an orphan, not lost)
    storage = c.node("a").node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    assert [b.reason for b in storage] == ["DevicesLost"] and gone.volume_id in storage[0].message
    assert kept.volume_id not in storage[0].message
    # a Lost volume can still be deleted (its record goes; there is no device to delete)
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=gone.volume_id))
    assert c.cr("thinvolumes", gone.volume_id) is None
    assert c.devices("a") == [kept.volume_id]


def test_a_node_whose_agent_stays_down_gets_no_new_volumes(cluster: Cluster) -> None:
    """Node a reports every 1 s and the controller allows 4 s of clock skew: once a's status is older
    than 3 x 1 + 4 = 7 s, its capacity is 0, a create there fails at once (RESOURCE_EXHAUSTED naming
    the node: the external-provisioner reschedules, and a CR its earlier attempt left there is
    withdrawn so the claim can go to b) and its volumes are PoolUnavailable; node b is untouched.
    When the agent is back, so is everything."""
    c = cluster
    a, b = c.nodes["a"].name, c.nodes["b"].name
    bound = 3 * 1.0 + 4.0
    c.controller_proc.argv += ["--status-skew-seconds", "4"]
    c.controller_proc.stop()
    c.controller_proc.start()
    c.nodes["a"].proc.argv += ["--refresh-seconds", "1"]
    _restart(c, "a")
    ctl = c.controller()
    vol = ctl.CreateVolume(create_req("pvc-before", 64 * MiB, requisite=[a], preferred=[a])).volume
    assert c.pool("a")["status"]["refreshSeconds"] == 1.0

    def health(volume_id: str) -> list[tuple[str, str]]:
        got = ctl.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=volume_id))
        return [(e.reason, e.message) for e in got.volume_health.health_statuses]

    assert health(vol.volume_id) == []
    c.nodes["a"].proc.kill()

    def last_updated() -> float:
        return calendar.timegm(time.strptime(c.pool("a")["status"]["lastUpdated"], "%Y-%m-%dT%H:%M:%SZ"))

    last = last_updated()
    # well within the bound (the last publish was about a period ago): a's capacity stands
    assert time.time() - last < bound - 2.0
    assert capacity(c, a).available_capacity > 0
    # staleness is time passing, which no API event marks: wait until the bound is certainly past
    # (lastUpdated has whole seconds: the write was within 1 s after it). A publish the agent had
    # sent when it was killed can land after the read above: wait again from that one if it did
    while True:
        time.sleep(max(0.0, last + bound + 1.5 - time.time()))
        if (newer := last_updated()) == last:
            break
        last = newer
    assert capacity(c, a).available_capacity == 0 and capacity(c, a).maximum_volume_size.value == 0
    assert capacity(c, b).available_capacity > 0

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        ctl.CreateVolume(create_req("pvc-after", 64 * MiB, requisite=[a], preferred=[a]), timeout=30)
    took = time.monotonic() - started
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
    assert a in exc.value.details() and "has not reported for" in exc.value.details()
    assert took < 5.0, took  # no wait for a node that is not there
    assert c.cr("thinvolumes", "v-pvc-after") is None  # nothing was left for a dead node to do
    ((reason, message),) = health(vol.volume_id)
    assert reason == "PoolUnavailable" and "has not reported for" in message
    # the CR of an attempt made just before the node went silent, never taken up by its agent: the
    # retry withdraws it, so that the rescheduled attempt can go to another node
    api = client_mod.Client(c.env.api_client())
    spec = res.VolumeSpec(node_name=a, pool="p", size_bytes=64 * MiB, fs_type="ext4")
    api.create(res.ThinVolume(meta=res.Meta(name="v-pvc-early"), spec=spec), deadline=deadline_mod.default())
    early = create_req("pvc-early", 64 * MiB, requisite=[a], preferred=[a])
    assert code_of(lambda: ctl.CreateVolume(early, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c.cr("thinvolumes", "v-pvc-early") is None
    moved = ctl.CreateVolume(create_req("pvc-early", 64 * MiB, requisite=[a, b], preferred=[b])).volume
    assert node_of(moved) == b
    # one its agent had taken up (its finalizer: the device may be made already, or when the agent
    # is back) is not refused as RESOURCE_EXHAUSTED, on which the external-provisioner would
    # reschedule the claim and stop calling: deleting the claim then would leak CR and device.
    # ABORTED (retried), and the CR stays for the agent
    api.create(res.ThinVolume(meta=res.Meta(name="v-pvc-taken"), spec=spec), deadline=deadline_mod.default())
    api.set_finalizers(
        api.get(res.ThinVolume, "v-pvc-taken", deadline=deadline_mod.default()),
        (res.FINALIZER,),
        deadline=deadline_mod.default(),
    )
    taken_req = create_req("pvc-taken", 64 * MiB, requisite=[a], preferred=[a])
    assert code_of(lambda: ctl.CreateVolume(taken_req, timeout=30)) == grpc.StatusCode.ABORTED
    assert c.cr("thinvolumes", "v-pvc-taken") is not None

    c.nodes["a"].proc.start()  # its start-up publishes the status before it serves
    assert capacity(c, a).available_capacity > 0
    assert health(vol.volume_id) == []
    after = ctl.CreateVolume(create_req("pvc-after", 64 * MiB, requisite=[a], preferred=[a])).volume
    assert node_of(after) == a
    taken = ctl.CreateVolume(taken_req).volume  # the retry finds what the agent made, back
    assert node_of(taken) == a and taken.volume_id == "v-pvc-taken"
    for v in (vol, after, moved, taken):
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    assert c.devices("a") == [] and c.devices("b") == []
