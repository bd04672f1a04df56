"""The dm-thin pool backend: each Backend step performed on a real device-mapper thin pool.

Sits between the pool engine (journal, records, locks; backend-neutral) and csi_thin.dm (ioctls,
parsers, loop devices, thin tools). Every method is one observable kernel-level change, so the engine
can journal intent around it and, after a crash, tell from `device_ids()` / `transaction_id()` whether
it happened.

Names: the pool is the dm device `csi-thin-<pool>-pool`, thin device <id> is `csi-thin-<pool>-<id>`
(dm uuids `CSI-THIN-<pool>-pool` / `CSI-THIN-<pool>-<id>`), all under /dev/mapper. Tables refer to
devices by major:minor because that is how the kernel prints them back, so a live table and the one we
would load compare equal when nothing changed (idempotent re-assembly).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from csi_thin import config as config_mod
from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import holders, ioctl, loop, parse, thintools
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import faults

log = logging.getLogger(__name__)

_MAX_METADATA_BYTES = 16 * model.GiB  # dm-thin uses at most ~15.8 GiB of a metadata device
_MIN_METADATA_BYTES = 2 * model.MiB
#: headroom over the kernel docs' 48 bytes per data block: snapshots share btree nodes until they
#: diverge, and a full metadata device turns the pool read-only, so err on the big side
_METADATA_HEADROOM = 4
#: dm-thin's superblock magic (drivers/md/dm-thin-metadata.c), a le64 after csum, flags, blocknr, uuid
_THIN_SUPERBLOCK_MAGIC = 27022010
_MAGIC_OFFSET = 32


def metadata_size_for(data_size: int, block_size: int) -> int:
    """Metadata bytes for a new pool: 48 * data_size / block_size (kernel docs) with headroom,
    at least 2 MiB, at most what dm-thin can use, rounded up to 1 MiB."""
    raw = _METADATA_HEADROOM * 48 * data_size // block_size
    size = max(_MIN_METADATA_BYTES, min(_MAX_METADATA_BYTES, raw))
    return -(-size // model.MiB) * model.MiB


def _devno(path: str) -> str:
    """major:minor of a block device, as the kernel prints it in tables."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise errors.InvalidArgument(f"{path} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _blockdev_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _first_block_is_zero(path: str) -> bool:
    """True for a never-used metadata device (the kernel formats it on first load)."""
    return _first_block(path) == bytes(4096)


def _is_thin_superblock(block: bytes) -> bool:
    """The block carries dm-thin's superblock magic (a le64 at byte 32)."""
    return int.from_bytes(block[_MAGIC_OFFSET : _MAGIC_OFFSET + 8], "little") == _THIN_SUPERBLOCK_MAGIC


def _first_block(path: str) -> bytes:
    """The first 4 KiB of a device (short if the device is smaller).

    Read with O_DIRECT: the kernel writes metadata with bios that bypass this device's page cache,
    so a cached read could show zeros from before the pool's first commit.
    """
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            n = os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        return buf[:n]
    finally:
        buf.close()


def _byte_extents(runs: thintools.BlockRuns, size_bytes: int) -> tuple[model.Extent, ...]:
    bs = runs.block_bytes
    return model.merge_extents(((first * bs, n * bs) for first, n in runs.runs), limit=size_bytes)


