"""Pure parts of the dm-thin backend and thin tools: metadata sizing, names, thin_ls parsing."""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import struct

import pytest

from csi_thin import config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import ioctl, thintools
from csi_thin.pool import backend as backend_mod
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


class _NoDevices:
    """The two Control calls teardown makes, on a host where no dm device exists."""

    def list_devices(self) -> list[object]:
        return []

    def info(self, name: str) -> None:
        return None


def _block_cfg(tmp_path: pathlib.Path, meta: pathlib.Path) -> config.PoolConfig:
    return config.PoolConfig(
        name="blk",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(tmp_path / "state"),
        dmthin=config.DmThinConfig(data_device=str(tmp_path / "data"), metadata_device=str(meta)),
    )


def test_destroy_refuses_to_wipe_a_device_that_is_not_thin_metadata(tmp_path: pathlib.Path) -> None:
    """destroy zeroes the first 4 KiB of metadata_device: a config naming the wrong disk must not cost
    that disk its partition table or filesystem superblock."""
    not_ours = tmp_path / "disk"
    content = b"\x55\xaa" * 2048 + os.urandom(4096)
    not_ours.write_bytes(content)
    be = dmthin.DmThinBackend(_block_cfg(tmp_path, not_ours), control=_NoDevices())  # type: ignore[arg-type]
    with pytest.raises(errors.FailedPrecondition, match="no dm-thin superblock"):
        be.destroy(deadline=deadline_mod.Deadline.after(10))
    assert not_ours.read_bytes() == content


def test_destroy_wipes_thin_metadata(tmp_path: pathlib.Path) -> None:
    meta = tmp_path / "meta"
    sb = bytearray(8192)
    sb[32:40] = (27022010).to_bytes(8, "little")  # dm-thin's superblock magic
    meta.write_bytes(bytes(sb))
    be = dmthin.DmThinBackend(_block_cfg(tmp_path, meta), control=_NoDevices())  # type: ignore[arg-type]
    be.destroy(deadline=deadline_mod.Deadline.after(10))
    assert meta.read_bytes() == bytes(8192)


