"""The CSI Identity and Controller services through a real gRPC channel over a unix socket, on the
real PoolEngine + LMDB with tests.fakes.FakeBackend underneath."""

from __future__ import annotations

import json
import logging
import pathlib
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from csi_thin import deadline
from csi_thin.csi.pb import csi_pb2
from csi_thin.pool import faults
from tests import csi_harness as h
from tests import fakes

S = grpc.StatusCode
MiB = h.MiB
GiB = h.GiB
Mode = h.Mode
Src = csi_pb2.VolumeContentSource


@pytest.fixture
def d(tmp_path: pathlib.Path) -> Iterator[h.Driver]:
    with h.fake_driver(tmp_path) as driver:
        yield driver


def pool_state(d: h.Driver) -> tuple[object, ...]:
    """Everything that a request could change: the records and the fake pool's devices."""
    assert isinstance(d.backend, fakes.FakeBackend)
    with open(d.backend.state_file, encoding="utf-8") as f:
        state = json.load(f)
    return (sorted(map(repr, d.engine.list())), state["devices"], state["active"], state["txid"])


def snap_src(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return Src(snapshot=Src.SnapshotSource(snapshot_id=snapshot_id))


def vol_src(volume_id: str) -> csi_pb2.VolumeContentSource:
    return Src(volume=Src.VolumeSource(volume_id=volume_id))


# -- identity --------------------------------------------------------------------------------------


def test_identity(d: h.Driver) -> None:
    info = d.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi-thin.io" and info.vendor_version
    caps = d.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {
        csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE,
        csi_pb2.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
        # standalone serves changed-block tracking on the same socket (tests/cbt_scenarios.py)
        csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE,
        # and volume group snapshots where the controller is (tests/integration/test_csi_group_controller.py)
        csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE,
    }
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value


@pytest.mark.parametrize(
    "condition",
    [{"mode": "out_of_data_space"}, {"mode": "ro"}, {"needs_check": True}, {"mode": "fail"}],
)
def test_probe_stays_ready_when_the_pool_is_full_or_degraded(
    d: h.Driver, condition: dict[str, object]
) -> None:
    """Probe is liveness: restarting the plugin would not fix the pool (volume conditions,
    GetCapacity and `pool status` report it)."""
    assert isinstance(d.backend, fakes.FakeBackend)
    d.backend.set_condition(**condition)
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_probe_is_not_ready_while_starting_up(d: h.Driver) -> None:
    d.engine.last_recovery = None  # as before start-up recovery has run
    assert not d.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_probe_fails_when_the_pool_is_gone(d: h.Driver) -> None:
    assert isinstance(d.backend, fakes.FakeBackend)
    d.backend.set_condition(assembled=False)
    assert h.code_of(lambda: d.identity.Probe(csi_pb2.ProbeRequest())) == S.FAILED_PRECONDITION


def test_health_service(d: h.Driver) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix://{d.socket}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# -- the volume life cycle, each call retried ------------------------------------------------------------


def test_every_controller_rpc_is_idempotent(d: h.Driver) -> None:
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-a", 10 * MiB)).volume
    assert c.CreateVolume(h.create_req("pvc-a", 10 * MiB)).volume == vol
    assert vol.capacity_bytes == 10 * MiB
    assert dict(vol.volume_context) == {"csi-thin.io/access-type": "mount", "csi-thin.io/fs-type": "ext4"}
    assert [dict(t.segments) for t in vol.accessible_topology] == [{"csi-thin.io/node": "node-1"}]

    snap = c.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-a", source_volume_id=vol.volume_id)
    ).snapshot
    again = c.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-a", source_volume_id=vol.volume_id)
    ).snapshot
    assert snap == again and snap.ready_to_use and snap.source_volume_id == vol.volume_id
    assert c.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot == snap

    restore = h.create_req("pvc-r", 20 * MiB, volume_content_source=snap_src(snap.snapshot_id))
    r = c.CreateVolume(restore).volume
    assert c.CreateVolume(restore).volume == r
    assert r.capacity_bytes == 20 * MiB and r.content_source.snapshot.snapshot_id == snap.snapshot_id
    clone = h.create_req("pvc-c", 10 * MiB, volume_content_source=vol_src(vol.volume_id))
    cl = c.CreateVolume(clone).volume
    assert c.CreateVolume(clone).volume == cl and cl.content_source.volume.volume_id == vol.volume_id

    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=30 * MiB)
    )
    for _ in range(2):
        resp = c.ControllerExpandVolume(expand)
        assert resp.capacity_bytes == 30 * MiB and resp.node_expansion_required
    block_expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=30 * MiB),
        volume_capability=h.block_cap(),
    )
    # a block volume's read-only publishes (loop views) learn the new size only from NodeExpandVolume
    assert c.ControllerExpandVolume(block_expand).node_expansion_required

    got = c.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 30 * MiB
    health = c.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=vol.volume_id))
    assert health.volume_health.volume_id == vol.volume_id and not health.volume_health.health_statuses

    validate = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[h.mount_cap()]
    )
    assert c.ValidateVolumeCapabilities(validate).confirmed.volume_capabilities == [h.mount_cap()]
    multi = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[h.mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]
    )
    resp_multi = c.ValidateVolumeCapabilities(multi)
    assert not resp_multi.HasField("confirmed") and resp_multi.message

    for _ in range(2):
        c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (vol, r, cl):
        for _ in range(2):
            c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    assert d.engine.list() == []