class DmThinBackend:
    """Backend on a dm-thin pool assembled from block devices or sparse loop files."""

    kind = "dmthin"

    def __init__(self, config: config_mod.PoolConfig, *, control: ioctl.Control | None = None) -> None:
        if config.dmthin is None:
            raise errors.InvalidArgument(f"pool {config.name}: the dmthin backend needs a 'dmthin' section")
        config.validate()
        self._pool = config.name
        self._cfg: config_mod.DmThinConfig = config.dmthin
        self._ctl_obj = control
        self._ctl_lock = threading.Lock()
        # one metadata snapshot at a time: the pool holds at most one
        self._metadata_snap = threading.Lock()
        self.pool_name = f"csi-thin-{self._pool}-pool"
        # the id exactly as _thin_name writes it: ASCII digits, no leading zero
        self._thin_re = re.compile(rf"csi-thin-{re.escape(self._pool)}-(0|[1-9][0-9]*)", re.ASCII)

    # -- names ----------------------------------------------------------------------------------

    @property
    def pool_path(self) -> str:
        return f"/dev/mapper/{self.pool_name}"

    def _thin_name(self, dev_id: int) -> str:
        if not 0 <= dev_id <= model.MAX_DEVICE_ID:
            raise errors.InvalidArgument(f"thin device id {dev_id} outside 0..{model.MAX_DEVICE_ID}")
        return f"csi-thin-{self._pool}-{dev_id}"

    def _thin_uuid(self, dev_id: int) -> str:
        return f"CSI-THIN-{self._pool}-{dev_id}"

    def device_path(self, dev_id: int) -> str:
        return f"/dev/mapper/{self._thin_name(dev_id)}"

    @property
    def _ctl(self) -> ioctl.Control:
        # opened on first use, so constructing a backend needs no /dev/mapper/control
        with self._ctl_lock:
            if self._ctl_obj is None:
                self._ctl_obj = ioctl.Control()
            return self._ctl_obj

    # -- assembly -------------------------------------------------------------------------------

    def _file_mode(self) -> bool:
        return self._cfg.data_file is not None

    def _metadata_file_path(self) -> str:
        assert self._cfg.data_file is not None
        return self._cfg.metadata_file or f"{self._cfg.data_file}.meta"

    def _ensure_files(self) -> None:
        """Create missing sparse files with the configured sizes (existing ones are kept as they are)."""
        assert self._cfg.data_file is not None
        meta_size = self._cfg.metadata_size or metadata_size_for(self._cfg.data_size, self._cfg.block_size)
        for path, size in (
            (self._cfg.data_file, self._cfg.data_size),
            (self._metadata_file_path(), meta_size),
        ):
            if os.path.exists(path):
                continue
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            # O_EXCL: two agents racing on a fresh node must not both size the same file
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            log.info("pool=%s created sparse file=%s bytes=%d", self._pool, path, size)

    def _devices(
        self, *, attach: bool, attached: list[str], deadline: deadline_mod.Deadline
    ) -> tuple[str, str] | None:
        """(metadata device, data device) paths; loops are attached (or reused) when `attach`.

        Returns None when the pool is file-backed, `attach` is False and a loop is missing.
        """
        if not self._file_mode():
            assert self._cfg.metadata_device is not None
            assert self._cfg.data_device is not None
            self._refuse_one_device(self._cfg.metadata_device, self._cfg.data_device)
            return self._cfg.metadata_device, self._cfg.data_device
        assert self._cfg.data_file is not None
        out: list[str] = []
        for path in (self._metadata_file_path(), self._cfg.data_file):
            dev = loop.find(path)
            if dev is None:
                if not attach:
                    return None
                dev = loop.attach(path, deadline=deadline)
                attached.append(dev)
                log.info("pool=%s attached loop=%s file=%s", self._pool, dev, path)
            out.append(dev)
        return out[0], out[1]

    def _refuse_one_device(self, metadata_dev: str, data_dev: str) -> None:
        """Two names of one disk (/dev/sdb, /dev/disk/by-id/...) pass the config's check: the kernel
        would take it as both, format the metadata at its start, where the first data blocks land too,
        and the first volume writes would overwrite the pool's metadata."""
        try:
            meta, data = os.stat(metadata_dev), os.stat(data_dev)
        except OSError:
            return  # a missing device fails where it is opened, with its own message
        same_node = stat.S_ISBLK(meta.st_mode) and meta.st_rdev == data.st_rdev
        if same_node or (meta.st_dev, meta.st_ino) == (data.st_dev, data.st_ino):
            raise errors.InvalidArgument(
                f"pool {self._pool}: metadata_device {metadata_dev} and data_device {data_dev} are one device"
            )

    def _pool_table(self, metadata_dev: str, data_dev: str) -> ioctl.Target:
        bs = self._cfg.block_size
        blocks = _blockdev_size(data_dev) // bs
        if blocks == 0:
            raise errors.InvalidArgument(
                f"pool {self._pool}: data device {data_dev} is smaller than one block"
            )
        lwm = self._cfg.low_water_mark_blocks or max(1, blocks // 100)
        table = parse.PoolTable(
            metadata_dev=_devno(metadata_dev),
            data_dev=_devno(data_dev),
            block_sectors=bs // model.SECTOR,
            low_water_mark=lwm,
            skip_block_zeroing=not self._cfg.zero_blocks,
            no_discard_passdown=not self._cfg.discard_passdown,
            error_if_no_space=self._cfg.error_if_no_space,
        )
        return ioctl.Target(0, blocks * (bs // model.SECTOR), "thin-pool", table.format())

    def metadata_is_blank(self) -> bool:
        """True when assembling would let the kernel format a new, empty pool: the pool is not live and
        its metadata device (or file) is missing or never written (all-zero first block)."""
        info = self._ctl.info(self.pool_name)
        if info is not None and info.live_table:
            return False
        if self._file_mode():
            path = self._metadata_file_path()
            if not os.path.exists(path):
                return True
            dev = loop.find(path)
            return _first_block_is_zero(dev if dev is not None else path)
        assert self._cfg.metadata_device is not None
        return _first_block_is_zero(self._cfg.metadata_device)

    def assemble(self, *, deadline: deadline_mod.Deadline) -> None:
        info = self._ctl.info(self.pool_name)
        if info is not None and info.live_table:
            self._check_live_pool(info, deadline=deadline)
            self._repair_leftover_thins()
            return
        if info is not None:
            # a create that crashed before its table went live: nothing references it
            self._ctl.remove(self.pool_name)
        if self._file_mode():
            self._ensure_files()
        attached: list[str] = []
        try:
            devices = self._devices(attach=True, attached=attached, deadline=deadline)
            assert devices is not None
            metadata_dev, data_dev = devices
            target = self._pool_table(metadata_dev, data_dev)
            self._check_metadata(metadata_dev, deadline=deadline)
            deadline.check("pool create")
            self._ctl.create(self.pool_name, uuid=f"CSI-THIN-{self._pool}-pool")
            try:
                self._ctl.load(self.pool_name, [target])
                self._ctl.resume(self.pool_name)
            except BaseException:
                with contextlib.suppress(errors.CsiThinError):
                    self._ctl.remove(self.pool_name)
                raise
        except BaseException:
            for dev in attached:
                with contextlib.suppress(errors.CsiThinError):
                    loop.detach(dev)
            raise
        status = self.status(deadline=deadline)
        log.info(
            "pool=%s assembled transaction_id=%d data=%d/%d mode=%s",
            self._pool,
            status.transaction_id,
            status.data_used_bytes,
            status.data_total_bytes,
            status.mode.value,
        )

    def _check_metadata(self, metadata_dev: str, *, deadline: deadline_mod.Deadline) -> None:
        """thin_check an existing metadata device before the kernel sees it; never repair here."""
        if _first_block_is_zero(metadata_dev):
            log.info("pool=%s metadata=%s is fresh: the kernel formats it", self._pool, metadata_dev)
            return
        deadline.check("thin_check")
        result = thintools.check(metadata_dev, deadline=deadline)
        if not result.ok:
            raise dm_errors.MetadataCheckFailed(
                f"pool {self._pool}: thin_check of metadata {metadata_dev} failed "
                f"(exit {result.returncode}); the pool was NOT assembled. Inspect and repair offline "
                f"(thin_repair) before starting again. thin_check said: {result.output[-1500:]}"
            )
        log.info("pool=%s metadata=%s thin_check=ok", self._pool, metadata_dev)

    def _check_live_pool(self, info: ioctl.DeviceInfo, *, deadline: deadline_mod.Deadline) -> None:
        """An active pool must be ours as configured; a suspended one is resumed."""
        devices = self._devices(attach=False, attached=[], deadline=deadline)
        live = self._ctl.table(self.pool_name)
        if devices is None or len(live) != 1 or live[0].target_type != "thin-pool":
            raise errors.FailedPrecondition(
                f"pool {self._pool}: {self.pool_name} is active but not on the configured devices"
            )
        want = self._pool_table(*devices)
        have = parse.parse_pool_table(live[0].params)
        if (have, live[0].length) != (parse.parse_pool_table(want.params), want.length):
            raise errors.FailedPrecondition(
                f"pool {self._pool}: {self.pool_name} is active with table {live[0].line()!r}, "
                f"configured is {want.line()!r}; tear it down first to change it"
            )
        if info.suspended:
            self._ctl.resume(self.pool_name)

    def _repair_leftover_thins(self) -> None:
        """Undo what a step killed half-way left in the kernel. Every step that leaves such a state
        undoes it on every path it survives; a crash (SIGKILL) in between leaves:
        - a device with no live table (activate killed after create, or after load): never active,
          so remove it; recovery then takes the active flag from the kernel;
        - an inactive table beside the live one (grow killed between load and resume): drop it, an
          open grow intent redoes its reload in recovery;
        - a suspended device (create_snap of an active origin killed before its resume): every IO
          to a staged volume hangs until someone resumes it.
        The owner lock keeps any other csi-thin process out, so such a device here is a leftover; one
        that carries another uuid than the one activate gives it is not ours (made by hand, by
        another tool): left alone."""
        for dev_id, name in sorted(self._our_thins().items()):
            info = self._ctl.info(name)
            if info is None or not (info.suspended or info.inactive_table or not info.live_table):
                continue
            if info.uuid != self._thin_uuid(dev_id):
                log.warning(
                    "pool=%s dev_id=%d event=repair-skipped name=%s uuid=%r reason=not-created-by-us",
                    self._pool,
                    dev_id,
                    name,
                    info.uuid,
                )
                continue
            log.warning(
                "pool=%s dev_id=%d event=repair-leftover live=%s inactive=%s suspended=%s",
                self._pool,
                dev_id,
                info.live_table,
                info.inactive_table,
                info.suspended,
            )
            faults.reach("dmthin:assemble/repair")
            if not info.live_table:
                self._ctl.remove(name)
                continue
            if info.inactive_table:
                self._ctl.clear(name)
            if info.suspended:
                self._ctl.resume(name)

    def _our_thins(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for dev in self._ctl.list_devices():
            m = self._thin_re.fullmatch(dev.name)
            if m and int(m.group(1)) <= model.MAX_DEVICE_ID:
                out[int(m.group(1))] = dev.name
        return out

    def teardown(self, *, deadline: deadline_mod.Deadline) -> None:
        for dev_id in sorted(self._our_thins()):
            deadline.check(f"deactivate {dev_id}")
            self.deactivate(dev_id, deadline=deadline)
        info = self._ctl.info(self.pool_name)
        if info is not None:
            if info.suspended:
                self._ctl.resume(self.pool_name)  # removing a suspended pool would skip its commit
            with contextlib.suppress(dm_errors.DeviceNotFound):
                holders.retry_busy(
                    lambda: self._ctl.remove(self.pool_name),
                    rdev=os.makedev(info.major, info.minor),
                    source=info.path,
                    what=f"remove {self.pool_name}",
                    deadline=deadline,
                )
        if self._file_mode():
            assert self._cfg.data_file is not None
            for path in (self._cfg.data_file, self._metadata_file_path()):
                dev = loop.find(path)
                if dev is None:
                    continue
                loop.detach(dev)
                # a reader (blkid, udev) defers the detach to its last close: wait for it, or the
                # next assemble would build the pool on a loop device that is about to go away
                for _ in deadline.backoff(first=0.005, cap=0.1):
                    if loop.find(path) != dev:
                        break
                else:
                    rdev = os.stat(dev).st_rdev
                    raise dm_errors.DeviceBusy(
                        f"pool {self._pool}: {dev} ({path}) is still open after its detach: "
                        + holders.describe(rdev, source=dev, what=f"detach {dev}")
                    )

    def destroy(self, *, deadline: deadline_mod.Deadline) -> None:
        if not self._file_mode():
            # checked before anything is torn down: a config naming the wrong disk must not cost
            # that disk its first 4 KiB (nor the running pool its devices)
            assert self._cfg.metadata_device is not None
            block = _first_block(self._cfg.metadata_device)
            if block != bytes(len(block)) and not _is_thin_superblock(block):
                raise errors.FailedPrecondition(
                    f"pool {self._pool}: metadata_device {self._cfg.metadata_device} holds no dm-thin "
                    "superblock: refusing to wipe it (is the config pointing at the right device?)"
                )
        self.teardown(deadline=deadline)
        if self._file_mode():
            assert self._cfg.data_file is not None
            for path in (self._cfg.data_file, self._metadata_file_path()):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return
        # block devices stay; wiping the superblock makes the next assemble start a fresh pool
        assert self._cfg.metadata_device is not None
        fd = os.open(self._cfg.metadata_device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes(4096), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- pool state -----------------------------------------------------------------------------

    def _pool_status_line(self) -> parse.PoolStatusLine:
        try:
            targets = self._ctl.status(self.pool_name)
        except dm_errors.DeviceNotFound as exc:
            raise errors.Unavailable(f"pool {self._pool} is not assembled") from exc
        if len(targets) != 1 or targets[0].target_type != "thin-pool":
            raise errors.Unavailable(f"pool {self._pool}: {self.pool_name} has no thin-pool table")
        return parse.parse_pool_status(targets[0].params)

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        deadline.check("pool status")
        return parse.to_pool_status(self._pool_status_line(), block_size_bytes=self._cfg.block_size)

    def transaction_id(self, *, deadline: deadline_mod.Deadline) -> int:
        deadline.check("pool status")
        line = self._pool_status_line()
        if line.failed:
            raise errors.Unavailable(f"pool {self._pool} has failed: no transaction id")
        return line.transaction_id

    def _pool_mode(self) -> model.PoolMode:
        [target] = self._ctl.status(self.pool_name, flush=False)
        return parse.parse_pool_status(target.params).mode

    def _require_writable(self, what: str) -> None:
        targets = self._ctl.status(self.pool_name, flush=False)
        line = parse.parse_pool_status(targets[0].params)
        if line.mode == model.PoolMode.OUT_OF_DATA_SPACE:
            raise dm_errors.NoSpace(f"pool {self._pool} is out of data space: {what} refused")
        if line.mode != model.PoolMode.RW:
            raise errors.Unavailable(f"pool {self._pool} is {line.mode.value}: {what} refused")

    def set_transaction_id(self, old: int, new: int, *, deadline: deadline_mod.Deadline) -> None:
        deadline.check("set_transaction_id")
        try:
            self._message(f"set_transaction_id {old} {new}")
        except dm_errors.DmInvalidArgument as exc:
            # the kernel answers EINVAL when `old` is not the current id: say which it is
            current = self._pool_status_line().transaction_id
            if current != old:
                raise dm_errors.TransactionIdMismatch(
                    f"pool {self._pool}: set_transaction_id {old} -> {new}: current id is {current}"
                ) from exc
            raise

    def _message(self, message: str) -> str:
        try:
            return self._ctl.message(self.pool_name, message)
        except dm_errors.DeviceNotFound as exc:
            if exc.errno == errno.ENXIO:  # the pool device itself is missing
                raise errors.Unavailable(f"pool {self._pool} is not assembled") from exc
            raise

    # -- thin devices ---------------------------------------------------------------------------

    def create_thin(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        self._thin_name(dev_id)
        deadline.check(f"create_thin {dev_id}")
        self._message(f"create_thin {dev_id}")

    def create_snap(
        self,
        dev_id: int,
        origin_id: int,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        held: bool = False,
    ) -> None:
        self._thin_name(dev_id)
        origin = self._thin_name(origin_id)
        deadline.check(f"create_snap {dev_id}")
        if held:  # the caller suspended the origin (quiesce), if it is active
            self._message(f"create_snap {dev_id} {origin_id}")
            return
        info = self._ctl.info(origin)
        if info is None or not info.live_table:
            # an inactive origin has no in-flight IO: dm-thin snapshots it without a suspend
            self._message(f"create_snap {dev_id} {origin_id}")
            return
        # a flushing suspend waits for in-flight IO, which a pool without space (queueing) or a
        # failed pool never completes: refuse instead of hanging past the deadline
        self._require_writable(f"create_snap {dev_id} of active {origin_id}")
        # an active origin must be suspended (flushing its IO, freezing its filesystem) around the
        # message; it is resumed on every path, even past the deadline: a stuck origin is worse
        self._ctl.suspend(origin)
        try:
            faults.reach("dmthin:create_snap/suspended")
            self._message(f"create_snap {dev_id} {origin_id}")
            faults.reach("dmthin:create_snap/messaged")
        finally:
            self._ctl.resume(origin)

    def quiesce(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        named = [(i, self._thin_name(i)) for i in origin_ids]
        active = [(i, n) for i, n in named if (info := self._ctl.info(n)) is not None and info.live_table]
        if not active:
            return  # inactive origins have no in-flight IO: nothing to hold
        # as for one snapshot: a flushing suspend on a pool that cannot complete IO would hang
        self._require_writable(f"group snapshot of active {', '.join(n for _, n in active)}")
        suspended: list[tuple[int, str]] = []
        try:
            for origin_id, name in active:
                deadline.check(f"suspend {name}")
                self._ctl.suspend(name)
                suspended.append((origin_id, name))
            faults.reach("dmthin:quiesce/suspended")
        except BaseException as exc:
            left: list[int] = []
            for origin_id, name in reversed(suspended):  # every path resumes what it suspended
                try:
                    self._ctl.resume(name)
                except Exception:  # resume the others all the same
                    log.exception("pool=%s dev_id=%d event=resume-failed", self._pool, origin_id)
                    left.append(origin_id)
            if left:
                raise backend_mod.HoldLeft(
                    f"group snapshot hold failed ({exc!r}) and devices {left} could not be resumed",
                    origin_ids=left,
                ) from exc
            raise

    def release(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        del deadline  # a resume is never skipped for time: a suspended origin hangs its writers
        failure: Exception | None = None
        for origin_id in origin_ids:
            name = self._thin_name(origin_id)
            try:
                info = self._ctl.info(name)
                if info is not None and info.suspended:
                    self._ctl.resume(name)
            except Exception as exc:  # resume the others all the same
                log.exception("pool=%s dev_id=%d event=resume-failed", self._pool, origin_id)
                failure = failure or exc
        if failure is not None:
            raise failure

    def delete(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        name = self._thin_name(dev_id)
        deadline.check(f"delete {dev_id}")
        info = self._ctl.info(name)
        if info is not None and info.live_table:
            raise dm_errors.DeviceBusy(f"thin device {dev_id} is active ({name}): deactivate it first")
        self._message(f"delete {dev_id}")

    def device_ids(self, *, deadline: deadline_mod.Deadline) -> dict[int, int]:
        devices = self._devices(attach=False, attached=[], deadline=deadline)
        if devices is None:
            raise errors.Unavailable(f"pool {self._pool} is not assembled")
        metadata_dev = devices[0]
        if self._ctl.info(self.pool_name) is None:
            # inactive pool: nobody writes the metadata, read it directly
            return thintools.ls_mapped_bytes(metadata_dev, deadline=deadline, metadata_snap=False)
        with self._held_metadata_snap(metadata_dev, "its device ids", deadline=deadline):
            return thintools.ls_mapped_bytes(metadata_dev, deadline=deadline, metadata_snap=True)

    @contextlib.contextmanager
    def _held_metadata_snap(
        self, metadata_dev: str, what: str, *, deadline: deadline_mod.Deadline
    ) -> Iterator[None]:
        """Hold a metadata snapshot of the live pool for the block only, released on every path.

        One at a time (the pool holds at most one). It blocks no pool message: mutations go on
        beside it; it only pins the metadata blocks of that moment until it is released. A crash
        while it is held leaves it held: the next holder finds the reserve busy and starts afresh.
        """
        mode = self._pool_mode()
        if mode in (model.PoolMode.RO, model.PoolMode.FAIL):
            # the kernel takes no messages in these modes (EOPNOTSUPP: no reserve_metadata_snap), and
            # the thin tools refuse live metadata without one
            raise errors.Unavailable(
                f"pool {self._pool} is {mode.value}: {what} can only be read with the pool "
                "torn down (thin_ls / thin_check offline)"
            )
        # another reader's snapshot (a changed-block delta of a big device, say) is waited for within
        # the caller's deadline only
        if not self._metadata_snap.acquire(timeout=max(deadline.remaining(), 0.001)):
            raise errors.DeadlineExceeded(
                f"pool {self._pool}: deadline exceeded waiting for the metadata snapshot"
            )
        try:
            deadline.check("reserve_metadata_snap")
            try:
                self._message("reserve_metadata_snap")
            except dm_errors.DeviceBusy:
                # a snapshot left by a crash between reserve and release: drop it, take a fresh one
                self._message("release_metadata_snap")
                self._message("reserve_metadata_snap")
            try:
                faults.reach("dmthin:metadata_snap/reserved")
                # a status without noflush commits, writing the superblock that names the snapshot
                self._ctl.status(self.pool_name)
                yield
                faults.reach("dmthin:metadata_snap/read")
            finally:
                self._message("release_metadata_snap")
        finally:
            self._metadata_snap.release()

    def _live_metadata_dev(self, *, deadline: deadline_mod.Deadline) -> str:
        devices = self._devices(attach=False, attached=[], deadline=deadline)
        if devices is None or self._ctl.info(self.pool_name) is None:
            raise errors.Unavailable(f"pool {self._pool} is not assembled")
        return devices[0]

    # -- changed-block tracking (read-only: one metadata snapshot, released before returning) ------

    def allocated(
        self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        self._thin_name(dev_id)
        metadata_dev = self._live_metadata_dev(deadline=deadline)
        with self._held_metadata_snap(metadata_dev, f"the blocks of {dev_id}", deadline=deadline):
            runs = thintools.mappings(metadata_dev, dev_id, deadline=deadline)
        return _byte_extents(runs, size_bytes)

    def delta(
        self, base_id: int, target_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        self._thin_name(base_id)
        self._thin_name(target_id)
        metadata_dev = self._live_metadata_dev(deadline=deadline)
        with self._held_metadata_snap(metadata_dev, f"the delta {base_id}..{target_id}", deadline=deadline):
            runs = thintools.delta(metadata_dev, base_id, target_id, deadline=deadline)
        return _byte_extents(runs, size_bytes)

    def mapped_bytes(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int:
        name = self._thin_name(dev_id)
        deadline.check(f"status {dev_id}")
        info = self._ctl.info(name)
        if info is not None and info.live_table:
            [target] = self._ctl.status(name)
            line = parse.parse_thin_status(target.params)
            if line.failed:
                raise errors.Unavailable(f"thin device {dev_id} has failed")
            return line.mapped_bytes
        ids = self.device_ids(deadline=deadline)
        if dev_id not in ids:
            raise dm_errors.DeviceNotFound(
                f"pool {self._pool} has no thin device {dev_id}", errno=errno.ENODATA
            )
        return ids[dev_id]

    def _thin_target(self, dev_id: int, size_bytes: int) -> ioctl.Target:
        if size_bytes <= 0:
            raise errors.InvalidArgument(f"thin device {dev_id}: size {size_bytes} must be positive")
        pool = self._ctl.info(self.pool_name)
        if pool is None or not pool.live_table:
            raise errors.Unavailable(f"pool {self._pool} is not assembled")
        sectors = -(-size_bytes // model.SECTOR)
        table = parse.ThinTable(pool_dev=f"{pool.major}:{pool.minor}", dev_id=dev_id)
        return ioctl.Target(0, sectors, "thin", table.format())

    def activate(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> str:
        name = self._thin_name(dev_id)
        target = self._thin_target(dev_id, size_bytes)
        deadline.check(f"activate {dev_id}")
        info = self._ctl.info(name)
        if info is not None and info.live_table:
            live = self._ctl.table(name)
            if live == [target]:
                if info.suspended:
                    self._ctl.resume(name)  # also recreates a missing node
                elif not os.path.exists(info.path):
                    self._ctl.resume(name)
                return info.path
            self._ctl.load(name, [target])  # same id, another size: a reload
            return self._ctl.resume(name).path
        created = info is None
        if created:
            self._ctl.create(name, uuid=self._thin_uuid(dev_id))
        try:
            faults.reach("dmthin:activate/created")
            self._ctl.load(name, [target])
            faults.reach("dmthin:activate/loaded")
            return self._ctl.resume(name).path
        except BaseException:
            # leave no table-less device behind: it would look active to a later info()
            with contextlib.suppress(errors.CsiThinError):
                self._ctl.remove(name)
            raise

    def deactivate(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        """Remove the thin device. Open by someone for a moment (blkid, udev, a reader): the remove is
        retried within the deadline; mounted here, or still open at the deadline: DeviceBusy."""
        name = self._thin_name(dev_id)
        deadline.check(f"deactivate {dev_id}")
        info = self._ctl.info(name)
        if info is None:
            return
        try:
            holders.retry_busy(
                lambda: self._ctl.remove(name),
                rdev=os.makedev(info.major, info.minor),
                source=info.path,
                what=f"deactivate {name}",
                deadline=deadline,
            )
        except dm_errors.DeviceNotFound:
            return

    def resize(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        name = self._thin_name(dev_id)
        deadline.check(f"resize {dev_id}")
        info = self._ctl.info(name)
        if info is None or not info.live_table:
            return  # dm-thin keeps no size: the next activation's table carries it
        target = self._thin_target(dev_id, size_bytes)
        live = sum(t.length for t in self._ctl.table(name))
        if target.length < live:
            # as every backend: a smaller table swapped under a mounted filesystem cuts its tail off
            raise errors.OutOfRange(
                f"thin device {dev_id} is {live * model.SECTOR} bytes: cannot shrink to {size_bytes}"
            )
        self._ctl.load(name, [target])
        try:
            faults.reach("dmthin:resize/loaded")
            # resume swaps the new table in (suspending the device for the swap itself)
            self._ctl.resume(name)
        except BaseException:
            # leave no inactive table behind: the next resume of the device (a snapshot of it, a
            # repair) would swap it in unasked; the device keeps its live table and size
            with contextlib.suppress(errors.CsiThinError):
                info = self._ctl.info(name)
                if info is not None and info.inactive_table:
                    self._ctl.clear(name)
            raise

    def kernel_size(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int | None:
        name = self._thin_name(dev_id)
        deadline.check(f"table of {dev_id}")
        info = self._ctl.info(name)
        if info is None or not info.live_table:
            return None  # dm-thin keeps no size for an inactive device
        return sum(t.length for t in self._ctl.table(name)) * model.SECTOR

    def active_ids(self, *, deadline: deadline_mod.Deadline) -> set[int]:
        deadline.check("list devices")
        return set(self._our_thins())


if TYPE_CHECKING:
    from csi_thin.pool import backend as backend_mod

    def _implements_backend(config: config_mod.PoolConfig) -> backend_mod.Backend:
        return DmThinBackend(config)  # mypy proves DmThinBackend satisfies the Protocol
