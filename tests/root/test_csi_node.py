"""The CSI Node service for real, as root: the standalone driver over real gRPC on the reflink
backend (loop devices), with real mkfs, mounts and bind mounts. Every call is retried to prove it
idempotent."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat
import subprocess
import threading
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import deadline, errors, model, runner
from csi_thin.csi.pb import csi_pb2
from csi_thin.node import filesystem, mountinfo
from csi_thin.pool import reflink
from tests import csi_harness as h

S = grpc.StatusCode
MiB = h.MiB
Mode = h.Mode


class Node:
    """The driver plus helpers that retry every node call."""

    def __init__(self, d: h.Driver, workdir: pathlib.Path) -> None:
        self.d = d
        self.workdir = workdir

    def create(self, name: str, size: int, cap: csi_pb2.VolumeCapability, **kw: object) -> csi_pb2.Volume:
        return self.d.controller.CreateVolume(h.create_req(name, size, cap=cap, **kw)).volume

    def stage(self, vol: csi_pb2.Volume, cap: csi_pb2.VolumeCapability, name: str | None = None) -> str:
        path = str(self.workdir / "staging" / (name or vol.volume_id))
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=path,
            volume_capability=cap,
            volume_context=vol.volume_context,
        )
        self.d.node.NodeStageVolume(req)
        self.d.node.NodeStageVolume(req)
        return path

    def publish(
        self,
        vol: csi_pb2.Volume,
        cap: csi_pb2.VolumeCapability,
        staging: str,
        target: str,
        *,
        readonly: bool = False,
    ) -> str:
        path = str(self.workdir / "pods" / target)
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=staging,
            target_path=path,
            volume_capability=cap,
            volume_context=vol.volume_context,
            readonly=readonly,
        )
        self.d.node.NodePublishVolume(req)
        self.d.node.NodePublishVolume(req)
        return path

    def unpublish(self, vol: csi_pb2.Volume, target: str) -> None:
        for _ in range(2):
            self.d.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
            )
        assert not os.path.exists(target) and mountinfo.at(target) is None

    def unstage(self, vol: csi_pb2.Volume, staging: str) -> None:
        for _ in range(2):
            self.d.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
            )
        assert mountinfo.at(staging) is None
        dev = self.d.engine.get(vol.volume_id)
        assert dev is not None and not dev.active

    def stats(self, vol: csi_pb2.Volume, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.d.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=path)
        )

    def health(
        self, vol: csi_pb2.Volume, *, staging: str = "", target: str = ""
    ) -> list[tuple[int, str, str]]:
        """NodeGetVolumeHealth's entries as (status, reason, message)."""
        got = self.d.node.NodeGetVolumeHealth(
            csi_pb2.NodeGetVolumeHealthRequest(
                volume_id=vol.volume_id, staging_target_path=staging, volume_publish_path=target
            )
        ).volume_health
        assert got.volume_id == vol.volume_id
        return [(e.status, e.reason, e.message) for e in got.health_statuses]


def _cleanup_mounts(workdir: pathlib.Path, keep: str) -> None:
    """Unmount whatever a failed test left under workdir (deepest first), except the pool itself."""
    mounts = [m.mount_point for m in mountinfo.read() if m.mount_point.startswith(str(workdir) + "/")]
    for mp in sorted(set(mounts), key=len, reverse=True):
        if mp != keep:
            subprocess.run(["umount", "-l", mp], check=False)


