"""/proc/self/mountinfo parsing."""

from __future__ import annotations

import os
import pathlib

import pytest

from csi_thin.node import filesystem, mountinfo

SAMPLE = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
101 22 7:3 / /var/lib/kubelet/plugins/csi-thin/staging/v-pvc-1 rw,relatime shared:40 - ext4 /dev/loop3 rw
102 22 7:3 / /var/lib/kubelet/pods/p/volumes/mount rw,relatime shared:40 - ext4 /dev/loop3 rw
103 22 7:3 / /var/lib/kubelet/pods/p/volumes/ro ro,relatime - ext4 /dev/loop3 rw
104 22 0:5 /loop4 /var/lib/kubelet/pods/p/volumeDevices/dev rw,nosuid master:2 - devtmpfs udev rw,size=1k
105 22 7:5 / /mnt/with\\040space\\011tab rw - xfs /dev/loop5 rw,nouuid
106 22 7:5 /sub/dir /mnt/bind\\134slash rw - xfs /dev/loop5 rw
"""


def test_parse_sample() -> None:
    mounts = mountinfo.parse(SAMPLE)
    assert len(mounts) == 8
    root = mounts[0]
    assert (root.mount_id, root.parent_id, root.major, root.minor) == (22, 1, 253, 1)
    assert (root.mount_point, root.fs_type, root.source) == ("/", "ext4", "/dev/vda1")
    assert root.dev == os.makedev(253, 1)
    assert "errors=remount-ro" in root.super_options


def test_optional_fields_and_read_only() -> None:
    mounts = mountinfo.parse(SAMPLE)
    assert mounts[2].fs_type == "ext4" and not mounts[2].read_only
    assert mounts[4].read_only
    assert mounts[5].fs_type == "devtmpfs" and mounts[5].root == "/loop4"


def test_escapes() -> None:
    mounts = mountinfo.parse(SAMPLE)
    assert mounts[6].mount_point == "/mnt/with space\ttab"
    assert mounts[7].mount_point == "/mnt/bind\\slash" and mounts[7].root == "/sub/dir"


def test_no_optional_fields_and_no_super_options() -> None:
    m = mountinfo.parse_line("1 0 8:1 / /x rw - tmpfs none")
    assert m.fs_type == "tmpfs" and m.source == "none" and m.super_options == frozenset()


def test_at_returns_the_top_of_a_stack() -> None:
    text = SAMPLE + "200 101 7:9 / /var/lib/kubelet/plugins/csi-thin/staging/v-pvc-1 rw - xfs /dev/loop9 rw\n"
    top = mountinfo.at("/var/lib/kubelet/plugins/csi-thin/staging/v-pvc-1", mountinfo.parse(text))
    assert top is not None and top.source == "/dev/loop9"
    assert mountinfo.at("/nowhere", mountinfo.parse(text)) is None


@pytest.mark.parametrize(
    "line",
    ["", "garbage", "1 0 8:1 / /x rw tmpfs none", "a b 8:1 / /x rw - tmpfs none", "1 0 81 / /x rw - t s"],
)
def test_malformed(line: str) -> None:
    with pytest.raises(ValueError, match="mountinfo"):
        mountinfo.parse_line(line)


def test_reads_this_process() -> None:
    mounts = mountinfo.read()
    assert any(m.mount_point == "/" for m in mounts)


def test_has_capability(tmp_path: pathlib.Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")
    assert filesystem.has_capability(21, str(status))  # CAP_SYS_ADMIN
    assert not filesystem.has_capability(filesystem.CAP_SYS_RESOURCE, str(status))
    status.write_text("CapEff:\t000001ffffffffff\n")
    assert filesystem.has_capability(filesystem.CAP_SYS_RESOURCE, str(status))