def test_a_target_message_is_never_sent_twice(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel runs a target message and only then finds that its answer does not fit the buffer
    (DM_BUFFER_FULL). Asking again with a bigger buffer, as for a status or a table, would run the
    message twice: a second create_snap, delete or set_transaction_id on the pool."""
    control = tmp_path / "control"
    control.write_bytes(b"")
    ctl = ioctl.Control(str(control))
    sent: list[int] = []

    def answer_too_big(fd: int, request: int, buf: bytearray, mutate: bool) -> int:
        sent.append(request)
        struct.pack_into("=I", buf, 28, (1 << 8) | (1 << 16))  # flags: BUFFER_FULL | DATA_OUT
        return 0

    monkeypatch.setattr(fcntl, "ioctl", answer_too_big)
    try:
        with pytest.raises(dm_errors.DmError, match="not sent again"):
            ctl.message("csi-thin-x-pool", "delete 7")
        assert len(sent) == 1
        sent.clear()
        with pytest.raises(dm_errors.DmError, match="larger than"):  # a read is asked again, bounded
            ctl.status("csi-thin-x-pool")
        assert len(sent) > 1
    finally:
        ctl.close()


class _LeftoverDevices:
    """A Control listing device-mapper devices by name, each with a DeviceInfo; records what the
    backend does to them."""

    def __init__(self, infos: list[ioctl.DeviceInfo]) -> None:
        self.infos = {i.name: i for i in infos}
        self.calls: list[tuple[str, str]] = []

    def list_devices(self) -> list[ioctl.ListedDevice]:
        return [ioctl.ListedDevice(name=n, major=253, minor=i) for i, n in enumerate(self.infos)]

    def info(self, name: str) -> ioctl.DeviceInfo | None:
        return self.infos.get(name)

    def remove(self, name: str) -> None:
        self.calls.append(("remove", name))

    def clear(self, name: str) -> None:
        self.calls.append(("clear", name))

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name))


def _dev_info(
    name: str, uuid: str, *, live: bool, inactive: bool = False, suspended: bool = False
) -> ioctl.DeviceInfo:
    return ioctl.DeviceInfo(
        name=name,
        uuid=uuid,
        major=253,
        minor=0,
        open_count=0,
        target_count=1 if live else 0,
        event_nr=0,
        suspended=suspended,
        read_only=False,
        live_table=live,
        inactive_table=inactive,
    )


def test_assembly_repairs_only_thin_devices_it_created() -> None:
    """Assembly removes a table-less thin device, clears an inactive table and resumes a suspended
    device, because a step killed half-way leaves them. Only a device this backend created is such
    a leftover: its exact name (csi-thin-<pool>-<id>, the id as _thin_name writes it) AND its uuid
    (CSI-THIN-<pool>-<id>, set at create). A device whose name merely looks like ours (leading zero,
    an id out of range, a non-ASCII digit) or that carries another uuid (someone else's, or one
    being set up by hand) is not ours: left alone."""
    ctl = _LeftoverDevices(
        [
            _dev_info("csi-thin-fast-6", "CSI-THIN-fast-6", live=False),  # ours, activate killed
            _dev_info("csi-thin-fast-8", "CSI-THIN-fast-8", live=True, inactive=True, suspended=True),
            _dev_info("csi-thin-fast-007", "", live=False),
            _dev_info("csi-thin-fast-\u0669", "", live=False),  # ARABIC-INDIC DIGIT NINE
            _dev_info(f"csi-thin-fast-{model.MAX_DEVICE_ID + 1}", "", live=False),
            _dev_info("csi-thin-fast-5", "LVM-someone-else", live=False),
            _dev_info("csi-thin-fast-9", "", live=True, inactive=True, suspended=True),
        ]
    )
    be = dmthin.DmThinBackend(_cfg(), control=ctl)  # type: ignore[arg-type]
    be._repair_leftover_thins()
    assert ctl.calls == [
        ("remove", "csi-thin-fast-6"),
        ("clear", "csi-thin-fast-8"),
        ("resume", "csi-thin-fast-8"),
    ]
    # and only exact names count as our thin devices (teardown, active flags)
    assert be.active_ids(deadline=deadline_mod.Deadline.after(10)) == {5, 6, 8, 9}


class _LiveThin(_LeftoverDevices):
    """One active thin device of `sectors`, on an active pool."""

    def __init__(self, sectors: int) -> None:
        super().__init__(
            [
                _dev_info("csi-thin-fast-pool", "CSI-THIN-fast-pool", live=True),
                _dev_info("csi-thin-fast-3", "CSI-THIN-fast-3", live=True),
            ]
        )
        self.sectors = sectors

    def table(self, name: str) -> list[ioctl.Target]:
        assert name == "csi-thin-fast-3"
        return [ioctl.Target(0, self.sectors, "thin", "253:0 3")]

    def load(self, name: str, targets: list[ioctl.Target]) -> None:
        self.calls.append(("load", f"{name} {targets[0].length}"))


def test_resize_never_shrinks_an_active_device() -> None:
    """Every backend refuses to shrink (reflink: OutOfRange, the fake too): a smaller table swapped
    under a mounted filesystem cuts its tail off. A grow whose target is below what the kernel
    already has (a roll-forward, a recovery, a stale record) must not reload a smaller table."""
    ctl = _LiveThin(sectors=64 * MiB // 512)
    be = dmthin.DmThinBackend(_cfg(), control=ctl)  # type: ignore[arg-type]
    with pytest.raises(errors.OutOfRange):
        be.resize(3, 32 * MiB, deadline=deadline_mod.Deadline.after(10))
    assert ctl.calls == []
    be.resize(3, 96 * MiB, deadline=deadline_mod.Deadline.after(10))  # growing still reloads
    assert ctl.calls == [("load", f"csi-thin-fast-3 {96 * MiB // 512}"), ("resume", "csi-thin-fast-3")]


class _ActiveOrigins(_LeftoverDevices):
    """Active thin devices 1..n; suspend of `fail_suspend` fails, and so does the first resume of
    `fail_resume` (a resume can fail: ENOMEM, a table the kernel refuses on the swap)."""

    def __init__(self, n: int, *, fail_suspend: int, fail_resume: int) -> None:
        super().__init__(
            [_dev_info(f"csi-thin-fast-{i}", f"CSI-THIN-fast-{i}", live=True) for i in range(1, n + 1)]
        )
        self.fail_suspend = f"csi-thin-fast-{fail_suspend}"
        self.fail_resume = f"csi-thin-fast-{fail_resume}"

    def suspend(self, name: str) -> None:
        if name == self.fail_suspend:
            raise dm_errors.DmError(f"suspend {name}: injected")
        self.calls.append(("suspend", name))

    def resume(self, name: str) -> None:
        if name == self.fail_resume:
            self.fail_resume = ""
            raise dm_errors.DmError(f"resume {name}: injected")
        self.calls.append(("resume", name))


def test_a_failed_quiesce_resumes_every_origin_it_suspended_and_names_what_it_could_not() -> None:
    """A group's hold that fails half-way lets go of what it suspended. When one resume fails too,
    the others are resumed all the same (a suspended origin hangs every writer), and the failure
    names the origins still held, so that the engine's undo tries them again instead of closing the
    group as undone with an origin left suspended."""
    ctl = _ActiveOrigins(3, fail_suspend=3, fail_resume=2)
    be = dmthin.DmThinBackend(_cfg(), control=ctl)  # type: ignore[arg-type]
    be._require_writable = lambda what: None  # type: ignore[method-assign]
    with pytest.raises(backend_mod.HoldLeft) as exc:
        be.quiesce([1, 2, 3], deadline=deadline_mod.Deadline.after(10))
    assert exc.value.origin_ids == (2,)
    assert ctl.calls == [
        ("suspend", "csi-thin-fast-1"),
        ("suspend", "csi-thin-fast-2"),
        ("resume", "csi-thin-fast-1"),
    ]
