"""Node scenarios that must hold on every backend: run natively on reflink (root tier) and on real
dm-thin in the VM (vm tier), each with its own driver factory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import grpc

from csi_thin import deadline as deadline_mod
from csi_thin.csi.pb import csi_pb2
from csi_thin.node import blockview, mountinfo
from tests import blockio
from tests import csi_harness as h

DriverFactory = Callable[[], contextlib.AbstractContextManager[h.Driver]]
MiB = h.MiB
S = grpc.StatusCode


def write_errno(path: str) -> int:
    """0 when a write through `path` reaches the device, else the errno that stopped it (at the
    open, the write or the flush)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return exc.errno or -1
    try:
        os.pwrite(fd, b"written through a read-only publish".ljust(4096, b"!"), 0)
        os.fsync(fd)
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(fd)
    return 0


def loops_over(rdev: int) -> list[str]:
    """Every loop device whose backing file is the block device `rdev` (sysfs, no ioctl)."""
    found = []
    for name in os.listdir("/sys/block"):
        if not name.startswith("loop"):
            continue
        try:
            backing = pathlib.Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            if os.stat(backing).st_rdev == rdev and backing.startswith("/dev/"):
                found.append(name)
        except OSError:
            continue
    return found


def read_only_block_publish(workdir: pathlib.Path, driver: DriverFactory) -> None:
    """A read-only publish of a block volume refuses writes while a read-write publish of the same
    volume elsewhere still writes; unpublish after a driver restart removes what the read-only
    publish made, and nothing is left behind."""
    blk = h.block_cap()
    reader = h.block_cap(mode=h.Mode.SINGLE_NODE_READER_ONLY)
    staging = str(workdir / "staging" / "blk")
    rw, ro, ro_mode = (str(workdir / "pods" / p / "dev") for p in ("rw", "ro", "reader"))

    def publish(
        d: h.Driver, vol: csi_pb2.Volume, target: str, cap: csi_pb2.VolumeCapability, ro: bool
    ) -> None:
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=staging,
            target_path=target,
            volume_capability=cap,
            volume_context=vol.volume_context,
            readonly=ro,
        )
        for _ in range(2):
            d.node.NodePublishVolume(req)

    with driver() as d:
        vol = d.controller.CreateVolume(h.create_req("pvc-ro-blk", 64 * MiB, cap=blk)).volume
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, volume_capability=blk
        )
        d.node.NodeStageVolume(stage)
        dev = d.engine.get(vol.volume_id)
        assert dev is not None and dev.path
        rdev = os.stat(dev.path).st_rdev
        publish(d, vol, rw, blk, False)
        publish(d, vol, ro, blk, True)
        publish(d, vol, ro_mode, reader, False)
        blockio.write_at(rw, 0, b"tenant data".ljust(4096, b"."))
        for target in (ro, ro_mode):
            assert write_errno(target) in (errno.EROFS, errno.EPERM, errno.EACCES), target
            assert blockio.read_at(target, 0, 11) == b"tenant data"
            stats = d.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
            )
            assert stats.usage[0].total == 64 * MiB
        assert write_errno(rw) == 0  # the read-write publish still writes
        assert blockio.read_at(rw, 0, 35) == b"written through a read-only publish"
        # a read-only target asked for read-write (and the reverse) is another publish
        for target, cap, want_ro in ((ro, blk, False), (rw, blk, True)):
            other = csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap,
                readonly=want_ro,
            )
            assert h.code_of(lambda other=other: d.node.NodePublishVolume(other)) == S.ALREADY_EXISTS
        # grown, the volume shows its new size through the read-only publishes after NodeExpandVolume
        d.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MiB),
                volume_capability=blk,
            )
        )
        expand = csi_pb2.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=rw, volume_capability=blk
        )
        assert d.node.NodeExpandVolume(expand).capacity_bytes == 96 * MiB
        assert [blockio.device_size(t) for t in (rw, ro, ro_mode)] == [96 * MiB] * 3
        unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
        assert h.code_of(lambda: d.node.NodeUnstageVolume(unstage)) == S.FAILED_PRECONDITION
        assert len(loops_over(rdev)) == 2  # one read-only view per read-only target

    with driver() as d:  # a restart: the views are found again from the kernel, not from memory
        for target in (ro, ro_mode, rw):
            for _ in range(2):
                d.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
                )
            assert not os.path.exists(target) and mountinfo.at(target) is None
        assert loops_over(rdev) == []
        d.node.NodeUnstageVolume(unstage)
        dev = d.engine.get(vol.volume_id)
        assert dev is not None and not dev.active
        d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def drop_views_over(rdevs: set[int]) -> None:
    """After a failed scenario: remove the read-only views it left on these devices (and only
    those), so that the pool can be torn down."""
    for v in blockview.views():
        if v.backing_rdev in rdevs:
            blockview.close_view(v.label)


def loop_rdevs_under(workdir: pathlib.Path) -> set[int]:
    """Device numbers of the loop devices whose backing file lies under `workdir`."""
    found = set()
    for name in os.listdir("/sys/block"):
        try:
            backing = pathlib.Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            if backing.startswith(f"{workdir}/"):
                found.add(os.stat(f"/dev/{name}").st_rdev)
        except OSError:
            continue
    return found


TRIM_FILE_BYTES = 200 * MiB


def trim_gives_space_back(
    workdir: pathlib.Path, driver: DriverFactory, *, config_file: pathlib.Path, fs_type: str = "ext4"
) -> None:
    """Write 200 MiB into a staged volume's filesystem, sync, delete it: the pool still holds the
    blocks. `csi-thin pool trim` (next to the running driver) gives at least 90% of them back, and
    `pool status` and the totals say how much."""
    cap = h.mount_cap(fs_type)
    staging = str(workdir / "staging" / "trim")
    with driver() as d:
        vol = d.controller.CreateVolume(h.create_req("pvc-trim", 512 * MiB, cap=cap)).volume
        d.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=staging,
                volume_capability=cap,
                volume_context=vol.volume_context,
            )
        )
        try:
            data = os.path.join(staging, "data")
            chunk = os.urandom(MiB)  # incompressible, and not zeros a layer could skip
            fd = os.open(data, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for i in range(TRIM_FILE_BYTES // MiB):
                    os.pwrite(fd, chunk, i * MiB)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.sync()
            written = d.engine.status(deadline=deadline_mod.default()).data_used_bytes
            os.unlink(data)
            os.sync()
            deleted = d.engine.status(deadline=deadline_mod.default()).data_used_bytes
            # the premise: deleting a file gives nothing back to the pool by itself
            assert written - deleted < TRIM_FILE_BYTES // 10, (written, deleted)
            out = cli(config_file, "pool", "trim", "--json")
            result = json.loads(out)
            trimmed = d.engine.status(deadline=deadline_mod.default()).data_used_bytes
            assert written - trimmed >= 0.9 * TRIM_FILE_BYTES, (written, deleted, trimmed, result)
            assert result["filesystems"] == 1 and result["failures"] == [], result
            assert result["reclaimed_bytes"] >= 0.9 * TRIM_FILE_BYTES, (written, deleted, trimmed, result)
            status = json.loads(cli(config_file, "pool", "status", "--json"))["trim"]
            assert status["runs"] == 1 and status["failed_runs"] == 0, status
            assert status["reclaimed_bytes"] == result["reclaimed_bytes"], status
        finally:
            d.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
            )
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def cli(config_file: pathlib.Path, *args: str) -> str:
    """`csi-thin <args> --config FILE` in a process of its own, as an operator runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "csi_thin.cli", *args, "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout
