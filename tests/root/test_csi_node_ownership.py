"""The node touches only what is its own (issue 8 §2), over real gRPC on the reflink backend:
unpublish and unstage never remove what they did not make, a read-only block publish is really
read-only, the recorded volume attributes win over the caller's volume_context, and the files that
hold tenants' data are private to root."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import stat
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import deadline
from csi_thin.csi.pb import csi_pb2
from csi_thin.node import blockview, mountinfo
from csi_thin.pool import reflink
from tests import csi_harness as h
from tests import node_scenarios
from tests.root import test_csi_node as base

S = grpc.StatusCode
MiB = h.MiB


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Iterator[base.Node]:
    cfg = h.reflink_config(tmp_path)
    try:
        with base.reflink_driver(tmp_path) as d:
            yield base.Node(d, tmp_path)
    finally:
        base._cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        node_scenarios.drop_views_over(node_scenarios.loop_rdevs_under(tmp_path))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def _unpublish(node: base.Node, volume_id: str, target: pathlib.Path) -> grpc.StatusCode:
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    return h.code_of(lambda: node.d.node.NodeUnpublishVolume(req))


def test_unpublish_and_unstage_of_an_unknown_volume_touch_nothing(node: base.Node) -> None:
    """Reproduced: NodeUnpublishVolume of a volume id that does not exist deleted a regular file
    (or an empty directory) at the target path and answered OK. Nothing is touched now; with nothing
    mounted there the answer is still OK: kubelet retries a failed teardown forever, and a volume
    deleted while its node was down (device inactive after the reboot) would keep its pods' and its
    staging directories from ever being cleaned up (kubelet removes them itself after an OK)."""
    keep = node.workdir / "user" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("not the driver's")
    empty_file = node.workdir / "user" / "empty"
    empty_file.touch()
    empty_dir = node.workdir / "user" / "dir"
    empty_dir.mkdir()
    for target in (keep, empty_file, empty_dir, node.workdir / "user" / "missing"):
        assert _unpublish(node, "v-ghost", target) == S.OK
        unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id="v-ghost", staging_target_path=str(target))
        assert h.code_of(lambda unstage=unstage: node.d.node.NodeUnstageVolume(unstage)) == S.OK
    assert keep.read_text() == "not the driver's"
    assert empty_file.is_file() and empty_dir.is_dir()
    # something mounted there is not the unknown volume's: NOT_FOUND, and it stays mounted
    mounted = node.workdir / "user" / "mounted"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted)], check=True)
    try:
        assert _unpublish(node, "v-ghost", mounted) == S.NOT_FOUND
        unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id="v-ghost", staging_target_path=str(mounted))
        assert h.code_of(lambda: node.d.node.NodeUnstageVolume(unstage)) == S.NOT_FOUND
        assert mountinfo.at(str(mounted)) is not None
    finally:
        subprocess.run(["umount", str(mounted)], check=True)


def test_unpublish_removes_only_an_empty_target_it_could_have_made(node: base.Node) -> None:
    """For a known volume, unpublish removes an unmounted target only when it is what publish makes
    (an empty directory, an empty regular file); anything with content is left where it is."""
    cap = h.mount_cap()
    vol = node.create("pvc-a", 64 * MiB, cap)
    pods = node.workdir / "pods"
    full_file = pods / "a" / "volume"
    full_file.parent.mkdir(parents=True)
    full_file.write_text("someone's data")
    full_dir = pods / "b" / "volume"
    full_dir.mkdir(parents=True)
    (full_dir / "inside").write_text("someone's data")
    fifo = pods / "c" / "volume"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    for target in (full_file, full_dir, fifo):
        assert _unpublish(node, vol.volume_id, target) == S.OK
    assert full_file.read_text() == "someone's data"
    assert (full_dir / "inside").read_text() == "someone's data"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    made_dir, made_file = pods / "d" / "volume", pods / "e" / "dev"
    made_dir.mkdir(parents=True)
    made_file.parent.mkdir(parents=True)
    made_file.touch()
    for target in (made_dir, made_file):
        assert _unpublish(node, vol.volume_id, target) == S.OK
        assert not os.path.lexists(target)


def test_read_only_block_publish_is_read_only(tmp_path: pathlib.Path) -> None:
    """Reproduced: a `bind,ro` mount of a device node does not stop writes to the device."""
    cfg = h.reflink_config(tmp_path)
    try:
        node_scenarios.read_only_block_publish(tmp_path, lambda: base.reflink_driver(tmp_path))
    finally:
        base._cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        node_scenarios.drop_views_over(node_scenarios.loop_rdevs_under(tmp_path))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def test_a_block_volume_is_never_staged_or_published_as_a_mount(node: base.Node) -> None:
    """Reproduced: without volume_context a block volume staged as a mount volume got formatted.
    The recorded access type is the truth, whatever the request carries."""
    blk = h.block_cap()
    vol = node.create("pvc-raw", 64 * MiB, blk)
    staging = str(node.workdir / "staging" / "raw")
    for context in ({}, {"csi-thin.io/access-type": "mount", "csi-thin.io/fs-type": "ext4"}):
        as_mount = csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=staging,
            volume_capability=h.mount_cap(),
            volume_context=context,
        )
        assert h.code_of(lambda as_mount=as_mount: node.d.node.NodeStageVolume(as_mount)) == (
            S.FAILED_PRECONDITION
        )
    assert mountinfo.at(staging) is None
    staged = node.stage(vol, blk, name="raw")
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.path
    with open(dev.path, "rb") as f:
        assert not any(f.read(MiB))  # never formatted
    publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=staged,
        target_path=str(node.workdir / "pods" / "p" / "volume"),
        volume_capability=h.mount_cap(),
    )
    assert h.code_of(lambda: node.d.node.NodePublishVolume(publish)) == S.FAILED_PRECONDITION
    node.unstage(vol, staged)


def test_a_mount_volume_is_staged_with_its_recorded_filesystem(node: base.Node) -> None:
    """An xfs volume staged without volume_context is mounted as xfs (not formatted as ext4), and a
    context that names another filesystem than the record is refused."""
    vol = node.create("pvc-x", 320 * MiB, h.mount_cap("xfs"))
    staging = str(node.workdir / "staging" / "x")
    wrong = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id,
        staging_target_path=staging,
        volume_capability=h.mount_cap(),
        volume_context={"csi-thin.io/access-type": "mount", "csi-thin.io/fs-type": "ext4"},
    )
    assert h.code_of(lambda: node.d.node.NodeStageVolume(wrong)) == S.FAILED_PRECONDITION
    bare = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=h.mount_cap()
    )
    node.d.node.NodeStageVolume(bare)
    staged = mountinfo.at(staging)
    assert staged is not None and staged.fs_type == "xfs"
    node.unstage(vol, staging)


def _mode(path: pathlib.Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_holding_tenant_data_are_private(tmp_path: pathlib.Path) -> None:
    """Device files, the pool image, LMDB and the socket are 0600 and their folders 0700 whatever
    the umask; files an older version left readable are made private at start-up."""
    cfg = h.reflink_config(tmp_path)
    old = os.umask(0o022)
    try:
        with base.reflink_driver(tmp_path) as d:
            vol = d.controller.CreateVolume(h.create_req("pvc-a", 64 * MiB)).volume
            dev = d.engine.get(vol.volume_id)
            assert dev is not None
            devices = tmp_path / "pool" / "devices"
            files = [tmp_path / "pool.img", devices / f"{dev.dev_id}.img", d.socket]
            files += [p for p in (tmp_path / "state").iterdir() if p.is_file()]
            files += [p for p in (tmp_path / "state").rglob("*.mdb")]
            assert any(p.suffix == ".mdb" for p in files)
            assert {str(p): oct(_mode(p)) for p in files} == {str(p): "0o600" for p in files}
            assert _mode(devices) == 0o700 and _mode(tmp_path / "state") == 0o700
            with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
                s.connect(str(d.socket))  # still served
        # an older version's files: readable by everyone; the next start makes them private
        for p in (tmp_path / "pool.img", devices, devices / f"{dev.dev_id}.img"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        for p in (tmp_path / "state").rglob("*.mdb"):
            os.chmod(p, 0o644)
        os.chmod(tmp_path / "state", 0o755)
        with base.reflink_driver(tmp_path):
            assert _mode(devices) == 0o700 and _mode(tmp_path / "state") == 0o700
            for p in [
                tmp_path / "pool.img",
                devices / f"{dev.dev_id}.img",
                *(tmp_path / "state").rglob("*.mdb"),
            ]:
                assert _mode(p) == 0o600, p
    finally:
        os.umask(old)
        base._cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def test_a_view_left_by_a_publish_that_died_before_its_bind(node: base.Node) -> None:
    """A crash between making the read-only view and binding it: the retried publish reuses the
    view (no second one), and an unpublish instead of the retry removes it."""
    blk = h.block_cap()
    vol = node.create("pvc-crash", 64 * MiB, blk)
    staging = node.stage(vol, blk)
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.path
    rdev = os.stat(dev.path).st_rdev
    retried, abandoned = (str(node.workdir / "pods" / p / "dev") for p in ("retried", "abandoned"))
    for target in (retried, abandoned):  # what the dead publish had done
        pathlib.Path(target).parent.mkdir(parents=True)
        blockview.open_view(dev.path, blockview.label(vol.volume_id, target))
    assert len(node_scenarios.loops_over(rdev)) == 2
    node.publish(vol, blk, staging, "retried/dev", readonly=True)
    assert len(node_scenarios.loops_over(rdev)) == 2
    assert node_scenarios.write_errno(retried) != 0
    assert _unpublish(node, vol.volume_id, pathlib.Path(abandoned)) == S.OK
    assert len(node_scenarios.loops_over(rdev)) == 1
    node.unpublish(vol, retried)
    assert node_scenarios.loops_over(rdev) == []
    node.unstage(vol, staging)


def test_a_read_only_view_still_held_open_after_unpublish_is_never_published_again(node: base.Node) -> None:
    """Reproduced: unpublish of a read-only block target whose view a process still held open left
    the view detaching (the kernel detaches it when that process closes it); publishing the same
    target again reused that dying view, so the new publish went dead (ENXIO) the moment the holder
    closed, and its loop number was free for any other attach while still bound at the target."""
    cap = h.block_cap()
    vol = node.create("pvc-held", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    target = node.publish(vol, cap, staging, "held/dev", readonly=True)
    dev = node.d.engine.get(vol.volume_id)
    assert dev is not None and dev.path
    view = blockview.views_of(dev.path)
    assert len(view) == 1
    holder = os.open(view[0].path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        node.unpublish(vol, target)
        assert not os.path.lexists(target)
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=staging,
            target_path=target,
            volume_capability=cap,
            readonly=True,
        )
        assert h.code_of(lambda: node.d.node.NodePublishVolume(req)) == S.FAILED_PRECONDITION
        assert mountinfo.at(target) is None
    finally:
        os.close(holder)
    # the holder gone, the view is gone with it: the same target publishes again on a fresh view
    assert blockview.views_of(dev.path) == []
    node.d.node.NodePublishVolume(req)
    with open(target, "rb") as f:
        assert len(f.read(4096)) == 4096
    node.unpublish(vol, target)
    node.unstage(vol, staging)


def test_a_read_only_view_still_bound_elsewhere_is_not_detached(node: base.Node) -> None:
    """Reproduced: unpublish detached a read-only view while its node was still bound at another
    path (kubelet binds each publish again under its global map path): that bind was left naming a
    free loop number, which the next attach anywhere (another volume's view) takes over. The
    exclusive open that guards the detach does not see binds of a device node."""
    cap = h.block_cap()
    vol = node.create("pvc-rebound", 64 * MiB, cap)
    staging = node.stage(vol, cap)
    target = node.publish(vol, cap, staging, "rebound/dev", readonly=True)
    elsewhere = node.workdir / "global" / "dev"
    elsewhere.parent.mkdir()
    elsewhere.touch()
    subprocess.run(["mount", "--bind", target, str(elsewhere)], check=True)
    try:
        for _ in range(2):  # the target itself is unmounted; its view stays while bound elsewhere
            assert _unpublish(node, vol.volume_id, pathlib.Path(target)) == S.FAILED_PRECONDITION
            assert mountinfo.at(target) is None
            with open(elsewhere, "rb") as f:
                assert len(f.read(4096)) == 4096
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    node.unpublish(vol, target)
    assert not os.path.lexists(target)
    node.unstage(vol, staging)
