"""The data path on real dm-thin, through the CSI API (vm tier).

ext4 and xfs volumes served by the standalone driver (the real server and standalone composition,
in-process by tests/csi_harness.py, over gRPC on a unix socket) on a loop-file dm-thin pool:
CreateVolume, NodeStage (activate, mkfs, mount), NodePublish, writes, CreateSnapshot of the mounted
origin, restore into a larger volume (the filesystem grows to it), a clone, online expansion, and
byte-for-byte checks of the data, read back through the mounted filesystems and from the raw thin
devices (at the file's extents, by FIEMAP and O_DIRECT). At the end, unpublish, unstage and delete
everything, and check with plain tools (dmsetup, losetup, /proc/self/mountinfo; not csi_thin's own)
that nothing is left: no dm device, no mount, no loop device, no thin device in the pool, no data
block still mapped.

Small volumes: under TCG every block written costs, and thin devices cost only what is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin.csi.pb import csi_pb2
from csi_thin.dm import parse
from csi_thin.pool import dmthin
from tests import blockio, conftest
from tests import csi_harness as h

MiB = model.MiB
DMS = ["dmsetup", "--noudevsync", "--noudevrules"]
#: the first volume's size per filesystem: mkfs.xfs refuses filesystems under 300 MB
BASE = {"ext4": 64 * MiB, "xfs": 320 * MiB}
T = 300  # seconds per RPC: mkfs and fsck of a few hundred MB under software emulation


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout.strip()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Published:
    vol: csi_pb2.Volume
    staging: pathlib.Path
    target: pathlib.Path

    @property
    def id(self) -> str:
        return str(self.vol.volume_id)


class Node:
    """CSI calls of one test, on one capability (a mount volume of one filesystem)."""

    def __init__(self, d: h.Driver, workdir: pathlib.Path, pool: str, fs_type: str) -> None:
        self.d = d
        self.workdir = workdir
        self.pool = pool
        self.cap = h.mount_cap(fs_type)

    def create(self, name: str, size: int, *, snapshot_id: str = "", volume_id: str = "") -> csi_pb2.Volume:
        source = None
        if snapshot_id:
            snap = csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
            source = csi_pb2.VolumeContentSource(snapshot=snap)
        elif volume_id:
            source = csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id)
            )
        req = h.create_req(name, size, cap=self.cap, volume_content_source=source)
        vol = self.d.controller.CreateVolume(req, timeout=T).volume
        assert vol.capacity_bytes == size
        return vol

    def stage_publish(self, vol: csi_pb2.Volume, name: str) -> Published:
        p = Published(vol, self.workdir / "staging" / name, self.workdir / "pods" / name / "mount")
        self.d.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(p.staging),
                volume_capability=self.cap,
                volume_context=vol.volume_context,
            ),
            timeout=T,
        )
        self.d.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(p.staging),
                target_path=str(p.target),
                volume_capability=self.cap,
                volume_context=vol.volume_context,
            ),
            timeout=T,
        )
        return p

    def device(self, p: Published, size: int) -> str:
        """The thin device under a published volume, checked against the kernel: the filesystem at
        the target and at the staging path is this device's, its table is a thin target of our pool
        of `size` bytes, and the filesystem type is the requested one."""
        path = f"/dev/mapper/csi-thin-{self.pool}-"
        mounts = _mounts()
        staged, target = mounts[str(p.staging)], mounts[str(p.target)]
        assert staged.source.startswith(path), f"{p.id} is mounted from {staged.source}, not our thin device"
        rdev = os.stat(staged.source).st_rdev
        assert staged.dev == target.dev == f"{os.major(rdev)}:{os.minor(rdev)}"
        assert staged.fs_type == target.fs_type == self.cap.mount.fs_type
        name = staged.source.removeprefix("/dev/mapper/")
        [line] = sh(*DMS, "table", name).splitlines()
        start, sectors, kind, _pool_dev, _dev_id = line.split()
        assert (start, int(sectors) * 512, kind) == ("0", size, "thin")
        assert "ACTIVE" in sh(*DMS, "info", name) and "SUSPENDED" not in sh(*DMS, "info", name)
        return staged.source

    def fs_bytes(self, p: Published) -> int:
        """Filesystem size as the CSI sees it (NodeGetVolumeStats), checked against statvfs."""
        stats = self.d.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=p.vol.volume_id, volume_path=str(p.target)),
            timeout=T,
        )
        [total] = [u.total for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES]
        st = os.statvfs(p.target)
        assert total == st.f_blocks * st.f_frsize
        health = self.d.node.NodeGetVolumeHealth(
            csi_pb2.NodeGetVolumeHealthRequest(
                volume_id=p.id, staging_target_path=str(p.staging), volume_publish_path=str(p.target)
            ),
            timeout=T,
        ).volume_health
        assert not health.health_statuses, health
        return int(total)

    def release(self, p: Published) -> None:
        device = self.d.engine.get(p.id)
        assert device is not None and device.path
        name = device.path.removeprefix("/dev/mapper/")
        self.d.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=p.vol.volume_id, target_path=str(p.target)),
            timeout=T,
        )
        self.d.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=p.vol.volume_id, staging_target_path=str(p.staging)),
            timeout=T,
        )
        mounted = _mounts()
        assert str(p.target) not in mounted and str(p.staging) not in mounted
        assert not p.target.exists()
        assert name not in _dm_names(), f"{name} still active after NodeUnstageVolume"


@dataclasses.dataclass(frozen=True)
class Mount:
    dev: str  # major:minor
    fs_type: str
    source: str


def _mounts() -> dict[str, Mount]:
    """Mount point -> the (topmost) mount there, straight from /proc/self/mountinfo: `id parent
    maj:min root mount_point options [optional...] - fstype source super` (our paths need no
    unescaping)."""
    out: dict[str, Mount] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            fs_type, source = fields[fields.index("-") + 1 : fields.index("-") + 3]
            out[fields[4]] = Mount(dev=fields[2], fs_type=fs_type, source=source)
    return out


def _dm_names() -> set[str]:
    out = sh(*DMS, "ls")
    return set() if out == "No devices found" else {line.split()[0] for line in out.splitlines()}


def _write(path: pathlib.Path, data: bytes, *, sync: bool, in_place: bool = False) -> None:
    with open(path, "r+b" if in_place else "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _pool_config(workdir: pathlib.Path, name: str) -> config.PoolConfig:
    return config.pool_from_dict(
        {
            "name": name,
            "backend": "dmthin",
            "state_dir": str(workdir / "state"),
            "dmthin": {"data_file": str(workdir / "data.img"), "data_size": "2GiB", "block_size": "64KiB"},
        }
    )


@dataclasses.dataclass
class Pool:
    workdir: pathlib.Path
    cfg: config.PoolConfig
    backend: dmthin.DmThinBackend


@pytest.fixture
def pool() -> Iterator[Pool]:
    """A fresh loop-file pool in /scratch; destroyed after the test, whatever happened, and then
    checked gone: no dm device of its name, no loop device on its files, no mount under its dir."""
    name = f"dp{uuid.uuid4().hex[:6]}"
    workdir = pathlib.Path("/scratch") / f"datapath-{name}"
    workdir.mkdir(parents=True)
    cfg = _pool_config(workdir, name)
    backend = dmthin.DmThinBackend(cfg)
    try:
        yield Pool(workdir, cfg, backend)
    finally:
        # a failed test may leave mounts of its own (deepest first); the pool's devices go with destroy
        for mp in sorted((m for m in _mounts() if m.startswith(f"{workdir}/")), reverse=True):
            subprocess.run(["umount", mp], check=False)
        backend.destroy(deadline=deadline_mod.Deadline.after(120))
        assert not [n for n in _dm_names() if n.startswith(f"csi-thin-{name}-")]
        assert not [m for m in _mounts() if m.startswith(f"{workdir}/")]
        for f in ("data.img", "data.img.meta"):
            assert sh("losetup", "-j", str(workdir / f)) == ""
            assert not (workdir / f).exists()


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_data_path(pool: Pool, fs_type: str) -> None:
    t0 = time.monotonic()
    base = BASE[fs_type]
    with h.serve(pool.workdir, pool.backend) as d:
        n = Node(d, pool.workdir, pool.cfg.name, fs_type)

        # a fresh volume: formatted at stage (xfs keeps its 64 MiB log outside the statfs size)
        vol_a = n.create("dp-a", base)
        a = n.stage_publish(vol_a, "a")
        dev_a = n.device(a, base)
        fs_a = n.fs_bytes(a)
        assert base // 2 < fs_a <= base

        # written through the mounted filesystem: one file synced, one left in the page cache
        before = os.urandom(4 * MiB)
        unsynced = os.urandom(1 * MiB)
        _write(a.target / "data.bin", before, sync=True)
        assert sha(blockio.read_file_raw(str(a.target / "data.bin"), dev_a)) == sha(before)
        _write(a.target / "unsynced.bin", unsynced, sync=False)

        # a snapshot of the mounted, active origin: the suspend around create_snap freezes the
        # filesystem, so the page-cache-only write is in the snapshot too; the origin stays usable
        snap = d.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=vol_a.volume_id, name="dp-snap"), timeout=T
        ).snapshot
        assert snap.ready_to_use and snap.size_bytes == base
        assert n.device(a, base) == dev_a

        # the origin changes after the snapshot: in place, and a new file
        after = os.urandom(4 * MiB)
        _write(a.target / "data.bin", after, sync=True, in_place=True)
        (a.target / "new.txt").write_text("written after the snapshot\n")

        # restore into a volume twice the size: the snapshot's data, a filesystem grown to fit
        vol_b = n.create("dp-b", 2 * base, snapshot_id=snap.snapshot_id)
        b = n.stage_publish(vol_b, "b")
        dev_b = n.device(b, 2 * base)
        assert dev_b != dev_a
        assert sha((b.target / "data.bin").read_bytes()) == sha(before)
        assert sha((b.target / "unsynced.bin").read_bytes()) == sha(unsynced)
        assert not (b.target / "new.txt").exists()
        fs_b = n.fs_bytes(b)
        # grown at stage to the larger device: by (almost) all of the bytes the device has more
        assert fs_b - fs_a >= 0.9 * base, f"restored fs {fs_b} bytes on {2 * base}, its source {fs_a}"
        # raw: each thin device holds its own version of the file's blocks (copy on write of an
        # origin that was active when it was snapshotted)
        assert sha(blockio.read_file_raw(str(b.target / "data.bin"), dev_b)) == sha(before)
        assert sha(blockio.read_file_raw(str(a.target / "data.bin"), dev_a)) == sha(after)
        assert sha((a.target / "data.bin").read_bytes()) == sha(after)

        # the restored volume is independent of its source
        _write(b.target / "data.bin", os.urandom(4 * MiB), sync=True, in_place=True)
        assert sha(blockio.read_file_raw(str(a.target / "data.bin"), dev_a)) == sha(after)

        # a clone of the volume while it is mounted: its current data
        vol_c = n.create("dp-c", base, volume_id=vol_a.volume_id)
        c = n.stage_publish(vol_c, "c")
        dev_c = n.device(c, base)
        assert sha((c.target / "data.bin").read_bytes()) == sha(after)
        assert (c.target / "new.txt").read_text() == "written after the snapshot\n"
        assert sha(blockio.read_file_raw(str(c.target / "data.bin"), dev_c)) == sha(after)

        # online expansion of the mounted volume: the device grows live, then the filesystem
        grown = base * 3 // 2
        exp = d.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vol_a.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=grown),
                volume_capability=n.cap,
            ),
            timeout=T,
        )
        assert exp.capacity_bytes == grown and exp.node_expansion_required
        assert n.device(a, grown) == dev_a
        assert n.fs_bytes(a) == fs_a
        node_exp = d.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vol_a.volume_id,
                volume_path=str(a.target),
                staging_target_path=str(a.staging),
                capacity_range=csi_pb2.CapacityRange(required_bytes=grown),
                volume_capability=n.cap,
            ),
            timeout=T,
        )
        assert node_exp.capacity_bytes == grown
        fs_grown = n.fs_bytes(a)
        assert fs_grown - fs_a >= 0.9 * (grown - base), f"grown fs {fs_grown} bytes on {grown}, was {fs_a}"
        assert sha((a.target / "data.bin").read_bytes()) == sha(after)
        assert sha(blockio.read_file_raw(str(a.target / "data.bin"), dev_a)) == sha(after)
        _write(a.target / "more.bin", os.urandom(8 * MiB), sync=True)  # the new space is usable

        # tear down through the CSI API; nothing stays active or mounted, and the pool ends empty
        for p in (a, b, c):
            n.release(p)
        d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=T)
        for v in (vol_a, vol_b, vol_c):
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=T)
        assert not d.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=T).entries
        assert not d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=T).entries
        assert [x for x in _dm_names() if x.startswith(f"csi-thin-{pool.cfg.name}-")] == [
            pool.backend.pool_name
        ]
        assert pool.backend.device_ids(deadline=deadline_mod.Deadline.after(60)) == {}
        # `dmsetup status` (without --noflush) commits the pool first: every data block is free again
        [line] = sh(*DMS, "status", pool.backend.pool_name).splitlines()
        status = parse.parse_pool_status(line.split(maxsplit=3)[3])
        assert status.data_used_blocks == 0, f"{status.data_used_blocks} data blocks mapped after all deletes"
    conftest.report(f"data path {fs_type} on dm-thin (VM): ok in {time.monotonic() - t0:.1f}s")