@contextlib.contextmanager
def reflink_driver(workdir: pathlib.Path, **kw: object) -> Iterator[h.Driver]:
    cfg = h.reflink_config(workdir)
    backend = reflink.ReflinkBackend(cfg)
    with h.serve(workdir, backend, **kw) as d:  # type: ignore[arg-type]
        yield d


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Iterator[Node]:
    cfg = h.reflink_config(tmp_path)
    try:
        with reflink_driver(tmp_path) as d:
            yield Node(d, tmp_path)
    finally:
        _cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def test_mount_volume_life_cycle_ext4(node: Node) -> None:
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    staged = mountinfo.at(staging)
    assert staged is not None and staged.fs_type == "ext4"
    target = node.publish(vol, cap, staging, "pod-a/volume")
    _write(f"{target}/hello", "world")
    ro = node.publish(vol, cap, staging, "pod-b/volume", readonly=True)
    assert pathlib.Path(f"{ro}/hello").read_text() == "world"
    with pytest.raises(OSError) as exc:
        _write(f"{ro}/nope", "x")
    assert exc.value.errno == errno.EROFS

    st = node.stats(vol, target)
    by_unit = {u.unit: u for u in st.usage}
    assert 50 * MiB < by_unit[csi_pb2.VolumeUsage.BYTES].total <= 64 * MiB
    assert by_unit[csi_pb2.VolumeUsage.BYTES].used > 0
    assert by_unit[csi_pb2.VolumeUsage.INODES].used > 0
    assert node.health(vol, staging=staging, target=target) == []
    assert node.health(vol, staging=staging, target=ro) == []

    # a different read-only mode at a published target, another volume at a staging path: conflicts
    other = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=staging,
        target_path=ro,
        volume_capability=cap,
        readonly=False,
    )
    assert h.code_of(lambda: node.d.node.NodePublishVolume(other)) == S.ALREADY_EXISTS
    vol_b = node.create("pvc-b", 64 * MiB, cap)
    steal = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol_b.volume_id, staging_target_path=staging, volume_capability=cap
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(steal)) == S.ALREADY_EXISTS

    node.unpublish(vol, ro)
    node.unpublish(vol, target)
    # a path where the volume is no longer: inaccessible there (the CO asks where it published)
    assert [r[:2] for r in node.health(vol, staging=staging, target=target)] == [
        (csi_pb2.INACCESSIBLE, "NotPublished")
    ]
    node.unstage(vol, staging)
    assert [r[:2] for r in node.health(vol, staging=staging)] == [(csi_pb2.INACCESSIBLE, "NotStaged")]
    assert node.health(vol) == []  # unstaged is no issue in itself
    # the data survives: staged again, nothing is reformatted
    staging = node.stage(vol, cap)
    assert pathlib.Path(f"{staging}/hello").read_text() == "world"
    node.unstage(vol, staging)
    for v in (vol, vol_b):
        node.d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))


def test_xfs_is_mounted_nouuid_and_grows_online(node: Node) -> None:
    cap = h.mount_cap("xfs")
    vol = node.create("pvc-x", 320 * MiB, cap)
    assert vol.volume_context["csi-thin.io/fs-type"] == "xfs"
    # the recorded fs type is used when the stage request leaves it out
    staging = node.stage(vol, h.mount_cap())
    staged = mountinfo.at(staging)
    assert staged is not None and staged.fs_type == "xfs"
    target = node.publish(vol, h.mount_cap(), staging, "pod/volume")
    before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    grown = node.d.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=640 * MiB)
        )
    )
    assert grown.capacity_bytes == 640 * MiB and grown.node_expansion_required
    expand = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=target, staging_target_path=staging
    )
    for _ in range(2):
        assert node.d.node.NodeExpandVolume(expand).capacity_bytes == 640 * MiB
    after = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assert after > before + 250 * MiB
    # a second xfs with the same uuid (a restored snapshot) mounts beside the original thanks to nouuid
    snap = node.d.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="sx", source_volume_id=vol.volume_id)
    )
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot.snapshot_id)
    )
    copy = node.create("pvc-x2", 640 * MiB, cap, volume_content_source=src)
    staging2 = node.stage(copy, cap)
    assert mountinfo.at(staging2) is not None
    node.unstage(copy, staging2)
    node.unpublish(vol, target)
    node.unstage(vol, staging)


def test_restore_into_a_larger_volume_keeps_the_data_and_grows_the_filesystem(node: Node) -> None:
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    _write(f"{staging}/data", "payload")
    snap = node.d.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=vol.volume_id)
    )
    node.unstage(vol, staging)
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot.snapshot_id)
    )
    big = node.create("pvc-big", 256 * MiB, cap, volume_content_source=src)
    staging_big = node.stage(big, cap)
    assert pathlib.Path(f"{staging_big}/data").read_text() == "payload"
    total = os.statvfs(staging_big).f_blocks * os.statvfs(staging_big).f_frsize
    assert total > 200 * MiB
    node.unstage(big, staging_big)


def test_a_device_with_data_is_never_reformatted(node: Node) -> None:
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    _write(f"{staging}/keep", "me")
    node.unstage(vol, staging)
    wrong = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=h.mount_cap("xfs")
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(wrong)) == S.FAILED_PRECONDITION
    assert mountinfo.at(staging) is None
    staging = node.stage(vol, cap)
    assert pathlib.Path(f"{staging}/keep").read_text() == "me"
    node.unstage(vol, staging)


