"""DmThinBackend on a real loop-backed dm-thin pool in /scratch (vm tier): every Backend method."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import app, config, errors, model
from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import ioctl, loop, parse
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import dmthin, recovery
from csi_thin.store import lmdb_store
from tests import blockio

MiB = model.MiB
BS = 64 * model.KiB
DATA = 512 * MiB


def _dl() -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(60)


def _config(tmp: pathlib.Path, name: str) -> config.PoolConfig:
    return config.PoolConfig(
        name=name,
        backend=config.BackendKind.DMTHIN,
        state_dir=str(tmp / "state"),
        dmthin=config.DmThinConfig(data_file=str(tmp / "data.img"), data_size=DATA, block_size=BS),
    )


@pytest.fixture
def cfg() -> Iterator[config.PoolConfig]:
    tmp = pathlib.Path("/scratch") / f"be-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    cfg = _config(tmp, f"t{uuid.uuid4().hex[:6]}")
    yield cfg
    dmthin.DmThinBackend(cfg).destroy(deadline=_dl())
    assert not any(d.name.startswith(f"csi-thin-{cfg.name}-") for d in ioctl.Control().list_devices())


@pytest.fixture
def be(cfg: config.PoolConfig) -> dmthin.DmThinBackend:
    b = dmthin.DmThinBackend(cfg)
    b.assemble(deadline=_dl())
    return b


def _block(tag: bytes) -> bytes:
    return (tag * (BS // len(tag) + 1))[:BS]


def test_is_a_backend(be: dmthin.DmThinBackend) -> None:
    b: backend_mod.Backend = be  # mypy checks the Protocol; this checks the runtime object
    assert b.kind == "dmthin"


def test_fresh_pool_status(be: dmthin.DmThinBackend, cfg: config.PoolConfig) -> None:
    st = be.status(deadline=_dl())
    assert st.transaction_id == 0
    assert st.block_size_bytes == BS
    assert st.data_total_bytes == DATA
    assert st.data_used_bytes == 0
    assert st.metadata_total_bytes == dmthin.metadata_size_for(DATA, BS)
    assert 0 < st.metadata_used_bytes < st.metadata_total_bytes
    assert st.mode == model.PoolMode.RW
    assert st.healthy
    assert be.transaction_id(deadline=_dl()) == 0
    assert os.path.exists(be.pool_path)
    assert be.device_ids(deadline=_dl()) == {}
    assert be.active_ids(deadline=_dl()) == set()


def test_create_activate_write_read(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 64 * MiB, deadline=_dl())
    with pytest.raises(dm_errors.DeviceExists):
        be.create_thin(1, 64 * MiB, deadline=_dl())
    path = be.activate(1, 64 * MiB, deadline=_dl())
    assert path == be.device_path(1) == f"/dev/mapper/csi-thin-{be._pool}-1"
    assert be.activate(1, 64 * MiB, deadline=_dl()) == path  # idempotent
    assert blockio.device_size(path) == 64 * MiB
    blockio.write_at(path, 10 * MiB, _block(b"hello"))
    assert blockio.read_at(path, 10 * MiB, BS) == _block(b"hello")
    assert be.active_ids(deadline=_dl()) == {1}
    assert be.mapped_bytes(1, deadline=_dl()) == BS  # one pool block
    be.deactivate(1, deadline=_dl())
    be.deactivate(1, deadline=_dl())  # absent is fine
    assert not os.path.exists(path)
    assert be.mapped_bytes(1, deadline=_dl()) == BS  # from the metadata snapshot now
    path = be.activate(1, 64 * MiB, deadline=_dl())
    assert blockio.read_at(path, 10 * MiB, BS) == _block(b"hello")
    with pytest.raises(errors.NotFound):
        be.mapped_bytes(77, deadline=_dl())
    with pytest.raises(errors.NotFound):
        be.activate(78, MiB, deadline=_dl())  # no such id in the pool
    assert be.active_ids(deadline=_dl()) == {1}  # ... and no leftover dm device


def test_snapshot_of_inactive_origin(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 32 * MiB, deadline=_dl())
    origin = be.activate(1, 32 * MiB, deadline=_dl())
    blockio.write_at(origin, 0, _block(b"v1"))
    be.deactivate(1, deadline=_dl())
    be.create_snap(2, 1, 32 * MiB, deadline=_dl())  # no suspend: there is no origin device
    assert be.active_ids(deadline=_dl()) == set()
    snap = be.activate(2, 32 * MiB, deadline=_dl())
    assert blockio.read_at(snap, 0, BS) == _block(b"v1")
    assert set(be.device_ids(deadline=_dl())) == {1, 2}


def test_snapshot_of_active_origin(be: dmthin.DmThinBackend) -> None:
    ctl = ioctl.Control()
    be.create_thin(1, 32 * MiB, deadline=_dl())
    origin = be.activate(1, 32 * MiB, deadline=_dl())
    blockio.write_at(origin, MiB, _block(b"before"))
    be.create_snap(2, 1, 32 * MiB, deadline=_dl())
    info = ctl.info(os.path.basename(origin))
    assert info is not None
    assert not info.suspended
    blockio.write_at(origin, MiB, _block(b"after"))  # the origin stays usable
    snap = be.activate(2, 32 * MiB, deadline=_dl())
    assert blockio.read_at(snap, MiB, BS) == _block(b"before")
    assert blockio.read_at(origin, MiB, BS) == _block(b"after")

    # a failing create_snap (the id exists) still resumes the active origin
    with pytest.raises(dm_errors.DeviceExists):
        be.create_snap(2, 1, 32 * MiB, deadline=_dl())
    info = ctl.info(os.path.basename(origin))
    assert info is not None
    assert not info.suspended
    blockio.write_at(origin, 2 * MiB, _block(b"still"))
    assert blockio.read_at(origin, 2 * MiB, BS) == _block(b"still")
    with pytest.raises(errors.NotFound):
        be.create_snap(3, 55, 32 * MiB, deadline=_dl())  # no such origin


def test_assembly_resumes_an_origin_left_suspended(be: dmthin.DmThinBackend, cfg: config.PoolConfig) -> None:
    """A crash between create_snap's suspend and resume leaves the active origin suspended (every IO
    to the staged volume hangs): the next start's assembly resumes it."""
    ctl = ioctl.Control()
    be.create_thin(1, 16 * MiB, deadline=_dl())
    path = be.activate(1, 16 * MiB, deadline=_dl())
    name = os.path.basename(path)
    blockio.write_at(path, 0, _block(b"kept"))
    ctl.suspend(name)  # as create_snap does, then SIGKILL
    dmthin.DmThinBackend(cfg).assemble(deadline=_dl())  # the restarted process
    info = ctl.info(name)
    assert info is not None and info.live_table
    assert not info.suspended
    blockio.write_at(path, MiB, _block(b"after"))
    assert blockio.read_at(path, 0, BS) == _block(b"kept")
    assert blockio.read_at(path, MiB, BS) == _block(b"after")