@pytest.mark.parametrize("volume_id", ["v-absent", "reallyfakevolumeid", "s-is-not-a-volume"])
def test_absent_or_foreign_ids(d: h.Driver, volume_id: str) -> None:
    c = d.controller
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=volume_id))
    assert (
        h.code_of(lambda: c.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)))
        == S.NOT_FOUND
    )
    validate = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=[h.mount_cap()]
    )
    assert h.code_of(lambda: c.ValidateVolumeCapabilities(validate)) == S.NOT_FOUND
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=1)
    )
    assert h.code_of(lambda: c.ControllerExpandVolume(expand)) == S.NOT_FOUND
    snap = csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=volume_id)
    assert h.code_of(lambda: c.CreateSnapshot(snap)) == S.NOT_FOUND
    assert h.code_of(lambda: c.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=volume_id))) == S.NOT_FOUND
    assert (
        h.code_of(lambda: c.CreateVolume(h.create_req("x", volume_content_source=vol_src(volume_id))))
        == S.NOT_FOUND
    )
    assert (
        h.code_of(lambda: c.CreateVolume(h.create_req("x", volume_content_source=snap_src(volume_id))))
        == S.NOT_FOUND
    )
    assert d.engine.list() == []


def test_incompatible_recreate_is_already_exists(d: h.Driver) -> None:
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-a", 10 * MiB)).volume
    assert h.code_of(lambda: c.CreateVolume(h.create_req("pvc-a", 20 * MiB))) == S.ALREADY_EXISTS
    other = c.CreateVolume(h.create_req("pvc-b", 10 * MiB)).volume
    c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id))
    again = csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=other.volume_id)
    assert h.code_of(lambda: c.CreateSnapshot(again)) == S.ALREADY_EXISTS


def test_restore_smaller_than_the_source_is_out_of_range(d: h.Driver) -> None:
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-a", 20 * MiB)).volume
    snap = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)).snapshot
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-r",
        capacity_range=csi_pb2.CapacityRange(required_bytes=10 * MiB, limit_bytes=10 * MiB),
        volume_capabilities=[h.mount_cap()],
        volume_content_source=snap_src(snap.snapshot_id),
    )
    assert h.code_of(lambda: c.CreateVolume(req)) == S.OUT_OF_RANGE


# -- hostile input: INVALID_ARGUMENT and nothing changed -------------------------------------------------

_HUGE = 1 << 62
_CR = csi_pb2.CapacityRange


