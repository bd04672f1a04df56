"""The CSI GroupController (volume group snapshots) through a real gRPC channel over a unix socket, on
the real PoolEngine + LMDB with tests.fakes.FakeBackend underneath (the data and the hold of each
backend: tests/enginesuite.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import pytest

from csi_thin.csi.pb import csi_pb2
from tests import csi_harness as h
from tests import fakes

S = grpc.StatusCode
Src = csi_pb2.VolumeContentSource


@pytest.fixture
def d(tmp_path: pathlib.Path) -> Iterator[h.Driver]:
    with h.fake_driver(tmp_path) as driver:
        yield driver


def volumes(d: h.Driver, *names: str) -> list[str]:
    return [d.controller.CreateVolume(h.create_req(n)).volume.volume_id for n in names]


def create(d: h.Driver, name: str, sources: list[str]) -> csi_pb2.VolumeGroupSnapshot:
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=sources)
    return d.group.CreateVolumeGroupSnapshot(req).group_snapshot


def test_capabilities(d: h.Driver) -> None:
    caps = d.group.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]


def test_create_get_list_restore_delete(d: h.Driver) -> None:
    data, wal = volumes(d, "data", "wal")
    g = create(d, "db group", [data, wal])
    assert g.group_snapshot_id.startswith("gh-") and g.ready_to_use
    assert [s.source_volume_id for s in g.snapshots] == [data, wal]
    assert {s.group_snapshot_id for s in g.snapshots} == {g.group_snapshot_id}
    assert {s.creation_time.ToNanoseconds() for s in g.snapshots} == {g.creation_time.ToNanoseconds()}
    assert create(d, "db group", [data, wal]) == g, "a retried create returns the same group"
    ids = [s.snapshot_id for s in g.snapshots]
    got = d.group.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids[::-1])
    ).group_snapshot
    assert got.group_snapshot_id == g.group_snapshot_id and sorted(got.snapshots, key=str) == sorted(
        g.snapshots, key=str
    )
    # members are ordinary snapshots that name their group
    listed = d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=wal)).entries
    assert [(e.snapshot.snapshot_id, e.snapshot.group_snapshot_id) for e in listed] == [
        (ids[1], g.group_snapshot_id)
    ]
    one = d.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=ids[0])).snapshot
    assert one.group_snapshot_id == g.group_snapshot_id
    restored = d.controller.CreateVolume(
        h.create_req("restored", volume_content_source=Src(snapshot=Src.SnapshotSource(snapshot_id=ids[0])))
    ).volume
    assert restored.content_source.snapshot.snapshot_id == ids[0]
    # a member goes with its group only (the spec: INVALID_ARGUMENT)
    code = h.code_of(lambda: d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=ids[0])))
    assert code == S.INVALID_ARGUMENT
    d.group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids)
    )
    assert d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries == []
    code = h.code_of(
        lambda: d.group.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
        )
    )
    assert code == S.NOT_FOUND
    d.group.DeleteVolumeGroupSnapshot(  # absent is done
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids)
    )


def test_refusals_change_nothing(d: h.Driver) -> None:
    a, b, c = volumes(d, "a", "b", "c")
    g = create(d, "g", [a, b])
    ids = [s.snapshot_id for s in g.snapshots]
    other = d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="other", source_volume_id=c))
    assert isinstance(d.backend, fakes.FakeBackend)
    before = (sorted(map(repr, d.engine.list())), d.engine.store.transaction_id())
    G = csi_pb2
    calls = [
        (S.ALREADY_EXISTS, lambda: create(d, "g", [a, c])),
        (S.ALREADY_EXISTS, lambda: create(d, "g", [a])),
        (S.INVALID_ARGUMENT, lambda: create(d, "", [a])),
        (S.INVALID_ARGUMENT, lambda: create(d, "h", [])),
        (S.INVALID_ARGUMENT, lambda: create(d, "h", [a, a])),
        (S.NOT_FOUND, lambda: create(d, "h", [a, "v-missing"])),
        (S.NOT_FOUND, lambda: create(d, "h", [a, other.snapshot.snapshot_id])),
        (S.INVALID_ARGUMENT, lambda: d.group.GetVolumeGroupSnapshot(G.GetVolumeGroupSnapshotRequest())),
        (
            S.INVALID_ARGUMENT,
            lambda: d.group.GetVolumeGroupSnapshot(
                G.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids[:1])
            ),
        ),
        (S.INVALID_ARGUMENT, lambda: d.group.DeleteVolumeGroupSnapshot(G.DeleteVolumeGroupSnapshotRequest())),
        (
            S.INVALID_ARGUMENT,  # a member left out
            lambda: d.group.DeleteVolumeGroupSnapshot(
                G.DeleteVolumeGroupSnapshotRequest(
                    group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids[:1]
                )
            ),
        ),
        (
            S.INVALID_ARGUMENT,  # a snapshot of no group named with it
            lambda: d.group.DeleteVolumeGroupSnapshot(
                G.DeleteVolumeGroupSnapshotRequest(
                    group_snapshot_id=g.group_snapshot_id, snapshot_ids=[*ids, other.snapshot.snapshot_id]
                )
            ),
        ),
    ]
    for code, call in calls:
        assert h.code_of(call) == code
    assert (sorted(map(repr, d.engine.list())), d.engine.store.transaction_id()) == before
    assert d.backend.held() == []


def test_a_retried_create_returns_the_group_after_a_source_is_gone(d: h.Driver) -> None:
    """The CO retries CreateVolumeGroupSnapshot when it lost the answer (a sidecar restart), and a
    source volume may be deleted in between (snapshots outlive their volumes). The group was cut:
    the retry must return it (the spec: idempotent, the group made once), as CreateSnapshot does,
    not NOT_FOUND, which leaves the group's snapshots behind with no one knowing their ids."""
    a, b = volumes(d, "a", "b")
    g = create(d, "g", [a, b])
    d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=b))
    assert create(d, "g", [a, b]) == g
    # a group that does not exist yet still needs every source
    assert h.code_of(lambda: create(d, "h", [a, b])) == S.NOT_FOUND