def test_unknown_data_without_a_filesystem_is_not_formatted(node: Node) -> None:
    blk = h.block_cap()
    vol = node.create("pvc-raw", 64 * MiB, blk)
    staging = node.stage(vol, blk)
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.path
    with open(dev.path, "r+b") as f:
        f.seek(4096)
        f.write(b"application data, no filesystem signature")
    node.unstage(vol, staging)
    as_mount = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=h.mount_cap()
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(as_mount)) == S.FAILED_PRECONDITION
    node.d.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
    )


def test_block_volume_life_cycle(node: Node) -> None:
    cap = h.block_cap()
    vol = node.create("pvc-blk", 64 * MiB, cap)
    assert vol.volume_context["csi-thin.io/access-type"] == "block"
    staging = node.stage(vol, cap)
    target = node.publish(vol, cap, staging, "pod/dev/blk")
    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode)
    with open(target, "r+b") as f:
        f.write(b"raw bytes")
    stats = node.stats(vol, target)
    assert stats.usage[0].total == 64 * MiB
    # the target is a bind of the device node; a block volume's staging path holds nothing
    assert node.health(vol, staging=staging, target=target) == []
    assert [r[:2] for r in node.health(vol, target=staging)] == [(csi_pb2.INACCESSIBLE, "NotPublished")]
    grown = node.d.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB),
            volume_capability=cap,
        )
    )
    # kubelet calls NodeExpandVolume only when asked: it refreshes the read-only views' size
    assert grown.node_expansion_required
    expand = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=target, volume_capability=cap
    )
    assert node.d.node.NodeExpandVolume(expand).capacity_bytes == 128 * MiB
    node.unpublish(vol, target)
    node.unstage(vol, staging)