def _hostile() -> list[tuple[str, Callable[[h.Driver, str], object]]]:
    c: list[tuple[str, Callable[[h.Driver, str], object]]] = []

    def add(label: str, fn: Callable[[h.Driver, str], object]) -> None:
        c.append((label, fn))

    cv = csi_pb2.CreateVolumeRequest
    add("create: no name", lambda d, v: d.controller.CreateVolume(h.create_req("")))
    add("create: oversized name", lambda d, v: d.controller.CreateVolume(h.create_req("n" * 129)))
    add("create: control chars", lambda d, v: d.controller.CreateVolume(h.create_req("a\x1b[2Jb")))
    add(
        "create: negative size",
        lambda d, v: d.controller.CreateVolume(
            cv(name="x", capacity_range=_CR(required_bytes=-1), volume_capabilities=[h.mount_cap()])
        ),
    )
    add(
        "create: negative limit",
        lambda d, v: d.controller.CreateVolume(
            cv(name="x", capacity_range=_CR(limit_bytes=-5), volume_capabilities=[h.mount_cap()])
        ),
    )
    add(
        "create: limit below required",
        lambda d, v: d.controller.CreateVolume(
            cv(
                name="x",
                capacity_range=_CR(required_bytes=2 * MiB, limit_bytes=MiB),
                volume_capabilities=[h.mount_cap()],
            )
        ),
    )
    add(
        "create: unknown fs",
        lambda d, v: d.controller.CreateVolume(h.create_req("x", cap=h.mount_cap("zfs"))),
    )
    add(
        "create: fs traversal",
        lambda d, v: d.controller.CreateVolume(h.create_req("x", cap=h.mount_cap("../../bin/sh"))),
    )
    add(
        "create: multi-node mode",
        lambda d, v: d.controller.CreateVolume(
            h.create_req("x", cap=h.mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER))
        ),
    )
    add(
        "create: unknown mode",
        lambda d, v: d.controller.CreateVolume(h.create_req("x", cap=h.mount_cap(mode=42))),
    )
    add("create: no capabilities", lambda d, v: d.controller.CreateVolume(cv(name="x")))
    add(
        "create: bad mount flag",
        lambda d, v: d.controller.CreateVolume(h.create_req("x", cap=h.mount_cap(flags=("rw,dev suid",)))),
    )
    add(
        "create: empty source id",
        lambda d, v: d.controller.CreateVolume(h.create_req("x", volume_content_source=snap_src(""))),
    )
    add(
        "create: mixed capabilities",
        lambda d, v: d.controller.CreateVolume(
            cv(name="x", volume_capabilities=[h.mount_cap(), h.block_cap()])
        ),
    )
    add("delete: no id", lambda d, v: d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest()))
    add(
        "delete: oversized id",
        lambda d, v: d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v-" + "a" * 200)),
    )
    add(
        "delete: id with spaces",
        lambda d, v: d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v + " x")),
    )
    add(
        "snapshot: no name",
        lambda d, v: d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id=v)),
    )
    add(
        "snapshot: no source",
        lambda d, v: d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s")),
    )
    add("delete snapshot: no id", lambda d, v: d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest()))
    add(
        "expand: no range",
        lambda d, v: d.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(volume_id=v)),
    )
    add(
        "expand: negative",
        lambda d, v: d.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(volume_id=v, capacity_range=_CR(required_bytes=-1))
        ),
    )
    add(
        "validate: no capabilities",
        lambda d, v: d.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=v)
        ),
    )
    add(
        "list: negative max",
        lambda d, v: d.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1)),
    )
    add(
        "list snapshots: negative max",
        lambda d, v: d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=-1)),
    )
    add(
        "capacity: unknown fs",
        lambda d, v: d.controller.GetCapacity(
            csi_pb2.GetCapacityRequest(volume_capabilities=[h.mount_cap("ntfs")])
        ),
    )

    def stage(
        vid: str, path: str, cap: csi_pb2.VolumeCapability | None = None
    ) -> csi_pb2.NodeStageVolumeRequest:
        return csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=path, volume_capability=cap or h.mount_cap()
        )

    def publish(vid: str, target: str, staging: str = "/var/lib/stage/x") -> csi_pb2.NodePublishVolumeRequest:
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=h.mount_cap()
        )

    add("stage: relative path", lambda d, v: d.node.NodeStageVolume(stage(v, "staging/x")))
    add("stage: traversal", lambda d, v: d.node.NodeStageVolume(stage(v, "/var/lib/kubelet/../../etc")))
    add("stage: dot", lambda d, v: d.node.NodeStageVolume(stage(v, "/var/./lib")))
    add("stage: root", lambda d, v: d.node.NodeStageVolume(stage(v, "/")))
    add("stage: no path", lambda d, v: d.node.NodeStageVolume(stage(v, "")))
    add("stage: no id", lambda d, v: d.node.NodeStageVolume(stage("", "/var/lib/s")))
    add("stage: unknown fs", lambda d, v: d.node.NodeStageVolume(stage(v, "/var/lib/s", h.mount_cap("vfat"))))
    add(
        "stage: multi-node",
        lambda d, v: d.node.NodeStageVolume(
            stage(v, "/var/lib/s", h.mount_cap(mode=Mode.MULTI_NODE_READER_ONLY))
        ),
    )
    add(
        "stage: no capability",
        lambda d, v: d.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(volume_id=v, staging_target_path="/var/lib/s")
        ),
    )
    add("publish: traversal", lambda d, v: d.node.NodePublishVolume(publish(v, "/tmp/../etc/passwd")))
    add("publish: relative", lambda d, v: d.node.NodePublishVolume(publish(v, "../../etc")))
    add(
        "publish: staging traversal",
        lambda d, v: d.node.NodePublishVolume(publish(v, "/tmp/t", "/tmp/../etc")),
    )
    add(
        "unpublish: relative",
        lambda d, v: d.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=v, target_path="t")
        ),
    )
    add(
        "unpublish: trailing slash",
        lambda d, v: d.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=v, target_path="/tmp/t/")
        ),
    )
    add(
        "unstage: traversal",
        lambda d, v: d.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=v, staging_target_path="/a/../../b")
        ),
    )
    add(
        "stats: no path",
        lambda d, v: d.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=v)),
    )
    add(
        "controller volume health: no id",
        lambda d, v: d.controller.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest()),
    )
    add(
        "controller volume health list: negative max_entries",
        lambda d, v: d.controller.ControllerListVolumeHealth(
            csi_pb2.ControllerListVolumeHealthRequest(max_entries=-1)
        ),
    )
    add(
        "node volume health: no id",
        lambda d, v: d.node.NodeGetVolumeHealth(
            csi_pb2.NodeGetVolumeHealthRequest(volume_publish_path="/tmp/t")
        ),
    )
    add(
        "node volume health: relative publish path",
        lambda d, v: d.node.NodeGetVolumeHealth(
            csi_pb2.NodeGetVolumeHealthRequest(volume_id=v, volume_publish_path="tmp/t")
        ),
    )
    add(
        "node volume health: staging path traversal",
        lambda d, v: d.node.NodeGetVolumeHealth(
            csi_pb2.NodeGetVolumeHealthRequest(volume_id=v, staging_target_path="/var/../etc")
        ),
    )
    add(
        "expand node: no id",
        lambda d, v: d.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_path="/tmp/t")),
    )
    return c