def test_assembly_removes_only_table_less_devices_it_created(
    be: dmthin.DmThinBackend, cfg: config.PoolConfig
) -> None:
    """An activate killed between create and load leaves a table-less device: the next assembly
    removes it. A table-less device that only looks like ours (another uuid, an id written with a
    leading zero) is someone else's, maybe being set up right now: it stays."""
    ctl = ioctl.Control()
    ours = f"csi-thin-{cfg.name}-4"
    foreign = f"csi-thin-{cfg.name}-5"
    lookalike = f"csi-thin-{cfg.name}-06"
    ctl.create(ours, uuid=f"CSI-THIN-{cfg.name}-4")  # as activate does, then SIGKILL
    ctl.create(foreign, uuid=f"NOT-CSI-{cfg.name}-5")
    ctl.create(lookalike)
    try:
        dmthin.DmThinBackend(cfg).assemble(deadline=_dl())  # the restarted process
        assert ctl.info(ours) is None
        assert ctl.info(foreign) is not None
        assert ctl.info(lookalike) is not None
    finally:
        for name in (ours, foreign, lookalike):
            with contextlib.suppress(dm_errors.DeviceNotFound):
                ctl.remove(name)


def test_restore_into_larger_device(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    origin = be.activate(1, 16 * MiB, deadline=_dl())
    blockio.write_at(origin, 15 * MiB, _block(b"tail"))
    be.create_snap(2, 1, 16 * MiB, deadline=_dl())
    be.create_snap(3, 2, 64 * MiB, deadline=_dl())  # restore: a snapshot of the snapshot, bigger
    restored = be.activate(3, 64 * MiB, deadline=_dl())
    assert blockio.device_size(restored) == 64 * MiB
    assert blockio.read_at(restored, 15 * MiB, BS) == _block(b"tail")
    assert blockio.read_at(restored, 40 * MiB, BS) == bytes(BS)


def test_grow_active_and_inactive(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    path = be.activate(1, 16 * MiB, deadline=_dl())
    blockio.write_at(path, 0, _block(b"keep"))
    be.resize(1, 48 * MiB, deadline=_dl())
    assert blockio.device_size(path) == 48 * MiB
    blockio.write_at(path, 47 * MiB, _block(b"new"))
    assert blockio.read_at(path, 0, BS) == _block(b"keep")
    # activate with the new size is a no-op; with another size a reload
    assert be.activate(1, 48 * MiB, deadline=_dl()) == path
    be.activate(1, 64 * MiB, deadline=_dl())
    assert blockio.device_size(path) == 64 * MiB
    be.deactivate(1, deadline=_dl())
    be.resize(1, 128 * MiB, deadline=_dl())  # inactive: nothing to do in the kernel
    assert be.active_ids(deadline=_dl()) == set()
    path = be.activate(1, 128 * MiB, deadline=_dl())
    assert blockio.device_size(path) == 128 * MiB
    assert blockio.read_at(path, 47 * MiB, BS) == _block(b"new")


def test_resize_never_shrinks_an_active_device(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    path = be.activate(1, 48 * MiB, deadline=_dl())
    blockio.write_at(path, 47 * MiB, _block(b"tail"))
    with pytest.raises(errors.OutOfRange):
        be.resize(1, 16 * MiB, deadline=_dl())
    assert blockio.device_size(path) == 48 * MiB
    assert blockio.read_at(path, 47 * MiB, BS) == _block(b"tail")
    info = ioctl.Control().info(os.path.basename(path))
    assert info is not None and not info.inactive_table and not info.suspended


def test_delete(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    be.create_thin(2, 16 * MiB, deadline=_dl())
    be.activate(1, 16 * MiB, deadline=_dl())
    with pytest.raises(dm_errors.DeviceBusy):
        be.delete(1, deadline=_dl())
    be.deactivate(1, deadline=_dl())
    be.delete(1, deadline=_dl())
    assert set(be.device_ids(deadline=_dl())) == {2}
    with pytest.raises(errors.NotFound):
        be.delete(1, deadline=_dl())


def test_device_ids_via_metadata_snapshot(be: dmthin.DmThinBackend) -> None:
    for dev_id in (3, 9, 4000):
        be.create_thin(dev_id, 16 * MiB, deadline=_dl())
    path = be.activate(9, 16 * MiB, deadline=_dl())
    for i in range(4):
        blockio.write_at(path, i * BS, _block(b"x"))
    ids = be.device_ids(deadline=_dl())
    assert ids == {3: 0, 9: 4 * BS, 4000: 0}
    assert be.mapped_bytes(9, deadline=_dl()) == 4 * BS
    # the metadata snapshot is released again (no held root), so a second call works too
    ctl = ioctl.Control()
    [target] = ctl.status(be.pool_name)
    assert target.params.split()[3] == "-"
    assert be.device_ids(deadline=_dl()) == ids


def test_recovery_on_a_read_only_pool(be: dmthin.DmThinBackend, cfg: config.PoolConfig) -> None:
    """A pool the kernel turned read-only (metadata full or a metadata error) takes no messages, so
    no reserve_metadata_snap and no device_ids while it is live. Start-up recovery must still pass
    (it took the whole driver, and with it every existing volume, down), and device_ids says why."""
    be.create_thin(3, 16 * MiB, deadline=_dl())
    path = be.activate(3, 16 * MiB, deadline=_dl())
    blockio.write_at(path, 0, _block(b"ro"))
    be.deactivate(3, deadline=_dl())
    ctl = ioctl.Control()
    [live] = ctl.table(be.pool_name)
    ro = dataclasses.replace(parse.parse_pool_table(live.params), read_only=True)
    ctl.load(be.pool_name, [ioctl.Target(live.start, live.length, "thin-pool", ro.format())])
    ctl.resume(be.pool_name)
    try:
        assert be.status(deadline=_dl()).mode == model.PoolMode.RO
        with pytest.raises(errors.Unavailable, match="ro"):
            be.device_ids(deadline=_dl())
        with lmdb_store.LmdbStore(cfg.state_dir) as store:
            report = recovery.recover(be, store, deadline=_dl())
        assert not report.ids_checked
        assert be.activate(3, 16 * MiB, deadline=_dl()) == path  # existing volumes keep working
        assert blockio.read_at(path, 0, BS) == _block(b"ro")
        be.deactivate(3, deadline=_dl())
    finally:
        ctl.load(be.pool_name, [live])
        ctl.resume(be.pool_name)
    assert be.status(deadline=_dl()).mode == model.PoolMode.RW
    assert be.device_ids(deadline=_dl()) == {3: BS}


def test_set_transaction_id_compare_and_swap(be: dmthin.DmThinBackend) -> None:
    be.set_transaction_id(0, 1, deadline=_dl())
    assert be.transaction_id(deadline=_dl()) == 1
    with pytest.raises(dm_errors.TransactionIdMismatch) as exc:
        be.set_transaction_id(0, 2, deadline=_dl())
    assert isinstance(exc.value, errors.FailedPrecondition)
    assert "current id is 1" in exc.value.message
    be.set_transaction_id(1, 2, deadline=_dl())
    assert be.status(deadline=_dl()).transaction_id == 2


def test_reassembly_after_reboot(be: dmthin.DmThinBackend, cfg: config.PoolConfig) -> None:
    be.create_thin(1, 32 * MiB, deadline=_dl())
    path = be.activate(1, 32 * MiB, deadline=_dl())
    blockio.write_at(path, 0, _block(b"survive"))
    be.create_snap(2, 1, 32 * MiB, deadline=_dl())
    blockio.write_at(path, 0, _block(b"changed"))
    be.set_transaction_id(0, 5, deadline=_dl())
    be.assemble(deadline=_dl())  # already assembled as configured: nothing to do
    assert be.active_ids(deadline=_dl()) == {1}
    ids = be.device_ids(deadline=_dl())

    be.teardown(deadline=_dl())  # the active device goes too
    ctl = ioctl.Control()
    assert not any(d.name.startswith(f"csi-thin-{cfg.name}-") for d in ctl.list_devices())
    assert cfg.dmthin is not None
    assert cfg.dmthin.data_file is not None
    assert loop.find(cfg.dmthin.data_file) is None
    be.teardown(deadline=_dl())  # idempotent

    again = dmthin.DmThinBackend(cfg)  # a new process after the reboot
    again.assemble(deadline=_dl())  # existing metadata: thin_check runs first
    assert again.transaction_id(deadline=_dl()) == 5
    assert again.device_ids(deadline=_dl()) == ids
    assert blockio.read_at(again.activate(1, 32 * MiB, deadline=_dl()), 0, BS) == _block(b"changed")
    assert blockio.read_at(again.activate(2, 32 * MiB, deadline=_dl()), 0, BS) == _block(b"survive")


def test_corrupted_metadata_stops_assembly(be: dmthin.DmThinBackend, cfg: config.PoolConfig) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    be.teardown(deadline=_dl())
    assert cfg.dmthin is not None
    assert cfg.dmthin.data_file is not None
    meta_file = f"{cfg.dmthin.data_file}.meta"
    with open(meta_file, "r+b") as f:  # scribble over the superblock
        f.seek(64)
        f.write(os.urandom(512))
    fresh = dmthin.DmThinBackend(cfg)
    with pytest.raises(dm_errors.MetadataCheckFailed) as exc:
        fresh.assemble(deadline=_dl())
    assert isinstance(exc.value, errors.FailedPrecondition)
    assert "thin_check" in exc.value.message
    assert "NOT assembled" in exc.value.message
    assert ioctl.Control().info(fresh.pool_name) is None
    assert loop.find(meta_file) is None  # nothing left attached
    assert loop.find(cfg.dmthin.data_file) is None


def test_blank_metadata_under_a_store_is_never_formatted(cfg: config.PoolConfig) -> None:
    """The metadata superblock got wiped (or the metadata file lost) while the LMDB store holds
    committed volumes: the kernel would format a new, empty pool over it, destroying what thin_repair
    could still rebuild. The driver must refuse to assemble."""
    with app.open_engine(cfg, deadline=_dl()) as eng:
        eng.create_volume("v", 8 * MiB, deadline=_dl())
        eng.backend.teardown(deadline=_dl())
    assert cfg.dmthin is not None
    meta = f"{cfg.dmthin.data_file}.meta"
    with open(meta, "r+b") as f:
        f.write(bytes(4096))  # the superblock, wiped
        rest = f.read()
    with pytest.raises(errors.FailedPrecondition, match="blank"), app.open_engine(cfg, deadline=_dl()):
        pass
    assert ioctl.Control().info(dmthin.DmThinBackend(cfg).pool_name) is None
    with open(meta, "rb") as f:
        f.seek(4096)
        assert f.read() == rest  # not formatted


def test_expired_deadline_changes_nothing(be: dmthin.DmThinBackend) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        be.create_thin(1, MiB, deadline=deadline_mod.Deadline.after(0))
    assert be.device_ids(deadline=_dl()) == {}


def test_bad_ids(be: dmthin.DmThinBackend) -> None:
    with pytest.raises(errors.InvalidArgument):
        be.create_thin(model.MAX_DEVICE_ID + 1, MiB, deadline=_dl())
    with pytest.raises(errors.InvalidArgument):
        be.activate(-1, MiB, deadline=_dl())


def test_active_pool_with_another_table_is_refused(be: dmthin.DmThinBackend, cfg: config.PoolConfig) -> None:
    assert cfg.dmthin is not None
    other = config.PoolConfig(
        name=cfg.name,
        backend=cfg.backend,
        state_dir=cfg.state_dir,
        dmthin=config.DmThinConfig(data_file=cfg.dmthin.data_file, data_size=DATA, block_size=2 * BS),
    )
    with pytest.raises(errors.FailedPrecondition) as exc:
        dmthin.DmThinBackend(other).assemble(deadline=_dl())
    assert "tear it down first" in exc.value.message
    assert be.status(deadline=_dl()).healthy  # the running pool is untouched


def test_stale_metadata_snapshot_and_missing_node(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    ctl = ioctl.Control()
    ctl.message(be.pool_name, "reserve_metadata_snap")  # as if a crash hit between reserve and release
    assert be.device_ids(deadline=_dl()) == {1: 0}
    path = be.activate(1, 16 * MiB, deadline=_dl())
    os.unlink(path)  # someone cleaned /dev (a container restart)
    assert be.activate(1, 16 * MiB, deadline=_dl()) == path
    assert blockio.device_size(path) == 16 * MiB


def test_block_device_pool(tmp_path: pathlib.Path) -> None:
    """data_device + metadata_device: the pool sits on given block devices; destroy wipes the
    metadata superblock so the next assemble starts a fresh pool, and the devices stay."""
    work = pathlib.Path("/scratch") / f"blk-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    files = {"meta": (work / "meta", 4 * MiB), "data": (work / "data", 256 * MiB)}
    devs: dict[str, str] = {}
    for key, (path, size) in files.items():
        with open(path, "wb") as f:
            f.truncate(size)
        devs[key] = loop.attach(str(path))
    try:
        cfg = config.PoolConfig(
            name=f"b{uuid.uuid4().hex[:6]}",
            backend=config.BackendKind.DMTHIN,
            state_dir=str(work / "state"),
            dmthin=config.DmThinConfig(
                data_device=devs["data"],
                metadata_device=devs["meta"],
                zero_blocks=False,
                discard_passdown=False,
                error_if_no_space=False,
            ),
        )
        be = dmthin.DmThinBackend(cfg)
        be.assemble(deadline=_dl())
        [table] = ioctl.Control().table(be.pool_name)
        parsed = parse.parse_pool_table(table.params)
        assert parsed.skip_block_zeroing
        assert parsed.no_discard_passdown
        assert not parsed.error_if_no_space
        assert be.status(deadline=_dl()).data_total_bytes == 256 * MiB
        be.create_thin(7, 8 * MiB, deadline=_dl())
        be.teardown(deadline=_dl())
        be.assemble(deadline=_dl())
        assert set(be.device_ids(deadline=_dl())) == {7}
        be.destroy(deadline=_dl())
        assert loop.backing_file(devs["meta"]) is not None  # block devices are not ours to remove
        be.assemble(deadline=_dl())  # a fresh pool on the wiped metadata
        assert be.device_ids(deadline=_dl()) == {}
        be.teardown(deadline=_dl())
    finally:
        for key, (path, _) in files.items():
            loop.detach(devs[key])
            path.unlink()
        work.rmdir()


def test_full_pool_refuses_snapshot_of_active_origin_without_suspending() -> None:
    work = pathlib.Path("/scratch") / f"full-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    cfg = config.PoolConfig(
        name=f"f{uuid.uuid4().hex[:6]}",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(work / "state"),
        dmthin=config.DmThinConfig(data_file=str(work / "data.img"), data_size=16 * MiB, block_size=BS),
    )
    be = dmthin.DmThinBackend(cfg)
    be.assemble(deadline=_dl())
    try:
        be.create_thin(1, 32 * MiB, deadline=_dl())
        path = be.activate(1, 32 * MiB, deadline=_dl())
        fd = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(OSError):  # error_if_no_space: writes past the pool's end fail
                for i in range(32 * MiB // MiB):
                    os.pwrite(fd, b"z" * MiB, i * MiB)
                    os.fsync(fd)
        finally:
            os.close(fd)
        assert be.status(deadline=_dl()).mode == model.PoolMode.OUT_OF_DATA_SPACE
        with pytest.raises(errors.ResourceExhausted):
            be.create_snap(2, 1, 32 * MiB, deadline=_dl())
        info = ioctl.Control().info(os.path.basename(path))
        assert info is not None
        assert not info.suspended
    finally:
        be.destroy(deadline=_dl())
        work.rmdir()


def test_a_delete_takes_a_full_pool_out_of_data_space_by_itself() -> None:
    """dm-thin leaves out_of_data_space on a metadata commit that finds free blocks; the delete
    message commits, so no status flush (and no restart) is needed. Statuses here are read with
    noflush, which commits nothing, to see what the delete alone did."""
    work = pathlib.Path("/scratch") / f"heal-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    cfg = config.PoolConfig(
        name=f"h{uuid.uuid4().hex[:6]}",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(work / "state"),
        dmthin=config.DmThinConfig(data_file=str(work / "data.img"), data_size=16 * MiB, block_size=BS),
    )
    be = dmthin.DmThinBackend(cfg)
    be.assemble(deadline=_dl())
    ctl = ioctl.Control()

    def mode() -> model.PoolMode:
        [target] = ctl.status(be.pool_name, flush=False)
        return parse.parse_pool_status(target.params).mode

    try:
        be.create_thin(1, 32 * MiB, deadline=_dl())
        path = be.activate(1, 32 * MiB, deadline=_dl())
        fd = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(OSError):  # error_if_no_space: fails at once instead of queueing
                for i in range(32):
                    os.pwrite(fd, b"f" * MiB, i * MiB)
                    os.fsync(fd)
        finally:
            os.close(fd)
        be.deactivate(1, deadline=_dl())
        assert mode() == model.PoolMode.OUT_OF_DATA_SPACE
        be.set_transaction_id(0, 1, deadline=_dl())  # messages still run on a full pool
        assert mode() == model.PoolMode.OUT_OF_DATA_SPACE  # ... and a commit with nothing free keeps it
        be.delete(1, deadline=_dl())
        assert mode() == model.PoolMode.RW
        be.create_thin(2, MiB, deadline=_dl())
        blockio.write_at(be.activate(2, MiB, deadline=_dl()), 0, b"x" * 4096)
        be.deactivate(2, deadline=_dl())
    finally:
        be.destroy(deadline=_dl())
        work.rmdir()
