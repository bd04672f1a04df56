"""Other people's loop devices and transient openers never break us (root tier, real devices).

- A loop device left by a dead container, whose backing XFS was shut down (it answers EIO), is
  someone else's in every scan: assembly, recovery, activate, deactivate, teardown, destroy, and a
  whole driver start.
- A device claimed for a moment by another program (an fsck, a mount namespace cloned while it was
  mounted) is detached once it is let go, within the deadline; one that stays claimed is reported
  with who holds it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from csi_thin import deadline as deadline_mod
from csi_thin import demo, model
from csi_thin.csi.pb import csi_pb2
from csi_thin.dm import loop
from csi_thin.pool import reflink
from tests import stress
from tests.root import test_reflink

MiB = model.MiB


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    yield tmp_path
    test_reflink.cleanup_under(tmp_path)


@pytest.fixture
def stale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with stress.stale_eio_loop(tmp_path_factory.mktemp("dead-container")) as devs:
        yield devs
    for dev in devs:
        assert loop.backing_file(dev) is None


@pytest.fixture
def test_pool(workdir: pathlib.Path) -> reflink.ReflinkBackend:
    be = reflink.ReflinkBackend(test_reflink.make_config(workdir))
    be.assemble(deadline=deadline_mod.Deadline.after(60))
    return be


def _untouched(stale: list[str]) -> None:
    for dev in stale:
        backing = loop.backing_file(dev)
        assert backing is not None and backing.lstrip("/") in stress.STALE_FILES, (
            f"someone else's {dev} was touched"
        )


def test_every_reflink_scan_passes_over_a_stale_eio_loop(workdir: pathlib.Path, stale: list[str]) -> None:
    d = deadline_mod.Deadline.after(60)
    pool = reflink.ReflinkBackend(test_reflink.make_config(workdir))
    pool.assemble(deadline=d)
    for dev_id in (0, 1, 2):  # the stale loops' files are "/devices/0.img".."/devices/3.img"
        pool.create_thin(dev_id, 8 * MiB, deadline=d)
        assert loop.find(os.path.join(workdir, "pool", "devices", f"{dev_id}.img")) is None
    assert pool.active_ids(deadline=d) == set()
    dev = pool.activate(1, 8 * MiB, deadline=d)
    assert dev not in stale
    assert pool.active_ids(deadline=d) == {1}
    assert pool.device_path(1) == dev
    pool.create_snap(3, 1, 8 * MiB, deadline=d)
    pool.deactivate(2, deadline=d)  # not active: nothing to do, nothing of someone else's touched
    pool.deactivate(1, deadline=d)
    assert pool.active_ids(deadline=d) == set()
    pool.activate(0, 8 * MiB, deadline=d)
    pool.teardown(deadline=d)
    _untouched(stale)
    pool.assemble(deadline=d)  # assembly again, now with device files that match the stale suffixes
    assert pool.active_ids(deadline=d) == set()
    pool.destroy(deadline=d)
    _untouched(stale)


def test_the_driver_starts_and_serves_beside_a_stale_eio_loop(
    workdir: pathlib.Path, stale: list[str]
) -> None:
    """The issue as seen: `INTERNAL: status of /dev/loopN: Input/output error` at every start."""
    config = demo.pool_config(workdir, "reflink")
    cap = demo.mount_cap("ext4")
    stage, target = workdir / "stage", workdir / "target"
    try:
        for restart in range(2):  # the second start recovers a pool whose device files match
            with demo.driver(config, workdir / "csi.sock") as proc:
                channel = grpc.insecure_channel(f"unix://{workdir / 'csi.sock'}")
                with channel:
                    d = demo.Demo(channel)
                    demo.wait_ready(d, proc)
                    vols = [d.create(f"pvc-{restart}-{i}", 16 * MiB, cap) for i in range(2)]
                    d.stage(vols[0], cap, stage)
                    d.publish(vols[0], cap, stage, target)
                    (target / "hello").write_text("works")
                    d.release(vols[0].volume_id, stage, target)
                    listed = d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
                    assert len(listed) == 2 * (restart + 1)
                proc.terminate()
                proc.wait(timeout=30)
        _untouched(stale)
    finally:
        problems = demo.cleanup(workdir, config)
        assert not problems, problems
    _untouched(stale)


_HOLDER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(dev: str, seconds: float) -> subprocess.Popen[str]:
    """A process holding `dev` exclusively (like fsck, or a mount in a cloned namespace)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, dev, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_deactivate_waits_out_a_transient_exclusive_holder(test_pool: reflink.ReflinkBackend) -> None:
    d = deadline_mod.Deadline.after(60)
    test_pool.create_thin(1, 8 * MiB, deadline=d)
    dev = test_pool.activate(1, 8 * MiB, deadline=d)
    holder = _hold(dev, 0.5)
    try:
        test_pool.deactivate(1, deadline=d)
    finally:
        holder.kill()
        holder.wait()
    assert test_pool.active_ids(deadline=d) == set()


def test_a_device_that_stays_claimed_is_busy_with_its_holder_named(test_pool: reflink.ReflinkBackend) -> None:
    d = deadline_mod.Deadline.after(60)
    test_pool.create_thin(1, 8 * MiB, deadline=d)
    dev = test_pool.activate(1, 8 * MiB, deadline=d)
    holder = _hold(dev, 120)
    try:
        started = time.monotonic()
        with pytest.raises(reflink.DeviceBusy, match=rf"held by: .*pid {holder.pid} \(python") as busy:
            test_pool.deactivate(1, deadline=deadline_mod.Deadline.after(1.5))
        assert time.monotonic() - started >= 1.0, "busy reported at once, not retried within the deadline"
        assert busy.value.code == "FAILED_PRECONDITION"
        assert test_pool.device_path(1) == dev  # nothing changed
    finally:
        holder.kill()
        holder.wait()
    test_pool.deactivate(1, deadline=d)
    assert test_pool.active_ids(deadline=d) == set()


def test_a_mounted_device_is_busy_at_once(test_pool: reflink.ReflinkBackend, workdir: pathlib.Path) -> None:
    d = deadline_mod.Deadline.after(60)
    test_pool.create_thin(1, 64 * MiB, deadline=d)
    dev = test_pool.activate(1, 64 * MiB, deadline=d)
    mnt = workdir / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        started = time.monotonic()
        with pytest.raises(reflink.DeviceBusy, match=f"mounted at {mnt}"):
            test_pool.deactivate(1, deadline=d)
        assert time.monotonic() - started < 5, "a mount here is not transient: no waiting for it"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    test_pool.deactivate(1, deadline=d)