HOSTILE = _hostile()


@pytest.mark.parametrize(("label", "call"), HOSTILE, ids=[label for label, _ in HOSTILE])
def test_hostile_input_is_invalid_argument_and_changes_nothing(
    d: h.Driver, label: str, call: Callable[[h.Driver, str], object]
) -> None:
    vol = d.controller.CreateVolume(h.create_req("pvc-victim", 10 * MiB)).volume
    before = pool_state(d)
    assert h.code_of(lambda: call(d, vol.volume_id)) == S.INVALID_ARGUMENT
    assert pool_state(d) == before


def test_sizes_above_the_maximum_are_out_of_range_and_change_nothing(d: h.Driver) -> None:
    """CSI: a capacity the plugin cannot provide is OUT_OF_RANGE (CreateVolume, ControllerExpandVolume)."""
    vol = d.controller.CreateVolume(h.create_req("pvc-a", MiB)).volume
    before = pool_state(d)
    too_big = _CR(required_bytes=_HUGE)
    create = csi_pb2.CreateVolumeRequest(
        name="x", capacity_range=too_big, volume_capabilities=[h.mount_cap()]
    )
    expand = csi_pb2.ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=too_big)
    for call in (
        lambda: d.controller.CreateVolume(create),
        lambda: d.controller.ControllerExpandVolume(expand),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == S.OUT_OF_RANGE and "maximum" in exc.value.details()
    assert pool_state(d) == before


def test_invalid_starting_token_is_aborted(d: h.Driver) -> None:
    assert (
        h.code_of(lambda: d.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token="forged")))
        == S.ABORTED
    )
    assert (
        h.code_of(lambda: d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token="c1.%%")))
        == S.ABORTED
    )


# -- listing ----------------------------------------------------------------------------------------------


def test_list_volumes_pages_stay_stable(d: h.Driver) -> None:
    c = d.controller
    ids = sorted(c.CreateVolume(h.create_req(f"pvc-{i}", MiB)).volume.volume_id for i in range(5))
    page = c.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    assert [e.volume.volume_id for e in page.entries] == ids[:2] and page.next_token
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=ids[1]))  # the page's last entry goes
    page2 = c.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=page.next_token))
    assert [e.volume.volume_id for e in page2.entries] == ids[2:4]
    page3 = c.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=page2.next_token))
    assert [e.volume.volume_id for e in page3.entries] == ids[4:] and not page3.next_token
    everything = c.ListVolumes(csi_pb2.ListVolumesRequest())
    assert len(everything.entries) == 4


