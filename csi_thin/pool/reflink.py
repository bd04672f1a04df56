"""A pool backend without device-mapper: sparse files on a reflink filesystem, served by loop devices.

Sits beside the dm-thin backend under the pool engine and offers the same primitive steps
(`csi_thin.pool.backend.Backend`). The pool is a directory on XFS (reflink=1) or btrfs: an existing
mount, or an image file this backend formats and loop-mounts at the directory (small setups).

The mapping onto dm-thin:
- device id N is the sparse file `<directory>/devices/<N>.img`; its length is the device size;
- create_snap is an FICLONE reflink of the origin file: instant, copy-on-write, like a thin snapshot;
- the transaction id is a small file, replaced atomically (a spare swapped in, so nothing is
  allocated: it works on a full filesystem), with compare-and-swap under a lock;
- activate attaches the file to a loop device; the kernel's loop table is the truth of what is
  active and where (`loop.find(backing_file)`), so nothing here can drift from it;
- an attached, mounted origin is frozen (FIFREEZE) around the clone where dm-thin would suspend.

Crash safety: a new device file is built under a temporary name, fsynced, then linked to its final
name (link(2) never replaces, so an existing device is never clobbered) and the directory fsynced.
A crash leaves either no device or a whole one; leftovers under the temporary prefix are removed by
the next assemble and never listed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

from csi_thin import config, errors, model, runner
from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import holders, loop
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import faults, fiemap

log = logging.getLogger(__name__)

# linux/fs.h: _IOW(0x94, 9, int), _IOWR('X', 119, int), _IOWR('X', 120, int)
FICLONE = 0x40049409
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

#: Filesystems this backend can format an image with (both reflink with FICLONE).
FS_TYPES = ("xfs", "btrfs")

_DEVICES = "devices"
_TXID = "transaction_id"
_TXID_SPARE = "transaction_id.spare"  # the next id is written here, then swapped in (_write_txid)
_LOCK = ".lock"
_TMP = ".tmp-"
_SUFFIX = ".img"
_DELETED = " (deleted)"  # how sysfs shows the backing file of a loop device after an unlink
_DEVICE_FILE = re.compile(r"(0|[1-9][0-9]{0,7})\.img")
#: statvfs gives inode counts, not bytes; status reports them scaled by XFS's default (v5) inode size
#: so the figures read as bytes and the used ratio is exact.
NOMINAL_INODE_BYTES = 512
#: how `xfs_repair -n` says the log holds changes a mount would replay (a crash, not damage)
_XFS_DIRTY_LOG = "valuable metadata changes in a log"
#: errnos with which FICLONE says "this filesystem (or this pair of files) cannot share extents"
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


class DeviceBusy(dm_errors.DeviceBusy):
    """The device's block device is in use (mounted, or claimed by another holder).

    A subclass of the dm backend's: callers catch one type for either backend."""


class NotActive(errors.FailedPrecondition):
    """The device exists but has no block device now."""


class TransactionIdMismatch(dm_errors.TransactionIdMismatch):
    """set_transaction_id's `old` is not the pool's current transaction id."""


class NoReflink(errors.FailedPrecondition):
    """The pool directory's filesystem cannot share extents (FICLONE)."""


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields this backend needs."""

    dev: int  # st_dev / st_rdev form of major:minor
    mount_point: str
    fs_type: str
    source: str
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/<pid>/mountinfo (proc(5)): `id parent maj:min root point opts [tags] - fs src super`."""
    out: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        major, minor = (int(x) for x in fields[2].split(":"))
        out.append(
            Mount(
                dev=os.makedev(major, minor),
                mount_point=_unescape(fields[4]),
                fs_type=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                read_only="ro" in fields[5].split(","),
            )
        )
    return out


def mounts() -> list[Mount]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return parse_mountinfo(f.read())


def _is_mount_of(mount: Mount, dev: str) -> bool:
    try:
        if mount.dev == os.stat(dev).st_rdev:
            return True
    except FileNotFoundError:
        return False
    return mount.source.startswith("/") and os.path.realpath(mount.source) == os.path.realpath(dev)


def device_file_id(name: str) -> int | None:
    """The device id of a file name in the devices directory (`<N>.img`), None for anything else."""
    m = _DEVICE_FILE.fullmatch(name)
    if m is None:
        return None
    stem = m.group(1)
    dev_id = int(stem)
    return dev_id if dev_id <= model.MAX_DEVICE_ID else None


def _check_id(dev_id: int) -> None:
    if isinstance(dev_id, bool) or not isinstance(dev_id, int) or not 0 <= dev_id <= model.MAX_DEVICE_ID:
        raise errors.InvalidArgument(f"device id {dev_id!r} is not in 0..{model.MAX_DEVICE_ID}")


def _check_size(size_bytes: int) -> None:
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise errors.InvalidArgument(f"device size {size_bytes!r} must be a positive number of bytes")
    if size_bytes % model.SECTOR:
        raise errors.InvalidArgument(f"device size {size_bytes} is not a multiple of {model.SECTOR} bytes")


