"""csi_thin.pool.reflink on real loop devices, XFS (reflink=1) and btrfs images, as root on the host.

Every fixture cleans up what the test made, even on failure: mounts under the test's temp dir are
unmounted (deepest first), then every loop device whose backing file lies under it is detached. Loop
devices of other tests or engineers are never touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from csi_thin import config, errors, model, runner
from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import loop
from csi_thin.pool import backend as backend_mod
from csi_thin.pool import reflink
from tests import blockio

MiB = model.MiB
IMAGE_SIZE = 512 * MiB  # mkfs.xfs needs >= 300 MiB


def dl() -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(60)


def _loops_under(prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in os.listdir("/sys/block"):
        if name.startswith("loop"):
            try:
                backing = loop.backing_file(f"/dev/{name}")
            except OSError:  # someone else's loop device, being detached right now
                continue
            if backing and backing.removesuffix(" (deleted)").startswith(prefix):
                out[f"/dev/{name}"] = backing
    return out


def _unmount(mount_point: str) -> None:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:  # a test that failed mid-freeze must not leave a frozen filesystem behind
        fcntl.ioctl(fd, reflink.FITHAW, 0)
    except OSError:
        pass
    finally:
        os.close(fd)
    runner.run(["umount", mount_point], deadline=dl(), check=False)


def cleanup_under(root: pathlib.Path) -> None:
    """Unmount everything mounted under `root` and detach every loop device backed by a file there.

    Order matters: a pool filesystem hosts the files of the loop devices a volume is mounted from,
    so volumes are unmounted first, then their loops detached, then the pool unmounted, then its
    image loop detached (paths of loops on a lazily unmounted filesystem would no longer match).
    """
    prefix = str(root.resolve()) + "/"
    under = [m for m in reflink.mounts() if m.mount_point.startswith(prefix)]
    backings = _loops_under(prefix)
    hosts = [m for m in under if any(b.startswith(m.mount_point + "/") for b in backings.values())]
    for m in sorted(under, key=lambda m: -len(m.mount_point)):
        if m not in hosts:
            _unmount(m.mount_point)
    for dev, backing in backings.items():
        if any(backing.startswith(h.mount_point + "/") for h in hosts):
            loop.detach(dev)
    for m in sorted(hosts, key=lambda m: -len(m.mount_point)):
        _unmount(m.mount_point)
    for dev in _loops_under(prefix):
        loop.detach(dev)
    left = [m.mount_point for m in reflink.mounts() if m.mount_point.startswith(prefix)]
    assert not left, f"mounts left behind: {left}"


def make_config(tmp: pathlib.Path, *, fs_type: str = "xfs", image: bool = True) -> config.PoolConfig:
    return config.PoolConfig(
        name="test",
        backend=config.BackendKind.REFLINK,
        state_dir=str(tmp / "state"),
        reflink=config.ReflinkConfig(
            directory=str(tmp / "pool"),
            image_file=str(tmp / "pool.img") if image else None,
            image_size=IMAGE_SIZE if image else 0,
            fs_type=fs_type,
        ),
    )


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    cleanup_under(tmp_path)


@pytest.fixture(params=["xfs", "btrfs"])
def pool(request: pytest.FixtureRequest, workdir: pathlib.Path) -> reflink.ReflinkBackend:
    be = reflink.ReflinkBackend(make_config(workdir, fs_type=request.param))
    be.assemble(deadline=dl())
    return be


@pytest.fixture
def xfs_pool(workdir: pathlib.Path) -> reflink.ReflinkBackend:
    be = reflink.ReflinkBackend(make_config(workdir))
    be.assemble(deadline=dl())
    return be


def blockdev_size(dev: str) -> int:
    return int(runner.run(["blockdev", "--getsize64", dev], deadline=dl()).stdout)


def test_is_a_backend(xfs_pool: reflink.ReflinkBackend) -> None:
    be: backend_mod.Backend = xfs_pool
    assert be.kind == "reflink"


def test_every_method(pool: reflink.ReflinkBackend, workdir: pathlib.Path) -> None:
    d = dl()
    st = pool.status(deadline=d)
    assert st.transaction_id == 0
    assert st.mode == model.PoolMode.RW and not st.needs_check and st.healthy
    assert st.block_size_bytes == 64 * model.KiB
    assert 0 < st.data_used_bytes < st.data_total_bytes <= IMAGE_SIZE
    assert 0 <= st.metadata_used_bytes < st.metadata_total_bytes

    # transaction id: compare-and-swap
    pool.set_transaction_id(0, 1, deadline=d)
    assert pool.transaction_id(deadline=d) == 1
    with pytest.raises(reflink.TransactionIdMismatch, match="is 1, not 0"):
        pool.set_transaction_id(0, 2, deadline=d)
    assert pool.transaction_id(deadline=d) == 1

    # create_thin / device_ids / mapped_bytes
    pool.create_thin(1, 16 * MiB, deadline=d)
    with pytest.raises(errors.AlreadyExists):
        pool.create_thin(1, 16 * MiB, deadline=d)
    assert pool.device_ids(deadline=d) == {1: 0}
    assert pool.mapped_bytes(1, deadline=d) == 0
    assert os.stat(workdir / "pool" / "devices" / "1.img").st_size == 16 * MiB

    # activate is idempotent and the path is the kernel's loop device for the file
    assert pool.active_ids(deadline=d) == set()
    with pytest.raises(reflink.NotActive):
        pool.device_path(1)
    dev = pool.activate(1, 16 * MiB, deadline=d)
    assert dev.startswith("/dev/loop")
    assert pool.activate(1, 16 * MiB, deadline=d) == dev
    assert pool.device_path(1) == dev
    assert pool.active_ids(deadline=d) == {1}
    assert blockdev_size(dev) == 16 * MiB
    blockio.write_at(dev, 0, b"A" * MiB)
    assert pool.mapped_bytes(1, deadline=d) >= MiB
    assert pool.device_ids(deadline=d)[1] >= MiB

    # snapshot of an active (unmounted) origin; delete of an active device is refused
    pool.create_snap(2, 1, 16 * MiB, deadline=d)
    with pytest.raises(errors.AlreadyExists):
        pool.create_snap(2, 1, 16 * MiB, deadline=d)
    with pytest.raises(errors.NotFound):
        pool.create_snap(3, 99, 16 * MiB, deadline=d)
    assert set(pool.device_ids(deadline=d)) == {1, 2}
    with pytest.raises(reflink.DeviceBusy):
        pool.delete(1, deadline=d)

    # resize: active grows the block device, inactive grows the file, shrink refused
    pool.resize(1, 32 * MiB, deadline=d)
    assert blockdev_size(dev) == 32 * MiB
    pool.resize(2, 24 * MiB, deadline=d)
    assert os.stat(workdir / "pool" / "devices" / "2.img").st_size == 24 * MiB
    with pytest.raises(errors.OutOfRange):
        pool.resize(2, 8 * MiB, deadline=d)
    with pytest.raises(errors.NotFound):
        pool.resize(42, 8 * MiB, deadline=d)

    # deactivate: idempotent
    pool.deactivate(1, deadline=d)
    pool.deactivate(1, deadline=d)
    assert pool.active_ids(deadline=d) == set()
    assert loop.find(str(workdir / "pool" / "devices" / "1.img")) is None

    # delete: NotFound when absent
    pool.delete(2, deadline=d)
    with pytest.raises(errors.NotFound):
        pool.delete(2, deadline=d)
    with pytest.raises(errors.NotFound):
        pool.mapped_bytes(2, deadline=d)
    with pytest.raises(errors.NotFound):
        pool.device_path(2)

    # bad ids and sizes change nothing
    for bad in (-1, model.MAX_DEVICE_ID + 1):
        with pytest.raises(errors.InvalidArgument):
            pool.create_thin(bad, MiB, deadline=d)
    with pytest.raises(errors.InvalidArgument):
        pool.create_thin(5, 1000, deadline=d)
    assert set(pool.device_ids(deadline=d)) == {1}

    # teardown keeps data; re-assembly finds every device and the transaction id
    dev = pool.activate(1, 32 * MiB, deadline=d)
    pool.teardown(deadline=d)
    assert loop.find(str(workdir / "pool.img")) is None
    assert not any(m.mount_point == str(workdir / "pool") for m in reflink.mounts())
    with pytest.raises(errors.Unavailable):
        pool.device_ids(deadline=d)
    pool.teardown(deadline=d)  # idempotent
    pool.assemble(deadline=d)
    pool.assemble(deadline=d)  # idempotent
    assert set(pool.device_ids(deadline=d)) == {1}
    assert pool.transaction_id(deadline=d) == 1
    assert pool.active_ids(deadline=d) == set()
    dev = pool.activate(1, 32 * MiB, deadline=d)
    assert blockio.read_at(dev, 0, 4) == b"AAAA"

    # destroy removes what assemble made
    pool.destroy(deadline=d)
    assert not (workdir / "pool.img").exists()
    assert loop.find(str(workdir / "pool" / "devices" / "1.img")) is None


def test_snapshot_keeps_the_data_of_its_time(pool: reflink.ReflinkBackend) -> None:
    d = dl()
    pool.create_thin(10, 8 * MiB, deadline=d)
    origin = pool.activate(10, 8 * MiB, deadline=d)
    blockio.write_at(origin, 3 * MiB, b"before" * 1000)
    pool.create_snap(11, 10, 8 * MiB, deadline=d)
    blockio.write_at(origin, 3 * MiB, b"after!" * 1000)  # the origin changes after the snapshot
    snap = pool.activate(11, 8 * MiB, deadline=d)
    assert blockio.read_at(snap, 3 * MiB, 6000) == b"before" * 1000
    assert blockio.read_at(origin, 3 * MiB, 6000) == b"after!" * 1000
    # writes to the snapshot do not reach the origin
    blockio.write_at(snap, 0, b"snap" * 1024)
    assert blockio.read_at(origin, 0, 4) == b"\0\0\0\0"

    # restore the snapshot into a larger device
    pool.deactivate(11, deadline=d)
    pool.create_snap(12, 11, 32 * MiB, deadline=d)
    restored = pool.activate(12, 32 * MiB, deadline=d)
    assert blockdev_size(restored) == 32 * MiB
    assert blockio.read_at(restored, 3 * MiB, 6000) == b"before" * 1000
    assert blockio.read_at(restored, 0, 4) == b"snap"
    assert blockio.read_at(restored, 31 * MiB, 4) == b"\0\0\0\0"


def test_grow_while_attached(xfs_pool: reflink.ReflinkBackend) -> None:
    d = dl()
    xfs_pool.create_thin(1, 8 * MiB, deadline=d)
    dev = xfs_pool.activate(1, 8 * MiB, deadline=d)
    blockio.write_at(dev, 7 * MiB, b"keep")
    assert blockdev_size(dev) == 8 * MiB
    xfs_pool.resize(1, 64 * MiB, deadline=d)
    assert blockdev_size(dev) == 64 * MiB
    assert blockio.read_at(dev, 7 * MiB, 4) == b"keep"
    blockio.write_at(dev, 63 * MiB, b"tail")
    assert blockio.read_at(dev, 63 * MiB, 4) == b"tail"
    xfs_pool.resize(1, 64 * MiB, deadline=d)  # same size: a no-op
    # activate with a larger size grows an attached device too
    assert xfs_pool.activate(1, 96 * MiB, deadline=d) == dev
    assert blockdev_size(dev) == 96 * MiB


def test_grow_redone_after_the_file_grew_refreshes_the_loop_device(xfs_pool: reflink.ReflinkBackend) -> None:
    """A grow stopped between growing the file and refreshing the loop's capacity (killed, or the
    refresh failed) is finished by redoing resize (recovery, the grow undo's roll-forward): the redo
    must refresh the block device although the file already has its size."""
    d = dl()
    xfs_pool.create_thin(1, 8 * MiB, deadline=d)
    dev = xfs_pool.activate(1, 8 * MiB, deadline=d)
    os.truncate(xfs_pool._path(1), 64 * MiB)  # the file grown, then the process killed
    assert blockdev_size(dev) == 8 * MiB
    xfs_pool.resize(1, 64 * MiB, deadline=d)
    assert blockdev_size(dev) == 64 * MiB
    os.truncate(xfs_pool._path(1), 96 * MiB)  # the same, redone by a later activate
    assert xfs_pool.activate(1, 96 * MiB, deadline=d) == dev
    assert blockdev_size(dev) == 96 * MiB


def _mkfs_mount(dev: str, target: pathlib.Path) -> None:
    runner.run(["mkfs.ext4", "-q", "-F", dev], deadline=dl())  # 64 MiB: 1 KiB blocks
    target.mkdir(parents=True, exist_ok=True)
    runner.run(["mount", "-t", "ext4", dev, str(target)], deadline=dl())


def _write_with_timeout(path: pathlib.Path, data: bytes, seconds: float = 15.0) -> bool:
    """Write and fsync in a thread; False if it did not finish in time (a frozen filesystem)."""
    done = threading.Event()

    def work() -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        done.set()

    threading.Thread(target=work, daemon=True).start()
    return done.wait(seconds)


def test_snapshot_of_a_mounted_origin_is_consistent(
    pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    d = dl()
    pool.create_thin(1, 64 * MiB, deadline=d)
    dev = pool.activate(1, 64 * MiB, deadline=d)
    mnt = workdir / "mnt"
    _mkfs_mount(dev, mnt)
    # written, not synced: only the freeze before the clone can put it into the snapshot
    (mnt / "data.txt").write_bytes(b"frozen in time\n" * 1000)
    pool.create_snap(2, 1, 64 * MiB, deadline=d)
    (mnt / "data.txt").write_bytes(b"changed later\n")
    assert _write_with_timeout(mnt / "after.txt", b"thawed\n"), "origin filesystem left frozen"
    # deactivating a mounted device is refused and changes nothing
    with pytest.raises(reflink.DeviceBusy, match="mounted at"):
        pool.deactivate(1, deadline=d)
    assert pool.device_path(1) == dev
    with pytest.raises(reflink.DeviceBusy):
        pool.teardown(deadline=d)

    snap = pool.activate(2, 64 * MiB, deadline=d)
    fsck = runner.run(["e2fsck", "-n", "-f", snap], deadline=d, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    snap_mnt = workdir / "snapmnt"
    snap_mnt.mkdir()
    runner.run(["mount", "-t", "ext4", "-o", "ro", snap, str(snap_mnt)], deadline=d)
    try:
        assert (snap_mnt / "data.txt").read_bytes() == b"frozen in time\n" * 1000
        assert not (snap_mnt / "after.txt").exists()
    finally:
        runner.run(["umount", str(snap_mnt)], deadline=d)
    runner.run(["umount", str(mnt)], deadline=d)
    pool.deactivate(1, deadline=d)
    pool.deactivate(2, deadline=d)
    assert pool.active_ids(deadline=d) == set()


def test_failed_clone_thaws_the_origin(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = dl()
    xfs_pool.create_thin(1, 64 * MiB, deadline=d)
    dev = xfs_pool.activate(1, 64 * MiB, deadline=d)
    mnt = workdir / "mnt"
    _mkfs_mount(dev, mnt)
    froze: list[bool] = []

    def failing_clone(src_fd: int, dst_fd: int) -> None:
        # prove the origin really is frozen during the clone: a freeze now answers EBUSY
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, reflink.FIFREEZE, 0)
        except OSError as exc:
            froze.append(exc.errno == errno.EBUSY)
        else:
            fcntl.ioctl(fd, reflink.FITHAW, 0)
            froze.append(False)
        finally:
            os.close(fd)
        raise OSError(errno.EIO, "injected clone failure")

    monkeypatch.setattr(reflink, "_clone", failing_clone)
    with pytest.raises(errors.Internal, match=r"injected clone failure|Input/output error"):
        xfs_pool.create_snap(2, 1, 64 * MiB, deadline=d)
    assert froze == [True]
    assert _write_with_timeout(mnt / "after.txt", b"still writable\n"), "origin filesystem left frozen"
    assert set(xfs_pool.device_ids(deadline=d)) == {1}
    assert [n for n in os.listdir(workdir / "pool" / "devices") if n != "1.img"] == []
    monkeypatch.undo()
    runner.run(["umount", str(mnt)], deadline=d)


def _is_frozen(mount_point: pathlib.Path) -> bool:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, reflink.FIFREEZE, 0)
    except OSError as exc:
        assert exc.errno == errno.EBUSY, exc
        return True
    else:
        fcntl.ioctl(fd, reflink.FITHAW, 0)
        return False
    finally:
        os.close(fd)


def test_snapshot_killed_while_frozen_is_thawed_by_assemble(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """SIGKILL between FIFREEZE and FITHAW (no finally runs): the next assemble thaws the volume."""
    d = dl()
    xfs_pool.create_thin(1, 64 * MiB, deadline=d)
    dev = xfs_pool.activate(1, 64 * MiB, deadline=d)
    mnt = workdir / "mnt"
    _mkfs_mount(dev, mnt)
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            reflink._clone = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[assignment]
            xfs_pool.create_snap(2, 1, 64 * MiB, deadline=d)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert _is_frozen(mnt)
    leftovers = os.listdir(workdir / "pool" / "devices")
    assert any(n.startswith(".tmp-2-") for n in leftovers), leftovers

    restarted = reflink.ReflinkBackend(make_config(workdir))
    restarted.assemble(deadline=d)
    assert not _is_frozen(mnt)
    assert _write_with_timeout(mnt / "after.txt", b"writable again\n")
    assert restarted.device_ids(deadline=d).keys() == {1}
    assert os.listdir(workdir / "pool" / "devices") == ["1.img"]
    assert restarted.device_path(1) == dev  # assemble leaves active devices as they are
    runner.run(["umount", str(mnt)], deadline=d)


def test_damaged_image_is_refused_before_mounting(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """The check of an inactive pool (xfs_repair -n) stops assembly, and leaves no loop device."""
    d = dl()
    xfs_pool.create_thin(1, MiB, deadline=d)
    xfs_pool.teardown(deadline=d)
    with open(workdir / "pool.img", "r+b") as f:  # AGF, AGI, AGFL of AG 0 (4 KiB sectors)
        f.seek(4096)
        f.write(b"\xab" * 12288)
    with pytest.raises(dm_errors.MetadataCheckFailed, match=r"failed its check.*repair it offline"):
        xfs_pool.assemble(deadline=d)
    assert loop.find(str(workdir / "pool.img")) is None
    assert not any(m.mount_point == str(workdir / "pool") for m in reflink.mounts())


def test_crashed_pool_filesystem_fails_then_recovers(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """XFS shut down without flushing its log (what a crash leaves): status says FAIL, steps are
    Unavailable, teardown still lets go of everything, and assemble replays the log (which
    `xfs_repair -n` alone would report as damage) and brings back every synced device."""
    d = dl()
    pool_dir = str(workdir / "pool")
    xfs_pool.create_thin(1, 8 * MiB, deadline=d)
    dev = xfs_pool.activate(1, 8 * MiB, deadline=d)
    blockio.write_at(dev, 0, b"durable!" * 512)  # fsynced through the loop device into the pool
    xfs_pool.set_transaction_id(0, 1, deadline=d)
    xfs_pool.create_snap(2, 1, 8 * MiB, deadline=d)
    runner.run(["xfs_io", "-x", "-c", "shutdown", pool_dir], deadline=d)  # no log flush

    st = xfs_pool.status(deadline=d)
    assert st.mode == model.PoolMode.FAIL and st.needs_check and not st.healthy
    with pytest.raises(errors.Unavailable, match="has failed"):
        xfs_pool.create_thin(3, MiB, deadline=d)
    with pytest.raises(errors.Unavailable, match="has failed"):
        xfs_pool.transaction_id(deadline=d)
    xfs_pool.teardown(deadline=d)
    assert loop.find(str(workdir / "pool.img")) is None
    check = runner.run(["xfs_repair", "-n", str(workdir / "pool.img")], deadline=d, check=False)
    assert check.returncode != 0  # the dirty log: what assemble must not mistake for damage

    xfs_pool.assemble(deadline=d)
    assert xfs_pool.status(deadline=d).healthy
    assert xfs_pool.transaction_id(deadline=d) == 1
    assert set(xfs_pool.device_ids(deadline=d)) == {1, 2}
    for dev_id in (1, 2):
        path = xfs_pool.activate(dev_id, 8 * MiB, deadline=d)
        assert blockio.read_at(path, 0, 4096) == b"durable!" * 512


def test_refuses_a_directory_that_cannot_reflink(workdir: pathlib.Path) -> None:
    """tmp_path lives on the host's ext4: no FICLONE there."""
    (workdir / "pool").mkdir()
    be = reflink.ReflinkBackend(make_config(workdir, image=False))
    with pytest.raises(
        errors.FailedPrecondition, match=r"cannot reflink.*XFS made with -m reflink=1, or btrfs"
    ):
        be.assemble(deadline=dl())
    assert os.listdir(workdir / "pool") == []
    with pytest.raises(errors.InvalidArgument, match="fs_type 'ext4' cannot reflink"):
        reflink.ReflinkBackend(make_config(workdir, fs_type="ext4"))


def test_refuses_ext4_mounted_pool_directory(workdir: pathlib.Path) -> None:
    image = workdir / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    runner.run(["mkfs.ext4", "-q", "-F", str(image)], deadline=dl())
    dev = loop.attach(str(image))
    (workdir / "pool").mkdir()
    runner.run(["mount", dev, str(workdir / "pool")], deadline=dl())
    be = reflink.ReflinkBackend(make_config(workdir, image=False))
    with pytest.raises(reflink.NoReflink, match="is on ext4, which cannot reflink"):
        be.assemble(deadline=dl())


def test_existing_xfs_mount(workdir: pathlib.Path) -> None:
    """A pool on a filesystem someone else mounted: teardown and destroy leave the mount alone."""
    image = workdir / "fs.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    runner.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], deadline=dl())
    dev = loop.attach(str(image))
    (workdir / "pool").mkdir()
    runner.run(["mount", dev, str(workdir / "pool")], deadline=dl())
    d = dl()
    be = reflink.ReflinkBackend(make_config(workdir, image=False))
    be.assemble(deadline=d)
    be.create_thin(7, 4 * MiB, deadline=d)
    be.activate(7, 4 * MiB, deadline=d)
    be.teardown(deadline=d)
    assert be.active_ids(deadline=d) == set()
    be.assemble(deadline=d)
    assert set(be.device_ids(deadline=d)) == {7}
    be.destroy(deadline=d)
    assert os.listdir(workdir / "pool") == []
    assert any(m.mount_point == str(workdir / "pool") for m in reflink.mounts())


def test_partial_files_are_never_devices(xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path) -> None:
    """A crash between creating the temp file and linking it leaves no device, and assemble tidies up."""
    d = dl()
    devices = workdir / "pool" / "devices"
    (devices / ".tmp-5-deadbeef").write_bytes(b"half")
    (devices / "junk.txt").write_bytes(b"x")
    assert xfs_pool.device_ids(deadline=d) == {}
    xfs_pool.assemble(deadline=d)
    assert sorted(os.listdir(devices)) == ["junk.txt"]


def test_status_reports_read_only_and_full(xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path) -> None:
    d = dl()
    pool_dir = str(workdir / "pool")
    # fill the pool filesystem
    xfs_pool.create_thin(1, IMAGE_SIZE, deadline=d)
    dev = xfs_pool.activate(1, IMAGE_SIZE, deadline=d)
    fd = os.open(dev, os.O_WRONLY)
    try:
        chunk = b"\xff" * (4 * MiB)
        with pytest.raises(OSError):  # ENOSPC from the loop device's backing file
            for off in range(0, IMAGE_SIZE, len(chunk)):
                os.pwrite(fd, chunk, off)
            os.fsync(fd)
    finally:
        os.close(fd)
    st = xfs_pool.status(deadline=d)
    assert st.mode == model.PoolMode.OUT_OF_DATA_SPACE
    xfs_pool.deactivate(1, deadline=d)
    xfs_pool.delete(1, deadline=d)
    assert xfs_pool.status(deadline=d).mode == model.PoolMode.RW
    xfs_pool.create_thin(4, MiB, deadline=d)
    blockio.write_at(xfs_pool.activate(4, MiB, deadline=d), 0, b"ro-readable")
    xfs_pool.deactivate(4, deadline=d)
    runner.run(["mount", "-o", "remount,ro", pool_dir], deadline=d)
    try:
        assert xfs_pool.status(deadline=d).mode == model.PoolMode.RO
        # like a read-only thin pool: reads keep working, changes are Unavailable
        ro_dev = xfs_pool.activate(4, MiB, deadline=d)
        assert blockio.read_at(ro_dev, 0, 11) == b"ro-readable"
        with pytest.raises(OSError):
            blockio.write_at(ro_dev, 0, b"x")
        with pytest.raises(errors.Unavailable, match="read-only"):
            xfs_pool.create_thin(5, MiB, deadline=d)
        with pytest.raises(errors.Unavailable, match="read-only"):
            xfs_pool.resize(4, 2 * MiB, deadline=d)
        xfs_pool.deactivate(4, deadline=d)
    finally:
        runner.run(["mount", "-o", "remount,rw", pool_dir], deadline=d)


def _fill_file(path: str) -> None:
    """Write into `path` until the filesystem has no block left (ever smaller writes, then ENOSPC)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        off = 0
        for size in (4 * MiB, 64 * 1024, 4096):
            chunk = b"\xa5" * size
            try:
                while off + size <= IMAGE_SIZE:
                    os.pwrite(fd, chunk, off)
                    off += size
                    if off % (64 * MiB) == 0:
                        os.fsync(fd)
                os.fsync(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def test_a_delete_frees_its_space_at_once(xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path) -> None:
    """XFS frees an unlinked file's blocks later, in background inode reclaim, and statvfs does not
    wait for it: the delete truncates the file so the very next status (GetCapacity, a create)
    sees the space."""
    d = dl()
    xfs_pool.create_thin(1, IMAGE_SIZE, deadline=d)
    path = str(workdir / "pool" / "devices" / "1.img")
    with open(path, "r+b") as f:
        for _ in range(128):
            f.write(b"\x5a" * MiB)
        f.flush()
        os.fsync(f.fileno())
    before = xfs_pool.status(deadline=d)
    xfs_pool.delete(1, deadline=d)
    after = xfs_pool.status(deadline=d)
    assert after.data_used_bytes <= before.data_used_bytes - 120 * MiB, (before, after)


def test_a_full_pool_still_moves_its_transaction_id(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """On a full pool filesystem the fence must still work: it completes the delete that frees
    space (and a delete that frees nothing, like a snapshot's, must complete too). So must a
    re-assembly (a driver restart)."""
    d = dl()
    xfs_pool.create_thin(1, IMAGE_SIZE, deadline=d)
    xfs_pool.create_thin(2, IMAGE_SIZE, deadline=d)
    _fill_file(str(workdir / "pool" / "devices" / "1.img"))
    assert xfs_pool.status(deadline=d).mode == model.PoolMode.OUT_OF_DATA_SPACE
    # a restart (re-assembly, its reflink probe included) must work while full: deletes need a driver
    reflink.ReflinkBackend(make_config(workdir)).assemble(deadline=d)
    txid = xfs_pool.transaction_id(deadline=d)
    xfs_pool.delete(2, deadline=d)  # frees nothing: the pool stays full
    xfs_pool.set_transaction_id(txid, txid + 1, deadline=d)
    assert xfs_pool.transaction_id(deadline=d) == txid + 1
    xfs_pool.delete(1, deadline=d)
    assert xfs_pool.status(deadline=d).mode == model.PoolMode.RW
    xfs_pool.set_transaction_id(txid + 1, txid + 2, deadline=d)
    assert xfs_pool.transaction_id(deadline=d) == txid + 2


def test_a_pool_filesystem_gone_read_only_still_assembles(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """A pool filesystem that went read-only (btrfs forces it after an error, an operator remounts it
    ro for a repair) is the `read_only` condition, where existing volumes are still activated and
    deactivated (pool/modes.py). A driver restart there must assemble the pool, or nothing works."""
    d = dl()
    pool_dir = str(workdir / "pool")
    xfs_pool.create_thin(4, MiB, deadline=d)
    blockio.write_at(xfs_pool.activate(4, MiB, deadline=d), 0, b"ro-readable")
    xfs_pool.deactivate(4, deadline=d)
    runner.run(["mount", "-o", "remount,ro", pool_dir], deadline=d)
    try:
        restarted = reflink.ReflinkBackend(make_config(workdir))
        restarted.assemble(deadline=d)
        assert restarted.status(deadline=d).mode == model.PoolMode.RO
        ro_dev = restarted.activate(4, MiB, deadline=d)
        assert blockio.read_at(ro_dev, 0, 11) == b"ro-readable"
        restarted.deactivate(4, deadline=d)
        assert restarted.active_ids(deadline=d) == set()
    finally:
        runner.run(["mount", "-o", "remount,rw", pool_dir], deadline=d)


def test_a_full_pool_made_before_the_spare_txid_file_assembles_and_heals(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """A pool made by a version without transaction_id.spare, full when the driver is upgraded: the
    spare cannot be made (ENOSPC), yet the driver must start, so that a delete can free space; the
    fence makes the spare once there is room."""
    d = dl()
    spare = workdir / "pool" / "transaction_id.spare"
    xfs_pool.create_thin(1, IMAGE_SIZE, deadline=d)
    spare.unlink()
    _fill_file(str(workdir / "pool" / "devices" / "1.img"))
    assert xfs_pool.status(deadline=d).mode == model.PoolMode.OUT_OF_DATA_SPACE
    restarted = reflink.ReflinkBackend(make_config(workdir))
    restarted.assemble(deadline=d)
    txid = restarted.transaction_id(deadline=d)
    restarted.delete(1, deadline=d)
    restarted.set_transaction_id(txid, txid + 1, deadline=d)
    assert restarted.transaction_id(deadline=d) == txid + 1
    assert restarted.status(deadline=d).mode == model.PoolMode.RW
    assert spare.exists()


def test_concurrent_transaction_ids_and_creates(xfs_pool: reflink.ReflinkBackend) -> None:
    """Compare-and-swap under contention: exactly one winner per step, no lost update."""
    d = dl()
    wins: list[int] = []
    lock = threading.Lock()

    def bump(worker: int) -> None:
        for _ in range(20):
            cur = xfs_pool.transaction_id(deadline=d)
            try:
                xfs_pool.set_transaction_id(cur, cur + 1, deadline=d)
            except reflink.TransactionIdMismatch:
                continue
            with lock:
                wins.append(worker)

    def create(base: int) -> None:
        for i in range(10):
            xfs_pool.create_thin(base + i, MiB, deadline=d)
            xfs_pool.activate(base + i, MiB, deadline=d)

    threads = [threading.Thread(target=bump, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=create, args=(100 * (w + 1),)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert xfs_pool.transaction_id(deadline=d) == len(wins)
    assert len(xfs_pool.device_ids(deadline=d)) == 30
    active = xfs_pool.active_ids(deadline=d)
    assert len(active) == 30
    assert len({xfs_pool.device_path(i) for i in active}) == 30
    xfs_pool.teardown(deadline=d)


def test_deactivate_never_detaches_a_loop_device_that_changed_hands(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loop devices are machine-wide: between finding our device's loop number and detaching it,
    another process may detach it and attach its own file to the freed number."""
    d = dl()
    xfs_pool.create_thin(1, 8 * MiB, deadline=d)
    ours = xfs_pool.activate(1, 8 * MiB, deadline=d)
    foreign_file = workdir / "foreign.img"
    foreign_file.write_bytes(b"\0" * MiB)
    foreign = loop.attach(str(foreign_file), direct_io=False)
    try:
        real_find = loop.find
        # the number found for device 1 now belongs to someone else's file
        monkeypatch.setattr(reflink.loop, "find", lambda p: foreign if p.endswith("/1.img") else real_find(p))
        xfs_pool.deactivate(1, deadline=d)
        assert loop.backing_file(foreign) == str(foreign_file.resolve())
        monkeypatch.undo()
        assert loop.find(xfs_pool._path(1)) == ours
        xfs_pool.deactivate(1, deadline=d)
        assert loop.find(xfs_pool._path(1)) is None
    finally:
        loop.detach(foreign)


def test_devices_attached_by_a_replaced_container_are_still_ours(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """A node plugin container attaches through its own mount of the pool directory. Once it is
    replaced, sysfs shows the backing file relative to that vanished mount ("/devices/1.img"): the
    next container must still see the device as active, never attach the file a second time, never
    delete it while attached, and detach it on deactivate."""
    d = dl()
    xfs_pool.create_thin(1, 8 * MiB, deadline=d)
    view = workdir / "old-container-view"
    view.mkdir()
    res = subprocess.run(
        [
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind "{workdir / "pool"}" "{view}" && losetup -f --show "{view}/devices/1.img"',
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    dev = res.stdout.strip()
    try:
        assert loop.backing_file(dev) == "/devices/1.img"
        assert xfs_pool.active_ids(deadline=d) == {1}
        assert xfs_pool.device_path(1) == dev
        assert xfs_pool.activate(1, 8 * MiB, deadline=d) == dev
        with pytest.raises(dm_errors.DeviceBusy):
            xfs_pool.delete(1, deadline=d)
        xfs_pool.deactivate(1, deadline=d)
        assert loop.backing_file(dev) is None
        assert xfs_pool.active_ids(deadline=d) == set()
    finally:
        loop.detach(dev)


def test_snapshot_freezes_the_origin_even_when_a_mount_of_it_is_covered(
    xfs_pool: reflink.ReflinkBackend, workdir: pathlib.Path
) -> None:
    """The origin's first mount in mountinfo may be covered by another filesystem mounted on top;
    opening that path reaches the other one. Freezing it left the origin unfrozen (its unsynced
    writes missing from the snapshot) and froze a filesystem that is not ours."""
    d = dl()
    xfs_pool.create_thin(1, 64 * MiB, deadline=d)
    xfs_pool.create_thin(3, 64 * MiB, deadline=d)
    dev = xfs_pool.activate(1, 64 * MiB, deadline=d)
    other = xfs_pool.activate(3, 64 * MiB, deadline=d)
    covered, reachable = workdir / "covered", workdir / "reachable"
    _mkfs_mount(dev, covered)
    reachable.mkdir()
    runner.run(["mount", "--bind", str(covered), str(reachable)], deadline=d)
    _mkfs_mount(other, covered)  # now on top of the origin's first mount
    try:
        (reachable / "data.txt").write_bytes(b"frozen in time\n" * 1000)  # not synced
        xfs_pool.create_snap(2, 1, 64 * MiB, deadline=d)
        assert _write_with_timeout(covered / "x", b"not frozen\n"), "a filesystem not ours left frozen"
        snap = xfs_pool.activate(2, 64 * MiB, deadline=d)
        snap_mnt = workdir / "snapmnt"
        snap_mnt.mkdir()
        runner.run(["mount", "-t", "ext4", "-o", "ro", snap, str(snap_mnt)], deadline=d)
        try:
            assert (snap_mnt / "data.txt").read_bytes() == b"frozen in time\n" * 1000
        finally:
            runner.run(["umount", str(snap_mnt)], deadline=d)
    finally:
        for m in (covered, reachable, covered):
            runner.run(["umount", str(m)], deadline=d, check=False)
    for dev_id in (1, 2, 3):
        xfs_pool.deactivate(dev_id, deadline=d)