def test_list_snapshots_filters(d: h.Driver) -> None:
    c = d.controller
    a = c.CreateVolume(h.create_req("pvc-a", MiB)).volume
    b = c.CreateVolume(h.create_req("pvc-b", MiB)).volume
    sa = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="sa", source_volume_id=a.volume_id)).snapshot
    c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="sb", source_volume_id=b.volume_id))
    by_id = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=sa.snapshot_id)).entries
    assert [e.snapshot for e in by_id] == [sa]
    by_source = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=a.volume_id)).entries
    assert [e.snapshot.snapshot_id for e in by_source] == [sa.snapshot_id]
    assert not c.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id="nonexistent")).entries
    assert len(c.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == 2


def test_get_capacity(d: h.Driver) -> None:
    c = d.controller
    cap = c.GetCapacity(csi_pb2.GetCapacityRequest())
    # the fake pool: 64 GiB, nothing used, ratio 10
    assert cap.maximum_volume_size.value == 640 * GiB
    assert cap.available_capacity == int(64 * GiB * 0.95) // (64 * 1024) * (64 * 1024)
    assert cap.minimum_volume_size.value == 64 * 1024
    c.CreateVolume(h.create_req("pvc-a", 600 * GiB))
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 40 * GiB
    elsewhere = csi_pb2.GetCapacityRequest(
        accessible_topology=csi_pb2.Topology(segments={"csi-thin.io/node": "x"})
    )
    assert c.GetCapacity(elsewhere).available_capacity == 0
    assert h.code_of(lambda: c.CreateVolume(h.create_req("pvc-b", 41 * GiB))) == S.RESOURCE_EXHAUSTED


def test_validate_does_not_confirm_another_fs_type_than_the_volume_was_created_for(d: h.Driver) -> None:
    vol = d.controller.CreateVolume(h.create_req("pvc-a", 300 * MiB, cap=h.mount_cap("ext4"))).volume
    for fs_type, confirmed in (("xfs", False), ("ext4", True), ("", True)):
        validate = csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id,
            volume_capabilities=[h.mount_cap(fs_type)],
            volume_context=vol.volume_context,
        )
        resp = d.controller.ValidateVolumeCapabilities(validate)
        assert resp.HasField("confirmed") == confirmed, fs_type
        assert confirmed or "ext4" in resp.message


def test_get_capacity_as_the_external_provisioner_asks_for_it(d: h.Driver) -> None:
    """external-provisioner's capacity controller sends one capability with an empty mount and
    access mode UNKNOWN ("capacity is independent of the capabilities; the standard makes it
    mandatory to pass something"). Refusing it leaves Kubernetes without CSIStorageCapacity objects,
    and WaitForFirstConsumer volumes then never schedule."""
    as_sent = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=Mode(mode=Mode.UNKNOWN)
    )
    empty = csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.UNKNOWN))
    for cap in (as_sent, empty):
        got = d.controller.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[cap]))
        assert got.available_capacity > 0 and got.maximum_volume_size.value > 0


def test_topology_pins_volumes_to_this_node(d: h.Driver) -> None:
    key = "csi-thin.io/node"
    here = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={key: "node-1"})])
    there = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={key: "node-2"})])
    assert d.controller.CreateVolume(h.create_req("a", MiB, accessibility_requirements=here)).volume.volume_id
    assert (
        h.code_of(lambda: d.controller.CreateVolume(h.create_req("b", MiB, accessibility_requirements=there)))
        == S.RESOURCE_EXHAUSTED
    )
    info = d.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-1" and dict(info.accessible_topology.segments) == {key: "node-1"}


# -- capabilities and health (CSI 1.13) -------------------------------------------------------------------


