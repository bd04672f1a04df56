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
        subprocess.run(["umount", "-l", mp], check=False)


def _stage(d: h.Driver, workdir: pathlib.Path, vol: csi_pb2.Volume, tag: str) -> str:
    path = str(workdir / "staging" / tag)
    d.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=path,
            volume_capability=h.mount_cap(),
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


def run(
    serve: Callable[[], contextlib.AbstractContextManager[h.Driver]],
    workdir: pathlib.Path,
    *,
    filler_bytes: int,
) -> None:
    """The scenario; `serve` starts the driver on the pool (it is restarted once, while full)."""
    with serve() as d:
        filler, keep, snap_id, want, f_staging, f_target = _fill(d, workdir, filler_bytes=filler_bytes)
    # a node restart while full: the driver must come up (re-assembly, recovery), or nothing is deleted
    with serve() as d:
        _while_full(d, workdir, filler=filler, keep=keep, snap_id=snap_id, want=want)
        _heal(
            d,
            workdir,
            filler=filler,
            keep=keep,
            snap_id=snap_id,
            want=want,
            f_staging=f_staging,
            f_target=f_target,
        )


def _fill(
    d: h.Driver, workdir: pathlib.Path, *, filler_bytes: int
) -> tuple[csi_pb2.Volume, csi_pb2.Volume, str, str, str, str]:
    c = d.controller
    dl = deadline.default
    # a volume whose data must survive, and a snapshot of it (to restore from while full)
    keep = c.CreateVolume(h.create_req("pvc-keep", 32 * MiB)).volume
    staging = _stage(d, workdir, keep, "keep")
    payload = os.urandom(4 * MiB)
    _write_file(f"{staging}/data", payload)
    want = hashlib.sha256(payload).hexdigest()
    _unstage(d, keep, staging)
    snap = c.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-keep", source_volume_id=keep.volume_id))
    snap_id = snap.snapshot.snapshot_id

    # fill the pool through a mounted ext4 volume larger than the pool
    filler = c.CreateVolume(h.create_req("pvc-filler", filler_bytes)).volume
    f_staging = _stage(d, workdir, filler, "filler")
    f_target = _publish(d, workdir, filler, f_staging, "filler")
    written, err = fill(f_target, limit=filler_bytes)
    assert err in (errno.ENOSPC, errno.EIO, errno.EROFS), f"the fill failed with {errno.errorcode.get(err)}"
    status = d.engine.status(deadline=dl())
    print(f"filled: {written} bytes written, then {errno.errorcode.get(err)}; pool {status}")
    assert status.mode == model.PoolMode.OUT_OF_DATA_SPACE, status
    return filler, keep, snap_id, want, f_staging, f_target


def _while_full(
    d: h.Driver,
    workdir: pathlib.Path,
    *,
    filler: csi_pb2.Volume,
    keep: csi_pb2.Volume,
    snap_id: str,
    want: str,
) -> None:
    c = d.controller
    assert d.engine.status(deadline=deadline.default()).mode == model.PoolMode.OUT_OF_DATA_SPACE
    f_target = str(workdir / "pods" / "filler")
    # full: everything that would allocate is RESOURCE_EXHAUSTED, naming what is full
    refused = {
        "create": lambda: c.CreateVolume(h.create_req("pvc-new", 16 * MiB)),
        "snapshot": lambda: c.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="snap-2", source_volume_id=keep.volume_id)
        ),
        "restore": lambda: c.CreateVolume(
            h.create_req(
                "pvc-restore",
                32 * MiB,
                volume_content_source=Src(snapshot=Src.SnapshotSource(snapshot_id=snap_id)),
            )
        ),
        "clone": lambda: c.CreateVolume(
            h.create_req(
                "pvc-clone",
                32 * MiB,
                volume_content_source=Src(volume=Src.VolumeSource(volume_id=keep.volume_id)),
            )
        ),
        "expand": lambda: c.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=keep.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
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
    assert listed == {keep.volume_id, filler.volume_id}
    got = c.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=keep.volume_id))
    assert got.status.volume_condition.abnormal
    assert "out_of_data_space" in got.status.volume_condition.message
    stats = d.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=filler.volume_id, volume_path=f_target)
    )
    assert stats.volume_condition.abnormal and stats.usage

    # an existing volume stages and reads back byte-identical while the pool is full
    staging = _stage(d, workdir, keep, "keep")
    assert _sha(f"{staging}/data") == want
    _unstage(d, keep, staging)


def _heal(
    d: h.Driver,
    workdir: pathlib.Path,
    *,
    filler: csi_pb2.Volume,
    keep: csi_pb2.Volume,
    snap_id: str,
    want: str,
    f_staging: str,
    f_target: str,
) -> None:
    c = d.controller
    dl = deadline.default
    # deletes free space: the pool leaves out_of_data_space with no restart (a snapshot's delete
    # frees nothing here: its blocks are the kept volume's, so the pool is still full for it)
    _unpublish(d, filler, f_target)
    _unstage(d, filler, f_staging)
    c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id))
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=filler.volume_id))
    status = d.engine.status(deadline=dl())
    print(f"after the delete: pool {status}")
    assert status.mode == model.PoolMode.RW, status
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity > 0
    assert not c.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=keep.volume_id)
    ).status.volume_condition.abnormal

    # and new volumes work again: create, stage, write, read back
    fresh = c.CreateVolume(h.create_req("pvc-fresh", 32 * MiB)).volume
    f2 = _stage(d, workdir, fresh, "fresh")
    data = os.urandom(8 * MiB)
    _write_file(f"{f2}/data", data)
    assert _sha(f"{f2}/data") == hashlib.sha256(data).hexdigest()
    _unstage(d, fresh, f2)
    staging = _stage(d, workdir, keep, "keep")
    assert _sha(f"{staging}/data") == want
    _unstage(d, keep, staging)
    for vol in (fresh, keep):
        c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert d.engine.list() == []
