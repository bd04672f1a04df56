"""Loop devices that are not ours, and loop numbers other processes take or free, with the kernel's
answers injected at the syscall seam (sysfs reads, open of /dev/loopN, the loop ioctls).

A node has loop devices of snaps, other drivers and dead containers. One whose backing filesystem
was shut down answers EIO to LOOP_GET_STATUS64; that once made every driver start fail. Any error
from a loop device that is not provably ours means "not ours" in every scan.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import fcntl
import io
import os
import pathlib
from typing import Any

import pytest

from csi_thin import config, errors
from csi_thin import deadline as deadline_mod
from csi_thin.dm import loop
from csi_thin.pool import reflink

_GET_STATUS64 = 0x4C05
_CONFIGURE = 0x4C0A
_CLR_FD = 0x4C01
_CTL_GET_FREE = 0x4C82


@dataclasses.dataclass
class Loop:
    """One fake /dev/loopN: its sysfs backing_file (or an errno), its status answer (or an errno)."""

    backing: str | int | None = None
    status_errno: int = 0
    open_errno: int = 0
    configure_errno: int = 0
    ident: tuple[int, int] = (0, 0)


@dataclasses.dataclass
class Kernel:
    loops: dict[int, Loop] = dataclasses.field(default_factory=dict)
    free: list[int] = dataclasses.field(default_factory=list)  # answers to LOOP_CTL_GET_FREE
    fds: dict[int, str] = dataclasses.field(default_factory=dict)
    configured: list[int] = dataclasses.field(default_factory=list)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    real_open, real_os_open, real_listdir, real_ioctl = builtins.open, os.open, os.listdir, fcntl.ioctl

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        p = str(path)
        if p.startswith("/sys/block/"):
            name = p.split("/")[3]
            lo = k.loops.get(int(name[4:])) if name.startswith("loop") else None
            if lo is None or lo.backing is None or not p.endswith("/loop/backing_file"):
                raise FileNotFoundError(errno.ENOENT, "absent", p)
            if isinstance(lo.backing, int):
                raise OSError(lo.backing, "injected", p)
            return io.StringIO(lo.backing + "\n")
        return real_open(path, *args, **kwargs)

    def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        p = str(path)
        if p == "/dev/loop-control" or p.startswith("/dev/loop"):
            if p != "/dev/loop-control":
                lo = k.loops.get(int(p[9:]))
                if lo is None:
                    raise FileNotFoundError(errno.ENOENT, "absent", p)
                if lo.open_errno:
                    raise OSError(lo.open_errno, "injected", p)
            fd = real_os_open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            k.fds[fd] = p
            return fd
        return real_os_open(path, flags, *args, **kwargs)

    def fake_listdir(path: Any = ".") -> list[str]:
        if str(path) == "/sys/block":
            return [f"loop{n}" for n in sorted(k.loops)] + ["sda"]
        return real_listdir(path)

    def fake_ioctl(fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        p = k.fds.get(fd)
        if p is None:
            return real_ioctl(fd, request, arg, *rest)
        if p == "/dev/loop-control":
            assert request == _CTL_GET_FREE
            return k.free.pop(0)
        number = int(p[9:])
        lo = k.loops[number]
        if request == _GET_STATUS64:
            if lo.status_errno:
                raise OSError(lo.status_errno, os.strerror(lo.status_errno))
            if lo.backing is None:
                raise OSError(errno.ENXIO, "unbound")
            return loop._INFO64.pack(lo.ident[0], lo.ident[1], *([0] * 7), b"", b"", b"", 0, 0)
        if request == _CONFIGURE:
            if lo.configure_errno:
                raise OSError(lo.configure_errno, os.strerror(lo.configure_errno))
            k.configured.append(number)
            return arg
        if request == _CLR_FD:
            lo.backing = None
            return 0
        raise AssertionError(f"unexpected ioctl {request:#x} on {p}")

    def fake_close(fd: int) -> None:
        k.fds.pop(fd, None)
        real_close(fd)

    real_close = os.close
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "listdir", fake_listdir)
    monkeypatch.setattr(os, "close", fake_close)
    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(loop, "_ensure_node", lambda *a, **k: None)
    return k


FOREIGN_ERRNOS = [errno.EIO, errno.ENXIO, errno.ENODEV, errno.EACCES]


@pytest.mark.parametrize("code", FOREIGN_ERRNOS)
def test_find_takes_an_unreadable_status_as_not_ours(
    kernel: Kernel, tmp_path: pathlib.Path, code: int
) -> None:
    want = tmp_path / "pool" / "devices" / "1.img"
    want.parent.mkdir(parents=True)
    want.touch()
    st = os.stat(want)
    # a dead container's loop: its file shown relative to a vanished mount, a suffix of ours
    kernel.loops[0] = Loop(backing="/devices/1.img", status_errno=code)
    kernel.loops[1] = Loop(backing="/pool/devices/1.img", ident=(st.st_dev, st.st_ino))
    assert loop.find(str(want)) == "/dev/loop1"
    del kernel.loops[1]
    assert loop.find(str(want)) is None


@pytest.mark.parametrize("code", [*FOREIGN_ERRNOS, errno.ENOMEM])
def test_find_takes_an_unreadable_sysfs_attribute_as_not_ours(
    kernel: Kernel, tmp_path: pathlib.Path, code: int
) -> None:
    want = str(tmp_path / "7.img")
    kernel.loops[0] = Loop(backing=code)
    kernel.loops[1] = Loop(backing="/other.img")
    kernel.loops[2] = Loop(backing=want)
    assert loop.find(want) == "/dev/loop2"


@pytest.mark.parametrize("code", FOREIGN_ERRNOS)
def test_open_failure_of_a_foreign_loop_is_not_ours(
    kernel: Kernel, tmp_path: pathlib.Path, code: int
) -> None:
    want = tmp_path / "devices" / "3.img"
    want.parent.mkdir()
    want.touch()
    kernel.loops[4] = Loop(backing="/devices/3.img", open_errno=code)
    assert loop.find(str(want)) is None


def _reflink_backend(tmp_path: pathlib.Path) -> reflink.ReflinkBackend:
    directory = tmp_path / "pool"
    (directory / "devices").mkdir(parents=True, exist_ok=True)
    (directory / "transaction_id").write_text("0\n")
    for n in (1, 2):
        (directory / "devices" / f"{n}.img").touch()
    return reflink.ReflinkBackend(
        config.PoolConfig(
            name="p",
            backend=config.BackendKind.REFLINK,
            state_dir=str(tmp_path / "state"),
            reflink=config.ReflinkConfig(directory=str(directory)),
        )
    )


@pytest.mark.parametrize("code", FOREIGN_ERRNOS)
def test_reflink_scans_pass_over_a_stale_eio_loop(kernel: Kernel, tmp_path: pathlib.Path, code: int) -> None:
    """The scans of start-up recovery (active_ids), deactivate, teardown and destroy: a stale loop
    whose path is a suffix of one of ours but whose status fails is someone else's."""
    be = _reflink_backend(tmp_path)
    ours = os.stat(tmp_path / "pool" / "devices" / "2.img")
    kernel.loops[0] = Loop(backing="/devices/1.img", status_errno=code)
    kernel.loops[1] = Loop(backing="/devices/2.img", ident=(ours.st_dev, ours.st_ino))
    d = deadline_mod.Deadline.after(10)
    assert be.active_ids(deadline=d) == {2}
    be.deactivate(1, deadline=d)  # not active: nothing to do, the stale loop is left alone
    assert kernel.loops[0].backing == "/devices/1.img"
    be.teardown(deadline=d)
    assert kernel.loops[0].backing == "/devices/1.img", "someone else's loop device was detached"
    assert kernel.loops[1].backing is None
    be.destroy(deadline=d)
    assert kernel.loops[0].backing == "/devices/1.img"


