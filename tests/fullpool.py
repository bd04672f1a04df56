"""A pool filled through a mounted volume must heal: the scenario both backends run over real gRPC.

Fill the pool through a mounted ext4 volume until writes fail; then, at the CSI level: creates,
snapshots, clones, restores and expands answer RESOURCE_EXHAUSTED, while deletes, stage (of an
existing volume), unstage, unpublish, stats, lists and Probe keep working; another volume's data is
byte-identical; deleting the filler brings the pool back to `rw` with no restart, GetCapacity is
non-zero again and a new volume can be created, staged and written.

Run by tests/root/test_full_pool_reflink.py (reflink, natively) and tests/vm/test_full_pool_dmthin.py
(real dm-thin, error_if_no_space, in the VM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import pathlib
import subprocess
import time
from collections.abc import Callable

import grpc

from csi_thin import deadline, model
from csi_thin.csi.pb import csi_pb2
from csi_thin.node import mountinfo
from tests import csi_harness as h

S = grpc.StatusCode
MiB = model.MiB
Src = csi_pb2.VolumeContentSource

#: writes stop within this long of the pool filling (they fail fast: error_if_no_space, ENOSPC)
FILL_SECONDS = 300.0


def unmount_under(workdir: pathlib.Path, *, keep: str = "") -> None:
    """Unmount what a failed run left under workdir (deepest first): only this test's mounts."""
    mounts = {m.mount_point for m in mountinfo.read() if m.mount_point.startswith(f"{workdir}/")}
    for mp in sorted(mounts - {keep}, key=len, reverse=True):
        # not lazy: a lazily unmounted volume keeps its loop device busy, and the pool's teardown
        # after this must detach it
        subprocess.run(["umount", mp], check=False)


def _stage(
    d: h.Driver, workdir: pathlib.Path, vol: csi_pb2.Volume, tag: str, *, read_only: bool = False
) -> str:
    path = str(workdir / "staging" / tag)
    mode = h.Mode.SINGLE_NODE_READER_ONLY if read_only else h.Mode.SINGLE_NODE_WRITER
    d.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=path,
            volume_capability=h.mount_cap(mode=mode),
            volume_context=vol.volume_context,
        )
    )
    return path


def _publish(d: h.Driver, workdir: pathlib.Path, vol: csi_pb2.Volume, staging: str, tag: str) -> str:
    path = str(workdir / "pods" / tag)
    d.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=staging,
            target_path=path,
            volume_capability=h.mount_cap(),
            volume_context=vol.volume_context,
        )
    )
    return path


def _unpublish(d: h.Driver, vol: csi_pb2.Volume, target: str) -> None:
    d.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    assert mountinfo.at(target) is None