def test_missing_volume_and_unstaged_paths(node: Node) -> None:
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    missing = str(node.workdir / "nowhere")
    assert h.code_of(lambda: node.stats(vol, missing)) == S.NOT_FOUND
    ghost = csi_pb2.Volume(volume_id="v-ghost")
    assert h.code_of(lambda: node.stats(ghost, str(node.workdir))) == S.NOT_FOUND
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id="v-ghost", staging_target_path=str(node.workdir / "s"), volume_capability=cap
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(stage)) == S.NOT_FOUND
    publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=str(node.workdir / "not-staged"),
        target_path=str(node.workdir / "t"),
        volume_capability=cap,
    )
    assert h.code_of(lambda: node.d.node.NodePublishVolume(publish)) == S.FAILED_PRECONDITION
    # unpublishing and unstaging a volume (even one that does not exist) where it is not is done
    for volume_id in (vol.volume_id, "v-ghost"):
        node.d.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=missing)
        )
        node.d.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=missing)
        )


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_a_single_writer_volume_is_published_at_one_target_at_a_time(node: Node, block: bool) -> None:
    """CSI: SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod) is published once; a publish at another
    target path is FAILED_PRECONDITION and changes nothing. A repeated publish at the same path
    still succeeds, and once unpublished it can go elsewhere. SINGLE_NODE_WRITER has no such limit."""
    cap = (h.block_cap if block else h.mount_cap)(mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    vol = node.create("pvc-once", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    first = node.publish(vol, cap, staging, "pod-a/volume")  # publishes twice: idempotent
    second = str(node.workdir / "pods" / "pod-b" / "volume")
    again = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=staging,
        target_path=second,
        volume_capability=cap,
        volume_context=vol.volume_context,
    )
    with pytest.raises(grpc.RpcError) as exc:
        node.d.node.NodePublishVolume(again)
    assert exc.value.code() == S.FAILED_PRECONDITION and first in (exc.value.details() or "")
    assert mountinfo.at(second) is None and not os.path.exists(second)
    node.unpublish(vol, first)
    moved = node.publish(vol, cap, staging, "pod-b/volume")
    assert moved == second
    # the same volume as SINGLE_NODE_WRITER: a second publish is fine
    shared = (h.block_cap if block else h.mount_cap)(mode=Mode.SINGLE_NODE_WRITER)
    other = node.publish(vol, shared, staging, "pod-c/volume")
    node.unpublish(vol, other)
    node.unpublish(vol, moved)
    node.unstage(vol, staging)


def test_node_capabilities_and_info(node: Node) -> None:
    caps = {
        c.rpc.type for c in node.d.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    }
    rpc = csi_pb2.NodeServiceCapability.RPC
    assert {
        rpc.STAGE_UNSTAGE_VOLUME,
        rpc.GET_VOLUME_STATS,
        rpc.EXPAND_VOLUME,
        rpc.GET_VOLUME_HEALTH,
        rpc.GET_STORAGE_HEALTH,
    } <= caps


def test_pool_above_threshold_existing_volumes_keep_working(tmp_path: pathlib.Path) -> None:
    cfg = h.reflink_config(tmp_path)
    try:
        cap = h.mount_cap()
        with reflink_driver(tmp_path) as d:
            n = Node(d, tmp_path)
            vol = n.create("pvc-a", 64 * MiB, cap)
            staging = n.stage(vol, cap)
            target = n.publish(vol, cap, staging, "pod/volume")
        # the driver restarts with a threshold the pool is already above
        with reflink_driver(tmp_path, thresholds=model.Thresholds(data=0.0001, metadata=0.0001)) as d:
            n = Node(d, tmp_path)
            assert h.code_of(lambda: n.create("pvc-b", 64 * MiB, cap)) == S.RESOURCE_EXHAUSTED
            snap = csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)
            assert h.code_of(lambda: d.controller.CreateSnapshot(snap)) == S.RESOURCE_EXHAUSTED
            _write(f"{target}/still", "writable")
            reasons = {r[1] for r in n.health(vol, staging=staging, target=target)}
            assert "DataAboveThreshold" in reasons and "NotPublished" not in reasons
            storage = d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
            assert "DataAboveThreshold" in {b.reason for b in storage}
            assert all(b.status == csi_pb2.STORAGE_DEGRADED for b in storage)
            n.unpublish(vol, target)
            n.unstage(vol, staging)
            staging = n.stage(vol, cap)  # staging an existing volume still works
            assert pathlib.Path(f"{staging}/still").read_text() == "writable"
            n.unstage(vol, staging)
            d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        _cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def test_ext4_grows_online_or_at_the_next_stage(node: Node) -> None:
    """Online ext4 growth needs CAP_SYS_RESOURCE (this host's container drops it): without it the
    node says FAILED_PRECONDITION, and the next stage grows the filesystem offline."""
    cap = h.mount_cap()
    vol = node.create("pvc-e", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    target = node.publish(vol, cap, staging, "pod/volume")
    node.d.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=256 * MiB)
        )
    )
    expand = csi_pb2.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=target)
    if filesystem.has_capability(filesystem.CAP_SYS_RESOURCE):
        assert node.d.node.NodeExpandVolume(expand).capacity_bytes == 256 * MiB
        assert os.statvfs(target).f_blocks * os.statvfs(target).f_frsize > 200 * MiB
        node.unpublish(vol, target)
    else:
        assert h.code_of(lambda: node.d.node.NodeExpandVolume(expand)) == S.FAILED_PRECONDITION
        node.unpublish(vol, target)
        node.unstage(vol, staging)
        staging = node.stage(vol, cap)
        assert os.statvfs(staging).f_blocks * os.statvfs(staging).f_frsize > 200 * MiB
    node.unstage(vol, staging)


def test_a_second_call_on_a_volume_being_staged_is_aborted(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = str(node.workdir / "staging" / "a")
    entered, release = threading.Event(), threading.Event()
    real_make = filesystem.make
    calls: list[str] = []

    def slow_make(device: str, fs_type: str, *, deadline: deadline.Deadline) -> None:
        calls.append(device)
        entered.set()
        assert release.wait(30)
        real_make(device, fs_type, deadline=deadline)

    monkeypatch.setattr(filesystem, "make", slow_make)
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap
    )
    codes: list[grpc.StatusCode] = []
    t = threading.Thread(target=lambda: codes.append(h.code_of(lambda: node.d.node.NodeStageVolume(req))))
    t.start()
    assert entered.wait(10)
    assert h.code_of(lambda: node.d.node.NodeStageVolume(req)) == S.ABORTED
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
    assert h.code_of(lambda: node.d.node.NodeUnstageVolume(unstage)) == S.ABORTED
    release.set()
    t.join(30)
    assert codes == [S.OK] and len(calls) == 1
    node.d.node.NodeStageVolume(req)  # the retry finds the work done
    assert len(calls) == 1
    node.unstage(vol, staging)


