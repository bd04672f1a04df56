"""Space given back to a reflink pool, natively: a staged filesystem trimmed by `csi-thin pool trim`
discards its free blocks, the buffered loop device under it punches holes in the volume's sparse
file, and the pool filesystem's used space falls by what the deleted file held."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
import yaml

from csi_thin import deadline, errors, model
from csi_thin.node import filesystem, mountinfo, trim
from csi_thin.pool import reflink
from tests import csi_harness as h
from tests import node_scenarios
from tests.root import test_csi_node as base


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_trim_gives_deleted_space_back(tmp_path: pathlib.Path, fs_type: str) -> None:
    raw = h.reflink_raw(tmp_path)
    config_file = tmp_path / "pool.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    cfg = h.reflink_config(tmp_path)
    try:
        node_scenarios.trim_gives_space_back(
            tmp_path, lambda: base.reflink_driver(tmp_path), config_file=config_file, fs_type=fs_type
        )
    finally:
        base._cleanup_mounts(tmp_path, keep=str(tmp_path / "pool"))
        reflink.ReflinkBackend(cfg).destroy(deadline=deadline.default())


def test_an_unmounted_staging_path_is_not_trimmed(tmp_path: pathlib.Path) -> None:
    """`csi-thin pool trim` runs in a process of its own, without the driver's per-volume claim: an
    unstage may unmount the staging path between the trim's look at mountinfo and its fstrim.
    fstrim by path then trims whatever filesystem holds the emptied directory (here the host's
    root filesystem, under /tmp). The trim pins the directory, checks it is the device's
    filesystem, and trims through that handle; a path that no longer holds it is left to the next
    run, like a volume being unstaged."""
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    staging = tmp_path / "staging"
    staging.mkdir()
    try:
        subprocess.run(["mount", loop, str(staging)], check=True)
        subprocess.run(["umount", str(staging)], check=True)  # the unstage, just after the look
        with pytest.raises(errors.OperationPending, match="no longer holds"):
            filesystem.trim(str(staging), loop, deadline=deadline.default())
    finally:
        subprocess.run(["umount", str(staging)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", loop], check=True)


def test_a_filesystem_gone_read_only_after_an_error_is_not_trimmed(tmp_path: pathlib.Path) -> None:
    """ext4 mounted errors=remount-ro hits an error (the kernel's own trigger): its mount still
    reads "rw" in mountinfo, only the superblock turns read-only, and fstrim would still discard
    by the bitmaps of a filesystem that just reported itself corrupt. The trim leaves it to fsck."""
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    staging = tmp_path / "staging"
    staging.mkdir()
    volume = model.Device(
        name="v1",
        dev_id=1,
        kind=model.DeviceKind.VOLUME,
        state=model.DeviceState.READY,
        size_bytes=64 * model.MiB,
        origin=None,
        created_at=0.0,
        active=True,
        path=loop,
    )
    try:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(staging)], check=True)
        assert [s.mount_point for s in trim.staged_filesystems([volume], mountinfo.read())] == [str(staging)]
        pathlib.Path(f"/sys/fs/ext4/{os.path.basename(loop)}/trigger_fs_error").write_text("1")
        broken = mountinfo.at(str(staging))
        assert broken is not None and not broken.read_only  # the mount still says rw
        assert trim.staged_filesystems([volume], mountinfo.read()) == []
    finally:
        subprocess.run(["umount", str(staging)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", loop], check=True)