def _unstage(d: h.Driver, vol: csi_pb2.Volume, staging: str) -> None:
    d.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
    )
    assert mountinfo.at(staging) is None
    dev = d.engine.get(vol.volume_id)
    assert dev is not None and not dev.active


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fill(target: str, *, limit: int) -> tuple[int, int]:
    """Write through the mounted volume until a write or fsync fails; (bytes written, errno)."""
    chunk = os.urandom(MiB)
    written = 0
    end = time.monotonic() + FILL_SECONDS
    fd = os.open(f"{target}/filler", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while written < limit:
            assert time.monotonic() < end, f"still writing after {FILL_SECONDS}s ({written} bytes)"
            try:
                os.write(fd, chunk)
                written += len(chunk)
                if written % (8 * MiB) == 0:
                    os.fsync(fd)
            except OSError as exc:
                return written, exc.errno or 0
        try:
            os.fsync(fd)
        except OSError as exc:
            return written, exc.errno or 0
    finally:
        with contextlib.suppress(OSError):  # close reports a writeback error again: already seen
            os.close(fd)
    raise AssertionError(f"wrote {written} bytes (the whole volume) and nothing failed: the pool is not full")


@dataclasses.dataclass(frozen=True)
class _Pool:
    """What the scenario made before the pool filled up."""

    keep: csi_pb2.Volume  # data that must survive; a snapshot shares its blocks
    solo: csi_pb2.Volume  # data that must survive; no snapshot shares its blocks
    snap_id: str
    want: dict[str, str]  # volume id -> sha256 of its data file
    filler: csi_pb2.Volume
    f_staging: str
    f_target: str


def run(
    serve: Callable[[], contextlib.AbstractContextManager[h.Driver]],
    workdir: pathlib.Path,
    *,
    filler_bytes: int,
    shared_rw_mount_fails: bool,
) -> None:
    """The scenario; `serve` starts the driver on the pool (it is restarted once, while full).
    `shared_rw_mount_fails`: the backend has no block left for a copy-on-write when full, so a
    read-write mount of a volume sharing blocks with a snapshot must fail, and say why."""
    with serve() as d:
        pool = _fill(d, workdir, filler_bytes=filler_bytes)
    # a node restart while full: the driver must come up (re-assembly, recovery), or nothing is deleted
    with serve() as d:
        _while_full(d, workdir, pool, shared_rw_mount_fails=shared_rw_mount_fails)
        _heal(d, workdir, pool)


def _volume_with_data(d: h.Driver, workdir: pathlib.Path, name: str) -> tuple[csi_pb2.Volume, str]:
    vol = d.controller.CreateVolume(h.create_req(name, 32 * MiB)).volume
    staging = _stage(d, workdir, vol, name)
    payload = os.urandom(4 * MiB)
    _write_file(f"{staging}/data", payload)
    _unstage(d, vol, staging)
    return vol, hashlib.sha256(payload).hexdigest()


def _check_data(
    d: h.Driver, workdir: pathlib.Path, vol: csi_pb2.Volume, want: str, *, read_only: bool
) -> None:
    tag = f"check-{vol.volume_id}"
    staging = _stage(d, workdir, vol, tag, read_only=read_only)
    assert _sha(f"{staging}/data") == want
    _unstage(d, vol, staging)


def _fill(d: h.Driver, workdir: pathlib.Path, *, filler_bytes: int) -> _Pool:
    c = d.controller
    keep, want_keep = _volume_with_data(d, workdir, "pvc-keep")
    solo, want_solo = _volume_with_data(d, workdir, "pvc-solo")
    snap = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-keep", source_volume_id=keep.volume_id))

    # fill the pool through a mounted ext4 volume larger than the pool
    filler = c.CreateVolume(h.create_req("pvc-filler", filler_bytes)).volume
    f_staging = _stage(d, workdir, filler, "filler")
    f_target = _publish(d, workdir, filler, f_staging, "filler")
    written, err = fill(f_target, limit=filler_bytes)
    assert err in (errno.ENOSPC, errno.EIO, errno.EROFS), f"the fill failed with {errno.errorcode.get(err)}"
    status = d.engine.status(deadline=deadline.default())
    print(f"filled: {written} bytes written, then {errno.errorcode.get(err)}; pool {status}")
    assert status.mode == model.PoolMode.OUT_OF_DATA_SPACE, status
    return _Pool(
        keep=keep,
        solo=solo,
        snap_id=snap.snapshot.snapshot_id,
        want={keep.volume_id: want_keep, solo.volume_id: want_solo},
        filler=filler,
        f_staging=f_staging,
        f_target=f_target,
    )


def _while_full(d: h.Driver, workdir: pathlib.Path, p: _Pool, *, shared_rw_mount_fails: bool) -> None:
    c = d.controller
    assert d.engine.status(deadline=deadline.default()).mode == model.PoolMode.OUT_OF_DATA_SPACE
    # full: everything that would allocate is RESOURCE_EXHAUSTED, naming what is full
    src = p.keep.volume_id
    refused = {
        "create": lambda: c.CreateVolume(h.create_req("pvc-new", 16 * MiB)),
        "snapshot": lambda: c.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="snap-2", source_volume_id=src)
        ),
        "restore": lambda: c.CreateVolume(
            h.create_req(
                "pvc-restore",
                32 * MiB,
                volume_content_source=Src(snapshot=Src.SnapshotSource(snapshot_id=p.snap_id)),
            )
        ),
        "clone": lambda: c.CreateVolume(
            h.create_req(
                "pvc-clone", 32 * MiB, volume_content_source=Src(volume=Src.VolumeSource(volume_id=src))
            )
        ),
        "expand": lambda: c.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=src, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
            )
        ),
    }
    for label, call in refused.items():
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() == S.RESOURCE_EXHAUSTED, f"{label}: {exc.code()} {exc.details()}"
            assert "full" in (exc.details() or ""), f"{label}: {exc.details()}"
        else:
            raise AssertionError(f"{label} succeeded on a full pool")
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 0
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value, "a full pool must not fail Probe"
    listed = {e.volume.volume_id for e in c.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    assert listed == {p.keep.volume_id, p.solo.volume_id, p.filler.volume_id}
    # the health RPCs say it: the pool (node), each volume (controller and node), the list
    got = c.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=src)).volume_health
    full = [e for e in got.health_statuses if e.reason == "PoolOutOfDataSpace"]
    assert len(full) == 1 and full[0].status == csi_pb2.DEGRADED, got
    assert "out_of_data_space" in full[0].message
    storage = d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    assert (csi_pb2.STORAGE_DEGRADED, "PoolOutOfDataSpace") in {(b.status, b.reason) for b in storage}
    node = d.node.NodeGetVolumeHealth(
        csi_pb2.NodeGetVolumeHealthRequest(
            volume_id=p.filler.volume_id, staging_target_path=p.f_staging, volume_publish_path=p.f_target
        )
    ).volume_health
    assert {e.reason for e in node.health_statuses} >= {"PoolOutOfDataSpace"}, node
    assert not {"NotStaged", "NotPublished"} & {e.reason for e in node.health_statuses}, node
    unhealthy = c.ControllerListVolumeHealth(csi_pb2.ControllerListVolumeHealthRequest()).entries
    assert {e.volume_id for e in unhealthy} == listed
    stats = d.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=p.filler.volume_id, volume_path=p.f_target)
    )
    assert stats.usage

    # existing volumes stage and read back byte-identical while the pool is full: read-write where
    # no snapshot shares the blocks (overwriting a mapped block needs no new one), read-only where
    # one does (ext4's mount writes its superblock, and a shared block is copied before a write)
    _check_data(d, workdir, p.solo, p.want[p.solo.volume_id], read_only=False)
    _check_data(d, workdir, p.keep, p.want[p.keep.volume_id], read_only=True)
    if shared_rw_mount_fails:  # dm-thin has no spare block; a filesystem may still have a few
        staging = str(workdir / "staging" / "keep-rw")
        code = h.code_of(lambda: _stage(d, workdir, p.keep, "keep-rw"))
        assert code == S.RESOURCE_EXHAUSTED, code
        assert mountinfo.at(staging) is None
        _unstage(d, p.keep, staging)