def test_capabilities_advertise_get_snapshot_and_health(d: h.Driver) -> None:
    C = csi_pb2.ControllerServiceCapability.RPC
    N = csi_pb2.NodeServiceCapability.RPC
    ctrl = {
        c.rpc.type
        for c in d.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest()
        ).capabilities
    }
    node = {c.rpc.type for c in d.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    assert {C.GET_SNAPSHOT, C.GET_VOLUME_HEALTH, C.LIST_VOLUME_HEALTH, C.GET_VOLUME} <= ctrl
    assert {N.GET_VOLUME_HEALTH, N.GET_STORAGE_HEALTH, N.GET_VOLUME_STATS} <= node
    assert C.LIST_VOLUMES_PUBLISHED_NODES not in ctrl  # ListVolumes has no status to give


def _entries(statuses: object) -> list[tuple[int, str]]:
    return [(e.status, e.reason) for e in statuses]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("condition", "volume_status", "storage_status", "reason"),
    [
        (
            {"mode": "out_of_data_space", "data_used": 64 * GiB},
            csi_pb2.DEGRADED,
            csi_pb2.STORAGE_DEGRADED,
            "PoolOutOfDataSpace",
        ),
        ({"mode": "ro"}, csi_pb2.DEGRADED, csi_pb2.STORAGE_DEGRADED, "PoolReadOnly"),
        ({"needs_check": True}, csi_pb2.DEGRADED, csi_pb2.STORAGE_DEGRADED, "PoolNeedsCheck"),
        ({"metadata_used_ratio": 0.9}, csi_pb2.DEGRADED, csi_pb2.STORAGE_DEGRADED, "MetadataAboveThreshold"),
        ({"mode": "fail"}, csi_pb2.INACCESSIBLE, csi_pb2.STORAGE_UNREACHABLE, "PoolFailed"),
    ],
)
def test_the_pools_health_reaches_every_health_rpc(
    d: h.Driver, condition: dict[str, object], volume_status: int, storage_status: int, reason: str
) -> None:
    """NodeGetStorageHealth is the pool's health; every volume on the pool carries it in the
    controller's and the node's volume health, and ListVolumeHealth lists them all, in pages."""
    c = d.controller
    ids = sorted(c.CreateVolume(h.create_req(f"pvc-{i}", MiB)).volume.volume_id for i in range(3))
    assert not d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    healthy = c.ControllerListVolumeHealth(csi_pb2.ControllerListVolumeHealthRequest())
    assert not healthy.entries and not healthy.next_token
    assert isinstance(d.backend, fakes.FakeBackend)
    d.backend.set_condition(**condition)

    (backend,) = d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    assert (backend.status, backend.reason) == (storage_status, reason) and backend.message
    for vid in ids:
        got = c.ControllerGetVolumeHealth(
            csi_pb2.ControllerGetVolumeHealthRequest(volume_id=vid)
        ).volume_health
        assert got.volume_id == vid and _entries(got.health_statuses) == [(volume_status, reason)]
        node = d.node.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(volume_id=vid)).volume_health
        assert node.volume_id == vid and _entries(node.health_statuses) == [(volume_status, reason)]
    first = c.ControllerListVolumeHealth(csi_pb2.ControllerListVolumeHealthRequest(max_entries=2))
    rest = c.ControllerListVolumeHealth(
        csi_pb2.ControllerListVolumeHealthRequest(max_entries=2, starting_token=first.next_token)
    )
    assert [e.volume_id for e in first.entries] == ids[:2] and first.next_token
    assert [e.volume_id for e in rest.entries] == ids[2:] and not rest.next_token
    assert all(
        _entries(e.health_statuses) == [(volume_status, reason)] for e in [*first.entries, *rest.entries]
    )


def test_health_of_a_lost_volume_and_of_a_pool_that_is_gone(d: h.Driver) -> None:
    c = d.controller
    a = c.CreateVolume(h.create_req("pvc-a", MiB)).volume.volume_id
    b = c.CreateVolume(h.create_req("pvc-b", MiB)).volume.volume_id
    # the pool loses a's device behind the driver's back; recovery finds and marks it
    dl = deadline.default()
    d.engine.backend.delete(d.engine.get(a).dev_id, deadline=dl)  # type: ignore[union-attr]
    assert d.engine.recover(deadline=dl).lost == (a,)
    (lost,) = c.ControllerListVolumeHealth(csi_pb2.ControllerListVolumeHealthRequest()).entries
    assert lost.volume_id == a and _entries(lost.health_statuses) == [(csi_pb2.DATA_LOSS, "DeviceLost")]
    node = d.node.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(volume_id=a)).volume_health
    assert _entries(node.health_statuses) == [(csi_pb2.DATA_LOSS, "DeviceLost")]
    (backend,) = d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    assert (backend.status, backend.reason) == (csi_pb2.STORAGE_DEGRADED, "DevicesLost")
    assert a in backend.message and b not in backend.message
    # a pool whose status cannot be read at all: reported as unreachable, not an error
    assert isinstance(d.backend, fakes.FakeBackend)
    d.backend.set_condition(assembled=False)
    (backend,) = d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    assert (backend.status, backend.reason) == (csi_pb2.STORAGE_UNREACHABLE, "PoolUnavailable")
    got = c.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=b)).volume_health
    assert _entries(got.health_statuses) == [(csi_pb2.INACCESSIBLE, "PoolUnavailable")]
    node_b = d.node.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(volume_id=b)).volume_health
    assert _entries(node_b.health_statuses) == [(csi_pb2.INACCESSIBLE, "PoolUnavailable")]
    unknown = csi_pb2.ControllerGetVolumeHealthRequest(volume_id="v-ghost")
    assert h.code_of(lambda: c.ControllerGetVolumeHealth(unknown)) == S.NOT_FOUND
    node_unknown = csi_pb2.NodeGetVolumeHealthRequest(volume_id="v-ghost")
    assert h.code_of(lambda: d.node.NodeGetVolumeHealth(node_unknown)) == S.NOT_FOUND


def test_get_snapshot(d: h.Driver) -> None:
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-a", MiB)).volume
    snap = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)).snapshot
    got = c.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got == snap and got.ready_to_use and got.source_volume_id == vol.volume_id
    for missing in (vol.volume_id, "sh-none", "none-exist-id"):
        assert (
            h.code_of(lambda m=missing: c.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=m)))
            == S.NOT_FOUND
        )
    assert h.code_of(lambda: c.GetSnapshot(csi_pb2.GetSnapshotRequest())) == S.INVALID_ARGUMENT


