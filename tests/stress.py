"""A node's normal background noise, made on purpose while tests run (`CSI_THIN_STRESS=1`).

On a real node, loop devices come and go (snaps, other drivers, containers), programs like blkid,
udev, multipathd and cadvisor open block devices for a moment, and some loop devices are left
behind by containers that died with a mount. The driver must not care. This module makes that
noise, for the root tier (tests/root/conftest.py) and for single tests:

- `stale_eio_loop`: loop devices whose backing files live on an XFS that was shut down and then
  lazily unmounted, as a dead container leaves them: sysfs shows "/devices/<n>.img" (a suffix of
  every reflink pool's device paths) and LOOP_GET_STATUS64 answers EIO.
- `Churn` (`python -m tests.stress`): a separate process that, bounded in rate and stopping on its
  own, attaches and detaches loop devices of its own (files in its own directory) and opens and
  reads loop devices whose backing files lie under the given roots (the test session's, i.e.
  ours), O_RDONLY for a moment, like blkid. It touches nothing else: other people's loop devices
  are never opened, detached or held.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType

from csi_thin import deadline as deadline_mod
from csi_thin import runner
from csi_thin.dm import loop

ENV = "CSI_THIN_STRESS"
STALE_ENV = "CSI_THIN_STRESS_STALE"
#: the stress process stops on its own after this long even if nobody stops it
DEFAULT_SECONDS = 3600.0
#: operations per second (loop attach/detach counts one, an open+read counts one)
DEFAULT_RATE = 20.0

_XFS_MIN = 300 * 1024 * 1024  # mkfs.xfs refuses smaller filesystems


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def stale_enabled() -> bool:
    return os.environ.get(STALE_ENV, "") not in ("", "0")


def _sparse(path: pathlib.Path, size: int) -> pathlib.Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


#: the files a dead container's loop devices are backed by, relative to its vanished mount: their
#: paths in sysfs are suffixes of a reflink pool's device files and of a dm-thin pool's loop files
STALE_FILES = (
    "devices/0.img",
    "devices/1.img",
    "devices/2.img",
    "devices/3.img",
    "data.img",
    "data.img.meta",
)


@contextlib.contextmanager
def stale_eio_loop(workdir: pathlib.Path, files: tuple[str, ...] = STALE_FILES) -> Iterator[list[str]]:
    """Loop devices left by a dead container: backed by `files` on an XFS that was shut down
    (`xfs_io -x -c shutdown`) and lazily unmounted, so sysfs shows "/<file>" and their status answers
    EIO. Yields their device paths; everything is detached and removed afterwards (only what this
    made)."""
    d = deadline_mod.Deadline.after(120)
    image = _sparse(workdir / "dead-container-xfs.img", _XFS_MIN)
    runner.run(["mkfs.xfs", "-q", "-f", str(image)], deadline=d)
    outer = loop.attach(str(image), direct_io=False)
    mnt = workdir / "dead-container-mnt"
    mnt.mkdir(exist_ok=True)
    inner: list[str] = []
    mounted = False
    try:
        runner.run(["mount", "-t", "xfs", outer, str(mnt)], deadline=d)
        mounted = True
        for name in files:
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            inner.append(loop.attach(str(_sparse(mnt / name, 1 << 20))))
        runner.run(["xfs_io", "-x", "-c", "shutdown", str(mnt)], deadline=d)
        runner.run(["umount", "-l", str(mnt)], deadline=d)
        mounted = False
        for dev in inner:  # the environment is what it claims to be, or the test means nothing
            backing = loop.backing_file(dev)
            assert backing is not None and backing.lstrip("/") in files, (dev, backing)
            assert _status_errno(dev) == errno.EIO, f"{dev} answers its status on a shut-down XFS"
        yield inner
    finally:
        if mounted:
            runner.run(["umount", "-l", str(mnt)], deadline=d, check=False)
        for dev in inner:
            loop.detach(dev)
        # the lazily unmounted XFS lets go of its device once the last file on it is closed
        loop.detach(outer)
        for _ in d.backoff(first=0.01, cap=0.2):
            if loop.find(str(image)) is None:
                break
        else:
            raise AssertionError(f"{outer} ({image}) still attached after cleanup")
        image.unlink()


def _status_errno(dev: str) -> int:
    """The errno LOOP_GET_STATUS64 answers on `dev` (0: it answered)."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, 0x4C05, bytes(232))  # LOOP_GET_STATUS64, struct loop_info64
    except OSError as exc:
        return exc.errno or 0
    finally:
        os.close(fd)
    return 0


class Churn:
    """The stress process (`python -m tests.stress`), started and stopped by the caller."""

    def __init__(
        self, workdir: pathlib.Path, roots: list[pathlib.Path], *, seconds: float, rate: float
    ) -> None:
        self._workdir = workdir
        self._roots = roots
        self._seconds = seconds
        self._rate = rate
        self.proc: subprocess.Popen[str] | None = None
        self.summary = ""

    def __enter__(self) -> Churn:
        argv = [sys.executable, "-m", "tests.stress", "--dir", str(self._workdir)]
        argv += ["--seconds", str(self._seconds), "--rate", str(self._rate)]
        for root in self._roots:
            argv += ["--root", str(root)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the process we started, by its pid
        out, _ = self.proc.communicate(timeout=60)
        self.summary = out.strip()
        if self.proc.returncode != 0:
            raise AssertionError(f"stress process failed (exit {self.proc.returncode}): {self.summary}")


def _ours(roots: list[str]) -> list[str]:
    """Bound loop devices whose backing file lies under one of `roots`."""
    return [dev for dev, backing in loop.scan() if any(backing.startswith(r) for r in roots)]


def _peek(dev: str) -> bool:
    """What blkid does: open read-only, read the first blocks, close. Any error is the device going
    away under us (ENXIO, ENOENT...): that is the product's business, not the reader's."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        with contextlib.suppress(OSError):
            os.pread(fd, 4096, 0)
        return True
    finally:
        os.close(fd)


def _churn_once(workdir: pathlib.Path, n: int) -> bool:
    """Attach one of our own small files to a loop device, read it, and detach it."""
    path = workdir / f"churn-{n % 4}.img"
    if not path.exists():
        _sparse(path, 1 << 20)
    try:
        dev = loop.attach(str(path), direct_io=False, deadline=deadline_mod.Deadline.after(10))
    except Exception as exc:
        print(f"attach failed: {exc}", file=sys.stderr)
        return False
    _peek(dev)
    loop.detach(dev)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True, help="a directory of the stress's own files")
    parser.add_argument("--root", action="append", default=[], help="open loop devices of files under it")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    roots = [os.path.realpath(r) + "/" for r in args.root]
    stop = False

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    parent = os.getppid()
    end = time.monotonic() + args.seconds
    rng = random.Random(os.getpid())
    counts = {"churned": 0, "churn_failed": 0, "peeked": 0, "peek_gone": 0}
    n = 0
    while not stop and time.monotonic() < end and os.getppid() == parent:
        n += 1
        if n % 2:
            counts["churned" if _churn_once(workdir, n) else "churn_failed"] += 1
        else:
            devs = _ours(roots)
            if devs:
                counts["peeked" if _peek(rng.choice(devs)) else "peek_gone"] += 1
        time.sleep(1.0 / args.rate)
    for path in workdir.glob("churn-*.img"):
        # a churn interrupted between attach and detach: its loop device is ours to detach
        for dev, backing in loop.scan():
            if backing == str(path.resolve()):
                loop.detach(dev)
        path.unlink()
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts["churn_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
