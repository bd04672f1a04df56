"""csi_thin.dm.ioctl on real device-mapper (vm tier): every command, node handling, error mapping."""

from __future__ import annotations

import errno
import os
import pathlib
import stat
import uuid as uuid_mod
from collections.abc import Iterator

import pytest

from csi_thin import errors
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import ioctl, loop, parse

MiB = 1024 * 1024
SCRATCH = pathlib.Path("/scratch")


@pytest.fixture
def ctl() -> Iterator[ioctl.Control]:
    with ioctl.Control() as c:
        yield c


@pytest.fixture
def names(ctl: ioctl.Control) -> Iterator[list[str]]:
    """Devices a test created, removed afterwards in reverse order (the pool last)."""
    created: list[str] = []
    yield created
    for name in reversed(created):
        if ctl.info(name) is not None:
            info = ctl.info(name)
            if info is not None and info.suspended:
                ctl.resume(name)
            ctl.remove(name)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid_mod.uuid4().hex[:8]}"


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def test_version(ctl: ioctl.Control) -> None:
    major, minor, _patch = ctl.version()
    assert major == 4
    assert minor >= 27  # any kernel with LOOP_CONFIGURE has a newer dm


def test_create_load_resume_table_status_remove(ctl: ioctl.Control, names: list[str]) -> None:
    name = _unique("ioctl-zero")
    info = ctl.create(name, uuid=f"CSI-THIN-TEST-{name}")
    names.append(name)
    assert info.name == name
    assert info.uuid == f"CSI-THIN-TEST-{name}"
    assert not info.live_table
    assert not info.inactive_table
    st = os.stat(info.path)
    assert stat.S_ISBLK(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (info.major, info.minor)

    ctl.load(name, [ioctl.Target(0, 2048, "zero", "")])
    got = ctl.info(name)
    assert got is not None
    assert got.inactive_table
    assert not got.live_table

    resumed = ctl.resume(name)
    assert resumed.live_table
    assert not resumed.inactive_table
    assert not resumed.suspended
    assert _size(info.path) == MiB
    assert ctl.table(name) == [ioctl.Target(0, 2048, "zero", "")]
    assert ctl.status(name) == [ioctl.Target(0, 2048, "zero", "")]
    assert name in {d.name for d in ctl.list_devices()}

    ctl.suspend(name)
    got = ctl.info(name)
    assert got is not None
    assert got.suspended
    # a reload while suspended goes live on resume: the device grows
    ctl.load(name, [ioctl.Target(0, 4096, "zero", "")])
    assert ctl.table(name, inactive=True) == [ioctl.Target(0, 4096, "zero", "")]
    ctl.resume(name)
    assert _size(info.path) == 2 * MiB

    ctl.remove(name)
    names.remove(name)
    assert ctl.info(name) is None
    assert not os.path.exists(info.path)
    assert name not in {d.name for d in ctl.list_devices()}


def test_clear_inactive_table(ctl: ioctl.Control, names: list[str]) -> None:
    name = _unique("ioctl-clear")
    ctl.create(name)
    names.append(name)
    ctl.load(name, [ioctl.Target(0, 8, "zero", "")])
    ctl.clear(name)
    info = ctl.info(name)
    assert info is not None
    assert not info.inactive_table


def test_many_targets_need_a_bigger_buffer(ctl: ioctl.Control, names: list[str]) -> None:
    """A table longer than the first 16 KiB buffer comes back whole (DM_BUFFER_FULL retry)."""
    name = _unique("ioctl-big")
    ctl.create(name)
    names.append(name)
    targets = [ioctl.Target(i * 8, 8, "error" if i % 2 else "zero", "") for i in range(2000)]
    ctl.load(name, targets)
    ctl.resume(name)
    assert ctl.table(name) == targets
    assert len(ctl.status(name)) == 2000


def test_error_mapping(ctl: ioctl.Control, names: list[str]) -> None:
    absent = _unique("ioctl-absent")
    with pytest.raises(dm_errors.DeviceNotFound) as nf:
        ctl.remove(absent)
    assert isinstance(nf.value, errors.NotFound)
    assert nf.value.errno == errno.ENXIO
    assert ctl.info(absent) is None
    with pytest.raises(dm_errors.DeviceNotFound):
        ctl.status(absent)

    name = _unique("ioctl-dup")
    ctl.create(name)
    names.append(name)
    with pytest.raises(dm_errors.DeviceExists) as ex:
        ctl.create(name)
    assert isinstance(ex.value, errors.AlreadyExists)
    ctl.load(name, [ioctl.Target(0, 8, "zero", "")])
    ctl.resume(name)

    fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
    try:
        with pytest.raises(dm_errors.DeviceBusy) as busy:
            ctl.remove(name)
        assert isinstance(busy.value, errors.FailedPrecondition)
        info = ctl.info(name)
        assert info is not None
        assert info.open_count == 1
    finally:
        os.close(fd)

    with pytest.raises(dm_errors.DmInvalidArgument):
        ctl.load(name, [ioctl.Target(0, 8, "no-such-target", "")])
    with pytest.raises(dm_errors.DmInvalidArgument):
        ctl.create("bad/name")


def test_thin_pool_messages_and_status(ctl: ioctl.Control, names: list[str]) -> None:
    SCRATCH.mkdir(exist_ok=True)
    tag = uuid_mod.uuid4().hex[:8]
    meta_file, data_file = SCRATCH / f"ioctl-{tag}.meta", SCRATCH / f"ioctl-{tag}.data"
    for path, size in ((meta_file, 4 * MiB), (data_file, 64 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    meta, data = loop.attach(str(meta_file)), loop.attach(str(data_file))
    try:
        pool = f"ioctl-pool-{tag}"
        ctl.create(pool)
        names.append(pool)
        ctl.load(pool, [ioctl.Target(0, 64 * MiB // 512, "thin-pool", f"{meta} {data} 128 0 0")])
        ctl.resume(pool)
        assert ctl.message(pool, "create_thin 0") == ""
        ctl.message(pool, "set_transaction_id 0 1")
        with pytest.raises(dm_errors.DeviceExists):
            ctl.message(pool, "create_thin 0")
        with pytest.raises(dm_errors.DeviceNotFound):
            ctl.message(pool, "delete 9")
        with pytest.raises(dm_errors.DmInvalidArgument):
            ctl.message(pool, "set_transaction_id 0 2")  # the CAS: old id is 1 now
        [target] = ctl.status(pool)
        assert target.target_type == "thin-pool"
        status = parse.parse_pool_status(target.params)
        assert status.transaction_id == 1
        assert status.data_total_blocks == 64 * MiB // (64 * 1024)
        assert status.mode.value == "rw"
        table = parse.parse_pool_table(ctl.table(pool)[0].params)
        assert table.block_sectors == 128

        thin = f"ioctl-thin-{tag}"
        ctl.create(thin)
        names.append(thin)
        ctl.load(thin, [ioctl.Target(0, 8 * MiB // 512, "thin", f"/dev/mapper/{pool} 0")])
        ctl.resume(thin)
        fd = os.open(f"/dev/mapper/{thin}", os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 65536, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        thin_status = parse.parse_thin_status(ctl.status(thin)[0].params)
        assert thin_status.mapped_sectors == 128
        ctl.remove(thin)
        names.remove(thin)
        ctl.message(pool, "delete 0")
        ctl.remove(pool)
        names.remove(pool)
    finally:
        loop.detach(meta)
        loop.detach(data)
        meta_file.unlink()
        data_file.unlink()
