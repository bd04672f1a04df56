"""DmThinBackend beside other people's devices (vm tier, real dm-thin on loop files in /scratch).

- A dead container's loop devices, backed by files named like our pool's on an XFS that was shut
  down (their status answers EIO), are someone else's in assembly, activate, teardown and destroy.
- A thin device open for a moment (blkid, udev, a reader) is removed once it is closed, within the
  deadline; one that stays open is DeviceBusy naming the process; a mounted one is busy at once.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from csi_thin import config, model
from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors
from csi_thin.dm import ioctl, loop
from csi_thin.pool import dmthin
from tests import stress

MiB = model.MiB


def _dl() -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(60)


@pytest.fixture
def tmp() -> Iterator[pathlib.Path]:
    path = pathlib.Path("/scratch") / f"foreign-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path


@pytest.fixture
def cfg(tmp: pathlib.Path) -> Iterator[config.PoolConfig]:
    cfg = config.PoolConfig(
        name=f"f{uuid.uuid4().hex[:6]}",
        backend=config.BackendKind.DMTHIN,
        state_dir=str(tmp / "state"),
        # named like the stale loops' files: sysfs shows "/data.img", a suffix of this path
        dmthin=config.DmThinConfig(
            data_file=str(tmp / "data.img"), data_size=256 * MiB, block_size=64 * 1024
        ),
    )
    yield cfg
    dmthin.DmThinBackend(cfg).destroy(deadline=_dl())
    assert not any(d.name.startswith(f"csi-thin-{cfg.name}-") for d in ioctl.Control().list_devices())


@pytest.fixture
def be(cfg: config.PoolConfig) -> dmthin.DmThinBackend:
    b = dmthin.DmThinBackend(cfg)
    b.assemble(deadline=_dl())
    return b


def test_a_stale_eio_loop_named_like_ours_is_not_ours(tmp: pathlib.Path, cfg: config.PoolConfig) -> None:
    with stress.stale_eio_loop(tmp) as stale:
        be = dmthin.DmThinBackend(cfg)
        assert be.metadata_is_blank()
        be.assemble(deadline=_dl())
        meta = loop.find(str(tmp / "data.img.meta"))
        data = loop.find(str(tmp / "data.img"))
        assert meta is not None and data is not None
        assert not {meta, data} & set(stale)
        be.assemble(deadline=_dl())  # again, live: the configured devices are found, not the stale ones
        be.create_thin(1, 16 * MiB, deadline=_dl())
        be.activate(1, 16 * MiB, deadline=_dl())
        assert be.active_ids(deadline=_dl()) == {1}
        assert be.device_ids(deadline=_dl()).keys() == {1}
        be.teardown(deadline=_dl())
        be.assemble(deadline=_dl())
        assert be.device_ids(deadline=_dl()).keys() == {1}
        be.destroy(deadline=_dl())
        for dev in stale:
            backing = loop.backing_file(dev)
            assert backing is not None and backing.lstrip("/") in stress.STALE_FILES, dev


_HOLDER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(dev: str, seconds: float) -> subprocess.Popen[str]:
    """A process with `dev` open, like blkid or a metrics agent reading it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, dev, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_deactivate_waits_out_a_transient_opener(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    path = be.activate(1, 16 * MiB, deadline=_dl())
    holder = _hold(path, 0.5)
    try:
        be.deactivate(1, deadline=_dl())
    finally:
        holder.kill()
        holder.wait()
    assert be.active_ids(deadline=_dl()) == set()


def test_a_device_that_stays_open_is_busy_with_its_holder_named(be: dmthin.DmThinBackend) -> None:
    be.create_thin(1, 16 * MiB, deadline=_dl())
    path = be.activate(1, 16 * MiB, deadline=_dl())
    holder = _hold(path, 300)
    try:
        started = time.monotonic()
        with pytest.raises(dm_errors.DeviceBusy, match=rf"held by: .*pid {holder.pid} \(python"):
            be.deactivate(1, deadline=deadline_mod.Deadline.after(1.5))
        assert time.monotonic() - started >= 1.0, "busy reported at once, not retried within the deadline"
        assert be.active_ids(deadline=_dl()) == {1}
    finally:
        holder.kill()
        holder.wait()
    be.deactivate(1, deadline=_dl())
    assert be.active_ids(deadline=_dl()) == set()


def test_a_mounted_device_is_busy_at_once(be: dmthin.DmThinBackend, tmp: pathlib.Path) -> None:
    be.create_thin(1, 64 * MiB, deadline=_dl())
    path = be.activate(1, 64 * MiB, deadline=_dl())
    mnt = tmp / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", path], check=True)
    subprocess.run(["mount", path, str(mnt)], check=True)
    try:
        started = time.monotonic()
        with pytest.raises(dm_errors.DeviceBusy, match=f"mounted at {mnt}"):
            be.deactivate(1, deadline=_dl())
        assert time.monotonic() - started < 10, "a mount here is not transient: no waiting for it"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    be.deactivate(1, deadline=_dl())


def test_teardown_waits_for_a_reader_of_its_loop_devices(be: dmthin.DmThinBackend, tmp: pathlib.Path) -> None:
    """A reader defers a loop detach to its last close; teardown returns once the loops are gone, so a
    re-assembly never builds the pool on a loop device about to vanish under it."""
    meta = loop.find(str(tmp / "data.img.meta"))
    assert meta is not None
    holder = _hold(meta, 0.5)
    try:
        be.teardown(deadline=_dl())
        assert loop.find(str(tmp / "data.img.meta")) is None
    finally:
        holder.kill()
        holder.wait()
    be.assemble(deadline=_dl())
    assert be.status(deadline=_dl()).healthy