def test_unpublish_and_unstage_never_unmount_another_volume(node: Node) -> None:
    """A call naming volume A at a path where volume B is mounted must leave B alone."""
    cap = h.mount_cap()
    a = node.create("pvc-a", 64 * MiB, cap)
    b = node.create("pvc-b", 64 * MiB, cap)
    staging_a = node.stage(a, cap)
    staging_b = node.stage(b, cap)
    target_b = node.publish(b, cap, staging_b, "pod-b/volume")
    wrong_unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=target_b)
    assert h.code_of(lambda: node.d.node.NodeUnpublishVolume(wrong_unpublish)) == S.FAILED_PRECONDITION
    assert mountinfo.at(target_b) is not None
    wrong_unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=a.volume_id, staging_target_path=staging_b)
    assert h.code_of(lambda: node.d.node.NodeUnstageVolume(wrong_unstage)) == S.FAILED_PRECONDITION
    assert mountinfo.at(staging_b) is not None
    # a path holding something that is not a volume of ours is not ours to unmount either
    other = node.workdir / "pods" / "other"
    other.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        foreign = csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=str(other))
        assert h.code_of(lambda: node.d.node.NodeUnpublishVolume(foreign)) == S.FAILED_PRECONDITION
        assert mountinfo.at(str(other)) is not None
    finally:
        subprocess.run(["umount", str(other)], check=True)
    node.unpublish(b, target_b)
    node.unstage(b, staging_b)
    node.unstage(a, staging_a)


def test_paths_under_a_symlinked_directory_stay_idempotent(node: Node) -> None:
    """kubelet's root dir is often a symlink (/var/lib/kubelet -> /data/kubelet); mountinfo shows
    the resolved path, so a node that compares the literal path never sees its own mounts."""
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    real = node.workdir / "real-kubelet"
    real.mkdir()
    link = node.workdir / "kubelet"
    link.symlink_to(real)
    staging = str(link / "staging")
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap
    )
    node.d.node.NodeStageVolume(stage)
    node.d.node.NodeStageVolume(stage)
    assert len([m for m in mountinfo.read() if m.mount_point == str(real / "staging")]) == 1
    target = str(link / "pod" / "volume")
    publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
    )
    node.d.node.NodePublishVolume(publish)
    node.d.node.NodePublishVolume(publish)
    assert len([m for m in mountinfo.read() if m.mount_point == str(real / "pod" / "volume")]) == 1
    # health resolves a symlinked parent as every other call does
    assert node.health(vol, staging=staging, target=target) == []
    node.unpublish(vol, target)
    assert mountinfo.at(str(real / "pod" / "volume")) is None
    node.unstage(vol, staging)
    assert mountinfo.at(str(real / "staging")) is None


def test_a_target_that_is_a_symlink_is_refused(node: Node) -> None:
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    outside = node.workdir / "outside"
    outside.mkdir()
    (node.workdir / "pods").mkdir()
    target = node.workdir / "pods" / "volume"
    target.symlink_to(outside)
    publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, target_path=str(target), volume_capability=cap
    )
    assert h.code_of(lambda: node.d.node.NodePublishVolume(publish)) == S.INVALID_ARGUMENT
    assert mountinfo.at(str(outside)) is None
    blk_target = node.workdir / "pods" / "blk"
    (node.workdir / "outside-file").write_text("keep")
    blk_target.symlink_to(node.workdir / "outside-file")
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(blk_target))
    assert h.code_of(lambda: node.d.node.NodeUnpublishVolume(unpublish)) == S.INVALID_ARGUMENT
    assert (node.workdir / "outside-file").read_text() == "keep"
    node.unstage(vol, staging)


def test_restage_with_another_fs_type_or_access_mode_is_refused(node: Node) -> None:
    """Another access mode at the staging path is an incompatible stage (ALREADY_EXISTS); another
    filesystem type is one the volume does not have at all (FAILED_PRECONDITION: its record says)."""
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    for other, code in (
        (h.mount_cap("xfs"), S.FAILED_PRECONDITION),
        (h.mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY), S.ALREADY_EXISTS),
    ):
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, volume_capability=other
        )
        assert h.code_of(lambda req=req: node.d.node.NodeStageVolume(req)) == code
    node.unstage(vol, staging)


def test_stats_of_another_volumes_block_device_is_not_found(node: Node) -> None:
    blk = h.block_cap()
    a = node.create("pvc-a", 64 * MiB, blk)
    b = node.create("pvc-b", 32 * MiB, blk)
    staging_a = node.stage(a, blk)
    staging_b = node.stage(b, blk)
    target_b = node.publish(b, blk, staging_b, "pod/dev/b")
    assert h.code_of(lambda: node.stats(a, target_b)) == S.NOT_FOUND
    node.unpublish(b, target_b)
    node.unstage(b, staging_b)
    node.unstage(a, staging_a)


