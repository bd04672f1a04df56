"""Pure parts of the dm-thin backend and thin tools: metadata sizing, names, thin_ls parsing."""

from __future__ import annotations

import errno

import pytest

from csi_thin import config, errors, model
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import thintools
from csi_thin.pool import dmthin

MiB, GiB, KiB = model.MiB, model.GiB, model.KiB


@pytest.mark.parametrize(
    ("data_size", "block_size", "expected"),
    [
        (256 * MiB, 64 * KiB, 2 * MiB),  # the floor
        (1 * GiB, 64 * KiB, 3 * MiB),  # 4 x 48 B x 16384 blocks = 3 MiB
        (100 * GiB, 64 * KiB, 300 * MiB),
        (100 * GiB, 1 * MiB, 19 * MiB),  # 18.75 MiB rounded up
        (1024 * 1024 * GiB, 64 * KiB, 16 * GiB),  # the ceiling dm-thin can use
    ],
)
def test_metadata_size_for(data_size: int, block_size: int, expected: int) -> None:
    assert dmthin.metadata_size_for(data_size, block_size) == expected


def _cfg(name: str = "fast") -> config.PoolConfig:
    return config.PoolConfig(
        name=name,
        backend=config.BackendKind.DMTHIN,
        state_dir="/var/lib/csi-thin",
        dmthin=config.DmThinConfig(data_file="/var/lib/csi-thin/data.img", data_size=GiB),
    )


def test_names_need_no_device_mapper() -> None:
    be = dmthin.DmThinBackend(_cfg())
    assert be.kind == "dmthin"
    assert be.pool_name == "csi-thin-fast-pool"
    assert be.pool_path == "/dev/mapper/csi-thin-fast-pool"
    assert be.device_path(42) == "/dev/mapper/csi-thin-fast-42"
    with pytest.raises(errors.InvalidArgument):
        be.device_path(model.MAX_DEVICE_ID + 1)


def test_needs_a_dmthin_section() -> None:
    with pytest.raises(errors.InvalidArgument):
        dmthin.DmThinBackend(config.PoolConfig(name="x", backend=config.BackendKind.DMTHIN, state_dir="/s"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("0 0\n", {0: 0}),
        ("1      65536\n7   1048576\n16777215 0\n", {1: 65536, 7: 1048576, 16777215: 0}),
    ],
)
def test_parse_thin_ls(text: str, expected: dict[int, int]) -> None:
    assert thintools.parse_ls(text) == expected


@pytest.mark.parametrize("text", ["DEV MAPPED_BYTES\n", "1 64KiB\n", "1\n"])
def test_parse_thin_ls_rejects(text: str) -> None:
    with pytest.raises(dm_errors.DmError):
        thintools.parse_ls(text)


def test_errno_mapping() -> None:
    assert isinstance(dm_errors.from_errno(errno.ENXIO, "x"), errors.NotFound)
    assert isinstance(dm_errors.from_errno(errno.ENODATA, "x"), dm_errors.DeviceNotFound)
    assert isinstance(dm_errors.from_errno(errno.EEXIST, "x"), dm_errors.DeviceExists)
    assert isinstance(dm_errors.from_errno(errno.EBUSY, "x", create=True), dm_errors.DeviceExists)
    assert isinstance(dm_errors.from_errno(errno.EBUSY, "x"), dm_errors.DeviceBusy)
    assert isinstance(dm_errors.from_errno(errno.ENOSPC, "x"), errors.ResourceExhausted)
    assert isinstance(dm_errors.from_errno(errno.EINVAL, "x"), dm_errors.DmInvalidArgument)
    other = dm_errors.from_errno(errno.EPERM, "x")
    assert isinstance(other, dm_errors.DmError)
    assert other.errno == errno.EPERM
    assert isinstance(other, errors.Internal)