def _heal(d: h.Driver, workdir: pathlib.Path, p: _Pool) -> None:
    c = d.controller
    # deletes free space: the pool leaves out_of_data_space with no restart (the snapshot's delete
    # frees nothing: its blocks are the kept volume's, so its fence runs on a pool still full)
    _unpublish(d, p.filler, p.f_target)
    _unstage(d, p.filler, p.f_staging)
    c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=p.snap_id))
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=p.filler.volume_id))
    status = d.engine.status(deadline=deadline.default())
    print(f"after the delete: pool {status}")
    assert status.mode == model.PoolMode.RW, status
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity > 0
    kept = csi_pb2.ControllerGetVolumeHealthRequest(volume_id=p.keep.volume_id)
    assert not c.ControllerGetVolumeHealth(kept).volume_health.health_statuses
    assert not d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    assert not c.ControllerListVolumeHealth(csi_pb2.ControllerListVolumeHealthRequest()).entries

    # and new volumes work again: create, stage, write, read back
    fresh = c.CreateVolume(h.create_req("pvc-fresh", 32 * MiB)).volume
    f2 = _stage(d, workdir, fresh, "fresh")
    data = os.urandom(8 * MiB)
    _write_file(f"{f2}/data", data)
    assert _sha(f"{f2}/data") == hashlib.sha256(data).hexdigest()
    _unstage(d, fresh, f2)
    for vol in (p.keep, p.solo):
        _check_data(d, workdir, vol, p.want[vol.volume_id], read_only=False)
    for vol in (fresh, p.keep, p.solo):
        c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert d.engine.list() == []