@pytest.mark.parametrize("block", [False, True])
def test_unstage_of_a_volume_still_published_is_refused(node: Node, block: bool) -> None:
    """A block volume is published by binding its device node, which does not hold the device:
    unstaging under it would free the loop number for the next volume while the bind still points
    at it. A mount volume would lose its staging mount and then fail to deactivate anyway."""
    cap = h.block_cap() if block else h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    target = node.publish(vol, cap, staging, "pod/dev/a" if block else "pod/volume")
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
    assert h.code_of(lambda: node.d.node.NodeUnstageVolume(unstage)) == S.FAILED_PRECONDITION
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.active
    assert block or mountinfo.at(staging) is not None
    node.unpublish(vol, target)
    node.unstage(vol, staging)


def test_a_filesystem_shut_down_by_an_error_is_degraded_health(node: Node) -> None:
    """ext4 (errors=remount-ro) stops writing after an error; the volume's health must say so."""
    cap = h.mount_cap(flags=("errors=remount-ro",))
    vol = node.create("pvc-a", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    target = node.publish(vol, cap, staging, "pod/volume")
    assert node.health(vol, staging=staging, target=target) == []
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.path
    pathlib.Path(f"/sys/fs/ext4/{os.path.basename(dev.path)}/trigger_fs_error").write_text("1")
    ((status, reason, message),) = node.health(vol, staging=staging, target=target)  # once, not per path
    assert (status, reason) == (csi_pb2.DEGRADED, "FilesystemReadOnly") and "read-only" in message
    # the pool is fine: only the volume is
    assert not node.d.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest()).backend_health
    node.unpublish(vol, target)
    node.unstage(vol, staging)


def test_a_mkfs_killed_at_the_deadline_does_not_leave_the_volume_unformattable(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkfs killed part-way leaves no signature but a non-zero head: the next stage took that for
    unknown data and refused to format the (new, empty) volume forever."""
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    real_run = runner.run

    def killed_mkfs(argv: list[str], **kw: object) -> runner.Result:
        if argv[0].startswith("mkfs"):
            with open(argv[-1], "r+b") as f:  # what mkfs wrote before it was killed
                f.seek(4096)
                f.write(b"\x53\xef half a filesystem")
            raise errors.CommandTimeout(argv, 0.1)
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run", killed_mkfs)
    staging = str(node.workdir / "staging" / "a")
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(req)) == S.DEADLINE_EXCEEDED
    monkeypatch.undo()
    staging = node.stage(vol, cap, name="a")
    assert mountinfo.at(staging) is not None
    node.unstage(vol, staging)


def test_a_volume_in_use_elsewhere_is_not_staged_again(node: Node) -> None:
    """Without the volume context (which records the access type), a block volume published to a
    pod could be staged as a mount volume at another path: a blank one would be formatted under
    the pod that writes to it raw."""
    blk = h.block_cap()
    vol = node.create("pvc-raw", 64 * MiB, blk)
    staging = node.stage(vol, blk)
    target = node.publish(vol, blk, staging, "pod/dev/raw")
    as_mount = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=str(node.workdir / "staging" / "other"),
        volume_capability=h.mount_cap(),
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(as_mount)) == S.FAILED_PRECONDITION
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.path
    with open(dev.path, "rb") as f:
        assert not any(f.read(MiB))  # not formatted
    node.unpublish(vol, target)
    node.unstage(vol, staging)


def test_a_mount_volume_onto_a_file_is_a_clear_error(node: Node) -> None:
    """Staging or publishing a mount volume where a regular file stands is FAILED_PRECONDITION
    (the file is left alone), not an internal error."""
    cap = h.mount_cap()
    vol = node.create("pvc-file", 64 * MiB, cap)
    blocker = node.workdir / "pods" / "pod-f" / "volume"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    staging_file = node.workdir / "staging-file"
    staging_file.write_text("not a directory either")
    bad_stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=str(staging_file),
        volume_capability=cap,
        volume_context=vol.volume_context,
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(bad_stage)) == S.FAILED_PRECONDITION
    staging = node.stage(vol, cap)
    bad_publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=staging,
        target_path=str(blocker),
        volume_capability=cap,
        volume_context=vol.volume_context,
    )
    assert h.code_of(lambda: node.d.node.NodePublishVolume(bad_publish)) == S.FAILED_PRECONDITION
    assert blocker.read_text() == "not a directory" and staging_file.read_text() == "not a directory either"
    node.unstage(vol, staging)
    node.d.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
