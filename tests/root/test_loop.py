"""csi_thin.dm.loop on real loop devices (root tier: runs as root on the host, no dm needed)."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from csi_thin import errors
from csi_thin.dm import loop

MiB = 1024 * 1024


@pytest.fixture
def attached(tmp_path: pathlib.Path) -> Iterator[list[str]]:
    """Loop devices a test attached; detached afterwards whatever happens (never others' loops)."""
    devs: list[str] = []
    yield devs
    for dev in devs:
        loop.detach(dev)


def _sparse(path: pathlib.Path, size: int) -> pathlib.Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_attach_find_write_detach(tmp_path: pathlib.Path, attached: list[str]) -> None:
    backing = _sparse(tmp_path / "data.img", 8 * MiB)
    dev = loop.attach(str(backing))
    attached.append(dev)
    assert dev.startswith("/dev/loop")
    assert loop.size_bytes(dev) == 8 * MiB
    assert loop.find(str(backing)) == dev
    assert loop.backing_file(dev) == str(backing.resolve())
    # a write through the device lands in the file
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, b"csi-thin" * 512, MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(backing, "rb") as f:
        f.seek(MiB)
        assert f.read(8) == b"csi-thin"
    loop.detach(dev)
    assert loop.find(str(backing)) is None
    assert loop.backing_file(dev) is None
    loop.detach(dev)  # already detached: fine


def test_direct_io_is_used_when_supported(tmp_path: pathlib.Path, attached: list[str]) -> None:
    backing = _sparse(tmp_path / "dio.img", 4 * MiB)
    dev = loop.attach(str(backing), direct_io=True)
    attached.append(dev)
    n = dev.removeprefix("/dev/loop")
    with open(f"/sys/block/loop{n}/loop/dio", encoding="utf-8") as f:
        assert f.read().strip() == "1"
    buffered = loop.attach(str(_sparse(tmp_path / "buf.img", 4 * MiB)), direct_io=False)
    attached.append(buffered)
    n = buffered.removeprefix("/dev/loop")
    with open(f"/sys/block/loop{n}/loop/dio", encoding="utf-8") as f:
        assert f.read().strip() == "0"


def test_read_only(tmp_path: pathlib.Path, attached: list[str]) -> None:
    backing = _sparse(tmp_path / "ro.img", 4 * MiB)
    dev = loop.attach(str(backing), read_only=True)
    attached.append(dev)
    n = dev.removeprefix("/dev/loop")
    with open(f"/sys/block/loop{n}/ro", encoding="utf-8") as f:
        assert f.read().strip() == "1"
    # depending on the kernel the open or the write is refused
    with pytest.raises(OSError):
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)


def test_refresh_capacity_after_grow(tmp_path: pathlib.Path, attached: list[str]) -> None:
    backing = _sparse(tmp_path / "grow.img", 4 * MiB)
    dev = loop.attach(str(backing))
    attached.append(dev)
    os.truncate(backing, 12 * MiB)
    assert loop.size_bytes(dev) == 4 * MiB
    loop.refresh_capacity(dev)
    assert loop.size_bytes(dev) == 12 * MiB


def test_find_resolves_symlinks(tmp_path: pathlib.Path, attached: list[str]) -> None:
    backing = _sparse(tmp_path / "real.img", 4 * MiB)
    link = tmp_path / "link.img"
    link.symlink_to(backing)
    dev = loop.attach(str(link))
    attached.append(dev)
    assert loop.find(str(backing)) == dev
    assert loop.find(str(link)) == dev
    assert loop.find(str(tmp_path / "absent.img")) is None


def test_bad_paths(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.InvalidArgument):
        loop.detach("/dev/sda")
    with pytest.raises(FileNotFoundError):
        loop.attach(str(tmp_path / "missing.img"))


def _churn(directory: str, stop_at: float) -> int:
    """Attach and detach loop devices until `stop_at` (runs in a child process)."""
    n = 0
    while time.monotonic() < stop_at:
        path = _sparse(pathlib.Path(directory) / f"churn{os.getpid()}-{n % 4}.img", 1 << 20)
        loop.detach(loop.attach(str(path)))
        n += 1
    return n


def test_find_survives_loops_detached_under_it(tmp_path: pathlib.Path, attached: list[str]) -> None:
    """Loop devices are machine-wide: while `find` scans /sys/block, other processes tear loops down,
    and reading a backing_file attribute removed between open() and read() answers ENODEV. That
    means "not attached", never an error (it once failed recovery and csi-sanity under load)."""
    target = _sparse(tmp_path / "target.img", 1 << 20)
    dev = loop.attach(str(target))
    attached.append(dev)
    stop_at = time.monotonic() + 4
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        churners = [pool.submit(_churn, str(tmp_path), stop_at) for _ in range(2)]
        scans = 0
        while time.monotonic() < stop_at:
            assert loop.find(str(target)) == dev
            scans += 1
        churned = sum(f.result() for f in churners)
    assert scans > 10 and churned > 10, (scans, churned)


def test_find_a_device_attached_from_a_mount_namespace_that_is_gone(
    tmp_path: pathlib.Path, attached: list[str]
) -> None:
    """A node plugin container attaches through its own mount of the pool directory; once that
    container is replaced, sysfs shows the file relative to the vanished mount ("/devices/1.img").
    The next container must still find the device, or it attaches the file a second time and
    deletes files that are still attached."""
    pool = tmp_path / "pool"
    (pool / "devices").mkdir(parents=True)
    backing = _sparse(pool / "devices" / "1.img", 4 * MiB)
    other = tmp_path / "other-pool" / "devices"
    other.mkdir(parents=True)
    same_suffix = _sparse(other / "1.img", 4 * MiB)
    inside = tmp_path / "container-view"
    inside.mkdir()
    res = subprocess.run(
        [
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind "{pool}" "{inside}" && losetup -f --show "{inside}/devices/1.img"',
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    dev = res.stdout.strip()
    attached.append(dev)
    assert loop.backing_file(dev) == "/devices/1.img"  # what the next container sees
    assert loop.find(str(backing)) == dev
    assert loop.identity(dev) == (os.stat(backing).st_dev, os.stat(backing).st_ino)
    assert loop.find(str(same_suffix)) is None  # same suffix, another file


def test_a_labelled_read_only_loop_stacked_on_another(tmp_path: pathlib.Path, attached: list[str]) -> None:
    """What the node's read-only views are made of: the label is kept by the kernel (status reads it
    back), the backing block device is known by number, and writes are refused."""
    backing = _sparse(tmp_path / "lower.img", 4 * MiB)
    lower = loop.attach(str(backing))
    attached.append(lower)
    view = loop.attach(lower, read_only=True, direct_io=False, label="csi-thin-ro:test")
    attached.insert(0, view)  # detached first: it holds the lower device open
    st = loop.status(view)
    assert st == loop.Status(
        backing_rdev=os.stat(lower).st_rdev, read_only=True, autoclear=False, label="csi-thin-ro:test"
    )
    assert view in loop.read_only_devices() and lower not in loop.read_only_devices()
    lower_status = loop.status(lower)
    assert lower_status is not None and not lower_status.read_only and lower_status.backing_rdev == 0
    # lo_file_name keeps the first 63 bytes of the path (pytest's tmp paths are often longer)
    assert lower_status.label == os.fsdecode(os.fsencode(str(backing.resolve()))[:63])
    with pytest.raises(OSError) as refused:
        fd = os.open(view, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 0)
        finally:
            os.close(fd)
    assert refused.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    with pytest.raises(errors.InvalidArgument):
        loop.attach(lower, read_only=True, label="x" * 64)