def test_unoffered_rpcs_are_unimplemented(d: h.Driver) -> None:
    req = csi_pb2.ControllerPublishVolumeRequest(volume_id="v-a", node_id="node-1")
    assert h.code_of(lambda: d.controller.ControllerPublishVolume(req)) == S.UNIMPLEMENTED


# -- pool above its threshold ------------------------------------------------------------------------------


def test_pool_above_threshold_refuses_new_devices_but_existing_ones_work(d: h.Driver) -> None:
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-a", 10 * MiB)).volume
    snap = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)).snapshot
    assert isinstance(d.backend, fakes.FakeBackend)
    d.backend.set_condition(data_used=int(64 * GiB * 0.97))
    before = pool_state(d)
    assert h.code_of(lambda: c.CreateVolume(h.create_req("pvc-b", MiB))) == S.RESOURCE_EXHAUSTED
    snap2 = csi_pb2.CreateSnapshotRequest(name="s2", source_volume_id=vol.volume_id)
    assert h.code_of(lambda: c.CreateSnapshot(snap2)) == S.RESOURCE_EXHAUSTED
    restore = h.create_req("pvc-r", 10 * MiB, volume_content_source=snap_src(snap.snapshot_id))
    assert h.code_of(lambda: c.CreateVolume(restore)) == S.RESOURCE_EXHAUSTED
    assert pool_state(d) == before
    # existing: retried creates still answer, reads work and report the condition, deletes free space
    assert c.CreateVolume(h.create_req("pvc-a", 10 * MiB)).volume.volume_id == vol.volume_id
    got = c.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=vol.volume_id))
    (entry,) = got.volume_health.health_statuses
    assert (entry.status, entry.reason) == (csi_pb2.DEGRADED, "DataAboveThreshold") and "97%" in entry.message
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 0
    d.engine.activate(vol.volume_id, deadline=deadline.default())
    d.engine.deactivate(vol.volume_id, deadline=deadline.default())
    c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert d.engine.list() == []