def _oserror(what: str, exc: OSError) -> errors.CsiThinError:
    """Map an OSError of a pool step onto the backend's error contract."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.ResourceExhausted(f"{what}: pool filesystem is full ({os.strerror(exc.errno)})")
    if exc.errno == errno.EROFS:  # like a read-only thin pool: reads work, changes wait
        return errors.Unavailable(f"{what}: pool filesystem is read-only")
    return errors.Internal(f"{what}: {os.strerror(exc.errno or 0) if exc.errno else exc}")


def _make_private(devices: str) -> None:
    """Tenants' data is root's alone: the devices folder 0700, each device file 0600 (also those an
    older version made readable by everyone)."""
    os.chmod(devices, 0o700)
    for entry in os.scandir(devices):
        # a stat, not a chmod, per file: a chmod is a metadata write even when nothing changes, and
        # this runs at every start over every device of the pool
        if (
            device_file_id(entry.name) is not None
            and entry.stat(follow_symlinks=False).st_mode & 0o777 != 0o600
        ):
            os.chmod(entry.path, 0o600)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1  # linux/fs.h
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def _exchange(a: str, b: str) -> None:
    """Atomically swap the names of two existing files (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a, None, b)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clone(src_fd: int, dst_fd: int) -> None:
    """Share every extent of src with dst (dst becomes a CoW copy). A seam for fault injection."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


@contextlib.contextmanager
def _frozen(mount_point: str, *, dev: int | None = None) -> Iterator[None]:
    """Hold the filesystem mounted at `mount_point` (on block device `dev`, when given) frozen
    (flushed, writes blocked); always thaw."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if dev is not None and os.fstat(fd).st_dev != dev:  # covered since it was looked up
            raise errors.Unavailable(f"{mount_point} no longer reaches the filesystem to freeze; retry")
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise errors.Unavailable(
                    f"filesystem at {mount_point} is already frozen by someone else; retry later"
                ) from exc
            raise errors.Internal(f"freeze {mount_point}: {os.strerror(exc.errno or 0)}") from exc
        frozen_at = time.monotonic()
        log.info("event=freeze mount_point=%s", mount_point)
        try:
            yield
        finally:
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as exc:  # EINVAL: not frozen (someone thawed it already): fine
                if exc.errno != errno.EINVAL:
                    log.exception("event=thaw_failed mount_point=%s", mount_point)
                    raise errors.Internal(
                        f"thaw {mount_point}: {os.strerror(exc.errno or 0)}; run `fsfreeze -u {mount_point}`"
                    ) from exc
            log.info(
                "event=thaw mount_point=%s frozen_ms=%.1f", mount_point, (time.monotonic() - frozen_at) * 1000
            )
    finally:
        os.close(fd)


def _loop_tag(dev: str) -> object:
    """What a loop device is attached to: its backing file's (st_dev, st_ino) as `os.stat` gives
    it; the path sysfs shows when the file's filesystem has failed (EIO); None when unbound."""
    try:
        return loop.identity(dev)
    except loop.Unreadable:
        try:
            return ("path", loop.backing_file(dev))
        except OSError as exc:  # not even sysfs answers: matches no file of ours
            return ("unreadable", exc.errno)


