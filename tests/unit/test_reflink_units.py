"""Pure parts of csi_thin.pool.reflink: mountinfo parsing, device file names, ioctl numbers, config
checks. The steps themselves run on real loop devices in tests/root/test_reflink.py."""

from __future__ import annotations

import os
import pathlib

import pytest

from csi_thin import config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.pool import reflink


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """linux/ioctl.h _IOC: dir << 30 | size << 16 | type << 8 | nr."""
    return direction << 30 | size << 16 | kind << 8 | nr


def test_ioctl_numbers() -> None:
    write, read_write = 1, 3
    assert _ioc(write, 0x94, 9, 4) == reflink.FICLONE
    assert _ioc(read_write, ord("X"), 119, 4) == reflink.FIFREEZE
    assert _ioc(read_write, ord("X"), 120, 4) == reflink.FITHAW


MOUNTINFO = (
    "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "43 27 0:39 / /var/pool rw,relatime - btrfs /dev/loop0 rw,space_cache=v2\n"
    "50 22 7:3 / /mnt/with\\040space ro,noatime shared:7 master:2 - ext4 /dev/loop3 ro\n"
    "garbage line\n"
)


def test_parse_mountinfo() -> None:
    m = reflink.parse_mountinfo(MOUNTINFO)
    assert [x.mount_point for x in m] == ["/", "/var/pool", "/mnt/with space"]
    assert m[0].dev == os.makedev(252, 0) and m[0].fs_type == "ext4" and not m[0].read_only
    assert m[1].dev == os.makedev(0, 39) and m[1].source == "/dev/loop0" and m[1].fs_type == "btrfs"
    assert m[2].dev == os.makedev(7, 3) and m[2].read_only and m[2].source == "/dev/loop3"


@pytest.mark.parametrize(
    ("name", "dev_id"),
    [
        ("0.img", 0),
        ("7.img", 7),
        (f"{model.MAX_DEVICE_ID}.img", model.MAX_DEVICE_ID),
        (f"{model.MAX_DEVICE_ID + 1}.img", None),
        ("007.img", None),
        ("-1.img", None),
        ("7.img.bak", None),
        ("7", None),
        (".tmp-7-abcdef", None),
        ("\u0667.img", None),  # an Arabic-Indic digit is not an id
        ("transaction_id", None),
    ],
)
def test_device_file_id(name: str, dev_id: int | None) -> None:
    assert reflink.device_file_id(name) == dev_id


def _cfg(**kw: object) -> config.PoolConfig:
    rc = {"directory": "/var/lib/csi-thin/pool", **kw}
    return config.PoolConfig(
        name="p",
        backend=config.BackendKind.REFLINK,
        state_dir="/var/lib/csi-thin",
        reflink=config.ReflinkConfig(**rc),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"directory": "relative/pool"}, "must be absolute"),
        ({"directory": ""}, "needs a 'reflink' section"),
        ({"image_file": "pool.img", "image_size": model.GiB}, "must be absolute"),
        ({"image_file": "/p.img", "image_size": model.GiB, "fs_type": "ext4"}, "cannot reflink"),
        ({"block_size": 1000}, "multiple of 512"),
    ],
)
def test_config_refused(kw: dict[str, object], match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        reflink.ReflinkBackend(_cfg(**kw))


def test_steps_on_an_unassembled_pool_are_unavailable(tmp_path: pathlib.Path) -> None:
    be = reflink.ReflinkBackend(_cfg(directory=f"{tmp_path}/nowhere"))
    d = deadline_mod.Deadline.after(5)
    with pytest.raises(errors.Unavailable, match="not assembled"):
        be.device_ids(deadline=d)
    with pytest.raises(errors.InvalidArgument):
        be.create_thin(-1, model.MiB, deadline=d)
    with pytest.raises(errors.InvalidArgument):
        be.create_thin(1, 0, deadline=d)