def test_a_full_pool_refuses_what_allocates_and_deletes_still_run(d: h.Driver) -> None:
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-a", 10 * MiB)).volume
    snap = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)).snapshot
    assert isinstance(d.backend, fakes.FakeBackend)
    d.backend.set_condition(mode="out_of_data_space", data_used=64 * GiB)
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=20 * MiB)
    )
    for call in (
        lambda: c.CreateVolume(h.create_req("pvc-b", MiB)),
        lambda: c.CreateVolume(
            h.create_req("pvc-r", 10 * MiB, volume_content_source=snap_src(snap.snapshot_id))
        ),
        lambda: c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s2", source_volume_id=vol.volume_id)),
        lambda: c.ControllerExpandVolume(expand),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == S.RESOURCE_EXHAUSTED and "data space is full" in exc.value.details()
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 0
    c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    d.backend.set_condition(mode="ro", data_used=None)
    with pytest.raises(grpc.RpcError) as exc:
        c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert exc.value.code() == S.UNAVAILABLE and "thin_repair" in exc.value.details()
    d.backend.set_condition(mode="rw")
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity > 0
    assert d.engine.list() == []


# -- concurrency -----------------------------------------------------------------------------------


class Gate:
    """An engine step hook that parks the first call reaching `point` until released."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.reached = threading.Event()
        self.release = threading.Event()
        self._armed = True

    def __call__(self, point: str) -> None:
        if self._armed and point == self.point:
            self._armed = False
            self.reached.set()
            assert self.release.wait(30)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Gate]:
    def make(point: str) -> Gate:
        g = Gate(point)
        monkeypatch.setattr(faults, "hook", g)
        return g

    return make


def _in_background(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(h.code_of(fn)))
    t.start()
    return t, out


def test_concurrent_creates_of_one_name_abort_the_loser(d: h.Driver, gate: Callable[[str], Gate]) -> None:
    g = gate("create_volume/journaled")
    t, out = _in_background(lambda: d.controller.CreateVolume(h.create_req("pvc-a", MiB)))
    assert g.reached.wait(10)
    assert h.code_of(lambda: d.controller.CreateVolume(h.create_req("pvc-a", MiB))) == S.ABORTED
    assert (
        h.code_of(lambda: d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v-pvc-a")))
        == S.ABORTED
    )
    g.release.set()
    t.join(30)
    assert out == [S.OK]
    assert d.controller.CreateVolume(h.create_req("pvc-a", MiB)).volume.volume_id == "v-pvc-a"


def test_snapshot_while_its_source_is_being_expanded_is_aborted(
    d: h.Driver, gate: Callable[[str], Gate]
) -> None:
    vol = d.controller.CreateVolume(h.create_req("pvc-a", MiB)).volume
    g = gate("grow/journaled")
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=_CR(required_bytes=2 * MiB)
    )
    t, out = _in_background(lambda: d.controller.ControllerExpandVolume(expand))
    assert g.reached.wait(10)
    snap = csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)
    assert h.code_of(lambda: d.controller.CreateSnapshot(snap)) == S.ABORTED
    g.release.set()
    t.join(30)
    assert out == [S.OK]
    assert d.controller.CreateSnapshot(snap).snapshot.ready_to_use


def test_different_names_do_not_block_each_other(d: h.Driver, gate: Callable[[str], Gate]) -> None:
    vol = d.controller.CreateVolume(h.create_req("pvc-a", MiB)).volume
    g = gate("grow/journaled")
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=_CR(required_bytes=2 * MiB)
    )
    t, out = _in_background(lambda: d.controller.ControllerExpandVolume(expand))
    assert g.reached.wait(10)
    # reads never wait for a mutation
    assert d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    g.release.set()
    t.join(30)
    assert out == [S.OK]


# -- logging ------------------------------------------------------------------------------------------------


def test_log_lines_are_structured_and_never_hold_secrets(
    d: h.Driver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csi_thin.csi")
    d.controller.CreateVolume(h.create_req("pvc-a", MiB, secrets={"password": "hunter2"}))
    h.code_of(lambda: d.controller.CreateVolume(h.create_req("", MiB, secrets={"token": "tok-s3cr3t"})))
    lines = [r.getMessage() for r in caplog.records if r.name == "csi_thin.csi"]
    assert any("rpc=/csi.v1.Controller/CreateVolume code=OK" in line for line in lines)
    assert any("code=INVALID_ARGUMENT" in line and "error=" in line for line in lines)
    assert not any("hunter2" in line or "tok-s3cr3t" in line for line in lines)


def test_xfs_volumes_are_sized_up_to_what_mkfs_xfs_accepts(d: h.Driver) -> None:
    """mkfs.xfs refuses devices under 300 MB: a smaller xfs request is sized up at create, so the
    first stage cannot fail; ext4 and block volumes keep the requested size."""
    c = d.controller
    xfs = c.CreateVolume(h.create_req("pvc-xfs", 64 * MiB, h.mount_cap("xfs"))).volume
    assert xfs.capacity_bytes == 300 * MiB
    assert c.CreateVolume(h.create_req("pvc-xfs", 64 * MiB, h.mount_cap("xfs"))).volume == xfs
    assert (
        c.CreateVolume(h.create_req("pvc-ext4", 64 * MiB, h.mount_cap("ext4"))).volume.capacity_bytes
        == 64 * MiB
    )
    assert c.CreateVolume(h.create_req("pvc-blk", 64 * MiB, h.block_cap())).volume.capacity_bytes == 64 * MiB
    before = pool_state(d)
    capped = h.create_req("pvc-xfs-small", 64 * MiB, h.mount_cap("xfs"))
    capped.capacity_range.limit_bytes = 128 * MiB
    assert h.code_of(lambda: c.CreateVolume(capped)) == S.OUT_OF_RANGE
    assert pool_state(d) == before


def test_a_repeated_create_for_another_access_or_fs_type_is_already_exists(d: h.Driver) -> None:
    """CSI: a create with the same name but incompatible capabilities is ALREADY_EXISTS. What the
    volume was made for is kept on the device, and every volume listing carries it back."""
    c = d.controller
    vol = c.CreateVolume(h.create_req("pvc-k", 64 * MiB, h.mount_cap("ext4"))).volume
    assert dict(vol.volume_context) == {"csi-thin.io/access-type": "mount", "csi-thin.io/fs-type": "ext4"}
    assert c.CreateVolume(h.create_req("pvc-k", 64 * MiB, h.mount_cap("ext4"))).volume == vol
    before = pool_state(d)
    for other in (h.block_cap(), h.mount_cap("xfs")):
        size = 300 * MiB if other.mount.fs_type == "xfs" else 64 * MiB
        assert h.code_of(
            lambda other=other, size=size: c.CreateVolume(h.create_req("pvc-k", size, other))
        ) == (S.ALREADY_EXISTS)
    assert pool_state(d) == before
    got = c.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
    assert got.volume_context == vol.volume_context
    [entry] = [
        e for e in c.ListVolumes(csi_pb2.ListVolumesRequest()).entries if e.volume.volume_id == vol.volume_id
    ]
    assert entry.volume.volume_context == vol.volume_context