def test_attach_takes_another_number_when_the_free_one_vanishes(
    kernel: Kernel, tmp_path: pathlib.Path
) -> None:
    """LOOP_CTL_GET_FREE races are normal: another process may take the number (EBUSY at configure)
    or tear it down before we open it (ENXIO/ENOENT at open). Attach asks again for another."""
    backing = tmp_path / "f.img"
    backing.write_bytes(b"\0" * 4096)
    kernel.loops[3] = Loop(open_errno=errno.ENXIO)  # being torn down by another process
    kernel.loops[4] = Loop(configure_errno=errno.EBUSY)  # configured by another process first
    kernel.free = [3, 5, 4, 6]  # loop5 vanishes entirely (ENOENT)
    kernel.loops[6] = Loop()
    dev = loop.attach(str(backing), direct_io=False, deadline=deadline_mod.Deadline.after(10))
    assert dev == "/dev/loop6"
    assert kernel.configured == [6]


def test_attach_gives_up_at_the_deadline_not_after_a_count(kernel: Kernel, tmp_path: pathlib.Path) -> None:
    backing = tmp_path / "f.img"
    backing.write_bytes(b"\0" * 4096)
    kernel.loops[7] = Loop(configure_errno=errno.EBUSY)
    kernel.free = [7] * 100_000
    d = deadline_mod.Deadline.after(0.5)
    with pytest.raises(errors.Unavailable, match="no free loop device"):
        loop.attach(str(backing), direct_io=False, deadline=d)
    assert d.remaining() < 0.25, "gave up after a fixed count, long before the deadline"


def test_read_only_device_scan_passes_over_an_unreadable_loop(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's scan for its read-only views reads every loop device's sysfs: one whose backing
    file cannot be read (EIO, EACCES) is not a view of ours, never an error of the scan."""
    kernel.loops[3] = Loop(backing=errno.EIO)
    kernel.loops[4] = Loop(backing=errno.EACCES)
    kernel.loops[5] = Loop(backing="/srv/view.img")
    fake_open = builtins.open

    def open_ro(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/sys/block/loop") and str(path).endswith("/ro"):
            return io.StringIO("1\n")
        return fake_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_ro)
    assert loop.read_only_devices() == ["/dev/loop5"]