class ReflinkBackend:
    """`csi_thin.pool.backend.Backend` on sparse reflinked files and loop devices."""

    kind = "reflink"

    def __init__(self, cfg: config.PoolConfig) -> None:
        if cfg.reflink is None or not cfg.reflink.directory:
            raise errors.InvalidArgument("backend reflink needs a 'reflink' section with a directory")
        rc = cfg.reflink
        if not os.path.isabs(rc.directory):
            raise errors.InvalidArgument(f"reflink directory {rc.directory!r} must be absolute")
        if rc.image_file is not None:
            if not os.path.isabs(rc.image_file):
                raise errors.InvalidArgument(f"reflink image_file {rc.image_file!r} must be absolute")
            if rc.fs_type not in FS_TYPES:
                raise errors.InvalidArgument(
                    f"reflink fs_type {rc.fs_type!r} cannot reflink: use one of {list(FS_TYPES)}"
                )
        if rc.block_size <= 0 or rc.block_size % model.SECTOR:
            raise errors.InvalidArgument(f"reflink block_size {rc.block_size} must be a multiple of 512")
        self._cfg = rc
        self._name = cfg.name
        self._dir = os.path.realpath(rc.directory)
        self._devices = os.path.join(self._dir, _DEVICES)
        self._image = os.path.realpath(rc.image_file) if rc.image_file else None
        # per-id locks: activate/deactivate/snapshot of one id are check-then-act sequences on the
        # kernel's loop table; the engine serialises per name, this guards direct callers too
        self._locks: collections.defaultdict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        #: origins a group snapshot holds frozen (quiesce), each with what thaws it (release)
        self._held: dict[int, contextlib.ExitStack] = {}
        #: origins whose thaw failed (quiesce's own undo, or release): the next release tries again
        self._unthawed: set[int] = set()
        #: the held origins' frozen filesystems: mount point and an fd on it (_check_still_frozen)
        self._frozen_mounts: dict[int, tuple[str, int]] = {}
        self._held_guard = threading.Lock()

    # --- paths and small helpers ---------------------------------------------------------------

    def _path(self, dev_id: int) -> str:
        return os.path.join(self._devices, f"{dev_id}{_SUFFIX}")

    @contextlib.contextmanager
    def _locked(self, dev_id: int) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks[dev_id]
        with lock:
            yield

    def _require_assembled(self) -> None:
        try:
            os.stat(self._devices)
            os.stat(os.path.join(self._dir, _TXID))
        except FileNotFoundError as exc:
            raise errors.Unavailable(f"reflink pool {self._name} at {self._dir} is not assembled") from exc
        except OSError as exc:  # EIO: the filesystem shut itself down after an error
            raise errors.Unavailable(
                f"reflink pool {self._name} at {self._dir} has failed: {os.strerror(exc.errno or 0)}"
            ) from exc

    def _require_device(self, dev_id: int) -> str:
        _check_id(dev_id)
        self._require_assembled()
        path = self._path(dev_id)
        if not os.path.isfile(path):
            raise errors.NotFound(f"pool {self._name} has no device {dev_id}")
        return path

    def _mount_of(self, dev: str) -> Mount | None:
        """A mount of block device `dev`: by major:minor, or by source for btrfs (whose mounts show
        an anonymous device number)."""
        return next((m for m in mounts() if _is_mount_of(m, dev)), None)

    def _image_mounted(self) -> Mount | None:
        """The mount at the pool directory, if any."""
        return next((m for m in reversed(mounts()) if m.mount_point == self._dir), None)

    @contextlib.contextmanager
    def _pool_lock(self, deadline: deadline_mod.Deadline) -> Iterator[None]:
        """Serialise transaction id updates across threads and processes (flock on a lock file)."""
        fd = os.open(os.path.join(self._dir, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for _ in deadline.backoff(first=0.005, cap=0.1):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
            else:
                raise errors.DeadlineExceeded(f"pool {self._name}: lock not acquired before the deadline")
            yield
        finally:
            os.close(fd)

    # --- assemble / teardown / destroy ------------------------------------------------------

    def assemble(self, *, deadline: deadline_mod.Deadline) -> None:
        deadline.check("assemble")
        if self._image is not None:
            self._assemble_image(deadline)
        elif not os.path.isdir(self._dir):
            raise errors.FailedPrecondition(
                f"reflink pool directory {self._dir} does not exist (mount an XFS reflink=1 or btrfs "
                "filesystem there, or configure image_file + image_size)"
            )
        if self._assembled_read_only():
            return
        self._probe_reflink()
        try:
            os.makedirs(self._devices, mode=0o700, exist_ok=True)
            _make_private(self._devices)
            # everything a fence touches exists from here on: on a full filesystem even a new
            # empty file (an inode) may not be had
            for name in (_TXID, _TXID_SPARE):
                if not os.path.exists(os.path.join(self._dir, name)):
                    self._create_first(name)
            os.close(os.open(os.path.join(self._dir, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            for folder in (self._devices, self._dir):
                for name in os.listdir(folder):
                    # a step (or probe, or txid update) that crashed before its link or rename:
                    # never a device, and nothing else uses the name (assemble runs first, alone)
                    if name.startswith(_TMP):
                        log.info("event=remove_partial pool=%s file=%s", self._name, name)
                        os.unlink(os.path.join(folder, name))
                _fsync_dir(folder)
        except OSError as exc:
            raise _oserror(f"assemble pool {self._name}", exc) from exc
        self._thaw_leftovers()
        log.info("event=assembled pool=%s directory=%s", self._name, self._dir)

    def _assembled_read_only(self) -> bool:
        """Assemble an existing pool on a read-only filesystem (the `read_only` condition: btrfs
        forces it after an error, an operator remounts it ro for a repair) without writing anything:
        existing volumes are still activated and deactivated there, every change is refused (status
        says RO). False when the filesystem is writable (assemble goes on as usual)."""
        try:
            if not os.statvfs(self._dir).f_flag & os.ST_RDONLY:
                return False
        except OSError as exc:
            raise _oserror(f"assemble pool {self._name}", exc) from exc
        if not os.path.exists(os.path.join(self._dir, _TXID)):
            raise errors.Unavailable(
                f"reflink pool directory {self._dir} is read-only: no pool can be made there"
            )
        log.warning("event=assembled_read_only pool=%s directory=%s", self._name, self._dir)
        self._thaw_leftovers()
        return True

    def _create_first(self, name: str) -> None:
        """Make a transaction id file of a pool that lacks it. The spare of a pool made before it
        existed cannot be made on a full filesystem: the pool still assembles (deletes are what frees
        space) and the first fence makes it (`_write_txid`)."""
        try:
            self._create_file(name, b"0\n")
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if name != _TXID_SPARE or not full or not os.path.exists(os.path.join(self._dir, _TXID)):
                raise
            log.warning("event=spare_deferred pool=%s reason=filesystem full", self._name)

    def _thaw_leftovers(self) -> None:
        """Thaw filesystems on this pool's devices that a killed snapshot step left frozen.

        try/finally thaws on every failure a process survives; SIGKILL (or a crash of the node
        agent) between FIFREEZE and FITHAW is the one it does not, and a frozen volume blocks its
        writers forever. Assemble runs first at every start, so the freeze ends there. FITHAW of a
        filesystem that is not frozen answers EINVAL and changes nothing.
        """
        # the attached devices, from one pass over the kernel's loop devices: a look-up per device
        # file would read every loop device once per file of the pool (seconds at 10,000 devices)
        for path in sorted(self._attached()):
            dev_id = device_file_id(os.path.basename(path))
            if path.endswith(_DELETED) or dev_id is None:
                continue
            try:
                # loop.find also makes the /dev node if the container lacks it
                self._thaw_device(dev_id, repair=True, dev=loop.find(path))
            except OSError as exc:
                log.warning("event=thaw_failed pool=%s id=%d errno=%s", self._name, dev_id, exc.errno)

    def _thaw_device(self, dev_id: int, *, repair: bool = False, dev: str | None = None) -> None:
        """Thaw the filesystem mounted from device `dev_id` (its loop device `dev` when the caller
        found it already), if it is attached, mounted and frozen (FITHAW of a filesystem that is not
        frozen answers EINVAL and changes nothing)."""
        if dev is None:
            dev = loop.find(self._path(dev_id))
        mount = self._reachable_mount_of(dev) if dev is not None else None
        if mount is None:
            return
        try:
            fd = os.open(mount.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # not reachable from here: not ours to repair
        try:
            if repair:
                faults.reach("reflink:assemble/repair")
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            log.warning(
                "event=thawed_leftover pool=%s id=%d mount_point=%s", self._name, dev_id, mount.mount_point
            )
        finally:
            os.close(fd)

    def _assemble_image(self, deadline: deadline_mod.Deadline) -> None:
        assert self._image is not None
        if not os.path.exists(self._image):
            self._create_image(deadline)
        os.chmod(self._image, 0o600)  # as made since; an older version's was readable by everyone
        # direct IO where the host allows it: the image's pages are cached once, inside it; its
        # filesystem is made with 4 KiB sectors so it mounts whatever block size the loop gets
        dev = loop.find(self._image)
        attached_here = dev is None
        if dev is None:
            dev = loop.attach(self._image, direct_io=True, deadline=deadline)
        try:
            self._mount_image(dev, deadline)
        except BaseException:
            if attached_here:  # leave the host as it was: no loop device nobody will detach
                with contextlib.suppress(errors.CsiThinError):
                    loop.detach(dev)
            raise

    def _mount_image(self, dev: str, deadline: deadline_mod.Deadline) -> None:
        current = self._image_mounted()
        if current is not None:
            if not _is_mount_of(current, dev):
                raise errors.FailedPrecondition(
                    f"reflink pool directory {self._dir} is already a mount of {current.source}, "
                    f"not of the pool image {self._image}"
                )
            return
        other = self._mount_of(dev)
        if other is not None:
            raise errors.FailedPrecondition(
                f"pool image {self._image} ({dev}) is mounted at {other.mount_point}, not at {self._dir}"
            )
        self._check_image(dev, deadline)
        os.makedirs(self._dir, exist_ok=True)
        runner.run(["mount", "-t", self._cfg.fs_type, dev, self._dir], deadline=deadline)
        log.info("event=image_mounted pool=%s image=%s dev=%s", self._name, self._image, dev)

    def _create_image(self, deadline: deadline_mod.Deadline) -> None:
        """Make and format the image under a temporary name, then rename: never a half-made image."""
        assert self._image is not None
        size = self._cfg.image_size
        if size <= 0:
            raise errors.InvalidArgument(f"reflink pool image {self._image} is missing and image_size is 0")
        parent = os.path.dirname(self._image)
        tmp = os.path.join(parent, f"{_TMP}{os.path.basename(self._image)}")
        try:
            os.makedirs(parent, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            if self._cfg.fs_type == "xfs":
                argv = ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-s", "size=4096", tmp]
            else:
                argv = ["mkfs.btrfs", "-q", "-f", tmp]
            runner.run(argv, deadline=deadline)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._image)
            _fsync_dir(parent)
        except OSError as exc:
            raise _oserror(f"create pool image {self._image}", exc) from exc
        finally:
            with contextlib.suppress(OSError):  # best effort: the next attempt reuses the name
                os.unlink(tmp)
        log.info("event=image_created pool=%s image=%s size=%d", self._name, self._image, size)

    def _check_image(self, dev: str, deadline: deadline_mod.Deadline) -> None:
        """The metadata check of an inactive pool: a read-only fsck of the unmounted image."""
        if self._cfg.fs_type == "xfs":
            argv = ["xfs_repair", "-n", dev]
        else:
            argv = ["btrfs", "check", "--readonly", dev]
        res = runner.run(argv, deadline=deadline, check=False)
        if res.returncode != 0 and self._cfg.fs_type == "xfs" and _XFS_DIRTY_LOG in res.stderr + res.stdout:
            # a crash leaves changes in the log, which `xfs_repair -n` cannot replay and so reports
            # as damage: let a mount replay them, then check the result
            log.info("event=replay_log pool=%s image=%s", self._name, self._image)
            os.makedirs(self._dir, exist_ok=True)
            try:
                runner.run(["mount", "-t", "xfs", dev, self._dir], deadline=deadline)
            except errors.CommandFailed as exc:
                raise dm_errors.MetadataCheckFailed(
                    f"pool image {self._image}: its log could not be replayed (mount failed); "
                    f"repair it offline before assembling: {exc.stderr.strip()[-1000:]}"
                ) from exc
            runner.run(["umount", self._dir], deadline=deadline)
            res = runner.run(argv, deadline=deadline, check=False)
        if res.returncode != 0:
            raise dm_errors.MetadataCheckFailed(
                f"pool image {self._image} failed its check ({argv[0]} exited {res.returncode}); "
                f"repair it offline before assembling: {(res.stderr or res.stdout).strip()[-1000:]}"
            )

    def _probe_reflink(self) -> None:
        """Prove the directory can reflink by cloning a small temp file; refuse clearly if not.

        A full filesystem cannot hold the probe's files: an existing pool (proven when it was made)
        is then assembled unprobed, since a driver that does not start cannot delete anything."""
        src = os.path.join(self._dir, f"{_TMP}probe-{uuid.uuid4().hex}")
        dst = src + "-clone"
        try:
            try:
                src_fd = os.open(src, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if self._full_existing_pool(exc):
                    return
                raise _oserror(f"reflink probe in {self._dir}", exc) from exc
            try:
                os.write(src_fd, b"csi-thin reflink probe\n" * 200)
                dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    _clone(src_fd, dst_fd)
                finally:
                    os.close(dst_fd)
            except OSError as exc:
                if self._full_existing_pool(exc):
                    return
                if exc.errno not in _NO_REFLINK:
                    raise _oserror(f"reflink probe in {self._dir}", exc) from exc
                fs = next((m.fs_type for m in reversed(mounts()) if m.dev == os.stat(self._dir).st_dev), "?")
                raise NoReflink(
                    f"reflink pool directory {self._dir} is on {fs}, which cannot reflink "
                    f"(FICLONE: {os.strerror(exc.errno or 0)}); use XFS made with -m reflink=1, or btrfs"
                ) from exc
            finally:
                os.close(src_fd)
        finally:
            for path in (src, dst):
                with contextlib.suppress(OSError):  # best effort: assemble sweeps leftovers
                    os.unlink(path)

    def _full_existing_pool(self, exc: OSError) -> bool:
        if exc.errno != errno.ENOSPC or not os.path.exists(os.path.join(self._dir, _TXID)):
            return False
        log.warning("event=probe_skipped pool=%s reason=filesystem full (an existing pool)", self._name)
        return True

    def teardown(self, *, deadline: deadline_mod.Deadline) -> None:
        deadline.check("teardown")
        busy: list[DeviceBusy] = []
        # from the kernel's loop table, not the directory: a failed pool filesystem (EIO) cannot be
        # listed, and must still be let go of so it can be unmounted, checked and mounted again
        for path, seen in sorted(self._attached().items()):
            # for a file that still exists, `find` also makes the /dev node if the container lacks it
            dev = seen if path.endswith(_DELETED) else loop.find(path) or seen
            try:
                st = os.stat(path)
                ident: object = (st.st_dev, st.st_ino)
            except OSError:  # deleted, or a failed pool filesystem: take what the kernel says now
                ident = _loop_tag(dev)
            try:
                self._detach(dev, ident, os.path.basename(path), deadline)
            except DeviceBusy as exc:
                busy.append(exc)
        if busy:
            raise DeviceBusy(f"teardown of pool {self._name}: " + "; ".join(e.message for e in busy))
        if self._image is None:
            return
        current = self._image_mounted()
        image_dev = loop.find(self._image)
        if current is not None and image_dev is not None and _is_mount_of(current, image_dev):
            res = runner.run(["umount", self._dir], deadline=deadline, check=False)
            if res.returncode != 0:
                raise DeviceBusy(
                    f"unmount pool {self._name} at {self._dir}: {(res.stderr or res.stdout).strip()}"
                )
        if image_dev is not None:
            # btrfs lets go of its device a moment after umount returns: the detach is then
            # deferred to the last close, so wait for it rather than race a re-assembly
            loop.detach(image_dev)
            for _ in deadline.backoff(first=0.005, cap=0.1):
                if loop.find(self._image) is None:
                    break
            else:
                raise DeviceBusy(f"pool image {self._image} ({image_dev}) is still open after unmount")
        log.info("event=teardown pool=%s", self._name)

    def destroy(self, *, deadline: deadline_mod.Deadline) -> None:
        self.teardown(deadline=deadline)
        try:
            if self._image is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._image)
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rmdir(self._dir)  # the mount point assemble made; kept if someone filled it
            else:
                if os.path.isdir(self._devices):
                    for name in os.listdir(self._devices):
                        os.unlink(os.path.join(self._devices, name))
                    os.rmdir(self._devices)
                for name in (_TXID, _TXID_SPARE, _LOCK):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self._dir, name))
        except OSError as exc:
            raise _oserror(f"destroy pool {self._name}", exc) from exc
        log.info("event=destroyed pool=%s", self._name)

    # --- status and transaction id -----------------------------------------------------------

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        """Usage from statvfs of the pool filesystem.

        The metadata figures are the filesystem's inodes (used/total, times NOMINAL_INODE_BYTES): its
        analogue of a thin pool's metadata space. btrfs has no inode limit (it reports 0 inodes) and
        keeps metadata in the same space as data, so there the data figures stand for both.
        """
        deadline.check("status")
        try:
            st = os.statvfs(self._dir)
            os.stat(self._devices)
            txid = self._read_txid_raw()
        except FileNotFoundError as exc:
            raise errors.Unavailable(f"reflink pool {self._name} at {self._dir} is not assembled") from exc
        except OSError as exc:
            # a filesystem that shut down after an IO or corruption error answers EIO to
            # everything: report it like a failed thin pool, so nothing new is placed on it
            log.warning("event=pool_failed pool=%s errno=%s", self._name, exc.errno)
            return model.PoolStatus(
                transaction_id=0,
                block_size_bytes=self._cfg.block_size,
                data_used_bytes=0,
                data_total_bytes=0,
                metadata_used_bytes=0,
                metadata_total_bytes=0,
                mode=model.PoolMode.FAIL,
                needs_check=True,
            )
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        free = st.f_bavail * st.f_frsize
        if st.f_files > 0:
            meta_total = st.f_files * NOMINAL_INODE_BYTES
            meta_used = (st.f_files - st.f_ffree) * NOMINAL_INODE_BYTES
        else:
            meta_total, meta_used = total, used
        if st.f_flag & os.ST_RDONLY:
            mode = model.PoolMode.RO
        elif free < max(4 * self._cfg.block_size, min(total // 256, 64 * model.MiB)):
            # "~0": a filesystem refuses writes with a little space still free (XFS keeps per-AG
            # and delayed-allocation reserves), so full means below a small slack, not zero
            mode = model.PoolMode.OUT_OF_DATA_SPACE
        else:
            mode = model.PoolMode.RW
        return model.PoolStatus(
            transaction_id=txid,
            block_size_bytes=self._cfg.block_size,
            data_used_bytes=used,
            data_total_bytes=total,
            metadata_used_bytes=meta_used,
            metadata_total_bytes=meta_total,
            mode=mode,
            needs_check=False,
        )

    def transaction_id(self, *, deadline: deadline_mod.Deadline) -> int:
        deadline.check("read transaction id")
        self._require_assembled()
        return self._read_txid()

    def _read_txid(self) -> int:
        try:
            return self._read_txid_raw()
        except OSError as exc:
            raise _oserror(f"read the transaction id of pool {self._name}", exc) from exc

    def _read_txid_raw(self) -> int:
        path = os.path.join(self._dir, _TXID)
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        if not text.isdigit():
            raise errors.Internal(f"{path} holds {text[:40]!r}, not a transaction id")
        return int(text)

    def _create_file(self, name: str, data: bytes) -> None:
        """A whole new file in the pool directory (temporary name, fsync, rename, fsync the dir)."""
        tmp = os.path.join(self._dir, f"{_TMP}{name}-{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(self._dir, name))
            _fsync_dir(self._dir)
        finally:
            with contextlib.suppress(OSError):  # best effort: assemble sweeps leftovers
                os.unlink(tmp)

    def _write_txid(self, value: int) -> None:
        """Replace the transaction id atomically, allocating nothing.

        The value is written over the spare file's content (nobody reads the spare, so a torn write
        there is harmless) and fsynced; then the spare and the live file swap names in one journalled
        step (renameat2 RENAME_EXCHANGE). Both files keep their one block for good, so this works on
        a full pool filesystem too, where it matters most: the fence completes the delete that frees
        space. (A temporary file renamed over the live one needs a new block: ENOSPC when full.)
        """
        spare = os.path.join(self._dir, _TXID_SPARE)
        if not os.path.exists(spare):  # a pool made before the spare existed: make it (allocates)
            self._create_file(_TXID_SPARE, b"0\n")
        data = f"{value}\n".encode("ascii")
        fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC)
        try:
            # overwrite, then trim: a truncate to 0 first would free the block a full pool cannot get back
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        _exchange(spare, os.path.join(self._dir, _TXID))
        _fsync_dir(self._dir)

    def set_transaction_id(self, old: int, new: int, *, deadline: deadline_mod.Deadline) -> None:
        deadline.check("set transaction id")
        for label, value in (("old", old), ("new", new)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise errors.InvalidArgument(f"transaction id {label}={value!r} must be a non-negative int")
        self._require_assembled()
        with self._pool_lock(deadline):
            current = self._read_txid()
            if current != old:
                raise TransactionIdMismatch(
                    f"pool {self._name}: transaction id is {current}, not {old} (cannot set {new})"
                )
            try:
                self._write_txid(new)
            except OSError as exc:
                raise _oserror(f"set transaction id of pool {self._name}", exc) from exc
        log.info("event=set_transaction_id pool=%s old=%d new=%d", self._name, old, new)

    # --- device steps -----------------------------------------------------------------------

    def _list(self) -> list[int]:
        try:
            names = os.listdir(self._devices)
        except OSError as exc:
            raise _oserror(f"list devices of pool {self._name}", exc) from exc
        return [i for i in (device_file_id(n) for n in names) if i is not None]

    def _publish(self, tmp: str, dev_id: int) -> None:
        """fsync `tmp`, link it to the device's final name (never replacing one), fsync the dir."""
        faults.reach("reflink:publish/written")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.reach("reflink:publish/synced")
        try:
            os.link(tmp, self._path(dev_id))
        except FileExistsError as exc:
            raise errors.AlreadyExists(f"pool {self._name} already has device {dev_id}") from exc
        faults.reach("reflink:publish/linked")
        os.unlink(tmp)
        _fsync_dir(self._devices)

    def _tmp(self, dev_id: int) -> str:
        return os.path.join(self._devices, f"{_TMP}{dev_id}-{uuid.uuid4().hex}")

    def create_thin(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        _check_id(dev_id)
        _check_size(size_bytes)
        deadline.check(f"create device {dev_id}")
        self._require_assembled()
        if os.path.exists(self._path(dev_id)):
            raise errors.AlreadyExists(f"pool {self._name} already has device {dev_id}")
        tmp = self._tmp(dev_id)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size_bytes)
            finally:
                os.close(fd)
            self._publish(tmp, dev_id)
        except OSError as exc:
            raise _oserror(f"create device {dev_id}", exc) from exc
        finally:
            with contextlib.suppress(OSError):  # best effort: assemble sweeps leftovers
                os.unlink(tmp)
        log.info("event=create_thin pool=%s id=%d size=%d", self._name, dev_id, size_bytes)

    def create_snap(
        self,
        dev_id: int,
        origin_id: int,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        held: bool = False,
    ) -> None:
        _check_id(dev_id)
        _check_size(size_bytes)
        origin = self._require_device(origin_id)
        deadline.check(f"snapshot {origin_id} -> {dev_id}")
        if os.path.exists(self._path(dev_id)):
            raise errors.AlreadyExists(f"pool {self._name} already has device {dev_id}")
        tmp = self._tmp(dev_id)
        with self._locked(origin_id):
            try:
                src_fd = os.open(origin, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    dst_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    try:
                        # a buffered loop device leaves writes in the file's page cache: flush them
                        # before the freeze, so that inside it only the freeze's own flush is left
                        # (held: quiesce froze the origin and flushed it already)
                        if not held:
                            os.fsync(src_fd)
                        with contextlib.nullcontext() if held else self._consistent(origin):
                            faults.reach("reflink:create_snap/frozen")
                            if not held:
                                os.fsync(src_fd)
                            deadline.check(f"clone {origin_id} -> {dev_id}")
                            _clone(src_fd, dst_fd)
                            faults.reach("reflink:create_snap/cloned")
                            if held:
                                self._check_still_frozen(origin_id)
                        if os.fstat(dst_fd).st_size < size_bytes:  # restore into a larger device
                            os.ftruncate(dst_fd, size_bytes)
                    finally:
                        os.close(dst_fd)
                finally:
                    os.close(src_fd)
                self._publish(tmp, dev_id)
            except OSError as exc:
                raise _oserror(f"snapshot {origin_id} -> {dev_id}", exc) from exc
            finally:
                with contextlib.suppress(OSError):  # best effort: assemble sweeps leftovers
                    os.unlink(tmp)
        log.info("event=create_snap pool=%s id=%d origin=%d", self._name, dev_id, origin_id)

    def quiesce(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        with self._held_guard:
            busy = sorted(set(origin_ids) & set(self._held))
            if busy:
                raise errors.Unavailable(f"device {busy[0]} is held by another group snapshot; retry")
        # Only a freeze holds an origin: one attached without a filesystem mounted from it here (raw
        # block, or mounted in another mount namespace) is flushed, and its writers go on. One such
        # origin is still of the group's instant (every other one is frozen while it is cloned);
        # two are cloned at two instants, and a write on the second that depended on a write to
        # the first after the first's clone breaks write order. The spec: hold, or fail.
        unheld = [i for i in origin_ids if self._attached_unmounted(i)]
        if len(unheld) > 1:
            raise errors.FailedPrecondition(
                f"devices {', '.join(map(str, unheld))} are in use without a filesystem mounted from "
                "them on this node: their writes cannot be held at one instant on a reflink pool (only "
                "a filesystem can be frozen); a group may hold at most one such volume"
            )
        stacks: dict[int, contextlib.ExitStack] = {}
        probes: dict[int, tuple[str, int]] = {}
        try:
            for origin_id in origin_ids:
                origin = self._require_device(origin_id)
                deadline.check(f"freeze {origin_id}")
                stack = stacks[origin_id] = contextlib.ExitStack()
                try:
                    fd = os.open(origin, os.O_RDONLY | os.O_CLOEXEC)
                    stack.callback(os.close, fd)
                    os.fsync(fd)  # as create_snap: the page cache first, so the freeze's flush is short
                    frozen = stack.enter_context(self._consistent(origin))
                    os.fsync(fd)  # what the freeze flushed through a buffered loop device
                    if frozen is not None:  # to see, at its clone, that the freeze is still on
                        mount_fd = os.open(frozen, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                        stack.callback(os.close, mount_fd)
                        probes[origin_id] = (frozen, mount_fd)
                except OSError as exc:
                    raise _oserror(f"hold device {origin_id} for a group snapshot", exc) from exc
            faults.reach("reflink:quiesce/frozen")
        except BaseException as exc:
            left: list[int] = []
            for origin_id, stack in reversed(stacks.items()):  # every path thaws what it froze
                try:
                    stack.close()
                except Exception:  # thaw the others all the same
                    log.exception("event=thaw_failed pool=%s id=%d", self._name, origin_id)
                    left.append(origin_id)
            if left:
                with self._held_guard:
                    self._unthawed.update(left)
                raise backend_mod.HoldLeft(
                    f"group snapshot hold failed ({exc!r}) and devices {left} could not be thawed",
                    origin_ids=left,
                ) from exc
            raise
        with self._held_guard:
            self._held.update(stacks)
            self._frozen_mounts.update(probes)

    def _check_still_frozen(self, origin_id: int) -> None:
        """After a held origin's clone: its filesystem must still be frozen. The kernel keeps no
        count of who froze a filesystem, so someone else's FITHAW (`fsfreeze -u`) ends our freeze,
        and writes went on between the group's instant and this clone. FIFREEZE answers EBUSY on a
        frozen filesystem; one that succeeds has found it thawed (and froze it again: the release
        thaws it)."""
        with self._held_guard:
            probe = self._frozen_mounts.get(origin_id)
        if probe is None:
            return
        mount_point, fd = probe
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return  # still frozen
            raise errors.Internal(f"freeze {mount_point}: {os.strerror(exc.errno or 0)}") from exc
        raise errors.Unavailable(
            f"filesystem at {mount_point} was thawed by someone else while the group snapshot held it: "
            "its writes went on, the group would not be of one instant; retry"
        )

    def _attached_unmounted(self, origin_id: int) -> bool:
        """Attached to a loop device, and no filesystem mounted from it is reachable here."""
        dev = loop.find(self._require_device(origin_id))
        return dev is not None and self._reachable_mount_of(dev) is None

    def release(self, origin_ids: Sequence[int], *, deadline: deadline_mod.Deadline) -> None:
        del deadline  # a thaw is never skipped for time: a frozen filesystem hangs its writers
        failure: Exception | None = None
        for origin_id in origin_ids:
            with self._held_guard:
                stack = self._held.pop(origin_id, None)
                self._frozen_mounts.pop(origin_id, None)
                retry = origin_id in self._unthawed
            try:
                if stack is not None:
                    stack.close()
                elif retry:  # a thaw of ours that failed before: find the filesystem again
                    self._thaw_device(origin_id)
                # else not held by this process: a freeze found now is someone else's, made since
                # (one a killed process left was thawed by this process's assemble)
                with self._held_guard:
                    self._unthawed.discard(origin_id)
            except Exception as exc:  # thaw the others all the same
                log.exception("event=thaw_failed pool=%s id=%d", self._name, origin_id)
                with self._held_guard:
                    self._unthawed.add(origin_id)
                failure = failure or exc
        if failure is not None:
            raise failure

    @contextlib.contextmanager
    def _consistent(self, origin: str) -> Iterator[str | None]:
        """Make an attached origin's content stable: freeze a filesystem mounted from it (and yield
        its mount point), else flush the loop device's page cache; an inactive origin needs nothing."""
        dev = loop.find(origin)
        if dev is None:
            yield None
            return
        mount = self._reachable_mount_of(dev)
        if mount is None:
            try:
                fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                # claimed (mounted in another mount namespace?) but no mount of it is visible here:
                # nothing to freeze, so the snapshot is crash-consistent, not filesystem-clean
                log.warning("event=snapshot_unfrozen dev=%s reason=claimed_without_visible_mount", dev)
                fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # raw block use: push the block device's dirty pages into the file
            finally:
                os.close(fd)
            yield None
            return
        with _frozen(mount.mount_point, dev=os.stat(dev).st_rdev):
            yield mount.mount_point

    def _reachable_mount_of(self, dev: str) -> Mount | None:
        """A mount of `dev` whose path reaches its filesystem: a mount of it can be covered by
        another filesystem mounted on top, and opening that path would reach the other one."""
        rdev = os.stat(dev).st_rdev
        for m in mounts():
            if not _is_mount_of(m, dev):
                continue
            with contextlib.suppress(OSError):
                if os.stat(m.mount_point).st_dev == rdev:
                    return m
        return None

    def delete(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        path = self._require_device(dev_id)
        deadline.check(f"delete device {dev_id}")
        with self._locked(dev_id):
            dev = loop.find(path)
            if dev is not None:
                raise DeviceBusy(
                    f"device {dev_id} of pool {self._name} is active ({dev}); deactivate it first"
                )
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise errors.NotFound(f"pool {self._name} has no device {dev_id}") from exc
            except OSError as exc:
                raise _oserror(f"delete device {dev_id}", exc) from exc
            try:
                os.unlink(path)
                _fsync_dir(self._devices)
                self._free_now(fd, dev_id)
            except FileNotFoundError as exc:
                raise errors.NotFound(f"pool {self._name} has no device {dev_id}") from exc
            except OSError as exc:
                raise _oserror(f"delete device {dev_id}", exc) from exc
            finally:
                os.close(fd)
        log.info("event=delete pool=%s id=%d", self._name, dev_id)

    def _free_now(self, fd: int, dev_id: int) -> None:
        """Free an unlinked device file's blocks before the delete returns. XFS frees an unlinked
        file's extents later, in background inode reclaim, and statvfs does not wait for it: a full
        pool would still look full to the next status, and a create right after the delete would be
        refused. A truncate frees them in this call. The delete has happened either way: a failure
        here only delays the space (reclaim frees it)."""
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.warning("event=free_deferred pool=%s id=%d errno=%s", self._name, dev_id, exc.errno)

    def device_ids(self, *, deadline: deadline_mod.Deadline) -> dict[int, int]:
        """Every device with its allocated bytes (st_blocks; extents shared by reflink count in each)."""
        deadline.check("list devices")
        self._require_assembled()
        out: dict[int, int] = {}
        for dev_id in self._list():
            try:
                out[dev_id] = os.stat(self._path(dev_id)).st_blocks * model.SECTOR
            except FileNotFoundError:
                continue  # deleted while listing
        return out

    def activate(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> str:
        """Attach the device file to a loop device; grow it first if the requested size is larger.
        A smaller size never truncates data: the file keeps its length.

        Buffered, not direct IO: with direct IO the kernel gives the loop device the file's DIO
        alignment as its logical block size, and on XFS that turns from 512 to 4096 bytes once the
        file shares extents, i.e. after the first snapshot. A filesystem made with 1 KiB blocks on
        the volume would then no longer mount. Buffered loop devices always have 512-byte sectors.
        (Direct IO with a fixed 4 KiB block size would need `block_size` on `loop.attach`.)
        """
        _check_size(size_bytes)
        path = self._require_device(dev_id)
        deadline.check(f"activate device {dev_id}")
        with self._locked(dev_id):
            try:
                grown = self._grow_file(path, size_bytes)
                dev = loop.find(path)
                if dev is None:
                    # a read-only pool (like a read-only thin pool) still serves reads
                    read_only = bool(os.statvfs(self._dir).f_flag & os.ST_RDONLY)
                    dev = loop.attach(path, read_only=read_only, direct_io=False, deadline=deadline)
                    log.info("event=activate pool=%s id=%d dev=%s ro=%s", self._name, dev_id, dev, read_only)
                elif grown or loop.size_bytes(dev) < size_bytes:
                    # also when an earlier grow was stopped after the file grew, before this refresh
                    loop.refresh_capacity(dev)
            except OSError as exc:
                raise _oserror(f"activate device {dev_id}", exc) from exc
        return dev

    def _grow_file(self, path: str, size_bytes: int) -> bool:
        if os.stat(path).st_size >= size_bytes:
            return False
        os.truncate(path, size_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def deactivate(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> None:
        """Detach the device's loop device. Not active: done. Mounted or claimed: DeviceBusy.

        The exclusive open both proves nobody holds the device (a mount or a dm table claims it
        exclusively) and keeps anyone from mounting it before the detach completes: the detach then
        takes effect as this last opener closes.
        """
        _check_id(dev_id)
        deadline.check(f"deactivate device {dev_id}")
        self._require_assembled()
        path = self._path(dev_id)
        with self._locked(dev_id):
            dev = loop.find(path)
            if dev is None:
                return
            try:
                st = os.stat(path)
            except OSError as exc:
                raise _oserror(f"deactivate device {dev_id}", exc) from exc
            self._detach(dev, (st.st_dev, st.st_ino), f"device {dev_id}", deadline)

    def _detach(self, dev: str, ident: object, label: str, deadline: deadline_mod.Deadline) -> None:
        """Detach loop device `dev`, backed by the file `ident` (see `_loop_tag`), unless in use.

        Claimed by someone else (an fsck, a mount namespace cloned while it was mounted...) is
        retried within the deadline: on a node such holders come and go. Mounted here is not.
        """
        try:
            rdev = os.stat(dev).st_rdev
        except FileNotFoundError:
            return
        source = os.path.realpath(dev)
        what = f"deactivate {label} of pool {self._name}"

        def claim() -> int | None:
            try:
                return os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise DeviceBusy(f"{label} of pool {self._name} ({dev}) is in use") from exc
                if exc.errno in (errno.ENXIO, errno.ENOENT):
                    return None
                raise _oserror(f"deactivate {label}", exc) from exc

        fd = holders.retry_busy(claim, rdev=rdev, source=source, what=what, deadline=deadline)
        if fd is None:
            return
        try:
            # loop devices are machine-wide: since `dev` was looked up, another process may have
            # detached it and attached its own file to the number. Checked while we hold the device
            # open exclusively (nobody can mount it now); not ours any more: nothing of ours to detach
            if _loop_tag(dev) != ident:
                log.warning("event=loop_changed_hands pool=%s what=%s dev=%s", self._name, label, dev)
                return
            loop.detach(dev)
        finally:
            os.close(fd)
        # an opener that claims nothing (blkid, a reader) defers the detach to its last close
        for _ in deadline.backoff(first=0.005, cap=0.1):
            if _loop_tag(dev) != ident:
                break
        else:
            raise DeviceBusy(
                f"{label} of pool {self._name} ({dev}) is still open by another user: "
                + holders.describe(rdev, source=source, what=what)
            )
        log.info("event=deactivate pool=%s what=%s dev=%s", self._name, label, dev)

    def _attached(self) -> dict[str, str]:
        """Device file path (maybe with " (deleted)") -> loop device, for every loop device of this
        pool's device files, in one pass over the kernel's loop devices. A device attached through a
        mount that has since gone (a replaced container's) shows a path relative to that mount, a
        suffix of ours: it counts once its file identity (st_dev, st_ino) matches."""
        prefix = self._devices + "/"
        out: dict[str, str] = {}
        for dev, backing in loop.scan():
            if backing.startswith(prefix):
                out[backing] = dev
                continue
            ours = os.path.join(self._devices, os.path.basename(backing))
            if (
                backing.startswith("/")
                and ours.endswith(backing)
                and device_file_id(os.path.basename(ours)) is not None
            ):
                try:
                    st = os.stat(ours)
                except OSError:
                    continue
                if loop.is_backed_by(dev, (st.st_dev, st.st_ino)):  # EIO & co: not ours
                    out[ours] = dev
        return out

    def resize(self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline) -> None:
        """Grow the device file; an attached loop device picks the new size up at once."""
        _check_size(size_bytes)
        path = self._require_device(dev_id)
        deadline.check(f"resize device {dev_id}")
        with self._locked(dev_id):
            try:
                current = os.stat(path).st_size
                if size_bytes < current:
                    raise errors.OutOfRange(
                        f"device {dev_id} of pool {self._name} is {current} bytes: "
                        f"cannot shrink to {size_bytes}"
                    )
                grown = self._grow_file(path, size_bytes)
                dev = loop.find(path)
                # also when an earlier grow was stopped after the file grew, before this refresh
                if dev is not None and (grown or loop.size_bytes(dev) < size_bytes):
                    loop.refresh_capacity(dev)
            except OSError as exc:
                raise _oserror(f"resize device {dev_id}", exc) from exc
        log.info("event=resize pool=%s id=%d size=%d", self._name, dev_id, size_bytes)

    def kernel_size(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int | None:
        path = self._require_device(dev_id)
        deadline.check(f"size of device {dev_id}")
        try:
            return os.stat(path).st_size
        except FileNotFoundError as exc:
            raise errors.NotFound(f"pool {self._name} has no device {dev_id}") from exc
        except OSError as exc:
            raise _oserror(f"size of device {dev_id}", exc) from exc

    def active_ids(self, *, deadline: deadline_mod.Deadline) -> set[int]:
        deadline.check("list active devices")
        self._require_assembled()
        ids = (device_file_id(os.path.basename(b)) for b in self._attached() if not b.endswith(_DELETED))
        return {i for i in ids if i is not None}

    def device_path(self, dev_id: int) -> str:
        path = self._require_device(dev_id)
        dev = loop.find(path)
        if dev is None:
            raise NotActive(f"device {dev_id} of pool {self._name} is not active")
        return dev

    def mapped_bytes(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> int:
        path = self._require_device(dev_id)
        deadline.check(f"mapped bytes of device {dev_id}")
        try:
            return os.stat(path).st_blocks * model.SECTOR
        except FileNotFoundError as exc:
            raise errors.NotFound(f"pool {self._name} has no device {dev_id}") from exc

    # --- changed-block tracking (read-only: no lock, nothing held after return) ------------------

    def _extent_map(self, dev_id: int, *, deadline: deadline_mod.Deadline) -> list[fiemap.FileExtent]:
        path = self._require_device(dev_id)
        try:
            # an open file keeps its extents even if the device is deleted meanwhile: one consistent map
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise errors.NotFound(f"pool {self._name} has no device {dev_id}") from exc
        except OSError as exc:
            raise _oserror(f"open device {dev_id}", exc) from exc
        try:
            return fiemap.extents(fd, deadline=deadline)
        except OSError as exc:
            raise _oserror(f"extent map (FIEMAP) of device {dev_id}", exc) from exc
        finally:
            os.close(fd)

    def allocated(
        self, dev_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        return fiemap.allocated(self._extent_map(dev_id, deadline=deadline), size=size_bytes)

    def delta(
        self, base_id: int, target_id: int, size_bytes: int, *, deadline: deadline_mod.Deadline
    ) -> tuple[model.Extent, ...]:
        base = self._extent_map(base_id, deadline=deadline)
        target = self._extent_map(target_id, deadline=deadline)
        return fiemap.changed(base, target, size=size_bytes)
